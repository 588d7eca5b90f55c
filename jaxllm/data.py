"""Text sources -> TFDS array_record -> grain -> sentencepiece -> packed batches of host-local numpy.

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
  instead, counted in `Pipeline.skipped` and logged.
- Eval split: `eval_files` whole files of the first source, taken at a fixed stride from the sorted
  file names (42 files, eval_files=2 -> the 11th and 32nd), recorded in `Pipeline.eval_file_names`;
  or, with `eval_source`, all of another SPEC (required when the first source is a TFDS dataset).
- Mixture: each source's documents are sharded by process and reshuffled each epoch on their own,
  then interleaved in proportion to the weights by `grain.MapDataset.mix` (a fixed pattern, not a
  random draw), so the order is a pure function of the seed and resume stays exact.
- Tokenizer: sentencepiece BPE trained on whole train documents (newlines are learned as pieces),
  at most `_TOKENIZER_DOCS` documents taken at a stride, split between sources by weight. A
  vocab_size the corpus cannot fill is an error (hard limit), so the model's vocab equals the
  tokenizer's.
- Tokenizing: documents are encoded `_ENCODE_BATCH` at a time (`sp.encode(list)`, in grain's read
  threads; sentencepiece releases the GIL). With `pretokenize=True` every source is encoded once
  into `<cache_dir>/tokens/<fingerprint of source and tokenizer>/` (array_record, one record of
  uint16/uint32 ids per document, bos and eos included) and training reads ids only. The cache
  holds exactly what on-the-fly encoding gives, so both routes give the same batches.
- Rows: each document is bos + ids + eos; its (inputs, targets) = (doc[:-1], doc[1:]) pairs are cut
  into chunks of at most seq_len and first-fit packed, so no target crosses a document and padding
  has segment_id 0. Train: documents sharded by process, reshuffled each epoch, infinite.
  Eval: every process packs the whole eval split identically and takes its rows of each global
  batch, so all processes see the same number of batches; the last one is padded, nothing dropped.
- Workers: `worker_count > 0` runs the pipeline in that many grain worker processes
  (`mp_prefetch`); its iterator state covers the workers, so resume stays exact, but the batch
  order differs from `worker_count=0` (each worker packs its own slice of the documents).
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import functools
import glob
import hashlib
import importlib.resources
import io
import json
import math
import os
import re
import shutil
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from absl import flags, logging
from array_record.python import array_record_module
import grain
import numpy as np
import pyarrow.parquet as pq
import sentencepiece as spm
import tensorflow_datasets as tfds

DOC_CHARS = 2048
_MAX_DOC_CHARS = 8 * DOC_CHARS
_FORMAT = 2  # bump when the document rules change, so caches rebuild
_TOKENIZER_DOCS = 5000  # about 10 MB of text: keeps tokenizer training to seconds
_ENCODE_BATCH = 32  # documents per sp.encode call: amortises the call, keeps memory small
_READ = grain.ReadOptions(num_threads=2, prefetch_buffer_size=8)  # 8 x 32 documents ahead
SUFFIXES = ('.txt', '.jsonl', '.parquet')
_UNIGRAM_DOCS = 20_000  # documents sampled for the unigram baseline: a few seconds at most

Batch = dict[str, np.ndarray]


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
    while len(piece) > _MAX_DOC_CHARS:  # text without blank lines: cut at a newline if any
      cut = piece.rfind('\n', 0, _MAX_DOC_CHARS) + 1 or _MAX_DOC_CHARS
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


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
  """Serialises building between processes that share a cache dir (e.g. two local JAX processes)."""
  path.parent.mkdir(parents=True, exist_ok=True)
  with open(path, 'w') as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


@dataclasses.dataclass
class Documents:
  """Random-access documents of one source; `key` changes whenever their content may have."""

  name: str
  key: str
  data: Any  # a tfds data source: data[i][field] is the UTF-8 text
  field: str = 'text'

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


def _open_files(spec: str, *, cache_dir: str, eval_files: int, text_field: str,
                skip_bad_records: bool) -> tuple[Any, list[str], dict[str, int]]:
  """Builds (or reuses) the array_record dataset of a file source; returns (builder, eval paths, skipped)."""
  files = list_source_files(spec)
  eval_paths = pick_eval_files([str(f) for f in files], eval_files) if eval_files else []
  key = hashlib.sha256(f'{_FORMAT} {DOC_CHARS} {text_field} {skip_bad_records} {eval_paths}'.encode())
  for f in files:
    st = f.stat()
    key.update(f'{f} {st.st_size} {st.st_mtime_ns}\n'.encode())
  builder = JaxllmTextDocuments(files=files, eval_names=eval_paths, text_field=text_field,
                                skip_bad_records=skip_bad_records, file_format='array_record',
                                data_dir=str(Path(cache_dir) / key.hexdigest()[:16]))
  skipped_file = Path(builder.data_dir) / 'skipped.json'
  if not builder.is_prepared():
    tfds.display_progress_bar(False)  # a one-second build need not flood the training log
    builder.download_and_prepare()
    skipped_file.write_text(json.dumps(builder.bad.counts))
  skipped = json.loads(skipped_file.read_text()) if skipped_file.exists() else {}
  if skipped:
    logging.warning('%s: skipped %d bad files or records (skip_bad_records=True): %s', spec,
                    sum(skipped.values()), skipped)
  return builder, eval_paths, skipped


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
  return Documents(spec, f'tfds {builder.data_dir} {split} {text_field}', data, text_field)


def _open_one(spec: str, *, hold_out: int, cache_dir: str, text_field: str, tfds_data_dir: str | None,
              skip_bad_records: bool) -> tuple[Documents, Documents | None, list[str], dict[str, int]]:
  """(train documents, held-out eval documents or None, eval file names, skipped) of one SPEC."""
  if spec.startswith('tfds:'):
    return _open_tfds(spec, tfds_data_dir=tfds_data_dir, text_field=text_field), None, [], {}
  builder, eval_paths, skipped = _open_files(spec, cache_dir=cache_dir, eval_files=hold_out,
                                             text_field=text_field, skip_bad_records=skip_bad_records)
  # A read-only builder: its data sources pickle into grain's worker processes (ours need our args).
  builder = tfds.builder_from_directory(builder.data_dir)
  train = Documents(spec, str(builder.data_dir), builder.as_data_source('train'))
  if not eval_paths:
    return train, None, [], skipped
  held_out = Documents(f'{spec} (held out)', f'{builder.data_dir} eval', builder.as_data_source('eval'))
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


class Tokenizer:
  """A sentencepiece model; encode() adds no bos/eos, encode_docs() does."""

  def __init__(self, path: str):
    self.path = str(path)
    self.sp = spm.SentencePieceProcessor(model_file=self.path)
    self.vocab_size, self.bos_id, self.eos_id = self.sp.vocab_size(), self.sp.bos_id(), self.sp.eos_id()

  def encode(self, text: str) -> list[int]:
    return self.sp.encode(text)

  def encode_docs(self, texts: list[str]) -> list[np.ndarray]:
    """bos + ids + eos of each text as int32, from one batched sp.encode call."""
    out = []
    for ids in self.sp.encode(texts):
      doc = np.empty(len(ids) + 2, np.int32)
      doc[0], doc[1:-1], doc[-1] = self.bos_id, ids, self.eos_id
      out.append(doc)
    return out

  def decode(self, ids: Iterable[int]) -> str:
    return self.sp.decode([int(i) for i in ids])

  def fingerprint(self) -> str:
    return hashlib.sha256(self.sp.serialized_model_proto()).hexdigest()[:16]

  def token_bytes(self) -> np.ndarray:
    """UTF-8 bytes each id stands for ([vocab] int32; 0 for control ids), for bits per byte."""
    out = np.zeros(self.vocab_size, np.int32)
    for i in range(self.vocab_size):
      if self.sp.is_byte(i):
        out[i] = 1
      elif not (self.sp.is_control(i) or self.sp.is_unknown(i)):
        out[i] = len(self.sp.id_to_piece(i).replace('\u2581', ' ').encode('utf-8'))
    return out


def train_tokenizer(path: str, texts: list[str], vocab_size: int, *, model_type: str = 'bpe',
                    byte_fallback: bool = True, user_defined_symbols: Sequence[str] = (),
                    normalization: str = 'identity') -> None:
  """sentencepiece on `texts` (one document per sentence), written atomically to `path`.

  `normalization='identity'` (with no whitespace folding) is the only lossless choice; others are
  sentencepiece rule names such as 'nmt_nfkc'.
  """
  model = io.BytesIO()
  try:
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_writer=model, model_type=model_type, vocab_size=vocab_size,
        character_coverage=1.0, byte_fallback=byte_fallback, split_digits=True, unk_id=0, bos_id=1,
        eos_id=2, pad_id=-1, user_defined_symbols=list(user_defined_symbols),
        normalization_rule_name=normalization, remove_extra_whitespaces=normalization != 'identity',
        input_sentence_size=_TOKENIZER_DOCS, max_sentence_length=4 * _MAX_DOC_CHARS,
        num_threads=os.cpu_count() or 1, minloglevel=2)
  except RuntimeError as e:
    raise ValueError(f'vocab_size={vocab_size} does not suit this corpus: {str(e).strip()}') from None
  Path(path).parent.mkdir(parents=True, exist_ok=True)
  tmp = f'{path}.tmp{os.getpid()}'
  Path(tmp).write_bytes(model.getvalue())
  os.replace(tmp, path)


def tokenizer_sample(sources: Sources, n: int = _TOKENIZER_DOCS) -> list[str]:
  """About n train documents at a stride through each source, split by weight."""
  texts, total = [], sum(sources.weights)
  for docs, w in zip(sources.train, sources.weights):
    stride = max(1, math.ceil(len(docs) / max(1, round(n * w / total))))
    texts += [docs.text(i) for i in range(0, len(docs), stride)]
  return texts


def bytes_per_token(tokenizer: Tokenizer, texts: list[str]) -> float:
  """UTF-8 bytes per token (no bos/eos) over `texts`: the tokenizer's compression."""
  tokens = sum(len(ids) for ids in tokenizer.sp.encode(texts))
  return sum(len(t.encode('utf-8')) for t in texts) / max(tokens, 1)


