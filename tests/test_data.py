"""Tests of jaxllm.data on the embedded corpus: splits, tokenizer, packing, sharding, resume, errors.

The source-reading tests (document rules, SPEC syntax, bad input) are in test_sources.py.
"""

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest

from jaxllm import data, documents, sources
from jaxllm import tokenizer as tokenizer_lib

VOCAB, SEQ, BATCH = 512, 64, 8


def _make(work, **overrides):
  kwargs = dict(source_dir=None, cache_dir=str(work / 'data'), tokenizer_path=str(work / 'tokenizer.model'),
                vocab_size=VOCAB, seq_len=SEQ, batch_size=BATCH, eval_files=2, seed=0)
  return data.make_pipeline(**{**kwargs, **overrides})


@pytest.fixture(scope='session')
def work(tmp_path_factory):
  return tmp_path_factory.mktemp('data_work')


@pytest.fixture(scope='session')
def pipe(work):
  return _make(work)


@pytest.fixture(scope='session')
def corpus():
  return {f.name: f.read_text('utf-8') for f in sources.list_source_files(sources.default_source_dir())}


def _entropy(counts: np.ndarray) -> float:
  p = counts[counts > 0] / counts.sum()
  return float(-(p * np.log(p)).sum())


def unigram_entropy(tokenizer, texts) -> float:
  """Nats per target token (ids + eos) of a unigram model fit to `texts`: the loss of the best
  model that ignores context (the README compares the tiny run with it)."""
  counts = np.zeros(tokenizer.vocab_size, np.int64)
  for text in texts:
    counts += np.bincount(tokenizer.encode(text) + [tokenizer.eos_id], minlength=tokenizer.vocab_size)
  return _entropy(counts)


def eval_stats(pipe) -> dict[str, int]:
  """Documents, target tokens and UTF-8 bytes of the whole eval split, counted from the token
  cache's metadata when the pipeline has one, else from the text (bits/byte = nats/ln2/bytes)."""
  if pipe.eval_cache:
    return {k: pipe.eval_cache.meta[k] for k in ('docs', 'tokens', 'bytes')}
  docs = pipe.sources.eval
  texts = [docs.text(i) for i in range(len(docs))]
  tokens = sum(len(ids) + 1 for ids in pipe.tokenizer.encode_batch(texts))  # + eos
  return {'docs': len(texts), 'tokens': tokens, 'bytes': sum(len(t.encode('utf-8')) for t in texts)}


def train_unigram_entropy(pipe, max_docs: int = 20_000) -> float:
  """Nats per target of a unigram model of the first source's train documents (at a stride),
  read through the pipeline's own id route (text or token cache)."""
  docs = pipe.sources.train[0]
  picked = range(0, len(docs), math.ceil(len(docs) / max_docs))
  counts = np.zeros(pipe.tokenizer.vocab_size, np.int64)
  for start in range(0, len(picked), 256):
    for ids in pipe._ids('train', [(0, i) for i in picked[start:start + 256]]):
      counts += np.bincount(ids[1:], minlength=pipe.tokenizer.vocab_size)  # targets: ids + eos
  return _entropy(counts)


def _take(it, n):
  return [next(it) for _ in range(n)]


def _same(a, b):
  return len(a) == len(b) and all(x.keys() == y.keys() and all(np.array_equal(x[k], y[k]) for k in x)
                                  for x, y in zip(a, b))


def _saved_and_resumed(make_iter, skip, n):
  """(the n batches after `skip`, those from a fresh iterator given the state saved after `skip`,
  passed through JSON as a checkpoint does, and both iterators)."""
  it = make_iter()
  _take(it, skip)
  state = json.loads(json.dumps(it.get_state()))
  expected = _take(it, n)
  resumed = make_iter()
  resumed.set_state(state)
  return expected, _take(resumed, n), (it, resumed)


