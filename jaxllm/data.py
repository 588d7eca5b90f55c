"""Text files -> TFDS array_record -> grain -> sentencepiece -> packed batches of host-local numpy.

Choices:
- Document: a file is cut at blank lines into pieces of at least `DOC_CHARS` (2048) characters
  (a piece with no blank line for 8x that is cut at a newline), so the 5 MB Shakespeare corpus gives
  about 2,300 documents: fine-grained enough to shuffle, long enough that packing wastes little.
  Whitespace-only pieces are dropped; every document is an exact substring of its file.
- Eval split: `eval_files` whole files, taken at a fixed stride from the sorted file names
  (42 files, eval_files=2 -> the 11th and 32nd); recorded in `Pipeline.eval_file_names`.
- Cache: `<cache_dir>/<fingerprint>/`, the fingerprint hashing file names, sizes and mtimes plus the
  split rules, so a changed corpus builds a fresh dataset and an unchanged one is reused.
- Tokenizer: sentencepiece BPE trained on whole train documents (newlines are learned as pieces),
  at most `_TOKENIZER_DOCS` documents taken at a stride. A vocab_size the corpus cannot fill is an
  error (hard limit), so the model's vocab always equals the tokenizer's.
- Rows: each document is bos + ids + eos; its (inputs, targets) = (doc[:-1], doc[1:]) pairs are cut
  into chunks of at most seq_len and first-fit packed, so no target crosses a document and padding
  has segment_id 0. Train: documents sharded by process, reshuffled each epoch, infinite.
  Eval: every process packs the whole eval split identically and takes its rows of each global
  batch, so all processes see the same number of batches; the last one is padded, nothing dropped.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.resources
import io
import math
import os
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import grain
import numpy as np
import sentencepiece as spm
import tensorflow_datasets as tfds

DOC_CHARS = 2048
_MAX_DOC_CHARS = 8 * DOC_CHARS
_FORMAT = 1  # bump when the document rules change, so caches rebuild
_TOKENIZER_DOCS = 5000  # about 10 MB of text: keeps tokenizer training to seconds
_READ = grain.ReadOptions(num_threads=2, prefetch_buffer_size=64)  # small machines, small buffers

Batch = dict[str, np.ndarray]


def default_source_dir() -> str:
  """The Shakespeare corpus shipped inside the package."""
  return str(importlib.resources.files('jaxllm') / 'corpus' / 'shakespeare')


def list_text_files(source_dir: str) -> list[Path]:
  path = Path(source_dir)
  if not path.is_dir():
    raise FileNotFoundError(f'{path}: no such directory; point source_dir at a directory of UTF-8 .txt '
                            'files, or use source_dir=None for the embedded corpus')
  files = sorted(f for f in path.glob('*.txt') if f.is_file())
  if not files:
    raise ValueError(f'{path}: no .txt files in it; add UTF-8 .txt files or use source_dir=None '
                     'for the embedded corpus')
  return files


def read_text(path: Path) -> str:
  try:
    return path.read_bytes().decode('utf-8')
  except UnicodeDecodeError as e:
    raise ValueError(f'{path}: not valid UTF-8 (byte {e.start}); re-encode it '
                     '(iconv -t UTF-8) or remove it from the directory') from None


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


def pick_eval_files(names: list[str], eval_files: int) -> list[str]:
  """`eval_files` names at a fixed stride through the sorted list, centred in each stride."""
  n = len(names)
  if not 0 < eval_files < n:
    raise ValueError(f'eval_files={eval_files}: must be between 1 and {n - 1} for {n} .txt files')
  names = sorted(names)
  return [names[(2 * i + 1) * n // (2 * eval_files)] for i in range(eval_files)]


class JaxllmTextDocuments(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Documents of a directory of .txt files; splits 'train' and 'eval' hold out whole files."""

  VERSION = tfds.core.Version('1.0.0')

  def __init__(self, *, files: list[Path], eval_names: list[str], **kwargs: Any):
    self._files, self._eval_names = files, eval_names
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    # DatasetInfo(builder=self) and not dataset_info_from_configs(): the latter needs a package dir.
    return tfds.core.DatasetInfo(
        builder=self, description=f'eval files: {", ".join(self._eval_names)}',
        features=tfds.features.FeaturesDict({'text': tfds.features.Text(), 'file': tfds.features.Text()}),
        disable_shuffling=True)  # keep file order: eval reads deterministically, train is shuffled by grain

  def _split_generators(self, dl_manager: Any) -> dict[str, Any]:
    ev = set(self._eval_names)
    return {'train': self._generate_examples([f for f in self._files if f.name not in ev]),
            'eval': self._generate_examples([f for f in self._files if f.name in ev])}

  def _generate_examples(self, files: list[Path]) -> Iterator[tuple[str, dict[str, str]]]:
    for f in files:
      for i, doc in enumerate(split_documents(read_text(f))):
        yield f'{f.name}:{i:06d}', {'text': doc, 'file': f.name}


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


