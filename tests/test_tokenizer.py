"""jaxllm.tokenizer on tokenizers trained from the embedded corpus: control-token spellings in
documents stay text, and the tokenizer file is written whole or not at all.

The tokenizer tests that go through the data pipeline (reuse, vocabulary size, compression) are
in test_data.py.
"""

import os

import pytest

from jaxllm import sources
from jaxllm import tokenizer as tokenizer_lib

VOCAB = 512
# Control-token spellings of sentencepiece, Llama 3, ChatML and Mistral, and a byte piece's name,
# as documents may hold them (a scraped chat log, a tokenizer's docs), alone and run together.
HOSTILE = ['</s>', '<s>', '<unk>', '<pad>', '<0x41>', '<|eot_id|>', '<|begin_of_text|>',
           '<|im_start|>user', '<|im_end|>', '[INST] hi [/INST]', 'a</s>b', ' </s> ',
           '<s><s></s></s>', '</s>\n\n<s>', '<|eot_id|><|start_header_id|>assistant']
OPTIONS = {
    'bpe': {},  # jaxllm's default: BPE, byte fallback, identity normalization
    'bpe-special': {'user_defined_symbols': ['<tool>', '</tool>']},  # --special_tokens
    'unigram': {'model_type': 'unigram'},
}


@pytest.fixture(scope='module')
def corpus() -> list[str]:
  files = sources.list_source_files(sources.default_source_dir())
  docs = sources.split_documents(sources.read_text(files[0]))[:200]
  # Frequent enough that training learns pieces of them ('▁<', '<|', '|>'): the spellings are
  # then as close to a control piece as a corpus can bring them.
  return docs + [f'He said {h} then {h}{h}, and {h}.' for h in HOSTILE for _ in range(30)]


@pytest.fixture(scope='module', params=list(OPTIONS))
def tok(request, corpus, tmp_path_factory):
  path = tmp_path_factory.mktemp('tokenizer') / 'tokenizer.model'
  tokenizer_lib.train_sentencepiece(str(path), corpus, VOCAB, **OPTIONS[request.param])
  return tokenizer_lib.open_tokenizer(str(path))


def test_control_token_spellings_in_documents_encode_as_text(tok):
  sp = tok.sp
  control = {i for i in range(tok.vocab_size) if sp.is_control(i) or sp.is_unknown(i)}
  assert {tok.bos_id, tok.eos_id, sp.unk_id()} <= control
  for text in HOSTILE:
    ids = tok.encode(text)
    assert not set(ids) & control, (text, [sp.id_to_piece(i) for i in ids])
    assert tok.decode(ids) == text
  for text, doc in zip(HOSTILE, tok.encode_docs(HOSTILE)):
    inner = doc[1:-1].tolist()  # one document each: BOS first, EOS last, and neither inside
    assert (doc[0], doc[-1]) == (tok.bos_id, tok.eos_id)
    assert tok.bos_id not in inner and tok.eos_id not in inner, text
    assert tok.decode(doc) == text
  # A user-defined symbol (bpe-special) is matched in text, which is what --special_tokens is
  # for: as a piece that is not a control id and decodes back to its spelling.
  if sp.piece_to_id('<tool>') != sp.unk_id():
    ids = tok.encode('a <tool>x</tool>')
    assert sp.piece_to_id('<tool>') in ids and not set(ids) & control
    assert tok.decode(ids) == 'a <tool>x</tool>'


def test_training_writes_whole_files_and_removes_stale_temps(corpus, tmp_path):
  """A training killed mid-write leaves `tokenizer.model.tmpPID`: the next write of that file
  removes it; another file's temp is not touched."""
  path = tmp_path / 'tokenizer.model'
  stale = [tmp_path / 'tokenizer.model.tmp4242', tmp_path / 'tokenizer.model.tmp']
  for p in stale:
    p.write_bytes(b'half a model')
  (tmp_path / 'other.model.tmp7').write_bytes(b'not ours')
  tokenizer_lib.train_sentencepiece(str(path), corpus[:100], 400)
  assert sorted(os.listdir(tmp_path)) == ['other.model.tmp7', 'tokenizer.model']
  assert tokenizer_lib.open_tokenizer(str(path)).vocab_size == 400


def test_a_failed_write_keeps_the_old_file_and_no_temp(tmp_path, monkeypatch):
  path = tmp_path / 'tokenizer.model'
  path.write_bytes(b'old')

  def fail(src, dst):
    raise OSError('disk full')
  monkeypatch.setattr(tokenizer_lib.os, 'replace', fail)
  with pytest.raises(OSError, match='disk full'):
    tokenizer_lib.write_replacing(str(path), b'new')
  assert os.listdir(tmp_path) == ['tokenizer.model'] and path.read_bytes() == b'old'