def _segments(batch):
  """(inputs, targets, positions) of every segment of every row."""
  for r in range(batch['inputs'].shape[0]):
    seg = batch['segment_ids'][r]
    for s in np.unique(seg[seg > 0]):
      m = seg == s
      yield batch['inputs'][r][m], batch['targets'][r][m], batch['positions'][r][m]


def _segment_text(tok, inputs, targets):
  ids = [int(i) for i in inputs] + [int(targets[-1])]
  return tok.decode([i for i in ids if i not in (tok.bos_id, tok.eos_id)])


def test_determinism_same_seed_same_batches_other_seed_differs(pipe, work):
  first = _take(pipe.train_iter(), 3)
  assert _same(first, _take(pipe.train_iter(), 3))
  assert _same(first, _take(_make(work).train_iter(), 3))
  other = _make(work, seed=1)
  assert not _same(first, _take(other.train_iter(), 3))
  assert [pipe.train_doc_order()[i] for i in range(20)] != [other.train_doc_order()[i] for i in range(20)]


def test_resume_from_saved_state_is_exact(pipe):
  # 5 batches of 8 rows: stops inside a packed group of 32 bins; the state goes through JSON.
  expected, resumed, _ = _saved_and_resumed(pipe.train_iter, 5, 6)
  assert _same(expected, resumed)
  uninterrupted = _take(pipe.train_iter(), 11)[5:]
  assert _same(expected, uninterrupted)


def test_restarted_order_is_deterministic_and_fresh(pipe):
  """A resume without the data position (checkpoint.restore_data=False) at step 40: the same
  batches on every such restart, not those of a fresh run, and the documents still cover an epoch."""
  restarted = _take(pipe.train_iter(restart_step=40), 2)
  assert _same(restarted, _take(pipe.train_iter(restart_step=40), 2))
  assert not _same(restarted, _take(pipe.train_iter(), 2))
  assert not _same(restarted, _take(pipe.train_iter(restart_step=41), 2))
  order, n = pipe.train_doc_order(pipe.restart_seed(40)), len(pipe.train_source)
  assert sorted(order[i][1] for i in range(n)) == list(range(n))


def test_epochs_reshuffle_and_cover_every_document(pipe):
  order = pipe.train_doc_order()
  n = len(pipe.train_source)
  e0, e1 = [order[i][1] for i in range(n)], [order[n + i][1] for i in range(n)]
  assert sorted(e0) == sorted(e1) == list(range(n))
  assert e0 != e1


@pytest.mark.parametrize('split', ['train', 'eval'])
def test_packing_invariants_and_no_mixed_documents(pipe, corpus, split):
  batches = _take(pipe.train_iter(), 12) if split == 'train' else list(pipe.eval_batches(max_batches=12))
  tok, text = pipe.tokenizer, '\x00'.join(corpus.values())
  for b in batches:
    assert set(b) == {'inputs', 'targets', 'segment_ids', 'positions'}
    assert all(v.dtype == np.int32 and v.shape == (BATCH, SEQ) for v in b.values())
    seg, pos = b['segment_ids'], b['positions']
    same = (seg[:, :-1] == seg[:, 1:]) & (seg[:, :-1] > 0)
    assert np.array_equal(b['targets'][:, :-1][same], b['inputs'][:, 1:][same])  # next token, same doc
    starts = (seg > 0) & np.concatenate([np.ones((BATCH, 1), bool), seg[:, 1:] != seg[:, :-1]], axis=1)
    assert np.all(pos[starts] == 0)
    assert np.all(pos[:, 1:][same] == pos[:, :-1][same] + 1)
    assert np.all(np.diff(seg, axis=1)[seg[:, 1:] > 0] >= 0) and np.all(seg[:, 0] == 1)
    assert np.all((seg[:, 1:] == 0) | (seg[:, :-1] > 0))  # padding only at the end of a row
    for inputs, targets, positions in _segments(b):
      assert np.all(positions[inputs == tok.bos_id] == 0)  # bos only starts a segment
      assert tok.eos_id not in targets[:-1]  # eos only ends one
      assert _segment_text(tok, inputs, targets) in text
  assert sum((b['segment_ids'] > 0).mean() for b in batches) / len(batches) > 0.9  # little padding


