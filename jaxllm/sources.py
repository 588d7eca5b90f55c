"""Text sources -> documents: files built once into a TFDS array_record dataset, or a prepared one.

Choices:
- Sources: `sources` is a comma-separated list of `SPEC[@WEIGHT]`. A SPEC is a directory (read
  recursively, hidden entries left out as a glob leaves them), a file or a glob of `.txt`, `.jsonl`
  and `.parquet` files (suffixes in any case; `.txt` and `.jsonl` also compressed as `.gz`, `.bz2`
  or `.xz`, read as they stream), or `tfds:NAME:SPLIT` for a dataset already prepared (as
  array_record) in `tfds_data_dir` (NAME may carry a config and version: `tfds:c4/en:3.0.1:train`).
  File sources are built once into a TFDS array_record dataset under `<cache_dir>/<fingerprint>/`,
  the fingerprint hashing paths, sizes and mtimes plus the rules below, so a changed source builds
  afresh and an unchanged one is reused.
- Document: a `.txt` file is cut at blank lines into pieces of at least `DOC_CHARS` (2048) characters
  (a piece with no blank line for 8x that is cut at a newline), so the 5 MB Shakespeare corpus gives
  about 2,300 documents; every document is an exact substring of its file. A `.jsonl` line or a
  `.parquet` row is one document: its `text_field`, whole, however long. Whitespace-only documents
  are dropped.
- Bad input is an error naming the path (and line) and the fix: a missing path, a directory or glob
  with no source files, a file of another kind in it, a damaged compressed file, a file that is not
  UTF-8, a jsonl line that is not JSON or lacks the field, a parquet file without the column. With
  `skip_bad_records=True` bad files and records are skipped instead, counted in `Sources.skipped`
  (and so `Pipeline.skipped`) and logged.
- Eval split: `eval_files` whole files of the first source, taken at a fixed stride from the sorted
  file names (42 files, eval_files=2 -> the 11th and 32nd), recorded in `Sources.eval_file_names`;
  or, with `eval_source`, all of another SPEC (required when the first source is a TFDS dataset),
  which must share no file and no document (by hash, `doc_hash`) with a train source. An empty
  eval split is an error, not a loss of 0.
- Fingerprint: `Sources.fingerprint()` (the cache hash of each source) is saved with checkpoints;
  a resume compares it, since a changed source changes the order a saved data position replays.
"""

from __future__ import annotations

import bz2
import dataclasses
import glob
import gzip
import hashlib
import importlib.resources
import json
import lzma
import re
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from absl import logging
import numpy as np
import tensorflow_datasets as tfds

DOC_CHARS = 2048
MAX_DOC_CHARS = 8 * DOC_CHARS
OVERLAP_MIN_CHARS = 100  # shorter documents ('[Exit.]' ends 3 plays) repeat in unrelated texts
_FORMAT = 3  # bump when the document rules change, so caches rebuild (3: document hashes)
SUFFIXES = ('.txt', '.jsonl', '.parquet')
# Compressed text is read as it streams, like Levanter's and HF datasets' readers do.
_OPENERS = {'.gz': gzip.open, '.bz2': bz2.open, '.xz': lzma.open, '': open}
_CORRUPT = (OSError, EOFError, zlib.error, lzma.LZMAError)  # what a damaged compressed file raises
KINDS = '.txt, .jsonl or .parquet'  # in any case; .txt and .jsonl also as .gz, .bz2 or .xz
_KINDS_IN_FULL = f'{KINDS}, in any case; .txt and .jsonl also as .gz, .bz2 or .xz'


def default_source_dir() -> str:
  """The Shakespeare corpus shipped inside the package: its .txt files (its README is not a play)."""
  return str(importlib.resources.files('jaxllm') / 'corpus' / 'shakespeare' / '*.txt')


def source_kind(path: Path) -> tuple[str, str] | None:
  """(suffix, compression) of a file jaxllm reads, case-insensitively: 'a.JSONL.gz' -> ('.jsonl',
  '.gz'); None for any other kind (parquet compresses inside the file, so never .parquet.gz)."""
  name = path.name.lower()
  compression = next((c for c in _OPENERS if c and name.endswith(c)), '')
  suffix = Path(name.removesuffix(compression)).suffix
  readable = suffix in SUFFIXES and not (compression and suffix == '.parquet')
  return (suffix, compression) if readable else None