def _entropy(counts: np.ndarray) -> float:
  p = counts[counts > 0] / counts.sum()
  return float(-(p * np.log(p)).sum())


def unigram_entropy(tokenizer: Tokenizer, texts: Iterable[str]) -> float:
  """Nats per target token (ids + eos) of a unigram model fit to `texts`: a loss to beat."""
  counts = np.zeros(tokenizer.vocab_size, np.int64)
  for text in texts:
    counts += np.bincount(tokenizer.encode(text) + [tokenizer.eos_id], minlength=tokenizer.vocab_size)
  return _entropy(counts)


class TokenCache:
  """Pre-tokenized documents: record i holds bos + ids + eos of document i (see build_token_cache)."""

  def __init__(self, path: Path):
    self.path, self.meta = Path(path), json.loads((Path(path) / 'meta.json').read_text())
    self.dtype = np.dtype(self.meta['dtype'])
    self.records = grain.sources.ArrayRecordDataSource([str(self.path / 'ids.array_record')])

  def __len__(self) -> int:
    return len(self.records)

  def ids(self, i: int) -> np.ndarray:
    return np.frombuffer(self.records[int(i)], self.dtype).astype(np.int32)


def build_token_cache(docs: Documents, tokenizer: Tokenizer, path: Path, block: int = 256) -> None:
  """Encodes every document of `docs` once into `path` (written to a temporary dir, then renamed)."""
  dtype = np.uint16 if tokenizer.vocab_size <= 1 << 16 else np.uint32
  tmp = path.with_name(f'{path.name}.tmp{os.getpid()}')
  shutil.rmtree(tmp, ignore_errors=True)
  tmp.mkdir(parents=True)
  writer = array_record_module.ArrayRecordWriter(str(tmp / 'ids.array_record'), 'group_size:1')
  tokens = nbytes = 0
  for start in range(0, len(docs), block):
    texts = [docs.text(i) for i in range(start, min(start + block, len(docs)))]
    for ids in tokenizer.encode_docs(texts):
      writer.write(ids.astype(dtype).tobytes())
      tokens += len(ids) - 1  # targets: ids + eos
    nbytes += sum(len(t.encode('utf-8')) for t in texts)
  writer.close()
  meta = {'source': docs.name, 'tokenizer': tokenizer.path, 'dtype': np.dtype(dtype).name,
          'docs': len(docs), 'tokens': tokens, 'bytes': nbytes}
  (tmp / 'meta.json').write_text(json.dumps(meta, indent=1))
  os.replace(tmp, path)


