"""Conversations as training data: jsonl rows -> rendered, masked, packed batches (jaxllm.data),
the built-in chat demo, and the choices the pipeline counts (too long, nothing to train on).

The tokenizer is a small sentencepiece model trained here with jaxllm's default chat template;
HF tokenizers and template parity with transformers are test_chat.py's."""

import json
from pathlib import Path

import numpy as np
import pytest

from jaxllm import chat, data, sources
from jaxllm import tokenizer as tokenizer_lib

SEQ, BATCH = 96, 4


@pytest.fixture(scope='module')
def demo(tmp_path_factory):
  """Two plays' conversations of the built-in demo as two files (one held out for eval)."""
  root = tmp_path_factory.mktemp('chat_demo')
  files = sorted(Path(sources.shakespeare_chat(str(root / 'built'))).parent.glob('*.jsonl'))
  out = root / 'chats'
  out.mkdir()
  for f in files[:3]:
    (out / f.name).write_text(f.read_text('utf-8'), 'utf-8')
  return out


@pytest.fixture(scope='module')
def tokenizer_path(tmp_path_factory):
  path = tmp_path_factory.mktemp('chat_tok') / 'tokenizer.model'
  texts = [f.read_text('utf-8')[:200_000] for f in
           sorted(Path(sources.default_source_dir()).parent.glob('*.txt'))[:4]]
  tokenizer_lib.train_sentencepiece(str(path), texts, 512)
  return str(path)


def _make(root, tokenizer_path, **overrides):
  kwargs = dict(cache_dir=str(root / 'cache'), tokenizer_path=tokenizer_path, vocab_size=512,
                seq_len=SEQ, batch_size=BATCH, eval_files=1, seed=0, sources=str(root / '*.jsonl'),
                chat_template='default', encode_chat=chat.encode_chat)
  return data.make_pipeline(**{**kwargs, **overrides})


def _rows(path: Path) -> list[list[dict]]:
  return [chat.conversation(json.loads(line), str(path)) for line in path.open(encoding='utf-8')]


def _segments(batch):
  for b in range(batch['inputs'].shape[0]):
    for s in set(batch['segment_ids'][b].tolist()) - {0}:
      at = batch['segment_ids'][b] == s
      yield batch['targets'][b][at], batch['weights'][b][at]


def test_only_assistant_turns_carry_loss(demo, tokenizer_path):
  pipe = _make(demo, tokenizer_path)
  tok = pipe.tokenizer
  replies = {m['content'] for f in demo.glob('*.jsonl') for conv in _rows(f) for m in conv
             if m['role'] == 'assistant'}
  seen = 0
  it = pipe.train_iter()
  for _ in range(4):
    batch = next(it)
    assert set(batch) == {'inputs', 'targets', 'segment_ids', 'positions', 'weights'}
    assert not batch['weights'][batch['segment_ids'] == 0].any()  # padding never weighs
    for targets, weights in _segments(batch):
      supervised = targets[weights > 0].tolist()
      assert supervised and supervised[-1] == tok.eos_id  # each reply ends at EOS
      assert tok.decode(supervised[:-1]) in replies  # exactly one reply, nothing of the prompt
      assert 0 < weights.sum() < len(weights)  # the system and user turns carry no loss
      seen += 1
  assert seen >= 4 * BATCH


def test_loss_on_all_weighs_every_real_target(demo, tokenizer_path):
  batch = next(_make(demo, tokenizer_path, loss_on='all').train_iter())
  np.testing.assert_array_equal(batch['weights'], batch['segment_ids'] > 0)


def _lengths(tok, convs):
  return [len(chat.encode_chat(tok, c)[0]) - 1 for c in convs]


def test_long_conversations_dropped_or_truncated_and_counted(demo, tokenizer_path, tmp_path):
  pipe = _make(demo, tokenizer_path)
  train_file = Path(pipe.sources.train[0].files[0])
  convs = [c for f in pipe.sources.train[0].files for c in _rows(Path(f))]
  lengths = np.array(_lengths(pipe.tokenizer, convs))
  seq = int(np.percentile(lengths, 50))  # about half the conversations are too long
  too_long = int((lengths > seq).sum())
  assert 0 < too_long < len(convs), train_file
  dropped = _make(demo, tokenizer_path, seq_len=seq).caches[0]
  assert (dropped.meta['too_long'], dropped.meta['kept']) == (too_long, len(convs) - too_long)
  assert max(len(dropped.ids(i)[0]) - 1 for i in range(len(dropped))) <= seq
  # Truncated: kept unless the cut leaves no assistant token (then skipped, counted as such).
  masks = [chat.encode_chat(pipe.tokenizer, c)[1] for c in convs]
  empty = sum(not m[1:seq + 1].any() for m in masks)
  cut = _make(demo, tokenizer_path, seq_len=seq, chat_overflow='truncate').caches[0]
  assert (cut.meta['truncated'] + cut.meta['unsupervised'], cut.meta['kept']) == (
      too_long, len(convs) - empty)
  assert 0 < cut.meta['truncated'] and max(len(cut.ids(i)[0]) - 1 for i in range(len(cut))) <= seq


