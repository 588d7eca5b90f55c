"""Text sources -> documents: files built once into a TFDS array_record dataset, or a prepared one.

Choices:
- Sources: `sources` is a comma-separated list of `SPEC[@WEIGHT]`. A SPEC is a directory, a file or
  a glob of `.txt`, `.jsonl` and `.parquet` files, or `tfds:NAME:SPLIT` for a dataset already
  prepared (as array_record) in `tfds_data_dir` (NAME may carry a config and version:
  `tfds:c4/en:3.0.1:train`). File sources are built once into a TFDS array_record dataset under
  `<cache_dir>/<fingerprint>/`, the fingerprint hashing paths, sizes and mtimes plus the rules
  below, so a changed source builds afresh and an unchanged one is reused.
- Document: a `.txt` file is cut at blank lines into pieces of at least `DOC_CHARS` (2048) characters
  (a piece with no blank line for 8x that is cut at a newline), so the 5 MB Shakespeare corpus gives
  about 2,300 documents; every document is an exact substring of its file. A `.jsonl` line or a
  `.parquet` row is one document: its `text_field`, whole, however long. Whitespace-only documents
  are dropped.
- Bad input is an error naming the path (and line) and the fix: a missing path, a directory or glob
  with no source files, a file that is not UTF-8, a jsonl line that is not JSON or lacks the field,
  a parquet file without the column. With `skip_bad_records=True` bad files and records are skipped
  instead, counted in `Sources.skipped` (and so `Pipeline.skipped`) and logged.
- Eval split: `eval_files` whole files of the first source, taken at a fixed stride from the sorted
  file names (42 files, eval_files=2 -> the 11th and 32nd), recorded in `Sources.eval_file_names`;
  or, with `eval_source`, all of another SPEC (required when the first source is a TFDS dataset).
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import importlib.resources
import json
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from absl import logging
import tensorflow_datasets as tfds

DOC_CHARS = 2048
MAX_DOC_CHARS = 8 * DOC_CHARS
_FORMAT = 2  # bump when the document rules change, so caches rebuild
SUFFIXES = ('.txt', '.jsonl', '.parquet')


def default_source_dir() -> str:
  """The Shakespeare corpus shipped inside the package."""
  return str(importlib.resources.files('jaxllm') / 'corpus' / 'shakespeare')


def parse_sources(text: str) -> list[tuple[str, float]]:
  """'SPEC[@WEIGHT], ...' -> [(spec, weight)]; weights default to 1 and need not sum to 1."""
  out = []
  for item in filter(None, (s.strip() for s in text.split(','))):
    spec, _, weight = item.rpartition('@') if '@' in item else (item, '', '1')
    try:
      w = float(weight)
    except ValueError:
      w = -1.0
    if not spec or not w > 0:
      raise ValueError(f'source {item!r}: write SPEC or SPEC@WEIGHT with a weight > 0')
    out.append((spec, w))
  if not out:
    raise ValueError('no sources given: name a directory, a glob, a file or tfds:NAME:SPLIT')
  return out


def list_source_files(spec: str) -> list[Path]:
  """The .txt/.jsonl/.parquet files of a directory, a file or a glob, sorted."""
  fix = 'point the source at UTF-8 .txt, .jsonl or .parquet files'
  if glob.has_magic(spec):
    files = sorted(Path(p) for p in glob.glob(spec, recursive=True))
    if not files:
      raise FileNotFoundError(f'{spec}: the glob matches nothing; {fix}')
  else:
    path = Path(spec)
    if not path.exists():
      raise FileNotFoundError(f'{path}: no such file or directory; {fix}, or leave the source empty '
                              'for the embedded corpus')
    files = [path] if path.is_file() else sorted(path.iterdir())
  files = [f for f in files if f.is_file() and f.suffix in SUFFIXES]
  if not files:
    raise ValueError(f'{spec}: no .txt, .jsonl or .parquet files in it; {fix}')
  return files


def list_text_files(source_dir: str) -> list[Path]:
  return list_source_files(source_dir)


def read_text(path: Path) -> str:
  try:
    return path.read_bytes().decode('utf-8')
  except UnicodeDecodeError as e:
    raise ValueError(f'{path}: not valid UTF-8 (byte {e.start}); re-encode it '
                     '(iconv -t UTF-8) or remove it from the source') from None


def split_documents(text: str) -> list[str]:
  """Cuts text at blank lines into documents of at least DOC_CHARS characters (see module doc)."""
  pieces, start = [], 0
  for m in re.finditer(r'\n\n+', text):
    if m.end() - start >= DOC_CHARS:
      pieces.append(text[start:m.end()])
      start = m.end()
  pieces.append(text[start:])
  docs = []
  for piece in pieces:
    while len(piece) > MAX_DOC_CHARS:  # text without blank lines: cut at a newline if any
      cut = piece.rfind('\n', 0, MAX_DOC_CHARS) + 1 or MAX_DOC_CHARS
      docs.append(piece[:cut])
      piece = piece[cut:]
    docs.append(piece)
  return [d for d in docs if d.strip()]


class BadRecords:
  """Raises on bad input, or with skip=True counts it (per file) and logs the first few."""

  def __init__(self, skip: bool):
    self.skip, self.counts = skip, {}

  def __call__(self, where: str, problem: str, fix: str) -> None:
    if not self.skip:
      raise ValueError(f'{where}: {problem}; {fix}, or set skip_bad_records=True to skip and count '
                       'such records')
    path = where.rsplit(':', 1)[0] if where.rsplit(':', 1)[-1].isdigit() else where
    self.counts[path] = self.counts.get(path, 0) + 1
    if sum(self.counts.values()) <= 10:
      logging.warning('skipping %s: %s', where, problem)


def _jsonl_documents(path: Path, field: str, bad: BadRecords) -> Iterator[str]:
  with open(path, 'rb') as f:
    for n, line in enumerate(f, 1):
      if not line.strip():
        continue
      where = f'{path}:{n}'
      try:
        record = json.loads(line.decode('utf-8'))
      except UnicodeDecodeError:
        bad(where, 'not valid UTF-8', 're-encode the file (iconv -t UTF-8)')
        continue
      except ValueError:
        bad(where, 'not a JSON object', 'fix or delete the line')
        continue
      text = record.get(field) if isinstance(record, dict) else None
      if not isinstance(text, str):
        keys = ', '.join(record) if isinstance(record, dict) else type(record).__name__
        bad(where, f'no string field {field!r} (has: {keys})', 'set text_field to the field that holds the text')
        continue
      yield text


def _parquet_documents(path: Path, field: str, bad: BadRecords) -> Iterator[str]:
  # Imported here: pyarrow starts a thread (and with it a malloc arena) on import, which would
  # keep runtime.reuse_host_memory from covering XLA's threads.
  import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
  f = pq.ParquetFile(path)
  if field not in f.schema_arrow.names:
    raise ValueError(f'{path}: no column {field!r} (has: {", ".join(f.schema_arrow.names)}); set '
                     'text_field to the column that holds the text')
  row = 0
  for batch in f.iter_batches(columns=[field], batch_size=4096):
    for text in batch.column(0).to_pylist():
      row += 1
      if isinstance(text, bytes):
        try:
          text = text.decode('utf-8')
        except UnicodeDecodeError:
          text = None
      if not isinstance(text, str):
        bad(f'{path}:{row}', f'row {row} has no UTF-8 text in {field!r}', 'fill or drop the row')
        continue
      yield text


def file_documents(path: Path, *, text_field: str, bad: BadRecords) -> Iterator[str]:
  """The documents of one source file (see the module doc); bad input goes to `bad`."""
  if path.suffix == '.jsonl':
    docs = _jsonl_documents(path, text_field, bad)
  elif path.suffix == '.parquet':
    docs = _parquet_documents(path, text_field, bad)
  else:
    try:
      docs = split_documents(path.read_bytes().decode('utf-8'))
    except UnicodeDecodeError as e:
      bad(str(path), f'not valid UTF-8 (byte {e.start})', 're-encode it (iconv -t UTF-8) or remove it')
      return
  yield from (d for d in docs if d.strip())


def pick_eval_files(names: list[str], eval_files: int) -> list[str]:
  """`eval_files` names at a fixed stride through the sorted list, centred in each stride."""
  n = len(names)
  if not 0 < eval_files < n:
    raise ValueError(f'eval_files={eval_files}: must be between 1 and {n - 1} for {n} source files '
                     '(or set eval_source)')
  names = sorted(names)
  return [names[(2 * i + 1) * n // (2 * eval_files)] for i in range(eval_files)]


class JaxllmTextDocuments(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Documents of source files; split 'eval' holds out whole files (only when there are any)."""

  VERSION = tfds.core.Version('1.0.0')

  def __init__(self, *, files: list[Path], eval_names: list[str], text_field: str = 'text',
               skip_bad_records: bool = False, **kwargs: Any):
    self._files, self._eval_names, self._field = files, eval_names, text_field
    self.bad = BadRecords(skip_bad_records)
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    # DatasetInfo(builder=self) and not dataset_info_from_configs(): the latter needs a package dir.
    return tfds.core.DatasetInfo(
        builder=self, description=f'eval files: {", ".join(self._eval_names)}',
        features=tfds.features.FeaturesDict({'text': tfds.features.Text(), 'file': tfds.features.Text()}),
        disable_shuffling=True)  # keep file order: eval reads deterministically, train is shuffled by grain

  def _split_generators(self, dl_manager: Any) -> dict[str, Any]:
    ev = set(self._eval_names)
    splits = {'train': self._generate_examples([f for f in self._files if str(f) not in ev])}
    if ev:
      splits['eval'] = self._generate_examples([f for f in self._files if str(f) in ev])
    return splits

  def _generate_examples(self, files: list[Path]) -> Iterator[tuple[str, dict[str, str]]]:
    for f in files:
      for i, doc in enumerate(file_documents(f, text_field=self._field, bad=self.bad)):
        yield f'{f}:{i:09d}', {'text': doc, 'file': f.name}



