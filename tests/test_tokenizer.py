"""jaxllm.tokenizer on tokenizers trained from the embedded corpus: control-token spellings in
documents stay text, and the tokenizer file is written whole or not at all.

The tokenizer tests that go through the data pipeline (reuse, vocabulary size, compression) are
in test_data.py.
"""

import json
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


# Hugging Face tokenizer folders, written here file by file (no transformers needed): the forms
# tokenizer_config.json and special_tokens_map.json take on the Hub. Parity with transformers is
# in test_chat.py.
HF_SPECIALS = ['<s>', '</s>', '<|im_start|>', '<|im_end|>']


@pytest.fixture(scope='module')
def hf_json(corpus, tmp_path_factory) -> bytes:
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  tok.train_from_iterator(corpus[:100], trainers.BpeTrainer(
      vocab_size=400, special_tokens=HF_SPECIALS, show_progress=False,
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
  return tok.to_str().encode()


def hf_folder(path, definition: bytes, config: dict | None = None, **files) -> str:
  path.mkdir(exist_ok=True)
  (path / 'tokenizer.json').write_bytes(definition)
  if config is not None:
    (path / 'tokenizer_config.json').write_text(json.dumps(config))
  for name, contents in files.items():
    (path / name.replace('__', '.')).write_text(contents)
  return str(path)


def test_hf_folder_special_tokens_in_their_forms(hf_json, tmp_path):
  added = {'added_tokens_decoder': {}}  # transformers >= 4.34 writes it: the map is then ignored
  forms = {  # config, special_tokens_map.json -> (bos, eos)
      'strings': ({'bos_token': '<s>', 'eos_token': '</s>', **added}, None, ('<s>', '</s>')),
      'added_token_dicts': ({'bos_token': {'content': '<s>', 'special': True},
                             'eos_token': {'__type': 'AddedToken', 'content': '<|im_end|>'}},
                            None, ('<s>', '<|im_end|>')),
      'legacy_map_wins': ({'eos_token': '</s>'}, {'bos_token': '<s>', 'eos_token': '<|im_end|>'},
                          ('<s>', '<|im_end|>')),
      'map_ignored': ({'eos_token': '</s>', **added}, {'bos_token': '<s>'}, (None, '</s>')),
      'qwen_no_bos': ({'bos_token': None, 'eos_token': '<|im_end|>'}, None, (None, '<|im_end|>')),
      'bos_not_added': ({'bos_token': '<s>', 'eos_token': '</s>', 'add_bos_token': False}, None,
                        (None, '</s>')),
  }
  for name, (config, special_map, (bos, eos)) in forms.items():
    files = {} if special_map is None else {'special_tokens_map__json': json.dumps(special_map)}
    tok = tokenizer_lib.open_tokenizer(hf_folder(tmp_path / name, hf_json, config, **files))
    assert isinstance(tok, tokenizer_lib.HFTokenizer)
    ids = {t: i for t, (i, _) in tok.added_tokens().items()}
    assert (tok.bos_id, tok.eos_id) == (ids.get(bos), ids[eos]), name
    assert tok.special_token_map()['eos_token'] == eos
    doc = tok.encode_docs(['a </s> b'])[0].tolist()
    assert doc == ([] if bos is None else [ids[bos]]) + tok.encode('a </s> b') + [ids[eos]]
    assert ids['</s>'] not in doc[1:-1] and tok.decode(doc) == 'a </s> b'


def test_hf_folder_paths_templates_and_fingerprints(hf_json, tmp_path):
  config = {'bos_token': '<s>', 'eos_token': '</s>',
            'chat_template': [{'name': 'tool_use', 'template': 'T'},
                              {'name': 'default', 'template': 'D'}]}
  folder = hf_folder(tmp_path / 'm', hf_json, config)
  tok = tokenizer_lib.open_tokenizer(folder)
  assert tok.path == folder and tok.chat_template == 'D'
  by_file = tokenizer_lib.open_tokenizer(os.path.join(folder, 'tokenizer.json'))
  assert by_file.path == folder and by_file.fingerprint() == tok.fingerprint()
  assert by_file.vocab_size == tok.vocab_size == 400
  # transformers 5 writes chat_template.jinja and reads it over the config's.
  hf_folder(tmp_path / 'm', hf_json, config, chat_template__jinja='J')
  jinja = tokenizer_lib.open_tokenizer(folder)
  assert jinja.chat_template == 'J' and jinja.fingerprint() != tok.fingerprint()
  assert jinja.chat_template_source.endswith('chat_template.jinja')
  default = tokenizer_lib.open_tokenizer(folder, chat_template='default')
  assert default.chat_template == tokenizer_lib.DEFAULT_CHAT_TEMPLATE
  assert len({default.fingerprint(), jinja.fingerprint(), tok.fingerprint()}) == 3


def test_sentencepiece_takes_a_template_override(tok, tmp_path):
  assert tok.chat_template is None
  plain = tok.fingerprint()
  assert plain == tokenizer_lib.open_tokenizer(tok.path).fingerprint()  # unchanged without one
  file = tmp_path / 'mine.jinja'
  file.write_text('{{ messages[0].content }}')
  mine = tokenizer_lib.open_tokenizer(tok.path, chat_template=str(file))
  assert mine.chat_template == '{{ messages[0].content }}'
  assert mine.chat_template_source == str(file)
  assert mine.fingerprint() != plain and mine.encode('a b') == tok.encode('a b')
  assert tokenizer_lib.open_tokenizer(tok.path, chat_template='default').fingerprint() not in (
      plain, mine.fingerprint())
  # Template text has its control pieces matched; spans cover the text.
  ids, spans = mine.encode_template_text('<s>hi</s>x')
  assert ids[0] == tok.bos_id and tok.eos_id in ids and spans[0] == (0, 3)
  assert spans[-1][1] == len('<s>hi</s>x') and tok.eos_id not in mine.encode_plain('hi</s>x')


def test_bad_hf_folders_fail_naming_the_file(hf_json, tmp_path):
  cases = {
      'no_eos': ({'bos_token': '<s>'}, ValueError, r'tokenizer_config.json names no eos_token'),
      'eos_unknown': ({'eos_token': '<eot>'}, ValueError,
                      r"names eos_token '<eot>', which .*tokenizer.json does not hold"),
      'eos_number': ({'eos_token': 3}, ValueError, r'eos_token is 3, not a token string'),
      'template_number': ({'eos_token': '</s>', 'chat_template': 5}, ValueError,
                          'chat_template is not a string'),
  }
  for name, (config, error, match) in cases.items():
    with pytest.raises(error, match=match):
      tokenizer_lib.open_tokenizer(hf_folder(tmp_path / name, hf_json, config))
  (tmp_path / 'bad_json').mkdir()
  (tmp_path / 'bad_json' / 'tokenizer_config.json').write_text('{')
  with pytest.raises(ValueError, match='tokenizer_config.json is not valid JSON'):
    tokenizer_lib.open_tokenizer(hf_folder(tmp_path / 'bad_json', hf_json))
  with pytest.raises(ValueError, match='is not a tokenizers tokenizer.json'):
    tokenizer_lib.open_tokenizer(hf_folder(tmp_path / 'garbage', b'{"not": "a tokenizer"}', {}))
  (tmp_path / 'empty').mkdir()
  with pytest.raises(FileNotFoundError, match='empty has no tokenizer.json'):
    tokenizer_lib.open_tokenizer(str(tmp_path / 'empty'))
  with pytest.raises(FileNotFoundError, match='data.chat_template=.*missing.jinja does not exist'):
    tokenizer_lib.open_tokenizer(str(tmp_path / 'empty'),
                                 chat_template=str(tmp_path / 'missing.jinja'))


def test_text_bytes_without_bos_count_every_target(hf_json, tmp_path):
  import numpy as np
  tok = tokenizer_lib.open_tokenizer(hf_folder(tmp_path / 'q', hf_json, {'eos_token': '</s>'}))
  assert tok.bos_id is None and tok.doc_prefix_bytes == 0
  doc = tok.encode_docs(['héllo there, 🙂'])[0]
  batch = {'inputs': doc[None, :-1], 'targets': doc[None, 1:],
           'segment_ids': np.ones((1, len(doc) - 1), np.int32)}
  # Every target but the first token's text, which no input predicts.
  assert tok.text_bytes_counter()(batch) == len(tok.decode(doc[1:]).encode('utf-8'))


def test_hf_truncation_and_padding_saved_in_the_file_are_off(hf_json, tmp_path):
  from tokenizers import Tokenizer
  tok = Tokenizer.from_str(hf_json.decode())
  tok.enable_truncation(max_length=3)
  tok.enable_padding(length=64)
  ours = tokenizer_lib.open_tokenizer(hf_folder(tmp_path / 't', tok.to_str().encode(),
                                                {'eos_token': '</s>'}))
  plain = tokenizer_lib.open_tokenizer(hf_folder(tmp_path / 'p', hf_json, {'eos_token': '</s>'}))
  texts = ['a longer text than three tokens, surely', 'b']
  assert ours.encode_batch(texts) == plain.encode_batch(texts)
  assert len(ours.encode(texts[0])) > 3 and len(ours.encode(texts[1])) < 3