def test_conversations_without_a_target_are_skipped_and_all_of_them_is_an_error(
    tokenizer_path, tmp_path):
  rows = [{'messages': [{'role': 'user', 'content': f'question {i}'},
                        {'role': 'assistant', 'content': f'answer {i}'}]} for i in range(6)]
  rows += [{'messages': [{'role': 'user', 'content': 'no reply'}]}] * 2
  for name, part in (('a.jsonl', rows), ('b.jsonl', rows[:3])):
    (tmp_path / name).write_text(''.join(json.dumps(r) + '\n' for r in part))
  pipe = _make(tmp_path, tokenizer_path, eval_source=str(tmp_path / 'b.jsonl'),
               sources=str(tmp_path / 'a.jsonl'))
  assert (pipe.caches[0].meta['unsupervised'], pipe.caches[0].meta['kept']) == (2, 6)
  assert pipe.doc_count('train') == 6
  only = tmp_path / 'only'
  only.mkdir()
  for name in ('a.jsonl', 'b.jsonl'):
    (only / name).write_text(json.dumps(rows[-1]) + '\n')
  with pytest.raises(ValueError, match='no conversation has a token to train on.*data.loss_on=all'):
    _make(only, tokenizer_path)


def test_text_and_conversations_in_one_source_is_an_error(tokenizer_path, tmp_path):
  lines = [json.dumps({'text': 'plain text'}), json.dumps({'prompt': 'p', 'completion': 'c'})]
  (tmp_path / 'a.jsonl').write_text('\n'.join(lines) + '\n')
  (tmp_path / 'b.jsonl').write_text(lines[1] + '\n')
  with pytest.raises(ValueError, match='a.jsonl: document 1 is a conversation, unlike the ones before'):
    _make(tmp_path, tokenizer_path)


def test_play_conversations_pair_replies_of_two_speakers():
  play = ('ACT I.\n\nHAM.\nWho is there?\n\nHOR.\nA friend.\n[Exit.]\n\nHAM.\nStay.\n\n'
          'HAM.\nSpeak.\n\nHOR.\nI will.\n\nMAR.\nAnd I.\n')
  convs = sources.play_conversations(play, 'Hamlet')
  assert [[m['content'] for m in c['messages'][1:]] for c in convs] == [
      ['Who is there?', 'A friend.'], ['Speak.', 'I will.']]
  assert convs[0]['messages'][0] == {
      'role': 'system', 'content': "You are Hor in Shakespeare's Hamlet. Reply in character."}


def test_builtin_chat_demo_is_made_once_per_play(tmp_path):
  pattern = sources.shakespeare_chat(str(tmp_path))
  files = sorted(Path(pattern).parent.glob('*.jsonl'))
  plays = sorted(Path(sources.default_source_dir()).parent.glob('*.txt'))
  assert [f.stem for f in files] == [p.stem for p in plays]
  hamlet = _rows(Path(pattern).parent / 'hamlet.jsonl')
  assert len(hamlet) > 100 and all('Hamlet' in c[0]['content'] for c in hamlet)
  mtime = files[0].stat().st_mtime_ns
  assert sources.shakespeare_chat(str(tmp_path)) == pattern
  assert files[0].stat().st_mtime_ns == mtime  # made once


def test_a_config_that_requires_sources_says_so():
  with pytest.raises(ValueError, match='data.sources is required by this config.*--config.data.sources='):
    sources.resolve_specs(sources.REQUIRED)


def test_eval_fraction_holds_out_documents_of_one_file(tokenizer_path, tmp_path):
  """One chats.jsonl: eval_fraction splits its documents by content hash, the same on every
  build, no document on both sides; a fraction that holds out nothing is an error."""
  rows = [{'prompt': f'question {i}', 'completion': f'answer {i}'} for i in range(200)]
  rows += rows[:20]  # duplicates land beside their twins
  (tmp_path / 'chats.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in rows))
  pipe = _make(tmp_path, tokenizer_path, eval_fraction=0.1, eval_files=0,
               sources=str(tmp_path / 'chats.jsonl'))
  texts = lambda docs: [docs.text(i) for i in range(len(docs))]
  train, held = texts(pipe.sources.train[0]), texts(pipe.sources.eval)
  assert len(train) + len(held) == len(rows)
  assert not set(train) & set(held)
  assert 0.03 < len(set(held)) / 200 < 0.2
  with pytest.raises(ValueError, match='data.eval_fraction=1e-06 holds out no document'):
    _make(tmp_path, tokenizer_path, eval_fraction=1e-6, eval_files=0,
          sources=str(tmp_path / 'chats.jsonl'), cache_dir=str(tmp_path / 'c2'))
