"""One tokenizer interface for data, sampling, evaluation and conversion.

`Tokenizer` is what callers use: ids of texts, texts of ids, BOS/EOS, the UTF-8 bytes each id
stands for (bits per byte), a fingerprint (token caches are keyed on it). `open_tokenizer(path)`
picks the implementation from the file; sentencepiece `.model` is the first. A Hugging Face
`tokenizer.json` (special tokens, a chat template) is added as another subclass here, and no
caller changes: callers never reach into the library object behind it.
"""

from __future__ import annotations

import abc
import hashlib
import io
import os
from collections.abc import Iterable, Sequence

import numpy as np
import sentencepiece as spm

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
  a document or fake a turn (sentencepiece never matches control pieces in input; an
  implementation over HF tokenizer.json must not match its special tokens either).
  User-defined symbols (tools/train_tokenizer.py --special_tokens) are matched in text: that is
  what they are for, and they decode back to their spelling.
  """

  path: str
  vocab_size: int
  bos_id: int | None  # None: the tokenizer has no BOS (Qwen's); documents then start with no marker
  eos_id: int
  chat_template: str | None = None  # Jinja source of the chat template (jaxllm.chat renders it)

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

  @property
  def doc_prefix_bytes(self) -> int:
    """Bytes the encoding adds at the start of every document that decoding drops (for counting
    the bytes of the text a document's targets stand for)."""
    return 0

  def encode(self, text: str) -> list[int]:
    return self.encode_batch([text])[0]

  def encode_docs(self, texts: Sequence[str]) -> list[np.ndarray]:
    """BOS + ids + EOS of each text as int32."""
    out = []
    for ids in self.encode_batch(texts):
      doc = np.empty(len(ids) + 2, np.int32)
      doc[0], doc[1:-1], doc[-1] = self.bos_id, ids, self.eos_id
      out.append(doc)
    return out

  def text_bytes_counter(self):
    """batch -> UTF-8 bytes of the text its real targets (segment_ids > 0) stand for, less the
    document prefix at each document's first target (the one after BOS): bits per byte is then
    total nats / ln 2 / these bytes, comparable across tokenizers."""
    table, prefix = self.token_bytes(), self.doc_prefix_bytes

    def count(batch) -> int:
      real = batch['segment_ids'] > 0
      target_bytes = table[batch['targets']]
      starts = real & (batch['inputs'] == self.bos_id) & (target_bytes > 0)
      return int(target_bytes[real].sum()) - prefix * int(starts.sum())
    return count


class SentencePieceTokenizer(Tokenizer):
  """A sentencepiece `.model` file."""

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

  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
    return self.sp.encode(list(texts))  # one call: sentencepiece releases the GIL inside

  def decode(self, ids: Iterable[int]) -> str:
    return self.sp.decode([int(i) for i in ids])

  def fingerprint(self) -> str:
    return hashlib.sha256(self.model_proto()).hexdigest()[:16]

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


def exists(path: str) -> bool:
  """A tokenizer file is at `path` (a local path or a gs:// URL)."""
  return files.isfile(path)


def open_tokenizer(path: str) -> Tokenizer:
  """The tokenizer stored at `path` (a sentencepiece `.model` file, local or gs://)."""
  if not exists(path):
    raise FileNotFoundError(f'tokenizer {path} does not exist')
  return SentencePieceTokenizer(path)


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