def token_cache(docs: Documents, tokenizer: Tokenizer, cache_dir: str) -> TokenCache:
  """The cache of `docs` under this tokenizer, built on first use."""
  key = hashlib.sha256(f'{docs.key} {tokenizer.fingerprint()}'.encode()).hexdigest()[:16]
  path = Path(cache_dir) / 'tokens' / key
  if not (path / 'meta.json').exists():
    logging.info('pre-tokenizing %s into %s', docs.name, path)
    build_token_cache(docs, tokenizer, path)
  return TokenCache(path)


class _Chunk(grain.experimental.FlatMapTransform):
  """Each document's (inputs, targets) = (doc[:-1], doc[1:]) cut into chunks of at most seq_len."""

  def __init__(self, seq_len: int):
    self.seq_len, self.max_fan_out = seq_len, 1 << 20  # the iter flat map has no fan-out limit

  def flat_map(self, docs: list[np.ndarray]) -> list[dict[str, np.ndarray]]:
    L, pairs = self.seq_len, [(doc[:-1], doc[1:]) for doc in docs]
    return [{'inputs': inputs[i:i + L], 'targets': targets[i:i + L]}
            for inputs, targets in pairs for i in range(0, len(inputs), L)]


def _finish(rows: Batch) -> Batch:
  return {'inputs': rows['inputs'], 'targets': rows['targets'],
          'segment_ids': rows['inputs_segment_ids'], 'positions': rows['inputs_positions']}


