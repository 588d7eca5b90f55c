"""One tokenizer interface for data, sampling, evaluation, chat and conversion.

`Tokenizer` is what callers use: ids of texts, texts of ids, BOS/EOS, the UTF-8 bytes each id
stands for (bits per byte), a fingerprint (token caches are keyed on it), and what jaxllm.chat
needs to render and encode a conversation (the chat template, the special-token strings a
template reads, template text encoded with control tokens matched). `open_tokenizer(path)` picks
the implementation from the path; callers never reach into the library object behind it:

- a sentencepiece `.model` file: `SentencePieceTokenizer`;
- a Hugging Face model folder (or its tokenizer.json): `HFTokenizer`, over the `tokenizers`
  library (not transformers, an optional extra), with tokenizer_config.json and
  special_tokens_map.json beside it for BOS/EOS and the chat template. It encodes and decodes as
  transformers' AutoTokenizer does: `encode` as `tok(text, add_special_tokens=False,
  split_special_tokens=True)`, `decode` as `tok.decode(ids, skip_special_tokens=True)`.

The chat template is the tokenizer's own (tokenizer_config.json's `chat_template`, or the
chat_template.jinja file transformers 5 writes) unless `open_tokenizer(chat_template=...)`
(data.chat_template) overrides it: 'default' is `DEFAULT_CHAT_TEMPLATE`, anything else a Jinja
file. A sentencepiece model has none of its own.
"""

from __future__ import annotations

import abc
import hashlib
import io
import json
import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import sentencepiece as spm
import tokenizers

from jaxllm import files


# The chat template jaxllm gives a tokenizer that has none (a sentencepiece model trained here, and
# its HF export): turn markers in plain text, each assistant turn closed by EOS, which is where
# generation stops. Chosen over ChatML's <|im_start|> tokens because it adds no tokens to the
# vocabulary, so a pretrained model fine-tunes on it as it is.
DEFAULT_CHAT_TEMPLATE = (
    "{{- bos_token if bos_token else '' -}}"
    "{%- for message in messages -%}"
    "{{- '<|' + message['role'] + '|>\\n' + message['content'] -}}"
    "{{- eos_token if message['role'] == 'assistant' else '\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|assistant|>\\n' -}}{%- endif -%}")


