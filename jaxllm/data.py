"""Text sources -> TFDS array_record -> grain -> sentencepiece -> packed batches of host-local numpy.

Reading sources (SPEC syntax, document rules, bad input, the eval split) is `jaxllm.sources`; this
module trains the tokenizer, caches token ids and packs the documents it opens into batches.

Choices:
- Mixture: each source's documents are sharded by process and reshuffled each epoch on their own,
  then interleaved in proportion to the weights by `grain.MapDataset.mix` (a fixed pattern, not a
  random draw), so the order is a pure function of the seed and resume stays exact.
- Tokenizer: sentencepiece BPE trained on whole train documents (newlines are learned as pieces),
  at most `TOKENIZER_DOCS` documents taken at a stride, split between sources by weight. A
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
- Restart: `train_iter(restart_step=N)` (a resume without the saved data position, e.g. on another
  number of processes) reads a fresh order seeded by (seed, N): deterministic for a given step, and
  not a replay of the documents the first steps already read.
- Workers: `worker_count > 0` runs the pipeline in that many grain worker processes
  (`mp_prefetch`); its iterator state covers the workers, so resume stays exact, but the batch
  order differs from `worker_count=0` (each worker packs its own slice of the documents).
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import json
import math
import os
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path

from absl import flags, logging
from array_record.python import array_record_module
import grain
import numpy as np

from jaxllm import tokenizer as tokenizer_lib
from jaxllm.documents import Documents, Sources, open_sources
from jaxllm.sources import MAX_DOC_CHARS, resolve_specs

TOKENIZER_DOCS = 5000  # about 10 MB of text: keeps tokenizer training to seconds
_ENCODE_BATCH = 32  # documents per sp.encode call: amortises the call, keeps memory small
_READ = grain.ReadOptions(num_threads=2, prefetch_buffer_size=8)  # 8 x 32 documents ahead

Batch = dict[str, np.ndarray]


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


def train_tokenizer(path: str, texts: list[str], vocab_size: int, **options) -> None:
  """tokenizer.train_sentencepiece with this pipeline's sample and document limits."""
  # max_sentences=0: sentencepiece loads every text given (the caller chose how many).
  tokenizer_lib.train_sentencepiece(path, texts, vocab_size, max_sentences=0,
                                    max_chars=4 * MAX_DOC_CHARS, **options)


def tokenizer_sample(sources: Sources, n: int = TOKENIZER_DOCS) -> list[str]:
  """About n train documents at a stride through each source, split by weight."""
  texts, total = [], sum(sources.weights)
  for docs, w in zip(sources.train, sources.weights):
    stride = max(1, math.ceil(len(docs) / max(1, round(n * w / total))))
    texts += [docs.text(i) for i in range(0, len(docs), stride)]
  return texts


def bytes_per_token(tokenizer: tokenizer_lib.Tokenizer, texts: list[str]) -> float:
  """UTF-8 bytes per token (no bos/eos) over `texts`: the tokenizer's compression."""
  tokens = sum(len(ids) for ids in tokenizer.encode_batch(texts))
  return sum(len(t.encode('utf-8')) for t in texts) / max(tokens, 1)


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


def build_token_cache(docs: Documents, tokenizer: tokenizer_lib.Tokenizer, path: Path, block: int = 256) -> None:
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


def token_cache(docs: Documents, tokenizer: tokenizer_lib.Tokenizer, cache_dir: str) -> TokenCache:
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


def _pack(docs: grain.IterDataset, *, seq_len: int, batch_size: int, seed: int,
          shuffle: bool) -> grain.IterDataset:
  """Lists of documents (bos + ids + eos) -> packed rows with segment ids and positions."""
  chunks = grain.experimental.FlatMapIterDataset(docs, _Chunk(seq_len))
  return grain.experimental.FirstFitPackIterDataset(
      chunks, length_struct={'inputs': seq_len, 'targets': seq_len},
      num_packing_bins=4 * batch_size, seed=seed, shuffle_bins=shuffle)  # more bins, less padding


def pack_documents(docs: Sequence[np.ndarray], *, seq_len: int, batch_size: int,
                   seed: int = 0) -> Iterator[Batch]:
  """Batches of `docs` (int32 bos + ids + eos each, in this order) packed exactly as training
  packs them: the same chunking, first-fit packing, segment ids and positions (for benchmarks)."""
  lists = grain.MapDataset.source(list(docs)).batch(_ENCODE_BATCH, batch_fn=list)
  rows = _pack(lists.to_iter_dataset(), seq_len=seq_len, batch_size=batch_size, seed=seed,
               shuffle=True)
  return iter(rows.batch(batch_size, drop_remainder=True).map(_finish))


def _tag(source: int, index: int) -> tuple[int, int]:
  return source, int(index)