def _tag(source: int, index: int) -> tuple[int, int]:
  return source, int(index)


class Pipeline:
  """Built by make_pipeline(); batches are dicts of int32 [batch_size, seq_len] numpy arrays."""

  def __init__(self, *, sources: Sources, tokenizer: Tokenizer, seq_len: int, batch_size: int, seed: int,
               process_index: int, process_count: int, caches: list[TokenCache] | None = None,
               eval_cache: TokenCache | None = None, worker_count: int = 0):
    self.tokenizer, self.sources, self.eval_file_names = tokenizer, sources, sources.eval_file_names
    self.data_dir, self.skipped = sources.data_dir, sources.skipped
    self.train_source, self.eval_source = sources.train[0].data, sources.eval.data  # the first source's
    self.caches, self.eval_cache, self.worker_count = caches, eval_cache, worker_count
    self.seq_len, self.batch_size, self.seed = seq_len, batch_size, seed
    self.process_index, self.process_count = process_index, process_count

  def _ids(self, split: str, pairs: list[tuple[int, int]]) -> list[np.ndarray]:
    """bos + ids + eos of each (source, index), from the token cache or encoded now."""
    caches = self.caches if split == 'train' else self.eval_cache and [self.eval_cache]
    if caches:
      return [caches[s].ids(i) for s, i in pairs]
    docs = self.sources.train if split == 'train' else [self.sources.eval]
    return self.tokenizer.encode_docs([docs[s].text(i) for s, i in pairs])

  def _rows(self, order: grain.MapDataset, split: str, *, shuffle: bool) -> grain.IterDataset:
    docs = order.batch(_ENCODE_BATCH, batch_fn=list).map(functools.partial(self._ids, split))
    chunks = grain.experimental.FlatMapIterDataset(docs.to_iter_dataset(_READ), _Chunk(self.seq_len))
    return grain.experimental.FirstFitPackIterDataset(
        chunks, length_struct={'inputs': self.seq_len, 'targets': self.seq_len},
        num_packing_bins=4 * self.batch_size, seed=self.seed, shuffle_bins=shuffle)  # more bins, less padding

  def train_doc_order(self) -> grain.MapDataset:
    """(source, document) pairs this process reads, in order: each source's shard reshuffled every
    epoch (by seed + source + epoch), the sources interleaved by weight."""
    orders = []
    for s, docs in enumerate(self.sources.train):
      shard = grain.MapDataset.range(len(docs))[self.process_index::self.process_count]
      if not len(shard):
        raise ValueError(f'{docs.name}: {len(docs)} train documents cannot feed {self.process_count} processes')
      orders.append(shard.shuffle(seed=self.seed + s).repeat().map(functools.partial(_tag, s)))
    return orders[0] if len(orders) == 1 else grain.MapDataset.mix(orders, self.sources.weights)

  def train_iter(self) -> grain.DatasetIterator:
    """Infinite, checkpointable (get_state()/set_state()) iterator of this process's train batches."""
    rows = self._rows(self.train_doc_order(), 'train', shuffle=True)
    batches = rows.batch(self.batch_size, drop_remainder=True).map(_finish)
    if self.worker_count:
      if not flags.FLAGS.is_parsed():  # grain's workers read absl flags; outside absl.app use defaults
        flags.FLAGS.mark_as_parsed()
      batches = batches.mp_prefetch(grain.multiprocessing.MultiprocessingOptions(num_workers=self.worker_count))
    return iter(batches)

  def eval_batches(self, max_batches: int | None = None) -> Iterator[Batch]:
    """The eval split once, in order, the same on every call; every process yields as many batches."""
    order = grain.MapDataset.range(len(self.sources.eval)).map(functools.partial(_tag, 0))
    global_rows = self.batch_size * self.process_count
    for step, rows in enumerate(self._rows(order, 'eval', shuffle=False).batch(global_rows)):
      if max_batches is not None and step >= max_batches:
        return
      mine = slice(self.process_index * self.batch_size, (self.process_index + 1) * self.batch_size)
      yield _finish({k: np.pad(v, ((0, global_rows - len(v)), (0, 0)))[mine] for k, v in rows.items()})

  def eval_stats(self) -> dict[str, int]:
    """Documents, target tokens and UTF-8 bytes of the whole eval split (bits/byte = nats/ln2/bytes)."""
    if self.eval_cache:
      return {k: self.eval_cache.meta[k] for k in ('docs', 'tokens', 'bytes')}
    docs = self.sources.eval
    texts = [docs.text(i) for i in range(len(docs))]
    tokens = sum(len(ids) + 1 for ids in self.tokenizer.sp.encode(texts))  # + eos
    return {'docs': len(texts), 'tokens': tokens, 'bytes': sum(len(t.encode('utf-8')) for t in texts)}

  def train_unigram_entropy(self) -> float:
    """unigram_entropy() of the first source's train documents (at most _UNIGRAM_DOCS, at a stride)."""
    docs = self.sources.train[0]
    picked = range(0, len(docs), math.ceil(len(docs) / _UNIGRAM_DOCS))
    counts = np.zeros(self.tokenizer.vocab_size, np.int64)
    for start in range(0, len(picked), 256):
      for ids in self._ids('train', [(0, i) for i in picked[start:start + 256]]):
        counts += np.bincount(ids[1:], minlength=self.tokenizer.vocab_size)  # targets: ids + eos
    return _entropy(counts)