class Tokenizer(abc.ABC):
  """Texts <-> ids. `encode` adds no BOS/EOS; `encode_docs` frames each text as a document.

  Text is only ever text: the spelling of a control token inside a document ('</s>', '<s>',
  '<unk>', '<|eot_id|>') encodes as its characters, never as the control id, so data cannot end
  a document or fake a turn (sentencepiece never matches control pieces in input; HFTokenizer
  does not match its special tokens). User-defined symbols (tools/train_tokenizer.py
  --special_tokens) and an HF tokenizer's non-special added tokens are matched in text: that is
  what they are for, and they decode back to their spelling. Only a rendered chat template
  (`encode_template_text`) has its control tokens matched.
  """

  path: str
  vocab_size: int
  bos_id: int | None  # None: the tokenizer has no BOS (Qwen's); documents then start with no marker
  eos_id: int
  chat_template: str | None = None  # Jinja source of the chat template (jaxllm.chat renders it)
  chat_template_source: str = ''  # where the template came from, for error messages

  @abc.abstractmethod
  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
    """Ids of each text, no BOS/EOS."""

  @abc.abstractmethod
  def decode(self, ids: Iterable[int]) -> str:
    """The text of `ids` (control ids such as BOS/EOS are dropped)."""

  @abc.abstractmethod
  def fingerprint(self) -> str:
    """A short hash of the tokenizer's definition: equal fingerprints encode equally."""

  @abc.abstractmethod
  def token_bytes(self) -> np.ndarray:
    """[vocab] int32: UTF-8 bytes each id stands for in decoded text (0 for control ids)."""

  @abc.abstractmethod
  def special_token_map(self) -> dict[str, str]:
    """The special tokens' strings a chat template reads: {'bos_token': ..., 'eos_token': ...}."""

  @abc.abstractmethod
  def added_tokens(self) -> dict[str, tuple[int, bool]]:
    """Spelling -> (id, special) of each token that `encode_template_text` matches in text."""

  @abc.abstractmethod
  def encode_template_text(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    """Ids of a rendered chat template, its control tokens matched (no BOS added: the template
    writes its own), and each id's (start, end) character span in `text`."""

  @abc.abstractmethod
  def encode_plain(self, text: str) -> list[int]:
    """Ids of `text` with no added or control token matched: a control token's spelling typed
    in a message, encoded as the characters it is."""

  @property
  def doc_prefix_bytes(self) -> int:
    """Bytes the encoding adds at the start of every document that decoding drops (for counting
    the bytes of the text a document's targets stand for)."""
    return 0

  def encode(self, text: str) -> list[int]:
    return self.encode_batch([text])[0]

  def encode_docs(self, texts: Sequence[str]) -> list[np.ndarray]:
    """BOS + ids + EOS of each text as int32 (no BOS when the tokenizer has none)."""
    bos = [] if self.bos_id is None else [self.bos_id]
    return [np.array([*bos, *ids, self.eos_id], np.int32) for ids in self.encode_batch(texts)]

  def text_bytes_counter(self):
    """batch -> UTF-8 bytes of the text its real targets (segment_ids > 0, and weights > 0 where
    the batch has weights) stand for, less the
    document prefix at each document's first target (the one after BOS): bits per byte is then
    total nats / ln 2 / these bytes, comparable across tokenizers. Without a BOS a document's
    first token is no target, and its prefix is in no count."""
    table, prefix = self.token_bytes(), self.doc_prefix_bytes

    def count(batch) -> int:
      real = batch['segment_ids'] > 0
      if 'weights' in batch:  # conversations: only the targets that carry loss
        real = real & (batch['weights'] > 0)
      target_bytes = table[batch['targets']]
      if self.bos_id is None:
        return int(target_bytes[real].sum())
      starts = real & (batch['inputs'] == self.bos_id) & (target_bytes > 0)
      return int(target_bytes[real].sum()) - prefix * int(starts.sum())
    return count


def _split_on(text: str, spellings: Sequence[str]) -> list[str]:
  """`text` cut before and after each occurrence of `spellings` (longest first): text and
  spellings alternate, starting and ending with text (maybe '')."""
  if not spellings:
    return [text]
  pattern = '|'.join(re.escape(s) for s in sorted(spellings, key=len, reverse=True))
  return re.split(f'({pattern})', text)


class SentencePieceTokenizer(Tokenizer):
  """A sentencepiece `.model` file. Its control pieces (BOS, EOS) are matched only in rendered
  chat templates, where the text between two of them is encoded as sentencepiece encodes a
  document (with its dummy-prefix space): a turn after EOS starts as a document does."""

  def __init__(self, path: str):
    self.path = str(path)
    try:  # from the bytes: sentencepiece opens only local files, the path may be a gs:// URL
      self.sp = spm.SentencePieceProcessor(model_proto=files.read_bytes(self.path))
    except (RuntimeError, OSError) as e:  # sentencepiece's C++ status, e.g. a truncated file
      raise ValueError(f'tokenizer {self.path} is not a sentencepiece model ({e}); point '
                       'data.tokenizer at the .model file sentencepiece wrote') from None
    self.vocab_size, self.bos_id, self.eos_id = (self.sp.vocab_size(), self.sp.bos_id(),
                                                 self.sp.eos_id())
    if min(self.bos_id, self.eos_id) < 0:  # id -1 would index the last embedding row
      raise ValueError(f'tokenizer {self.path} has no BOS or EOS piece (bos_id={self.bos_id}, '
                       f'eos_id={self.eos_id}), which mark where documents start and end: train '
                       'one with bos_id and eos_id set (tools/train_tokenizer.py does)')
    self._control = {self.sp.id_to_piece(i): i for i in range(self.vocab_size)
                     if self.sp.is_control(i)}

  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
    return self.sp.encode(list(texts))  # one call: sentencepiece releases the GIL inside

  def decode(self, ids: Iterable[int]) -> str:
    return self.sp.decode([int(i) for i in ids])

  def fingerprint(self) -> str:
    digest = hashlib.sha256(self.model_proto())
    if self.chat_template is not None:  # only then: token caches of plain text stay valid
      digest.update(b'\0chat template\0' + self.chat_template.encode())
    return digest.hexdigest()[:16]

  def model_proto(self) -> bytes:
    """The serialized model (what the HF tokenizer.json export reads)."""
    return self.sp.serialized_model_proto()

  def token_bytes(self) -> np.ndarray:
    sp, out = self.sp, np.zeros(self.vocab_size, np.int32)
    for i in range(self.vocab_size):
      if sp.is_byte(i):
        out[i] = 1
      elif not (sp.is_control(i) or sp.is_unknown(i)):
        out[i] = len(sp.id_to_piece(i).replace('\u2581', ' ').encode('utf-8'))
    return out

  @property
  def doc_prefix_bytes(self) -> int:
    # sentencepiece's dummy prefix: a space before every text, which decoding drops.
    return int(self.sp.encode_as_pieces('a')[0].startswith('\u2581'))

  def special_token_map(self) -> dict[str, str]:
    ids = {'bos_token': self.bos_id, 'eos_token': self.eos_id, 'unk_token': self.sp.unk_id(),
           'pad_token': self.sp.pad_id()}
    return {name: self.sp.id_to_piece(i) for name, i in ids.items() if i >= 0}

  def added_tokens(self) -> dict[str, tuple[int, bool]]:
    return {piece: (i, True) for piece, i in self._control.items()}

  def encode_template_text(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    ids, spans, at = [], [], 0
    for k, chunk in enumerate(_split_on(text, list(self._control))):
      if k % 2:
        ids.append(self._control[chunk])
        spans.append((at, at + len(chunk)))
      elif chunk:
        char_of_byte = [c for c, ch in enumerate(chunk) for _ in ch.encode('utf-8')]
        char_of_byte.append(len(chunk))
        for piece in self.sp.encode(chunk, return_type='proto').pieces:
          ids.append(piece.id)
          spans.append((at + char_of_byte[piece.begin], at + char_of_byte[piece.end]))
      at += len(chunk)
    return ids, spans

  def encode_plain(self, text: str) -> list[int]:
    return self.encode(text)


# transformers' named special tokens (SPECIAL_TOKENS_ATTRIBUTES): the strings a template reads.
SPECIAL_TOKEN_NAMES = ('bos_token', 'eos_token', 'unk_token', 'sep_token', 'pad_token',
                       'cls_token', 'mask_token')
_BYTE_PIECE = re.compile(r'<0x[0-9A-Fa-f]{2}>')


class HFTokenizer(Tokenizer):
  """A Hugging Face tokenizer folder: tokenizer.json, run by the `tokenizers` library, with
  tokenizer_config.json and special_tokens_map.json read as transformers 5 reads them (the
  latter only in a folder whose config has no `added_tokens_decoder`, and then over it).

  BOS and EOS are the config's bos_token/eos_token (a string or an AddedToken dict); bos_id is
  None when there is no bos_token or `add_bos_token` is false (documents then start with no
  marker, as Qwen's do); a folder with no eos_token is an error. Encoding runs a copy of the
  tokenizer with `encode_special_tokens` set, so special-token spellings in text are text;
  `encode_template_text` runs the original, which matches them (as transformers does with a
  rendered chat template). Truncation and padding saved in tokenizer.json are switched off: the
  data pipeline packs whole documents.
  """

  def __init__(self, folder: str):
    self.path = str(folder)
    file = Path(folder) / 'tokenizer.json'
    self._definition = file.read_bytes()
    try:
      self._tok = tokenizers.Tokenizer.from_str(self._definition.decode('utf-8'))
      self._text = tokenizers.Tokenizer.from_str(self._definition.decode('utf-8'))
    except Exception as e:  # tokenizers raises a plain Exception for a bad file
      raise ValueError(f'{file} is not a tokenizers tokenizer.json ({e}); point data.tokenizer '
                       'at a Hugging Face model folder') from None
    for tok in (self._tok, self._text):  # a file's own settings would cut or pad documents
      tok.no_truncation()
      tok.no_padding()
    self._text.encode_special_tokens = True
    config_file = Path(folder) / 'tokenizer_config.json'
    config = _read_json(config_file)
    if 'added_tokens_decoder' not in config:  # the legacy layout, where the map has the last word
      config.update(_read_json(Path(folder) / 'special_tokens_map.json'))
    self._specials = {name: _token_content(config.get(name), config_file, name)
                      for name in SPECIAL_TOKEN_NAMES}
    self._specials = {k: v for k, v in self._specials.items() if v is not None}
    if 'eos_token' not in self._specials:
      raise ValueError(f'{config_file} names no eos_token, which ends every document and turn: '
                       'add one (e.g. "eos_token": "</s>") or use the model\'s own tokenizer files')
    self.eos_id = self._id_of('eos_token', config_file)
    self.bos_id = (self._id_of('bos_token', config_file) if 'bos_token' in self._specials
                   and config.get('add_bos_token', True) is not False else None)
    vocab = self._tok.get_vocab(with_added_tokens=True)
    self.vocab_size = max(self._tok.get_vocab_size(with_added_tokens=True), max(vocab.values()) + 1)
    self._added = {t.content: (i, t.special)
                   for i, t in self._tok.get_added_tokens_decoder().items()}
    self.chat_template, self.chat_template_source = _own_chat_template(Path(folder), config)
    self._token_bytes = None

  def _id_of(self, name: str, config_file: Path) -> int:
    i = self._tok.token_to_id(self._specials[name])
    if i is None:
      raise ValueError(f'{config_file} names {name} {self._specials[name]!r}, which '
                       f'{Path(self.path) / "tokenizer.json"} does not hold: fix the {name}')
    return i

  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
    return [e.ids for e in self._text.encode_batch(list(texts), add_special_tokens=False)]

  def decode(self, ids: Iterable[int]) -> str:
    return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)

  def fingerprint(self) -> str:
    digest = hashlib.sha256(self._definition)
    digest.update(json.dumps([self.chat_template, self.bos_id, self.eos_id]).encode())
    return digest.hexdigest()[:16]

  def token_bytes(self) -> np.ndarray:
    """From each token's string as the decoder reads it: byte-level BPE's characters are one
    byte each; otherwise '<0xNN>' byte pieces (with ByteFallback) are one byte and the rest is
    UTF-8 after the decoder's replacements ('▁' -> ' '). Computed once (a pass over the vocab)."""
    if self._token_bytes is None:
      self._token_bytes = self._count_token_bytes()
      self._token_bytes.flags.writeable = False
    return self._token_bytes

  def _count_token_bytes(self) -> np.ndarray:
    steps = _decoder_steps(json.loads(self._definition).get('decoder'))
    kinds = {step['type'] for step in steps}
    byte_chars = set(tokenizers.pre_tokenizers.ByteLevel.alphabet())
    replace = [(s['pattern']['String'], s['content']) for s in steps
               if s['type'] == 'Replace' and 'String' in s['pattern']]
    replace += [(s['replacement'], ' ') for s in steps if s['type'] == 'Metaspace']
    out = np.zeros(self.vocab_size, np.int32)
    for token, i in self._tok.get_vocab(with_added_tokens=True).items():
      if self._added.get(token, (i, False))[1]:
        continue  # a special token: decoding drops it
      if 'ByteLevel' in kinds:
        out[i] = sum(1 if c in byte_chars else len(c.encode('utf-8')) for c in token)
      elif 'ByteFallback' in kinds and _BYTE_PIECE.fullmatch(token):
        out[i] = 1
      else:
        for old, new in replace:
          token = token.replace(old, new)
        out[i] = len(token.encode('utf-8'))
    return out

  @property
  def doc_prefix_bytes(self) -> int:
    """What the table counts for a text less what decoding gives back: a Metaspace or Prepend
    normalizer's leading '▁', which the decoder strips."""
    ids = self.encode('a')
    return int(self.token_bytes()[ids].sum()) - len(self.decode(ids).encode('utf-8'))

  def special_token_map(self) -> dict[str, str]:
    return dict(self._specials)

  def added_tokens(self) -> dict[str, tuple[int, bool]]:
    return dict(self._added)

  def encode_template_text(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    encoding = self._tok.encode(text, add_special_tokens=False)
    return encoding.ids, encoding.offsets

  def encode_plain(self, text: str) -> list[int]:
    # The tokenizer's own steps without its added-token matching (which encode_special_tokens
    # keeps for non-special added tokens): transformers' `_encode_without_added_tokens`.
    tok = self._tok
    text = tok.normalizer.normalize_str(text) if tok.normalizer is not None else text
    pieces = ([p for p, _ in tok.pre_tokenizer.pre_tokenize_str(text)]
              if tok.pre_tokenizer is not None else [text])
    return [t.id for piece in pieces for t in tok.model.tokenize(piece)]


def _read_json(path: Path) -> dict:
  if not path.is_file():
    return {}
  try:
    data = json.loads(path.read_text(encoding='utf-8'))
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ValueError(f'{path} is not valid JSON ({e}): restore the model\'s own file') from None
  if not isinstance(data, dict):
    raise ValueError(f'{path} holds a {type(data).__name__}, not a JSON object: restore the '
                     'model\'s own file')
  return data


def _token_content(value, file: Path, name: str) -> str | None:
  """A special token as tokenizer_config.json writes it: a string, or an AddedToken dict."""
  if isinstance(value, dict):
    value = value.get('content')
  if value is not None and not isinstance(value, str):
    raise ValueError(f'{file}: {name} is {value!r}, not a token string or {{"content": ...}}')
  return value


def _decoder_steps(decoder: dict | None) -> list[dict]:
  if decoder is None:
    return []
  if decoder['type'] == 'Sequence':
    return [step for d in decoder['decoders'] for step in _decoder_steps(d)]
  return [decoder]


def _own_chat_template(folder: Path, config: dict) -> tuple[str | None, str]:
  """The folder's chat template: chat_template.jinja (transformers 5 writes it, and reads it
  over the config's), else tokenizer_config.json's `chat_template`: a string, or a list of
  {name, template} from which 'default' is taken."""
  jinja = folder / 'chat_template.jinja'
  if jinja.is_file():
    return jinja.read_text(encoding='utf-8'), str(jinja)
  template, source = config.get('chat_template'), f'{folder / "tokenizer_config.json"}'
  if isinstance(template, list):
    named = {t.get('name'): t.get('template') for t in template if isinstance(t, dict)}
    template, source = named.get('default'), f'{source} (the template named default)'
  if template is not None and not isinstance(template, str):
    raise ValueError(f'{source}: chat_template is not a string (or a list of {{name, template}} '
                     'with one named default): set data.chat_template to a Jinja file')
  return template, source if template is not None else ''


def read_chat_template(chat_template: str) -> tuple[str, str] | None:
  """(Jinja source, where from) that data.chat_template names: None for '' (the tokenizer's
  own), DEFAULT_CHAT_TEMPLATE for 'default', else the file's text (a missing file is an error)."""
  if not chat_template:
    return None
  if chat_template == 'default':
    return DEFAULT_CHAT_TEMPLATE, "data.chat_template='default' (jaxllm's)"
  if not os.path.isfile(chat_template):
    raise FileNotFoundError(f'data.chat_template={chat_template} does not exist: set it to a Jinja '
                            "file, 'default' (jaxllm's template) or '' (the tokenizer's own)")
  return Path(chat_template).read_text(encoding='utf-8'), chat_template


def exists(path: str) -> bool:
  """A tokenizer (a sentencepiece file or an HF folder) is at `path`, local or gs://."""
  return files.exists(path)


def open_tokenizer(path: str, chat_template: str = '') -> Tokenizer:
  """The tokenizer stored at `path`: a Hugging Face model folder (or the tokenizer.json in
  one), else a sentencepiece `.model` file. `chat_template` is data.chat_template: '' keeps the
  tokenizer's own template, 'default' is DEFAULT_CHAT_TEMPLATE, anything else a Jinja file."""
  override = read_chat_template(chat_template)
  folder = path if files.isdir(path) else (
      os.path.dirname(path) or '.' if os.path.basename(path).endswith('tokenizer.json') else None)
  if folder is not None:
    if not files.isfile(os.path.join(folder, 'tokenizer.json')):
      raise FileNotFoundError(f'tokenizer {path} has no tokenizer.json: point data.tokenizer at a '
                              'Hugging Face model folder or a sentencepiece .model file')
    tokenizer = HFTokenizer(folder)
  elif not files.isfile(path):
    raise FileNotFoundError(f'tokenizer {path} does not exist')
  else:
    tokenizer = SentencePieceTokenizer(path)
  if override is not None:
    tokenizer.chat_template, tokenizer.chat_template_source = override
  return tokenizer


def train_sentencepiece(path: str, texts: Sequence[str], vocab_size: int, *,
                        model_type: str = 'bpe', byte_fallback: bool = True,
                        user_defined_symbols: Sequence[str] = (), normalization: str = 'identity',
                        max_sentences: int = 5000, max_chars: int = 1 << 20) -> None:
  """sentencepiece on `texts` (one document per sentence), written atomically to `path`.

  `normalization='identity'` (with no whitespace folding) is the only lossless choice; others are
  sentencepiece rule names such as 'nmt_nfkc'. A vocab_size the texts cannot fill is an error.
  """
  model = io.BytesIO()
  try:
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_writer=model, model_type=model_type,
        vocab_size=vocab_size, character_coverage=1.0, byte_fallback=byte_fallback,
        split_digits=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        user_defined_symbols=list(user_defined_symbols), normalization_rule_name=normalization,
        remove_extra_whitespaces=normalization != 'identity', input_sentence_size=max_sentences,
        max_sentence_length=max_chars, num_threads=os.cpu_count() or 1, minloglevel=2)
  except RuntimeError as e:
    raise ValueError(f'vocab_size={vocab_size} does not suit this corpus: {str(e).strip()}') from None
  write_replacing(path, model.getvalue())


def write_replacing(path: str, contents: bytes) -> None:
  """`contents` as the file `path`, whole or not at all (jaxllm.files.replacing)."""
  files.makedirs(os.path.dirname(path) or '.')
  with files.replacing(path, 'wb') as f:
    f.write(contents)