def _walk(directory: Path, seen: set[Path], hidden: list[Path]) -> Iterator[Path]:
  """Files under `directory` (links to directories followed once); hidden entries (.git, .DS_Store)
  go to `hidden`, left out as a glob leaves them out."""
  for entry in directory.iterdir():
    if entry.name.startswith('.'):
      hidden.append(entry)
    elif entry.is_dir():
      real = entry.resolve()
      if real not in seen:  # a link back up the tree would loop
        seen.add(real)
        yield from _walk(entry, seen, hidden)
    else:
      yield entry


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


def list_source_files(spec: str, bad: BadRecords | None = None, exclude: Sequence[str] = ()) -> list[Path]:
  """The source files of a directory (read recursively), a file or a glob, sorted. Every file it
  names must be of a kind jaxllm reads (source_kind): another kind is an error naming it, or, with a
  skipping `bad`, counted and logged; hidden entries and `exclude` (a cache dir) are left out."""
  fix = f'point the source at UTF-8 {KINDS} files'
  bad = bad or BadRecords(skip=False)
  hidden: list[Path] = []
  if glob.has_magic(spec):
    found = sorted(Path(p) for p in glob.glob(spec, recursive=True))
    if not found:
      raise FileNotFoundError(f'{spec}: the glob matches nothing; {fix}')
  else:
    found = [Path(spec)]
    if not found[0].exists():
      raise FileNotFoundError(f'{spec}: no such file or directory; {fix}, or leave the source empty '
                              'for the embedded corpus')
  files, skip = [], {Path(p).resolve() for p in exclude}  # jaxllm's cache may sit in the source
  for path in found:
    if skip.isdisjoint([path.resolve(), *path.resolve().parents]):  # a glob lists files inside too
      files += _walk(path, {path.resolve(), *skip}, hidden) if path.is_dir() else [path]
  if hidden:
    logging.info('%s: left out %d hidden entries (%s)', spec, len(hidden), ', '.join(p.name for p in hidden[:5]))
  readable = []
  for f in sorted(set(files)):  # set: a recursive glob matches a file and the directories above it
    if not f.is_file():
      bad(str(f), 'not a regular file (a broken link, a pipe or a device)', 'remove it from the source')
    elif source_kind(f) is None:
      bad(str(f), f'not a kind of file jaxllm reads ({_KINDS_IN_FULL})',
          'convert or remove it, or name only readable files with a glob (DIR/**/*.txt)')
    else:
      readable.append(f)
  if not readable:
    raise ValueError(f'{spec}: no {KINDS} files in it; {fix}')
  return readable


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
  with _OPENERS[source_kind(path)[1]](path, 'rb') as f:
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
  try:
    f = pq.ParquetFile(path)
  except ValueError as e:  # pyarrow's ArrowInvalid: no parquet footer (cut short, or not parquet)
    raise OSError(e) from None  # file_documents names the damaged file
  if field not in f.schema_arrow.names:
    raise ValueError(f'{path}: no column {field!r} (has: {", ".join(f.schema_arrow.names)}); set '
                     'text_field to the column that holds the text')
  batches = f.iter_batches(columns=[field], batch_size=4096)
  for row, text in enumerate((t for b in batches for t in b.column(0).to_pylist()), 1):
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
  suffix, compression = source_kind(path)
  try:
    if suffix == '.jsonl':
      docs = _jsonl_documents(path, text_field, bad)
    elif suffix == '.parquet':
      docs = _parquet_documents(path, text_field, bad)
    else:
      with _OPENERS[compression](path, 'rb') as f:
        raw = f.read()
      try:
        docs = split_documents(raw.decode('utf-8'))
      except UnicodeDecodeError as e:
        bad(str(path), f'not valid UTF-8 (byte {e.start})', 're-encode it (iconv -t UTF-8) or remove it')
        return
    yield from (d for d in docs if d.strip())
  except _CORRUPT as e:
    if not compression and suffix != '.parquet':
      raise
    # Documents before the damage were already yielded; with skip_bad_records they stay.
    bad(str(path), f'a damaged {compression or suffix} file ({type(e).__name__}: {e})',
        f'download or {"compress" if compression else "write"} it again, or remove it')


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
    self.hashes: dict[str, list[int]] = {}  # split -> doc_hash of its long documents, as built
    self.docs: dict[str, int] = {}  # split -> documents
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    # DatasetInfo(builder=self) and not dataset_info_from_configs(): the latter needs a package dir.
    return tfds.core.DatasetInfo(
        builder=self, description=f'eval files: {", ".join(self._eval_names)}',
        features=tfds.features.FeaturesDict({'text': tfds.features.Text(), 'file': tfds.features.Text()}),
        disable_shuffling=True)  # keep file order: eval reads deterministically, train is shuffled by grain

  def _split_generators(self, dl_manager: Any) -> dict[str, Any]:
    ev = set(self._eval_names)
    splits = {'train': self._generate_examples([f for f in self._files if str(f) not in ev], 'train')}
    if ev:
      splits['eval'] = self._generate_examples([f for f in self._files if str(f) in ev], 'eval')
    return splits

  def _generate_examples(self, files: list[Path], split: str) -> Iterator[tuple[str, dict[str, str]]]:
    hashes, self.docs[split] = self.hashes.setdefault(split, []), 0
    for f in files:
      for i, doc in enumerate(file_documents(f, text_field=self._field, bad=self.bad)):
        self.docs[split] += 1
        if len(doc) >= OVERLAP_MIN_CHARS:
          hashes.append(doc_hash(doc))
        yield f'{f}:{i:09d}', {'text': doc, 'file': f.name}