def test_pack_documents_packs_like_training():
  """The packer tools/benchmark.py uses (the pipeline's own): every target token of every
  document lands once, in a segment whose positions restart at 0, padding only at row ends."""
  rng = np.random.default_rng(0)
  docs = [np.r_[1, rng.integers(3, 99, n), 2].astype(np.int32) for n in (10, 30, 5, 50, 7, 1)]
  rows = list(data.pack_documents(docs, seq_len=16, batch_size=2))
  seg = np.concatenate([b['segment_ids'] for b in rows])
  pos = np.concatenate([b['positions'] for b in rows])
  targets = np.concatenate([b['targets'] for b in rows])
  starts = (seg > 0) & np.concatenate([np.ones((len(seg), 1), bool), seg[:, 1:] != seg[:, :-1]], 1)
  assert np.all(pos[starts] == 0) and np.all((seg[:, 1:] == 0) | (seg[:, :-1] > 0))
  inputs = np.concatenate([b['inputs'] for b in rows])
  text = ' ' + ' '.join(' '.join(map(str, d)) for d in docs) + ' '
  for r, s in zip(*np.nonzero(starts)):  # each segment is a piece of one document, shifted by one
    n = (seg[r] == seg[r, s]).sum()
    assert ' ' + ' '.join(map(str, inputs[r, s:s + n])) + ' ' in text
    np.testing.assert_array_equal(targets[r, s:s + n - 1], inputs[r, s + 1:s + n])
  assert (seg > 0).sum() > 0.8 * sum(len(d) - 1 for d in docs)  # whole batches, little dropped


def test_two_processes_read_disjoint_documents_covering_the_epoch(pipe, work):
  procs = [_make(work, process_index=i, process_count=2) for i in range(2)]
  n = len(pipe.train_source)
  full = [{p.train_doc_order()[i][1] for i in range(len(range(p.process_index, n, 2)))} for p in procs]
  assert full[0].isdisjoint(full[1]) and full[0] | full[1] == set(range(n))
  # Rows: long segments of each process come from its own documents and not the other's.
  texts = ['\x00'.join(pipe.train_source[i]['text'].decode() for i in sorted(f)) for f in full]
  for p, own, other in ((procs[0], texts[0], texts[1]), (procs[1], texts[1], texts[0])):
    for b in _take(p.train_iter(), 3):
      for inputs, targets, _ in _segments(b):
        if len(inputs) >= 48:
          s = _segment_text(pipe.tokenizer, inputs, targets)
          assert s in own and s not in other


def test_two_processes_split_each_eval_batch(pipe, work):
  single = list(pipe.eval_batches())
  procs = [list(_make(work, process_index=i, process_count=2).eval_batches()) for i in range(2)]
  assert len(procs[0]) == len(procs[1]) == math.ceil(len(single) / 2)  # same step count on every process
  for k in single[0]:
    rows = np.concatenate([b[k] for b in single])
    split = np.concatenate([np.concatenate([a[k], b[k]]) for a, b in zip(*procs)])
    assert np.array_equal(split[:len(rows)], rows) and not split[len(rows):].any()  # extra rows are padding


def test_eval_files_held_out_and_eval_is_deterministic(pipe, corpus):
  assert len(pipe.eval_file_names) == 2 and set(pipe.eval_file_names) <= set(corpus)
  train_files = {ex['file'].decode() for ex in pipe.train_source}
  eval_files = {ex['file'].decode() for ex in pipe.eval_source}
  assert eval_files == set(pipe.eval_file_names) and not train_files & eval_files
  assert train_files | eval_files == set(corpus)
  all_batches = list(pipe.eval_batches())
  assert _same(all_batches, list(pipe.eval_batches()))
  assert _same(all_batches[:3], list(pipe.eval_batches(max_batches=3)))


