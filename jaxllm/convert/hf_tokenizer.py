"""The tokenizer files of an HF model folder: a sentencepiece model as them, and reading them.

`tokenizer_json` builds the `tokenizers` library's tokenizer.json from the serialized
sentencepiece model alone (no transformers needed) so that it encodes every text as sentencepiece
does; `files` gives every tokenizer file an export writes, as contents, for the caller to write.
An imported model keeps its own files (`TOKENIZER_FILES`); `special_token_ids` reads its BOS and
EOS ids from them, `with_chat_template` sets the chat template in its tokenizer_config.json.
"""

from __future__ import annotations

import base64
import json
import os
import re
from typing import Any

from jaxllm import tokenizer as tokenizer_lib
from jaxllm.convert import UnsupportedError

TOKENIZER_MODEL = 'tokenizer.model'  # HF's name for the sentencepiece model in a model folder
TOKENIZER_JSON = 'tokenizer.json'
TOKENIZER_CONFIG = 'tokenizer_config.json'
CHAT_TEMPLATE_FILE = 'chat_template.jinja'  # transformers 5 saves the template here
# The files of an HF tokenizer, as AutoTokenizer reads them from a model folder; an import
# carries those present, an export writes them back (tokenizer.json is the one that must be).
TOKENIZER_FILES = (TOKENIZER_JSON, TOKENIZER_CONFIG, 'special_tokens_map.json',
                   CHAT_TEMPLATE_FILE, TOKENIZER_MODEL, 'added_tokens.json')


def files(model_proto: bytes, *, model_max_length: int,
          chat_template: str | None = None) -> dict[str, bytes | dict]:
  """File name -> contents (JSON-able dict, or bytes) of the tokenizer files of an HF model
  folder: tokenizer.json, which AutoTokenizer runs, with its tokenizer_config.json (with
  `chat_template`, jaxllm's DEFAULT_CHAT_TEMPLATE if None) and special_tokens_map.json, and the
  sentencepiece model itself for sentencepiece users."""
  from sentencepiece import sentencepiece_model_pb2  # needs protobuf, as sentencepiece does

  proto = sentencepiece_model_pb2.ModelProto.FromString(model_proto)
  spec = proto.trainer_spec
  piece = lambda i: proto.pieces[i].piece if i >= 0 else None
  specials = dict(bos=piece(spec.bos_id), eos=piece(spec.eos_id), unk=piece(spec.unk_id))
  return {
      TOKENIZER_JSON: tokenizer_json(model_proto),  # first: refuses what it cannot express
      TOKENIZER_CONFIG: tokenizer_config(
          **specials, model_max_length=model_max_length,
          chat_template=chat_template or tokenizer_lib.DEFAULT_CHAT_TEMPLATE),
      'special_tokens_map.json': {f'{k}_token': v for k, v in specials.items() if v is not None},
      TOKENIZER_MODEL: model_proto}


def is_sentencepiece(data: bytes) -> bool:
  """Whether `data` is a serialized sentencepiece model. A tokenizer.model can be another format:
  Llama 3's (in its `original/` folder) is tiktoken's base64 text."""
  from google.protobuf.message import DecodeError
  from sentencepiece import sentencepiece_model_pb2

  try:
    return len(sentencepiece_model_pb2.ModelProto.FromString(data).pieces) > 0
  except DecodeError:
    return False


def tokenizer_config(*, bos: str | None = '<s>', eos: str | None = '</s>',
                     unk: str | None = '<unk>', model_max_length: int = 4096,
                     chat_template: str | None = None) -> dict:
  """tokenizer_config.json for the `tokenizer_json` beside it.

  The class is the generic fast tokenizer, so transformers 4.x and 5.x both run tokenizer.json as
  written: 5.x's `LlamaTokenizer` would rebuild it around a Metaspace pre-tokenizer, which drops
  one '▁' from a text that starts with a space. jaxllm's tokenizer encodes without bos/eos (the
  data pipeline adds them per document); HF conventionally adds bos, which tokenizer.json's
  post-processor does (5.x reads add_bos_token only when there is no tokenizer.json).
  split_special_tokens is False, as in HF's own Llama 2 and Mistral tokenizers: a chat
  template's `{{ eos_token }}` must become the EOS id in apply_chat_template. Plain text then
  reads '</s>' as EOS, where sentencepiece reads its characters: pass split_special_tokens=True
  to the call to encode a document exactly as jaxllm does."""
  out = {'tokenizer_class': 'PreTrainedTokenizerFast', 'bos_token': bos, 'eos_token': eos,
         'unk_token': unk, 'pad_token': None, 'add_bos_token': bos is not None,
         'add_eos_token': False, 'split_special_tokens': False,
         'model_max_length': model_max_length, 'clean_up_tokenization_spaces': False}
  if chat_template is not None:
    out['chat_template'] = chat_template
  return out