def doc_hash(text: str) -> int:
  """64 bits of a document's BLAKE2 hash: finds the same document in two sources."""
  return int.from_bytes(hashlib.blake2b(text.encode('utf-8'), digest_size=8).digest(), 'little')


@dataclasses.dataclass
class Documents:
  """Random-access documents of one source; `key` changes whenever their content may have, and so
  does `fingerprint` (which, unlike `key`, does not move with the cache directory)."""

  name: str
  key: str
  data: Any  # a tfds data source: data[i][field] is the UTF-8 text
  field: str = 'text'
  fingerprint: str = ''
  files: tuple[Path, ...] = ()  # the source files (none for a TFDS dataset)
  hashes_path: str = ''  # sorted unique doc_hash of every document ('': not known, TFDS)

  def hashes(self) -> np.ndarray:
    return np.load(self.hashes_path) if self.hashes_path else np.zeros(0, np.uint64)

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
    """{'train': {source: fingerprint}, 'eval': {...}}: what a saved data position assumes."""
    return {'train': {d.name: f'{d.fingerprint} {len(d)}' for d in self.train},
            'eval': {self.eval.name: f'{self.eval.fingerprint} {len(self.eval)}'}}


def _open_files(spec: str, *, cache_dir: str, eval_files: int, text_field: str,
                skip_bad_records: bool) -> tuple[Any, list[Path], list[str], dict[str, int], str]:
  """Builds (or reuses) the array_record dataset of a file source; returns (builder, files, eval
  paths, skipped, fingerprint: the hash of the files, their sizes and mtimes and the rules)."""
  listing = BadRecords(skip_bad_records)
  files = list_source_files(spec, listing, exclude=[cache_dir])
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
    try:
      builder.download_and_prepare()
    except AssertionError:  # TFDS's way to say that a split yielded no examples
      if builder.docs.get('eval') == 0:
        names = ', '.join(Path(p).name for p in eval_paths)
        raise EmptySource(f'the data.eval_files={eval_files} files held out of {spec} ({names}) '
                          f'hold {_NO_DOCS}, so eval would report loss 0; raise data.eval_files or set '
                          'data.eval_source') from None
      if builder.docs.get('train') == 0:
        raise EmptySource(f'{spec}: {_NO_DOCS} in it; point it at text') from None
      raise
    for split, hashes in builder.hashes.items():
      np.save(Path(builder.data_dir) / f'doc_hashes.{split}.npy', np.unique(np.array(hashes, np.uint64)))
    skipped_file.write_text(json.dumps(builder.bad.counts))
  built = json.loads(skipped_file.read_text()) if skipped_file.exists() else {}
  skipped = {**listing.counts, **built}
  if skipped:
    logging.warning('%s: skipped %d bad files or records (skip_bad_records=True): %s', spec,
                    sum(skipped.values()), skipped)
  return builder, files, eval_paths, skipped, fingerprint


