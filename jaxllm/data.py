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
- Conversations (a source of `sources.Conversation` documents): rendered with the tokenizer's chat
  template by the `encode_chat` the caller hands over (`jaxllm.chat.encode_chat`: the wiring
  passes it, which keeps this module's imports to three), which also gives the loss mask (assistant turns, or all
  tokens with loss_on='all'). They are always encoded once into a cache (`build_chat_cache`),
  which is where the choices are counted: a conversation over seq_len targets is dropped (or
  truncated, chat_overflow='truncate'), one with no supervised target is skipped; each count is
  logged and kept in the cache's meta.json, and a source left with no conversation is an error.
  Batches then carry `weights` (1 on targets that carry loss), which a text source sets to 1.
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
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from absl import flags, logging
from array_record.python import array_record_module
import grain
import numpy as np

from jaxllm import files
from jaxllm import tokenizer as tokenizer_lib
from jaxllm.documents import Documents, Sources, open_sources
from jaxllm.sources import MAX_DOC_CHARS, builtin_source, resolve_specs

TOKENIZER_DOCS = 5000  # about 10 MB of text: keeps tokenizer training to seconds
_ENCODE_BATCH = 32  # documents per sp.encode call: amortises the call, keeps memory small
_READ = grain.ReadOptions(num_threads=2, prefetch_buffer_size=8)  # 8 x 32 documents ahead

Batch = dict[str, np.ndarray]
# metrics.progress (a bar on a terminal, log lines otherwise), which the wiring hands over for the
# caches' one-off encoding passes; plain iteration by default.
Progress = Callable[..., Iterator]
_quiet: Progress = lambda items, **_: iter(items)


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


def _new_cache(path: Path) -> tuple[Path, array_record_module.ArrayRecordWriter]:
  """(the temporary dir a cache of `path` is written in, then renamed, and its record writer);
  a killed build's temporary dir is removed first (the caller holds the cache's lock)."""
  files.remove_stale_temps(str(path))
  tmp = path.with_name(f'{path.name}.tmp{os.getpid()}')
  shutil.rmtree(tmp, ignore_errors=True)
  tmp.mkdir(parents=True)
  return tmp, array_record_module.ArrayRecordWriter(str(tmp / 'ids.array_record'), 'group_size:1')


def build_token_cache(docs: Documents, tokenizer: tokenizer_lib.Tokenizer, path: Path, block: int = 256,
                      progress: Progress = _quiet) -> None:
  """Encodes every document of `docs` once into `path` (written to a temporary dir, then renamed)."""
  dtype = np.uint16 if tokenizer.vocab_size <= 1 << 16 else np.uint32
  tmp, writer = _new_cache(path)
  tokens = nbytes = 0
  starts = range(0, len(docs), block)
  for start in progress(starts, desc=f'tokenizing {docs.name}', total=len(starts), unit='block'):
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


def token_cache(docs: Documents, tokenizer: tokenizer_lib.Tokenizer, cache_dir: str,
                progress: Progress = _quiet) -> TokenCache:
  """The cache of `docs` under this tokenizer, built on first use."""
  key = hashlib.sha256(f'{docs.key} {tokenizer.fingerprint()}'.encode()).hexdigest()[:16]
  path = Path(cache_dir) / 'tokens' / key
  if not (path / 'meta.json').exists():
    logging.info('pre-tokenizing %s into %s', docs.name, path)
    build_token_cache(docs, tokenizer, path, progress=progress)
  return TokenCache(path)


class ChatCache(TokenCache):
  """Rendered conversations: record i holds the ids, then the loss mask (one byte per id), of the
  i-th conversation kept (see build_chat_cache)."""

  def ids(self, i: int) -> np.ndarray:
    """[2, n] int32: ids and their loss mask (1: the token is a supervised target)."""
    raw = self.records[int(i)]
    n = len(raw) // (self.dtype.itemsize + 1)
    return np.stack([np.frombuffer(raw, self.dtype, n).astype(np.int32),
                     np.frombuffer(raw, np.uint8, n, offset=n * self.dtype.itemsize).astype(np.int32)])