def read_json(path: str) -> Any:
  """The JSON in `path`, or None if there is no such file."""
  if not os.path.isfile(path):
    return None
  with open(path, encoding='utf-8') as f:
    try:
      return json.load(f)
    except json.JSONDecodeError as e:
      raise ValueError(f'{path} is not valid JSON ({e}): copy the tokenizer files again') from None


def special_token_ids(folder: str) -> dict[str, int | None]:
  """{'bos_token_id', 'eos_token_id'} of the HF tokenizer in `folder`: the tokens its
  tokenizer_config.json (or special_tokens_map.json) names, looked up in tokenizer.json (added
  tokens, then the vocabulary); None for one it does not name (Qwen has no BOS)."""
  config = read_json(os.path.join(folder, TOKENIZER_CONFIG)) or {}
  special_map = read_json(os.path.join(folder, 'special_tokens_map.json')) or {}
  tokenizer = read_json(os.path.join(folder, TOKENIZER_JSON)) or {}
  vocab = (tokenizer.get('model') or {}).get('vocab')
  ids = dict(vocab) if isinstance(vocab, dict) else {}  # BPE/WordPiece; Unigram's is a list
  ids.update({t['content']: t['id'] for t in tokenizer.get('added_tokens') or []})
  out = {}
  for name in ('bos', 'eos'):
    token = config.get(f'{name}_token', special_map.get(f'{name}_token'))
    if isinstance(token, dict):  # AddedToken's serialized form
      token = token.get('content')
    out[f'{name}_token_id'] = ids.get(token) if token else None
  return out


def read_chat_template(name: str) -> str | None:
  """The Jinja source data.chat_template (`name`) stands for; None for '' (the tokenizer's own).
  (tokenizer.read_chat_template, through here so that export imports three jaxllm modules.)"""
  found = tokenizer_lib.read_chat_template(name)
  return found and found[0]


def with_chat_template(config: dict | None, chat_template: str) -> dict:
  """tokenizer_config.json `config` (None: none yet) with `chat_template` set."""
  return dict(config or {'tokenizer_class': 'PreTrainedTokenizerFast'},
              chat_template=chat_template)


# sentencepiece ModelProto piece types and model types.
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6
_UNIGRAM, _BPE = 1, 2
_UNK_PENALTY = 10.0  # sentencepiece's (and tokenizers') score of an unknown char below the lowest