class Tokenizer:
  """A sentencepiece model; encode() adds no bos/eos."""

  def __init__(self, path: str):
    self.sp = spm.SentencePieceProcessor(model_file=str(path))
    self.vocab_size, self.bos_id, self.eos_id = self.sp.vocab_size(), self.sp.bos_id(), self.sp.eos_id()

  def encode(self, text: str) -> list[int]:
    return self.sp.encode(text)

  def decode(self, ids: Iterable[int]) -> str:
    return self.sp.decode([int(i) for i in ids])

  def token_bytes(self) -> np.ndarray:
    """UTF-8 bytes each id stands for ([vocab] int32; 0 for control ids), for bits per byte."""
    out = np.zeros(self.vocab_size, np.int32)
    for i in range(self.vocab_size):
      if self.sp.is_byte(i):
        out[i] = 1
      elif not (self.sp.is_control(i) or self.sp.is_unknown(i)):
        out[i] = len(self.sp.id_to_piece(i).replace('\u2581', ' ').encode('utf-8'))
    return out


def train_tokenizer(path: str, texts: list[str], vocab_size: int) -> None:
  """BPE on `texts` (one document per sentence), written atomically to `path`."""
  model = io.BytesIO()
  try:
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_writer=model, model_type='bpe', vocab_size=vocab_size,
        character_coverage=1.0, byte_fallback=True, split_digits=True, unk_id=0, bos_id=1, eos_id=2,
        pad_id=-1, normalization_rule_name='identity', remove_extra_whitespaces=False,  # lossless
        input_sentence_size=_TOKENIZER_DOCS, max_sentence_length=4 * _MAX_DOC_CHARS,
        num_threads=os.cpu_count() or 1, minloglevel=2)
  except RuntimeError as e:
    raise ValueError(f'vocab_size={vocab_size} does not suit this corpus: {str(e).strip()}') from None
  Path(path).parent.mkdir(parents=True, exist_ok=True)
  tmp = f'{path}.tmp{os.getpid()}'
  Path(tmp).write_bytes(model.getvalue())
  os.replace(tmp, path)


def unigram_entropy(tokenizer: Tokenizer, texts: Iterable[str]) -> float:
  """Nats per target token (ids + eos) of a unigram model fit to `texts`: a loss to beat."""
  counts = np.zeros(tokenizer.vocab_size, np.int64)
  for text in texts:
    counts += np.bincount(tokenizer.encode(text) + [tokenizer.eos_id], minlength=tokenizer.vocab_size)
  p = counts[counts > 0] / counts.sum()
  return float(-(p * np.log(p)).sum())


class _Chunk(grain.experimental.FlatMapTransform):
  """A document's (inputs, targets) = (doc[:-1], doc[1:]) cut into chunks of at most seq_len."""

  def __init__(self, seq_len: int):
    self.seq_len, self.max_fan_out = seq_len, 4 * _MAX_DOC_CHARS // seq_len + 1

  def flat_map(self, doc: np.ndarray) -> list[dict[str, np.ndarray]]:
    inputs, targets = doc[:-1], doc[1:]
    return [{'inputs': inputs[i:i + self.seq_len], 'targets': targets[i:i + self.seq_len]}
            for i in range(0, len(inputs), self.seq_len)]


def _finish(rows: Batch) -> Batch:
  return {'inputs': rows['inputs'], 'targets': rows['targets'],
          'segment_ids': rows['inputs_segment_ids'], 'positions': rows['inputs_positions']}