EncodeChat = Callable[..., tuple[np.ndarray, np.ndarray]]  # (tokenizer, messages, *, loss_on)


def build_chat_cache(docs: Documents, tokenizer: tokenizer_lib.Tokenizer, path: Path, *,
                     encode_chat: EncodeChat, seq_len: int, loss_on: str, overflow: str,
                     progress: Progress = _quiet) -> None:
  """Renders every conversation of `docs` once into `path` (module doc), counting what it leaves."""
  dtype = np.uint16 if tokenizer.vocab_size <= 1 << 16 else np.uint32
  tmp, writer = _new_cache(path)
  counts = dict(conversations=len(docs), kept=0, too_long=0, truncated=0, unsupervised=0, tokens=0,
                supervised=0)
  for i in progress(range(len(docs)), desc=f'rendering {docs.name}', total=len(docs),
                    unit='conversation'):
    try:
      ids, mask = encode_chat(tokenizer, json.loads(docs.text(i)), loss_on=loss_on)
    except ValueError as e:
      raise ValueError(f'{docs.name}, conversation {i}: {e}') from None
    cut = len(ids) - 1 > seq_len
    if cut and overflow == 'drop':
      counts['too_long'] += 1
      continue
    ids, mask = ids[:seq_len + 1], mask[:seq_len + 1]
    if not mask[1:].any():  # no target carries loss (left): the row would only cost compute
      counts['unsupervised'] += 1
      continue
    counts['truncated'] += cut
    writer.write(ids.astype(dtype).tobytes() + mask.astype(np.uint8).tobytes())
    counts['kept'] += 1
    counts['tokens'] += len(ids) - 1
    counts['supervised'] += int(mask[1:].sum())
  writer.close()
  if not counts['kept']:
    shutil.rmtree(tmp)
    if counts['unsupervised']:
      raise ValueError(f'{docs.name}: no conversation has a token to train on (loss_on='
                       f'{loss_on}) under the chat template of {tokenizer.path}: the template '
                       'must render assistant turns, or set data.loss_on=all')
    raise ValueError(f'{docs.name}: every conversation is longer than data.seq_len={seq_len} '
                     'tokens: raise data.seq_len, or set data.chat_overflow=truncate')
  meta = {'source': docs.name, 'tokenizer': tokenizer.path, 'dtype': np.dtype(dtype).name,
          'loss_on': loss_on, 'overflow': overflow, 'seq_len': seq_len, **counts}
  (tmp / 'meta.json').write_text(json.dumps(meta, indent=1))
  os.replace(tmp, path)


def chat_cache(docs: Documents, tokenizer: tokenizer_lib.Tokenizer, cache_dir: str, *,
               encode_chat: EncodeChat, seq_len: int, loss_on: str, overflow: str,
               progress: Progress = _quiet) -> ChatCache:
  """The rendered conversations of `docs` under these settings, built on first use; logs what
  was dropped, truncated or skipped."""
  key = hashlib.sha256(f'chat1 {docs.key} {tokenizer.fingerprint()} {seq_len} {loss_on} '
                       f'{overflow}'.encode()).hexdigest()[:16]
  path = Path(cache_dir) / 'tokens' / key
  if not (path / 'meta.json').exists():
    logging.info('rendering the conversations of %s into %s', docs.name, path)
    build_chat_cache(docs, tokenizer, path, encode_chat=encode_chat, seq_len=seq_len,
                     loss_on=loss_on, overflow=overflow, progress=progress)
  cache = ChatCache(path)
  m = cache.meta
  logging.info('%s: %d of %d conversations kept, %d of their %d targets supervised (loss_on=%s)',
               docs.name, m['kept'], m['conversations'], m['supervised'], m['tokens'], loss_on)
  for what, why in (('too_long', f'dropped: over data.seq_len={seq_len} targets (data.chat_overflow'
                                 '=truncate keeps their start)'),
                    ('truncated', f'truncated to data.seq_len={seq_len} targets'),
                    ('unsupervised', f'skipped: no target with loss (loss_on={loss_on})')):
    if m[what]:
      logging.warning('%s: %d conversations %s', docs.name, m[what], why)
  return cache