def make_pipeline(*, source_dir: str | None = None, cache_dir: str, tokenizer_path: str, vocab_size: int,
                  seq_len: int, batch_size: int, eval_files: int, seed: int, process_index: int = 0,
                  process_count: int = 1, sources: str | Sequence[tuple[str, float]] = '',
                  eval_source: str = '', text_field: str = 'text', tfds_data_dir: str | None = None,
                  skip_bad_records: bool = False, pretokenize: bool = False,
                  worker_count: int = 0) -> Pipeline:
  """Builds (or reuses) the datasets under cache_dir, the tokenizer at tokenizer_path and, with
  pretokenize=True, the token caches; `sources` ('SPEC[@WEIGHT], ...', see the module doc) replaces
  source_dir, and neither means the embedded corpus."""
  if not 0 <= process_index < process_count:
    raise ValueError(f'process_index={process_index} must be in [0, process_count={process_count})')
  if seq_len < 2 or batch_size < 1 or worker_count < 0:
    raise ValueError(f'seq_len={seq_len} must be >= 2, batch_size={batch_size} >= 1, worker_count >= 0')
  if source_dir and sources:
    raise ValueError('set source_dir or sources, not both')
  specs = parse_sources(sources) if isinstance(sources, str) and sources else list(sources)
  specs = specs or [(source_dir or default_source_dir(), 1.0)]
  with _file_lock(Path(cache_dir) / '.lock'):
    found = open_sources(specs, cache_dir=cache_dir, eval_files=eval_files, eval_source=eval_source,
                         text_field=text_field, tfds_data_dir=tfds_data_dir, skip_bad_records=skip_bad_records)
    if not Path(tokenizer_path).exists():
      train_tokenizer(tokenizer_path, tokenizer_sample(found), vocab_size)
    tokenizer = Tokenizer(tokenizer_path)
    if tokenizer.vocab_size != vocab_size:
      raise ValueError(f'{tokenizer_path} has vocab_size {tokenizer.vocab_size}, not {vocab_size}: delete '
                       'it to retrain, or set vocab_size to match')
    caches = eval_cache = None
    if pretokenize:
      caches = [token_cache(docs, tokenizer, cache_dir) for docs in found.train]
      eval_cache = token_cache(found.eval, tokenizer, cache_dir)
  return Pipeline(sources=found, tokenizer=tokenizer, seq_len=seq_len, batch_size=batch_size, seed=seed,
                  process_index=process_index, process_count=process_count, caches=caches,
                  eval_cache=eval_cache, worker_count=worker_count)