def test_an_empty_eval_split_is_an_error_not_loss_0(pipe):
  empty = documents.Documents('tfds:x:test', 'k', [])  # e.g. an empty prepared split
  found = dataclasses.replace(pipe.sources, eval=empty)
  p = data.Pipeline(sources=found, tokenizer=pipe.tokenizer, seq_len=SEQ, batch_size=BATCH, seed=0,
                    process_index=0, process_count=1)
  with pytest.raises(ValueError, match=r'the eval split \(tfds:x:test\) holds no documents; raise '
                                       'data.eval_files or set data.eval_source'):
    next(p.eval_batches())


def test_eval_stats_match_batches(pipe):
  stats = eval_stats(pipe)
  batches = list(pipe.eval_batches())
  assert stats['tokens'] == sum(int((b['segment_ids'] > 0).sum()) for b in batches)
  token_bytes = pipe.tokenizer.token_bytes()
  counted = sum(int(token_bytes[b['targets']][b['segment_ids'] > 0].sum()) for b in batches)
  assert abs(counted - stats['bytes']) <= stats['docs']  # only the dummy-prefix space differs


def test_a_missing_configured_tokenizer_is_an_error_not_retrained(pipe, work):
  """data.tokenizer pointing nowhere (a typo, an unmounted volume) must not get a new tokenizer:
  ids from an unrelated vocabulary would train or evaluate silently."""
  missing = work / 'elsewhere' / 'spm.model'
  with pytest.raises(FileNotFoundError, match=f'data.tokenizer={missing} does not exist'):
    _make(work, tokenizer_path=str(missing), train_missing_tokenizer=False)
  assert not missing.exists()


def test_tokenizer_reused_and_round_trips_held_out_text(pipe, work, corpus):
  path = work / 'tokenizer.model'
  before = (path.stat().st_mtime_ns, path.read_bytes())
  again = _make(work, seed=3)
  assert (path.stat().st_mtime_ns, path.read_bytes()) == before
  tok = again.tokenizer
  assert (tok.vocab_size, tok.bos_id, tok.eos_id, tok.sp.unk_id(), tok.sp.pad_id()) == (VOCAB, 1, 2, 0, -1)
  held_out = corpus[pipe.eval_file_names[0]]
  lines = [line for line in held_out.splitlines() if line.strip()][100:140] + ['  Odd  spacing\t, 123 ünïcödé ✓\n']
  for text in lines + [held_out[:5000]]:
    assert tok.decode(tok.encode(text)) == text
  with pytest.raises(ValueError, match='vocab_size'):
    _make(work, vocab_size=VOCAB * 2)  # an existing tokenizer of another size is not silently used


def test_unigram_entropy(pipe):
  class Fixed:
    vocab_size, eos_id = 8, 2
    def encode(self, text):
      return [3, 4]
  assert unigram_entropy(Fixed(), ['a', 'b']) == pytest.approx(math.log(3))
  assert 3.0 < train_unigram_entropy(pipe) < math.log(VOCAB)


def test_changed_corpus_rebuilds_and_unchanged_reuses(pipe, work, corpus, tmp_path):
  src = tmp_path / 'src'
  src.mkdir()
  for name in sorted(corpus)[:3]:
    (src / name).write_text(corpus[name], 'utf-8')
  kwargs = dict(source_dir=str(src), cache_dir=str(tmp_path / 'data'), eval_files=1)
  first = _make(work, **kwargs)  # tokenizer of the fixture is reused, so no training on 3 files
  assert _make(work, **kwargs).data_dir == first.data_dir
  with open(src / sorted(corpus)[0], 'a', encoding='utf-8') as f:
    f.write('\n\nA new scene.\n')
  second = _make(work, **kwargs)
  assert second.data_dir != first.data_dir
  def has_new(p):
    return any(b'A new scene.' in ex['text'] for split in (p.train_source, p.eval_source) for ex in split)
  assert has_new(second) and not has_new(first)