class _Chunk(grain.experimental.FlatMapTransform):
  """Each document's (inputs, targets) = (doc[:-1], doc[1:]) cut into chunks of at most seq_len;
  with `weights`, also the loss weight of each target (a conversation's mask, else 1)."""

  def __init__(self, seq_len: int, weights: bool = False):
    self.seq_len, self.max_fan_out = seq_len, 1 << 20  # the iter flat map has no fan-out limit
    self.weights = weights

  def flat_map(self, docs: list[np.ndarray]) -> list[dict[str, np.ndarray]]:
    L, out = self.seq_len, []
    for doc in docs:
      ids, mask = (doc[0], doc[1]) if doc.ndim == 2 else (doc, np.ones_like(doc))
      inputs, targets, weights = ids[:-1], ids[1:], mask[1:]
      for i in range(0, len(inputs), L):
        row = {'inputs': inputs[i:i + L], 'targets': targets[i:i + L]}
        if self.weights:
          row['weights'] = weights[i:i + L]
        out.append(row)
    return out


def _finish(rows: Batch) -> Batch:
  out = {'inputs': rows['inputs'], 'targets': rows['targets'],
         'segment_ids': rows['inputs_segment_ids'], 'positions': rows['inputs_positions']}
  if 'weights' in rows:
    out['weights'] = rows['weights']
  return out