@dataclasses.dataclass
class Documents:
  """Random-access documents of one source; `key` changes whenever their content may have, and so
  does `fingerprint` (which, unlike `key`, does not move with the cache directory)."""

  name: str
  key: str
  data: Any  # a tfds data source: data[i][field] is the UTF-8 text
  field: str = 'text'
  fingerprint: str = ''

  def __len__(self) -> int:
    return len(self.data)

  def text(self, i: int) -> str:
    t = self.data[int(i)][self.field]
    return t.decode('utf-8') if isinstance(t, bytes) else t


@dataclasses.dataclass
class Sources:
  """What open_sources() found: train sources with weights, the eval documents, bad-record counts."""

  train: list[Documents]
  weights: list[float]
  eval: Documents
  eval_file_names: list[str]
  data_dir: str  # the first source's dataset directory
  skipped: dict[str, int]

  def fingerprint(self) -> dict[str, dict[str, str]]:
    """{'train': {source: fingerprint}, 'eval': {...}}: what a checkpoint's data position assumes
    (compared at resume: jaxllm.checkpoint)."""
    return {'train': {d.name: f'{d.fingerprint} {len(d)}' for d in self.train},
            'eval': {self.eval.name: f'{self.eval.fingerprint} {len(self.eval)}'}}


def _open_files(spec: str, *, cache_dir: str, eval_files: int, text_field: str,
                skip_bad_records: bool) -> tuple[Any, list[str], dict[str, int], str]:
  """Builds (or reuses) the array_record dataset of a file source; returns (builder, eval paths,
  skipped, fingerprint: the hash of the files, their sizes and mtimes and the document rules)."""
  files = list_source_files(spec)
  eval_paths = pick_eval_files([str(f) for f in files], eval_files) if eval_files else []
  key = hashlib.sha256(f'{_FORMAT} {DOC_CHARS} {text_field} {skip_bad_records} {eval_paths}'.encode())
  for f in files:
    st = f.stat()
    key.update(f'{f} {st.st_size} {st.st_mtime_ns}\n'.encode())
  fingerprint = key.hexdigest()[:16]
  builder = JaxllmTextDocuments(files=files, eval_names=eval_paths, text_field=text_field,
                                skip_bad_records=skip_bad_records, file_format='array_record',
                                data_dir=str(Path(cache_dir) / fingerprint))
  skipped_file = Path(builder.data_dir) / 'skipped.json'
  if not builder.is_prepared():
    tfds.display_progress_bar(False)  # a one-second build need not flood the training log
    builder.download_and_prepare()
    skipped_file.write_text(json.dumps(builder.bad.counts))
  skipped = json.loads(skipped_file.read_text()) if skipped_file.exists() else {}
  if skipped:
    logging.warning('%s: skipped %d bad files or records (skip_bad_records=True): %s', spec,
                    sum(skipped.values()), skipped)
  return builder, eval_paths, skipped, fingerprint