class Pipeline:
  """Built by make_pipeline(); batches are dicts of int32 [batch_size, seq_len] numpy arrays."""

  def __init__(self, *, builder: JaxllmTextDocuments, tokenizer: Tokenizer, eval_file_names: list[str],
               seq_len: int, batch_size: int, seed: int, process_index: int, process_count: int):
    self.tokenizer, self.eval_file_names, self.data_dir = tokenizer, eval_file_names, builder.data_dir
    self.train_source, self.eval_source = builder.as_data_source('train'), builder.as_data_source('eval')
    self.seq_len, self.batch_size, self.seed = seq_len, batch_size, seed
    self.process_index, self.process_count = process_index, process_count

  def _tokenize(self, example: dict[str, Any]) -> np.ndarray:
    ids = self.tokenizer.encode(example['text'].decode('utf-8'))
    return np.array([self.tokenizer.bos_id, *ids, self.tokenizer.eos_id], np.int32)

  def _rows(self, docs: grain.IterDataset, *, shuffle: bool) -> grain.IterDataset:
    chunks = grain.experimental.FlatMapIterDataset(docs, _Chunk(self.seq_len))
    return grain.experimental.FirstFitPackIterDataset(
        chunks, length_struct={'inputs': self.seq_len, 'targets': self.seq_len},
        num_packing_bins=4 * self.batch_size, seed=self.seed, shuffle_bins=shuffle)  # more bins, less padding

  def train_doc_order(self) -> grain.MapDataset:
    """Train document indices this process reads, in order: element e*n+i is epoch e's i-th."""
    shard = grain.MapDataset.range(len(self.train_source))[self.process_index::self.process_count]
    if not len(shard):
      raise ValueError(f'{len(self.train_source)} train documents cannot feed {self.process_count} processes')
    return shard.shuffle(seed=self.seed).repeat()  # shuffle keys each epoch by seed + epoch

  def train_iter(self) -> grain.DatasetIterator:
    """Infinite, checkpointable (get_state()/set_state()) iterator of this process's train batches."""
    docs = self.train_doc_order().map(lambda i: self._tokenize(self.train_source[int(i)]))
    rows = self._rows(docs.to_iter_dataset(_READ), shuffle=True)
    return iter(rows.batch(self.batch_size, drop_remainder=True).map(_finish))

  def eval_batches(self, max_batches: int | None = None) -> Iterator[Batch]:
    """The eval split once, in order, the same on every call; every process yields as many batches."""
    docs = grain.MapDataset.source(self.eval_source).map(self._tokenize).to_iter_dataset(_READ)
    global_rows = self.batch_size * self.process_count
    for step, rows in enumerate(self._rows(docs, shuffle=False).batch(global_rows)):
      if max_batches is not None and step >= max_batches:
        return
      mine = slice(self.process_index * self.batch_size, (self.process_index + 1) * self.batch_size)
      yield _finish({k: np.pad(v, ((0, global_rows - len(v)), (0, 0)))[mine] for k, v in rows.items()})

  def eval_stats(self) -> dict[str, int]:
    """Documents, target tokens and UTF-8 bytes of the whole eval split (bits/byte = nats/ln2/bytes)."""
    texts = [ex['text'] for ex in self.eval_source]
    tokens = sum(len(self.tokenizer.encode(t.decode('utf-8'))) + 1 for t in texts)  # + eos
    return {'docs': len(texts), 'tokens': tokens, 'bytes': sum(len(t) for t in texts)}

  def train_unigram_entropy(self) -> float:
    return unigram_entropy(self.tokenizer, (ex['text'].decode('utf-8') for ex in self.train_source))


def make_pipeline(*, source_dir: str | None, cache_dir: str, tokenizer_path: str, vocab_size: int,
                  seq_len: int, batch_size: int, eval_files: int, seed: int, process_index: int = 0,
                  process_count: int = 1) -> Pipeline:
  """Builds (or reuses) the dataset under cache_dir and the tokenizer at tokenizer_path."""
  if not 0 <= process_index < process_count:
    raise ValueError(f'process_index={process_index} must be in [0, process_count={process_count})')
  if seq_len < 2 or batch_size < 1:
    raise ValueError(f'seq_len={seq_len} must be >= 2 and batch_size={batch_size} >= 1')
  files = list_text_files(source_dir or default_source_dir())
  eval_names = pick_eval_files([f.name for f in files], eval_files)
  key = hashlib.sha256(f'{_FORMAT} {DOC_CHARS} {eval_names}'.encode())
  for f in files:
    st = f.stat()
    key.update(f'{f.name} {st.st_size} {st.st_mtime_ns}\n'.encode())
  data_dir = Path(cache_dir) / key.hexdigest()[:16]
  with _file_lock(Path(cache_dir) / '.lock'):
    builder = JaxllmTextDocuments(files=files, eval_names=eval_names, data_dir=str(data_dir),
                                  file_format='array_record')
    if not builder.is_prepared():
      for f in files:  # fail on a bad file with its name before tfds leaves half a dataset
        read_text(f)
      tfds.display_progress_bar(False)  # a one-second build need not flood the training log
      builder.download_and_prepare()
    if not Path(tokenizer_path).exists():
      train = builder.as_data_source('train')
      stride = math.ceil(len(train) / _TOKENIZER_DOCS)
      train_tokenizer(tokenizer_path, [train[i]['text'].decode('utf-8') for i in range(0, len(train), stride)],
                      vocab_size)
  tokenizer = Tokenizer(tokenizer_path)
  if tokenizer.vocab_size != vocab_size:
    raise ValueError(f'{tokenizer_path} has vocab_size {tokenizer.vocab_size}, not {vocab_size}: delete it '
                     'to retrain, or set vocab_size to match')
  return Pipeline(builder=builder, tokenizer=tokenizer, eval_file_names=eval_names, seq_len=seq_len,
                  batch_size=batch_size, seed=seed, process_index=process_index, process_count=process_count)