class EmptySource(ValueError):
  """A file source, or the files it holds out for eval, without a document."""


_NO_DOCS = 'no documents (empty, whitespace only or skipped as bad)'


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
  builder, files, eval_paths, skipped, fingerprint = _open_files(
      spec, cache_dir=cache_dir, eval_files=hold_out, text_field=text_field,
      skip_bad_records=skip_bad_records)
  # A read-only builder: its data sources pickle into grain's worker processes (ours need our args).
  builder = tfds.builder_from_directory(builder.data_dir)
  train = Documents(spec, str(builder.data_dir), builder.as_data_source('train'),
                    fingerprint=fingerprint, files=tuple(f for f in files if str(f) not in eval_paths),
                    hashes_path=str(Path(builder.data_dir) / 'doc_hashes.train.npy'))
  if not eval_paths:
    return train, None, [], skipped
  held_out = Documents(f'{spec} (held out)', f'{builder.data_dir} eval', builder.as_data_source('eval'),
                       fingerprint=f'{fingerprint} eval', files=tuple(Path(p) for p in eval_paths),
                       hashes_path=str(Path(builder.data_dir) / 'doc_hashes.eval.npy'))
  return train, held_out, [Path(p).name for p in eval_paths], skipped


def check_no_overlap(eval_docs: Documents, train: Sequence[Documents]) -> None:
  """An eval_source must not share files or documents (by doc_hash) with a train source: its loss
  would then measure memorisation. TFDS sources are compared by name and split only."""
  fix = ('evaluate on text the run does not train on, or leave data.eval_source empty to hold out '
         'data.eval_files')
  eval_files = {f.resolve(): f for f in eval_docs.files}
  eval_hashes = eval_docs.hashes()
  for docs in train:
    if docs.fingerprint == eval_docs.fingerprint:
      raise ValueError(f'data.eval_source={eval_docs.name} is the train source {docs.name}; {fix}')
    shared = sorted(eval_files[r] for r in eval_files.keys() & {f.resolve() for f in docs.files})
    if shared:
      raise ValueError(f'data.eval_source={eval_docs.name} and the train source {docs.name} share '
                       f'{len(shared)} files (first: {shared[0]}); {fix}')
    same = int(np.isin(eval_hashes, docs.hashes()).sum()) if len(eval_hashes) else 0
    if same:
      raise ValueError(f'data.eval_source={eval_docs.name}: {same} of its {len(eval_hashes)} distinct '
                       f'documents (of {OVERLAP_MIN_CHARS}+ characters) are also in the train source '
                       f'{docs.name}; {fix}')


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
    try:
      eval_docs, _, _, bad = _open_one(eval_source, hold_out=0, **opts)
      if not len(eval_docs):  # a TFDS split (an empty file source is caught as it is built)
        raise EmptySource(eval_source)
    except EmptySource:
      raise ValueError(f'data.eval_source={eval_source} holds {_NO_DOCS}, so eval would report loss 0; '
                       'point it at held-out text') from None
    skipped.update(bad)
    check_no_overlap(eval_docs, [o[0] for o in opened])
  if eval_docs is None:
    raise ValueError(f'{sources[0][0]}: a TFDS source holds no files to keep out for eval; set data.eval_source '
                     '(for example tfds:lm1b:test)')
  for docs, *_ in opened:
    if not len(docs):
      raise ValueError(f'{docs.name}: no train documents in it (all held out for eval, empty or skipped)')
  return Sources([o[0] for o in opened], [w for _, w in sources], eval_docs, eval_names,
                 opened[0][0].key, skipped)