def _pack(docs: grain.IterDataset, *, seq_len: int, batch_size: int, seed: int,
          shuffle: bool, weights: bool = False) -> grain.IterDataset:
  """Lists of documents (bos + ids + eos, or [ids; mask] of a conversation) -> packed rows with
  segment ids and positions (and `weights`)."""
  chunks = grain.experimental.FlatMapIterDataset(docs, _Chunk(seq_len, weights))
  keys = ('inputs', 'targets', 'weights') if weights else ('inputs', 'targets')
  return grain.experimental.FirstFitPackIterDataset(
      chunks, length_struct={k: seq_len for k in keys},
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
               process_index: int, process_count: int,
               caches: Sequence[TokenCache | None] | None = None,
               eval_cache: TokenCache | None = None, worker_count: int = 0):
    self.tokenizer, self.sources, self.eval_file_names = tokenizer, sources, sources.eval_file_names
    self.data_dir, self.skipped = sources.data_dir, sources.skipped
    self.train_source, self.eval_source = sources.train[0].data, sources.eval.data  # the first source's
    self.caches = list(caches) if caches else [None] * len(sources.train)  # None: encoded as read
    self.eval_cache, self.worker_count = eval_cache, worker_count
    self.seq_len, self.batch_size, self.seed = seq_len, batch_size, seed
    self.process_index, self.process_count = process_index, process_count
    # Batches carry `weights` when any source is conversations (text targets weigh 1).
    self.weights = any(d.chat for d in sources.train) or sources.eval.chat

  def _docs(self, split: str) -> tuple[list[Documents], list[TokenCache | None]]:
    if split == 'train':
      return self.sources.train, self.caches
    return [self.sources.eval], [self.eval_cache]

  def doc_count(self, split: str, source: int = 0) -> int:
    """Documents of a source the pipeline reads (a conversation cache keeps fewer)."""
    docs, caches = self._docs(split)
    return len(caches[source] if caches[source] is not None else docs[source])

  def _ids(self, split: str, pairs: list[tuple[int, int]]) -> list[np.ndarray]:
    """bos + ids + eos (or a conversation's [ids; mask]) of each (source, index), from the
    source's cache or encoded now."""
    docs, caches = self._docs(split)
    out = [caches[s].ids(i) if caches[s] is not None else None for s, i in pairs]
    todo = [k for k, ids in enumerate(out) if ids is None]
    texts = [docs[pairs[k][0]].text(pairs[k][1]) for k in todo]
    for k, ids in zip(todo, self.tokenizer.encode_docs(texts) if texts else ()):
      out[k] = ids
    return out

  def _rows(self, order: grain.MapDataset, split: str, *, shuffle: bool,
            seed: int | None = None) -> grain.IterDataset:
    docs = order.batch(_ENCODE_BATCH, batch_fn=list).map(functools.partial(self._ids, split))
    return _pack(docs.to_iter_dataset(_READ), seq_len=self.seq_len, batch_size=self.batch_size,
                 seed=self.seed if seed is None else seed, shuffle=shuffle, weights=self.weights)

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
      n = self.doc_count('train', s)
      shard = grain.MapDataset.range(n)[self.process_index::self.process_count]
      if not len(shard):
        raise ValueError(f'{docs.name}: {n} train documents cannot feed {self.process_count} processes')
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
    order = grain.MapDataset.range(self.doc_count('eval')).map(functools.partial(_tag, 0))
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
                  worker_count: int = 0, train_missing_tokenizer: bool = True,
                  chat_template: str = '', loss_on: str = 'assistant',
                  chat_overflow: str = 'drop', encode_chat: EncodeChat | None = None,
                  eval_fraction: float = 0.0, progress: Progress = _quiet) -> Pipeline:
  """Builds (or reuses) the datasets under cache_dir, the tokenizer at tokenizer_path and, with
  pretokenize=True, the token caches (conversations are always cached); `sources` ('SPEC[@WEIGHT],
  ...', see the module doc) replaces source_dir, and neither means the embedded corpus.
  `chat_template` overrides the tokenizer's (tokenizer.open_tokenizer); conversations need
  `encode_chat` (jaxllm.chat.encode_chat); `progress` shows the caches' encoding passes."""
  if not 0 <= process_index < process_count:
    raise ValueError(f'process_index={process_index} must be in [0, process_count={process_count})')
  if seq_len < 2 or batch_size < 1 or worker_count < 0:
    raise ValueError(f'seq_len={seq_len} must be >= 2, batch_size={batch_size} >= 1, worker_count >= 0')
  specs = resolve_specs(sources, source_dir)
  with _file_lock(Path(cache_dir) / '.lock'):
    specs = [(builtin_source(spec, cache_dir), w) for spec, w in specs]
    eval_source = eval_source and builtin_source(eval_source, cache_dir)
    found = open_sources(specs, cache_dir=cache_dir, eval_files=eval_files, eval_source=eval_source,
                         eval_fraction=eval_fraction,
                         text_field=text_field, tfds_data_dir=tfds_data_dir, skip_bad_records=skip_bad_records)
    if not tokenizer_lib.exists(tokenizer_path):
      if not train_missing_tokenizer:  # a typo or unmounted volume must not get a new tokenizer
        raise FileNotFoundError(f'data.tokenizer={tokenizer_path} does not exist: fix the path, or '
                                'leave data.tokenizer empty to train one into the workdir')
      train_tokenizer(tokenizer_path, tokenizer_sample(found), vocab_size)
    tokenizer = tokenizer_lib.open_tokenizer(tokenizer_path, chat_template=chat_template)
    # An HF model's embedding table may have rows its tokenizer never uses (Qwen2: 151,936 rows
    # for 151,665 tokens); one trained here matches exactly, so a mismatch means another model's.
    trained_here = isinstance(tokenizer, tokenizer_lib.SentencePieceTokenizer)
    if tokenizer.vocab_size > vocab_size or (trained_here and tokenizer.vocab_size != vocab_size):
      raise ValueError(f'{tokenizer_path} has vocab_size {tokenizer.vocab_size}, not {vocab_size}: delete '
                       'it to retrain, or set vocab_size to match')

    def cache(docs: Documents) -> TokenCache | None:
      if docs.chat:
        if encode_chat is None:
          raise ValueError(f'{docs.name} holds conversations: pass encode_chat (jaxllm.chat.encode_chat)')
        return chat_cache(docs, tokenizer, cache_dir, encode_chat=encode_chat, seq_len=seq_len,
                          loss_on=loss_on, overflow=chat_overflow, progress=progress)
      return token_cache(docs, tokenizer, cache_dir, progress) if pretokenize else None
    caches, eval_cache = [cache(docs) for docs in found.train], cache(found.eval)
  return Pipeline(sources=found, tokenizer=tokenizer, seq_len=seq_len, batch_size=batch_size, seed=seed,
                  process_index=process_index, process_count=process_count, caches=caches,
                  eval_cache=eval_cache, worker_count=worker_count)