def tokenizer_json(model_proto: bytes) -> dict:
  """tokenizer.json (the `tokenizers` library's format) that encodes like the sentencepiece model
  `model_proto` (its serialized bytes), built from the proto alone: no transformers needed.

  sentencepiece prefixes '▁' to every non-empty text, then turns each space into '▁' (' a' ->
  '▁▁a'); the Metaspace pre-tokenizer of transformers' Llama tokenizer skips the prefix when the
  text already starts with one. So the normalizer here takes sentencepiece's steps in its order
  and there is no pre-tokenizer (bar user-defined pieces): the model sees the whole text, as
  sentencepiece's does. BPE is exact, on any text, for identity normalization (jaxllm's
  default); a precompiled charsmap (nmt_nfkc) goes through `tokenizers`' Precompiled normalizer,
  which differs on rare combining sequences. Unigram: see `_unigram_vocab`. Raises
  UnsupportedError, naming the field, for options this mapping does not reproduce."""
  from sentencepiece import sentencepiece_model_pb2  # needs protobuf, as sentencepiece does

  proto = sentencepiece_model_pb2.ModelProto()
  proto.ParseFromString(model_proto)
  spec, norm = proto.trainer_spec, proto.normalizer_spec
  unused = [p.piece for p in proto.pieces if p.type == _UNUSED]
  refuse = {f'trainer_spec.model_type={spec.model_type}': spec.model_type not in (_UNIGRAM, _BPE),
            'trainer_spec.treat_whitespace_as_suffix': spec.treat_whitespace_as_suffix,
            'normalizer_spec.escape_whitespaces=false': not norm.escape_whitespaces,
            'a denormalizer_spec': bool(proto.denormalizer_spec.precompiled_charsmap),
            f'UNUSED pieces ({unused[:3]})': bool(unused)}
  for field, bad in refuse.items():
    if bad:
      raise UnsupportedError(f'sentencepiece model: {field} has no tokenizer.json equivalent '
                             'here (models from tools/train_tokenizer.py all convert)')

  pieces = [p.piece for p in proto.pieces]
  specials = {i: pieces[i] for i in (spec.unk_id, spec.bos_id, spec.eos_id, spec.pad_id) if i >= 0}
  added = [dict(id=i, content=p, single_word=False, lstrip=False, rstrip=False,
                normalized=False, special=True) for i, p in sorted(specials.items())]
  # sentencepiece cuts user-defined pieces out of the normalized text (longest first) and emits
  # each whole. An added token would not do: `tokenizers` normalizes its content too, so the
  # dummy prefix would make '<tool>' match only as '▁<tool>'.
  user_defined = sorted((p.piece for p in proto.pieces if p.type == _USER_DEFINED), key=len,
                        reverse=True)
  # sentencepiece never matches a control, unknown or byte piece in text: '</s>' in a document
  # is four characters, '<0x41>' six. `tokenizers` matches any vocabulary entry its model
  # reaches, so the pre-tokenizer keeps those spellings out of reach, without changing any
  # segmentation sentencepiece makes.
  isolate = [re.escape(p) for p in user_defined]
  if spec.model_type != _BPE:
    # Unigram: those pieces score below every segmentation of known characters
    # (`_unigram_vocab`); one with a character the vocabulary lacks would still win (an unknown
    # char scores below every piece), so each unknown character is a pre-token of its own. That
    # is exact: no piece contains an unknown character, so sentencepiece's segmentation has a
    # boundary on both sides of it too.
    known = sorted({p.piece for p in proto.pieces
                    if len(p.piece) == 1 and p.type in (_NORMAL, _USER_DEFINED)})
    isolate.append('[^' + ''.join(f'\\x{{{ord(c):X}}}' for c in known) + ']')
  splits = []
  if isolate:
    splits.append({'type': 'Split', 'behavior': 'Isolated', 'invert': False,
                   'pattern': {'Regex': '|'.join(isolate)}})
  if spec.model_type == _BPE and user_defined:
    # BPE: no merge forms one of those pieces, but ignore_merges emits a pre-token that is a
    # vocabulary entry whole ('</s>' right after a user-defined piece): such a pre-token is cut
    # where sentencepiece cuts that text.
    unreachable = [p.piece for p in proto.pieces if p.type in (_UNKNOWN, _CONTROL, _BYTE)]
    if cuts := _cuts(model_proto, user_defined[0], unreachable):
      splits.append({'type': 'Split', 'behavior': 'MergedWithPrevious', 'invert': False,
                     'pattern': {'Regex': cuts}})
  pre_tokenizer = (None if not splits else splits[0] if len(splits) == 1 else
                   {'type': 'Sequence', 'pretokenizers': splits})
  post = None
  if spec.bos_id >= 0:  # bos + text (+ bos + text for a pair), as Llama's
    bos = pieces[spec.bos_id]
    post = {'type': 'TemplateProcessing',
            'single': [_special(bos, 0), _sequence('A', 0)],
            'pair': [_special(bos, 0), _sequence('A', 0), _special(bos, 1), _sequence('B', 1)],
            'special_tokens': {bos: {'id': bos, 'ids': [spec.bos_id], 'tokens': [bos]}}}
  if spec.model_type == _BPE:
    model = {'type': 'BPE', 'dropout': None,
             'unk_token': pieces[spec.unk_id] if spec.unk_id >= 0 else None,
             'continuing_subword_prefix': None, 'end_of_word_suffix': None,
             'fuse_unk': True, 'byte_fallback': spec.byte_fallback,
             # A pre-token that is a piece comes out whole: that emits user-defined pieces, which
             # no merge forms. The text between them gets it too; sentencepiece's BPE gives each
             # of its pieces back whole as well (checked on an 8k vocabulary).
             'ignore_merges': bool(user_defined),
             'vocab': {p: i for i, p in enumerate(pieces)}, 'merges': _bpe_merges(proto)}
  else:
    model = {'type': 'Unigram', 'unk_id': spec.unk_id if spec.unk_id >= 0 else None,
             'vocab': _unigram_vocab(proto), 'byte_fallback': spec.byte_fallback}
  return {'version': '1.0', 'truncation': None, 'padding': None, 'added_tokens': added,
          'normalizer': _spm_normalizer(norm), 'pre_tokenizer': pre_tokenizer,
          'post_processor': post, 'decoder': _spm_decoder(norm), 'model': model}