def test_small_corpus_with_too_large_vocab_fails_clearly(corpus, tmp_path):
  src = tmp_path / 'src'
  src.mkdir()
  for name in ('phoenix_and_the_turtle.txt', 'passionate_pilgrim.txt'):
    (src / name).write_text(corpus[name], 'utf-8')
  with pytest.raises(ValueError, match='vocab_size=20000'):
    _make(tmp_path, source_dir=str(src), vocab_size=20000, eval_files=1)


# Sources beyond a directory of .txt: jsonl, parquet, TFDS by name, mixtures, the token cache.


class TinyLines(__import__('tensorflow_datasets').core.GeneratorBasedBuilder, skip_registration=True):
  """A prepared TFDS dataset for the tfds:NAME:SPLIT route (unregistered: read back from its files)."""

  VERSION = __import__('tensorflow_datasets').core.Version('1.0.0')
  DOCS = {'train': 40, 'test': 6}

  def _info(self):
    tfds = __import__('tensorflow_datasets')
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(
        {'sentence': tfds.features.Text()}), disable_shuffling=True)

  def _split_generators(self, dl_manager):
    return {split: self._generate_examples(split, n) for split, n in self.DOCS.items()}

  def _generate_examples(self, split, n):
    for i in range(n):
      yield i, {'sentence': f'{split} line {i}: ' + 'the quick brown fox jumps over the lazy dog. ' * (i % 7 + 1)}


@pytest.fixture(scope='session')
def mixed_dir(tmp_path_factory, corpus):
  """Corpus documents as two .jsonl files (field 'body') and one .parquet file (column 'body')."""
  import pyarrow as pa
  import pyarrow.parquet as pq
  root = tmp_path_factory.mktemp('mixed')
  docs = [d for name in sorted(corpus)[:6] for d in sources.split_documents(corpus[name])]
  (root / 'j').mkdir()
  for k in range(2):
    with open(root / 'j' / f'part{k}.jsonl', 'w', encoding='utf-8') as f:
      for d in docs[k::3]:
        f.write(json.dumps({'id': 1, 'body': d}) + '\n')
  pq.write_table(pa.table({'body': docs[2::3]}), root / 'p.parquet')
  return root, docs


def _mix(work, root, **overrides):
  # The plays after the first six (a-c) that the train files hold: an eval_source must not overlap them.
  plays_d_to_z = str(Path(sources.default_source_dir()).parent / '[d-z]*.txt')
  return _make(work, **{'sources': f'{root}/j/*.jsonl@3, {root}/p.parquet@1', 'source_dir': None,
                        'eval_source': plays_d_to_z, 'text_field': 'body',
                        'cache_dir': str(root / 'cache'), **overrides})


@pytest.fixture(scope='session')
def mix(work, mixed_dir):
  return _mix(work, mixed_dir[0])


def test_jsonl_and_parquet_sources_hold_every_document(mix, mixed_dir):
  _, docs = mixed_dir
  jsonl, parquet = mix.sources.train
  texts = lambda d: [d.text(i) for i in range(len(d))]
  assert texts(jsonl) == docs[0::3] + docs[1::3] and texts(parquet) == docs[2::3]
  assert len(mix.sources.eval) > 1500 and not mix.eval_file_names  # all of eval_source


def test_mixture_weights_and_determinism(mix, work, mixed_dir):
  order = mix.train_doc_order()
  tags = [order[i][0] for i in range(4000)]
  assert tags.count(0) / len(tags) == pytest.approx(0.75, abs=0.02)
  first = _take(mix.train_iter(), 4)
  assert _same(first, _take(_mix(work, mixed_dir[0]).train_iter(), 4))
  assert not _same(first, _take(_mix(work, mixed_dir[0], seed=5).train_iter(), 4))
  expected, resumed, _ = _saved_and_resumed(mix.train_iter, 3, 4)
  assert _same(expected, resumed)