class Pipeline:
  """Built by make_pipeline(); batches are dicts of int32 [batch_size, seq_len] numpy arrays."""

  def __init__(self, *, sources: Sources, tokenizer: tokenizer_lib.Tokenizer, seq_len: int, batch_size: int, seed: int,
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

  def _rows(self, order: grain.MapDataset, split: str, *, shuffle: bool,
            seed: int | None = None) -> grain.IterDataset:
    docs = order.batch(_ENCODE_BATCH, batch_fn=list).map(functools.partial(self._ids, split))
    return _pack(docs.to_iter_dataset(_READ), seq_len=self.seq_len, batch_size=self.batch_size,
                 seed=self.seed if seed is None else seed, shuffle=shuffle)

  def restart_seed(self, step: int) -> int:
    """The data seed of an order restarted at `step` (0: the run's own data.seed)."""
    if not step:
      return self.seed
    return int(np.random.SeedSequence([self.seed, step]).generate_state(1)[0] >> 1)

  def train_doc_order(self, seed: int | None = None) -> grain.MapDataset:
    """(source, document) pairs this process reads, in order: each source's shard reshuffled every
    epoch (by seed + source + epoch), the sources interleaved by weight."""
    seed, orders = self.seed if seed is None else seed, []
    for s, docs in enumerate(self.sources.train):
      shard = grain.MapDataset.range(len(docs))[self.process_index::self.process_count]
      if not len(shard):
        raise ValueError(f'{docs.name}: {len(docs)} train documents cannot feed {self.process_count} processes')
      orders.append(shard.shuffle(seed=seed + s).repeat().map(functools.partial(_tag, s)))
    return orders[0] if len(orders) == 1 else grain.MapDataset.mix(orders, self.sources.weights)

  def train_iter(self, restart_step: int = 0) -> grain.DatasetIterator:
    """Infinite, checkpointable (get_state()/set_state()) iterator of this process's train batches;
    `restart_step` > 0: a fresh order for a resume without the saved position (module doc)."""
    seed = self.restart_seed(restart_step)
    rows = self._rows(self.train_doc_order(seed), 'train', shuffle=True, seed=seed)
    batches = rows.batch(self.batch_size, drop_remainder=True).map(_finish)
    if self.worker_count:
      if not flags.FLAGS.is_parsed():  # grain's workers read absl flags; outside absl.app use defaults
        flags.FLAGS.mark_as_parsed()
      batches = batches.mp_prefetch(grain.multiprocessing.MultiprocessingOptions(num_workers=self.worker_count))
    return iter(batches)

  def eval_batches(self, max_batches: int | None = None) -> Iterator[Batch]:
    """The eval split once, in order, the same on every call; every process yields as many batches."""
    if not len(self.sources.eval):  # a loss over no tokens would read 0, a perplexity 1
      raise ValueError(f'the eval split ({self.sources.eval.name}) holds no documents; raise '
                       'data.eval_files or set data.eval_source to held-out text')
    order = grain.MapDataset.range(len(self.sources.eval)).map(functools.partial(_tag, 0))
    global_rows = self.batch_size * self.process_count
    for step, rows in enumerate(self._rows(order, 'eval', shuffle=False).batch(global_rows)):
      if max_batches is not None and step >= max_batches:
        return
      mine = slice(self.process_index * self.batch_size, (self.process_index + 1) * self.batch_size)
      yield _finish({k: np.pad(v, ((0, global_rows - len(v)), (0, 0)))[mine] for k, v in rows.items()})


def make_pipeline(*, source_dir: str | None = None, cache_dir: str, tokenizer_path: str, vocab_size: int,
                  seq_len: int, batch_size: int, eval_files: int, seed: int, process_index: int = 0,
                  process_count: int = 1, sources: str | Sequence[tuple[str, float]] = '',
                  eval_source: str = '', text_field: str = 'text', tfds_data_dir: str | None = None,
                  skip_bad_records: bool = False, pretokenize: bool = False,
                  worker_count: int = 0, train_missing_tokenizer: bool = True) -> Pipeline:
  """Builds (or reuses) the datasets under cache_dir, the tokenizer at tokenizer_path and, with
  pretokenize=True, the token caches; `sources` ('SPEC[@WEIGHT], ...', see the module doc) replaces
  source_dir, and neither means the embedded corpus."""
  if not 0 <= process_index < process_count:
    raise ValueError(f'process_index={process_index} must be in [0, process_count={process_count})')
  if seq_len < 2 or batch_size < 1 or worker_count < 0:
    raise ValueError(f'seq_len={seq_len} must be >= 2, batch_size={batch_size} >= 1, worker_count >= 0')
  specs = resolve_specs(sources, source_dir)
  with _file_lock(Path(cache_dir) / '.lock'):
    found = open_sources(specs, cache_dir=cache_dir, eval_files=eval_files, eval_source=eval_source,
                         text_field=text_field, tfds_data_dir=tfds_data_dir, skip_bad_records=skip_bad_records)
    if not tokenizer_lib.exists(tokenizer_path):
      if not train_missing_tokenizer:  # a typo or unmounted volume must not get a new tokenizer
        raise FileNotFoundError(f'data.tokenizer={tokenizer_path} does not exist: fix the path, or '
                                'leave data.tokenizer empty to train one into the workdir')
      train_tokenizer(tokenizer_path, tokenizer_sample(found), vocab_size)
    tokenizer = tokenizer_lib.open_tokenizer(tokenizer_path)
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