def _spm_normalizer(norm) -> dict:
  """sentencepiece's normalization in its order: the charsmap, whitespace cleanup, the dummy
  prefix, then each space to '▁'."""
  steps = []
  if norm.precompiled_charsmap:  # e.g. nmt_nfkc; identity (jaxllm's default) has none
    steps.append({'type': 'Precompiled',
                  'precompiled_charsmap': base64.b64encode(norm.precompiled_charsmap).decode()})
  if norm.remove_extra_whitespaces:  # spaces only, not tabs or newlines
    steps += [_replace(r'\A +| +\z', '', regex=True), _replace(' {2,}', ' ', regex=True)]
  if norm.add_dummy_prefix:  # even before a space; `tokenizers` leaves an empty text empty too
    steps.append({'type': 'Prepend', 'prepend': '\u2581'})
  steps.append(_replace(' ', '\u2581'))
  return {'type': 'Sequence', 'normalizers': steps}


def _spm_decoder(norm) -> dict:
  """'▁' back to spaces, byte pieces back to UTF-8, less the dummy prefix's space."""
  steps = [_replace('\u2581', ' '), {'type': 'ByteFallback'}, {'type': 'Fuse'}]
  if norm.add_dummy_prefix:  # after Fuse, so that only the text's first space goes
    steps.append({'type': 'Strip', 'content': ' ', 'start': 1, 'stop': 0})
  return {'type': 'Sequence', 'decoders': steps}


def _cuts(model_proto: bytes, anchor: str, spellings: list[str]) -> str:
  """A regex that matches, in a pre-token that is exactly one of `spellings`, the first piece
  that sentencepiece makes of that text after the user-defined piece `anchor` (where such a
  pre-token comes from). Split MergedWithPrevious, the pre-token falls apart there, and BPE
  makes of the rest what sentencepiece makes: no merge crossed that cut. Anchored at \\A as a
  whole, so that the regex is tried at the start of a pre-token only."""
  import sentencepiece as spm

  sp = spm.SentencePieceProcessor(model_proto=model_proto)
  nbytes = lambda piece: 1 if sp.is_byte(sp.piece_to_id(piece)) else len(
      piece.replace('\u2581', ' ').encode())
  alternatives = []
  for text in spellings:
    pieces = sp.encode_as_pieces(anchor + text)
    pieces = pieces[pieces.index(anchor) + 1:]
    assert sum(map(nbytes, pieces)) == len(text.encode()), (text, pieces)
    # The first cut in characters (byte pieces of one character come out together).
    cut = next(k for k in range(1, len(text) + 1)
               if len(text[:k].encode()) >= nbytes(pieces[0]))
    if cut < len(text):
      alternatives.append(f'{re.escape(text[:cut])}(?={re.escape(text[cut:])}\\z)')
  return '\\A(?:' + '|'.join(alternatives) + ')' if alternatives else ''


def _bpe_merges(proto) -> list[list[str]]:
  """sentencepiece BPE merges the adjacent pair whose concatenation is the highest-scoring piece
  (leftmost on a tie): every (left, right) split of each piece into two pieces, best merged
  score first. Only ordinary pieces take part: user-defined ones are matched whole before the
  model, and control and byte pieces never form from text."""
  normal = {p.piece: p for p in proto.pieces if p.type == _NORMAL}
  merges = []
  for i, p in enumerate(proto.pieces):
    if p.type != _NORMAL:
      continue
    for k in range(1, len(p.piece)):
      left, right = p.piece[:k], p.piece[k:]
      if left in normal and right in normal:
        merges.append((-p.score, i, k, left, right))
  return [[left, right] for *_, left, right in sorted(merges)]


def _unigram_vocab(proto) -> list[list]:
  """[piece, score] by id. sentencepiece's lattice never matches control, unknown or byte pieces
  in text; `tokenizers`' matches every piece, so those score below any other segmentation of
  their characters. That is not enough where the vocabulary lacks one of those characters (an
  unknown char scores from the lowest score in the vocabulary, now one of these): the
  pre-tokenizer's cut in `tokenizer_json` keeps their spellings out of reach. A known difference
  remains: sentencepiece sums scores in float32, so in a long text two segmentations closer
  than its rounding can part."""
  lowest = min((p.score for p in proto.pieces if p.type == _NORMAL), default=0.0)
  never = lambda n: n * (lowest - _UNK_PENALTY) - 1.0
  return [[p.piece, never(len(p.piece)) if p.type in (_UNKNOWN, _CONTROL, _BYTE) else p.score]
          for p in proto.pieces]


def _replace(pattern: str, content: str, *, regex: bool = False) -> dict:
  return {'type': 'Replace', 'pattern': {'Regex' if regex else 'String': pattern},
          'content': content}


def _special(token: str, type_id: int) -> dict:
  return {'SpecialToken': {'id': token, 'type_id': type_id}}


def _sequence(name: str, type_id: int) -> dict:
  return {'Sequence': {'id': name, 'type_id': type_id}}