def test_tfds_dataset_by_name_and_split(work, tmp_path):
  TinyLines(data_dir=str(tmp_path / 'tfds'), file_format='array_record').download_and_prepare()
  p = _make(work, sources='tfds:tiny_lines:train', tfds_data_dir=str(tmp_path / 'tfds'),
            eval_source='tfds:tiny_lines:test', text_field='sentence', cache_dir=str(tmp_path / 'c'))
  assert len(p.sources.train[0]) == 40 and p.sources.eval.text(5).startswith('test line 5: the quick')
  assert len(_take(p.train_iter(), 2)) == 2
  assert sum(int((b['segment_ids'] > 0).sum()) for b in p.eval_batches()) == eval_stats(p)['tokens']
  opts = dict(tfds_data_dir=str(tmp_path / 'tfds'), cache_dir=str(tmp_path / 'c'), text_field='sentence')
  with pytest.raises(ValueError, match='eval_source'):
    _make(work, sources='tfds:tiny_lines:train', **opts)
  with pytest.raises(ValueError, match="no split 'nope'"):
    _make(work, sources='tfds:tiny_lines:nope', eval_source='tfds:tiny_lines:test', **opts)
  with pytest.raises(FileNotFoundError, match='tfds:not_here:train'):
    _make(work, sources='tfds:not_here:train', eval_source='tfds:tiny_lines:test', **opts)


def test_token_cache_gives_the_same_batches(pipe, work):
  cached = _make(work, pretokenize=True)
  assert cached.caches and len(cached.caches[0]) == len(pipe.train_source)
  assert _same(_take(pipe.train_iter(), 4), _take(cached.train_iter(), 4))
  assert _same(list(pipe.eval_batches(max_batches=5)), list(cached.eval_batches(max_batches=5)))
  assert eval_stats(cached) == eval_stats(pipe)
  cached.sources.train[0].text = None  # proves the cached route does no text work
  it = cached.train_iter()
  _take(it, 2)
  state = it.get_state()
  expected = _take(it, 3)
  it.set_state(state)
  assert _same(expected, _take(it, 3))
  assert train_unigram_entropy(cached) == pytest.approx(train_unigram_entropy(pipe))


def test_worker_processes_resume_exactly(work):
  p = _make(work, worker_count=2)
  expected, resumed, iters = _saved_and_resumed(p.train_iter, 3, 4)
  try:
    assert _same(expected, resumed)
  finally:
    for i in iters:
      i.close()  # stops the worker processes now, not at interpreter exit


def test_train_tokenizer_options_and_compression(pipe, tmp_path):
  texts = [pipe.sources.train[0].text(i) for i in range(0, 400, 4)]
  path = str(tmp_path / 'u.model')
  data.train_tokenizer(path, texts, 400, model_type='unigram', user_defined_symbols=['<tool>'])
  tok = tokenizer_lib.open_tokenizer(path)
  assert tok.sp.piece_to_id('<tool>') > 2 and tok.encode('a <tool> b').count(tok.sp.piece_to_id('<tool>')) == 1
  held_out = [pipe.sources.eval.text(i) for i in range(20)]
  assert all(tok.decode(tok.encode(t)) == t for t in held_out)  # identity normalization by default
  assert 1.0 < data.bytes_per_token(tok, held_out) < data.bytes_per_token(pipe.tokenizer, held_out)  # 400 < 512 pieces


def test_a_killed_cache_builds_leftovers_are_removed(pipe, tmp_path):
  """A token cache is built in `<key>.tmpPID/` and renamed; a build killed mid-way leaves that
  folder, which the next build of the key removes (it is never read)."""
  path = tmp_path / 'tokens' / 'key'
  stale = tmp_path / 'tokens' / 'key.tmp99999'
  stale.mkdir(parents=True)
  (stale / 'ids.array_record').write_bytes(b'half')
  data.build_token_cache(pipe.sources.eval, pipe.tokenizer, path)
  assert not stale.exists() and (path / 'meta.json').exists()