def _open_tfds(spec: str, *, tfds_data_dir: str | None, text_field: str) -> Documents:
  """`tfds:NAME:SPLIT`, already prepared as array_record; nothing is downloaded."""
  name, _, split = spec.removeprefix('tfds:').rpartition(':')
  if not name or not split:
    raise ValueError(f'{spec}: write tfds:NAME:SPLIT, for example tfds:lm1b:train or tfds:c4/en:3.0.1:train')
  where = tfds_data_dir or 'the default TFDS data_dir'
  try:
    builder = tfds.builder(name, data_dir=tfds_data_dir)
  except Exception as e:  # tfds raises several types for an unknown or unprepared name
    raise FileNotFoundError(f'{spec}: no dataset {name!r} in {where} ({type(e).__name__}); prepare it '
                            'there with `tfds build --file_format=array_record` or set tfds_data_dir') from None
  if not builder.is_prepared():
    raise FileNotFoundError(f'{spec}: not prepared in {builder.data_dir}; run `tfds build {name} '
                            '--file_format=array_record` there or set tfds_data_dir')
  if split not in builder.info.splits:
    raise ValueError(f'{spec}: no split {split!r} (has: {", ".join(builder.info.splits)})')
  if text_field not in builder.info.features:
    raise ValueError(f'{spec}: no feature {text_field!r} (has: {", ".join(builder.info.features)}); '
                     'set text_field')
  try:
    data = builder.as_data_source(split)
  except Exception as e:
    raise ValueError(f'{spec}: cannot be read without TensorFlow ({str(e).splitlines()[0]}); rebuild '
                     'it with --file_format=array_record') from None
  return Documents(spec, f'tfds {builder.data_dir} {split} {text_field}', data, text_field,
                   f'tfds {name} {builder.version} {split} {text_field}')


def _open_one(spec: str, *, hold_out: int, cache_dir: str, text_field: str, tfds_data_dir: str | None,
              skip_bad_records: bool) -> tuple[Documents, Documents | None, list[str], dict[str, int]]:
  """(train documents, held-out eval documents or None, eval file names, skipped) of one SPEC."""
  if spec.startswith('tfds:'):
    return _open_tfds(spec, tfds_data_dir=tfds_data_dir, text_field=text_field), None, [], {}
  builder, eval_paths, skipped, fingerprint = _open_files(spec, cache_dir=cache_dir, eval_files=hold_out,
                                             text_field=text_field, skip_bad_records=skip_bad_records)
  # A read-only builder: its data sources pickle into grain's worker processes (ours need our args).
  builder = tfds.builder_from_directory(builder.data_dir)
  train = Documents(spec, str(builder.data_dir), builder.as_data_source('train'),
                    fingerprint=fingerprint)
  if not eval_paths:
    return train, None, [], skipped
  held_out = Documents(f'{spec} (held out)', f'{builder.data_dir} eval', builder.as_data_source('eval'),
                       fingerprint=f'{fingerprint} eval')
  return train, held_out, [Path(p).name for p in eval_paths], skipped


def open_sources(sources: Sequence[tuple[str, float]], *, cache_dir: str, eval_files: int,
                 eval_source: str = '', text_field: str = 'text', tfds_data_dir: str | None = None,
                 skip_bad_records: bool = False) -> Sources:
  """Opens every source (building file sources under cache_dir) and picks the eval documents."""
  opts = dict(cache_dir=cache_dir, text_field=text_field, tfds_data_dir=tfds_data_dir,
              skip_bad_records=skip_bad_records)
  opened = [_open_one(spec, hold_out=0 if n or eval_source else eval_files, **opts)
            for n, (spec, _) in enumerate(sources)]
  eval_docs, eval_names = opened[0][1], opened[0][2]
  skipped = {k: v for o in opened for k, v in o[3].items()}
  if eval_source:
    eval_docs, _, _, bad = _open_one(eval_source, hold_out=0, **opts)
    skipped.update(bad)
  if eval_docs is None:
    raise ValueError(f'{sources[0][0]}: a TFDS source holds no files to keep out for eval; set eval_source '
                     '(for example tfds:lm1b:test)')
  for docs, *_ in opened:
    if not len(docs):
      raise ValueError(f'{docs.name}: no train documents in it (all held out for eval, empty or skipped)')
  return Sources([o[0] for o in opened], [w for _, w in sources], eval_docs, eval_names,
                 opened[0][0].key, skipped)
