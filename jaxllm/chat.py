"""Conversations -> token ids and loss masks, through the tokenizer's chat template.

A conversation is a list of messages `{'role': 'system'|'user'|'assistant', 'content': str}`, the
HF/OpenAI form; a jsonl row holds one as `messages`, or as `prompt` and `completion` (a user turn
and the assistant's reply). Choices:

- Rendering is transformers' (5.x): the template runs in jinja2's ImmutableSandboxedEnvironment
  (templates come from the Hub: untrusted code) with trim_blocks and lstrip_blocks, the same
  helpers (`raise_exception`, a `tojson` that does not escape HTML, `strftime_now`, `namespace`
  refusing underscore names), `{% generation %}` blocks accepted, and the tokenizer's special
  token strings (`bos_token`, `eos_token`, ...) as variables. The ids of a conversation equal
  `AutoTokenizer.apply_chat_template(messages, tokenize=True)`.
- Loss masks do not need `{% generation %}` tags (no stock instruct template has them): an
  assistant turn is the text between `render(messages[:i], add_generation_prompt=True)` and
  `render(messages[:i + 1])`, both prefixes of the whole rendering: its content and end-of-turn
  marker as the template writes them. A token is masked in when its character span overlaps a
  turn's (transformers' rule for `return_assistant_tokens_mask`, so a template with the tags
  gives the same mask either way). A template that does not render a conversation's beginning as
  a prefix of the whole is an error naming data.loss_on='all'.
- A control token's spelling in a message (a user typing '<|eot_id|>') is text: as with
  transformers' `apply_chat_template(sanitize_control_tokens=True)`, each such spelling is
  wrapped in private-use markers before rendering, and the rendered text is encoded piece by
  piece: marked spellings with nothing matched, the rest with the template's control tokens
  matched (each piece after the first encoded after a newline that is then dropped, so a
  sentencepiece-style tokenizer adds no word-start space). Control tokens are the special added
  tokens, and the added tokens that appear in the template's own text. Only such rows differ
  from plain `apply_chat_template`, which would give the control id; they equal the sanitized
  call. Any private-use marker characters (U+F0000, U+F0001) in messages are removed first, so
  data cannot forge a mark.

A leaf over jaxllm.tokenizer: no jax.
"""

from __future__ import annotations

import datetime
import functools
import json
import re
from collections.abc import Sequence

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.sandbox
import jinja2.utils
import numpy as np

from jaxllm import tokenizer as tokenizer_lib

ROLES = ('system', 'user', 'assistant')
LOSS_ON = ('assistant', 'all')
_MARK_START, _MARK_END = '\U000f0000', '\U000f0001'  # transformers' control-token markers


def is_conversation(row: dict) -> bool:
  """Whether a jsonl row is a conversation (`conversation` reads it, or says what is wrong)."""
  return any(key in row for key in ('messages', 'prompt', 'completion'))


def conversation(row: dict, where: str) -> list[dict]:
  """The messages of a jsonl row (`messages`, or `prompt` + `completion`); a bad row is a
  ValueError that starts with `where` (e.g. 'chats.jsonl:12') and says what is wrong. Only role
  and content are kept."""
  if not isinstance(row, dict):
    raise ValueError(f'{where}: a conversation is a JSON object, not {type(row).__name__}')
  if 'messages' in row:
    messages = row['messages']
    if not isinstance(messages, list) or not messages:
      raise ValueError(f'{where}: messages must be a non-empty list of {{role, content}}')
    out = []
    for n, message in enumerate(messages):
      if not isinstance(message, dict):
        raise ValueError(f'{where}: messages[{n}] is a {type(message).__name__}, not '
                         '{role, content}')
      role, content = message.get('role'), message.get('content')
      if not isinstance(role, str) or role not in ROLES:
        raise ValueError(f'{where}: messages[{n}] has role {role!r}; roles are {", ".join(ROLES)}')
      if not isinstance(content, str):
        raise ValueError(f'{where}: messages[{n}] content is {type(content).__name__}, not a '
                         'string')
      out.append({'role': role, 'content': content})
    return out
  missing = [k for k in ('prompt', 'completion') if not isinstance(row.get(k), str)]
  if missing:
    raise ValueError(f'{where}: a conversation has messages, or prompt and completion strings; '
                     f'this row has no string {" or ".join(missing)} (keys: {", ".join(row)})')
  return [{'role': 'user', 'content': row['prompt']},
          {'role': 'assistant', 'content': row['completion']}]


class _GenerationTags(jinja2.ext.Extension):
  """`{% generation %}...{% endgeneration %}`, transformers' marks of assistant text, rendered as
  their body in a scope of its own (as transformers' call block has)."""
  tags = {'generation'}

  def parse(self, parser):
    lineno = next(parser.stream).lineno
    body = parser.parse_statements(('name:endgeneration',), drop_needle=True)
    return jinja2.nodes.Scope(body).set_lineno(lineno)


class _Namespace(jinja2.utils.Namespace):
  """`namespace()` that refuses underscore-prefixed names (no reaching Python internals)."""

  def __init__(*args, **kwargs):  # noqa: N805 (jinja's signature: `self` may be a keyword)
    self, attrs = args[0], dict(*args[1:], **kwargs)
    for name in attrs:
      _Namespace._check(name)
    jinja2.utils.Namespace.__init__(self, attrs)

  def __setitem__(self, name, value):
    _Namespace._check(name)
    jinja2.utils.Namespace.__setitem__(self, name, value)

  @staticmethod
  def _check(name):
    if isinstance(name, str) and name.startswith('_'):
      raise jinja2.exceptions.SecurityError(f'a chat template may not set {name!r} on a namespace')


def _raise_exception(message):
  raise jinja2.exceptions.TemplateError(message)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
  return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                    sort_keys=sort_keys)


def _make_dict(*args, **kwargs) -> dict:
  return dict(*args, **kwargs)


@functools.cache
def _environment() -> jinja2.sandbox.ImmutableSandboxedEnvironment:
  env = jinja2.sandbox.ImmutableSandboxedEnvironment(
      trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTags, jinja2.ext.loopcontrols])
  env.filters['tojson'] = _tojson
  env.globals.update(raise_exception=_raise_exception, namespace=_Namespace, dict=_make_dict,
                     strftime_now=lambda fmt: datetime.datetime.now().strftime(fmt))
  return env


@functools.lru_cache(maxsize=16)
def _compile(template: str) -> jinja2.Template:
  return _environment().from_string(template)


def _template(tokenizer: tokenizer_lib.Tokenizer) -> jinja2.Template:
  if tokenizer.chat_template is None:
    raise ValueError(f'tokenizer {tokenizer.path} has no chat template: set '
                     "data.chat_template='default' (jaxllm's) or to a Jinja file")
  try:
    return _compile(tokenizer.chat_template)
  except jinja2.TemplateError as e:
    raise ValueError(f'chat template {tokenizer.chat_template_source}: {e} (line '
                     f'{getattr(e, "lineno", "?")})') from None


def render(tokenizer: tokenizer_lib.Tokenizer, messages: Sequence[dict], *,
           add_generation_prompt: bool = False) -> str:
  """The text of `messages` under the tokenizer's chat template."""
  template = _template(tokenizer)
  try:
    return template.render(messages=list(messages), tools=None, documents=None,
                           add_generation_prompt=add_generation_prompt,
                           **tokenizer.special_token_map())
  except jinja2.TemplateError as e:
    raise ValueError(f'chat template {tokenizer.chat_template_source}: {e}') from None


@functools.lru_cache(maxsize=16)
def _template_literals(template: str) -> str:
  """The template's own text and string constants, joined by NULs (no match across two)."""
  tree = _environment().parse(template)
  literals = {n.data for n in tree.find_all(jinja2.nodes.TemplateData)}
  literals |= {n.value for n in tree.find_all(jinja2.nodes.Const) if isinstance(n.value, str)}
  return '\0'.join(sorted(literals))


def _control_tokens(tokenizer: tokenizer_lib.Tokenizer) -> dict[str, int]:
  """Spelling -> id of the tokens a message may not produce: the special added tokens, and the
  added tokens the template writes itself (whitespace tokens aside)."""
  literals = _template_literals(tokenizer.chat_template) if tokenizer.chat_template else ''
  return {text: i for text, (i, special) in tokenizer.added_tokens().items()
          if special or (text in literals and not text.isspace())}


def _alternation(spellings) -> str:
  return '|'.join(re.escape(s) for s in sorted(spellings, key=len, reverse=True))


def _mark(messages: Sequence[dict], control: dict[str, int]) -> list[dict]:
  pattern = re.compile(_alternation(control)) if control else None

  def mark(value):
    if not isinstance(value, str):
      return value
    value = value.replace(_MARK_START, '').replace(_MARK_END, '')
    return pattern.sub(lambda m: _MARK_START + m.group(0) + _MARK_END, value) if pattern else value
  return [{key: mark(value) for key, value in message.items()} for message in messages]


def _encode_marked(tokenizer: tokenizer_lib.Tokenizer, text: str,
                   control: dict[str, int]) -> tuple[list[int], list[tuple[int, int]]]:
  """Ids of a rendering of marked messages and each id's character span in the text without
  the markers. Text and marked spellings alternate: the spellings are encoded as text, the text
  with control tokens matched."""
  if control:
    marked = f'{_MARK_START}({_alternation(control)}){_MARK_END}'
    pieces = re.split(f'{marked}|[{_MARK_START}{_MARK_END}]', text)
  else:
    pieces = [text]
  newline = tokenizer.encode_template_text('\n')[0]
  ids, spans, at = [], [], 0
  for k, piece in enumerate(pieces):
    if not piece:  # None: a lone marker (a template cut a marked spelling), which breaks the text
      continue
    as_text = k % 2 == 1
    if as_text:
      piece_ids = _after_newline(tokenizer.encode_plain, piece, newline)
      if control[piece] in piece_ids:
        raise ValueError(f'{piece!r} in a message cannot be encoded as text: tokenizer '
                         f'{tokenizer.path} gives its control id from plain text')
      piece_spans = [(at, at + len(piece))] * len(piece_ids)
    elif k == 0:
      piece_ids, piece_spans = tokenizer.encode_template_text(piece)
      piece_spans = [(at + a, at + b) for a, b in piece_spans]
    else:
      with_newline, with_spans = tokenizer.encode_template_text('\n' + piece)
      if with_newline[:len(newline)] == newline:
        piece_ids = with_newline[len(newline):]
        piece_spans = [(at + max(a - 1, 0), at + max(b - 1, 0))
                       for a, b in with_spans[len(newline):]]
      else:
        piece_ids, piece_spans = tokenizer.encode_template_text(piece)
        piece_spans = [(at + a, at + b) for a, b in piece_spans]
    ids += piece_ids
    spans += piece_spans
    at += len(piece)
  return ids, spans


def _after_newline(encode, piece: str, newline: list[int]) -> list[int]:
  """`encode(piece)` as in mid-text: after a newline, which is then dropped (a sentencepiece-style
  tokenizer would start a string with a word-start space), unless it merged with the piece."""
  ids = encode('\n' + piece)
  return ids[len(newline):] if ids[:len(newline)] == newline else encode(piece)


def _assistant_spans(tokenizer: tokenizer_lib.Tokenizer, messages: Sequence[dict],
                     full: str) -> list[tuple[int, int]]:
  """(start, end) in `full` of each assistant turn, by incremental rendering."""
  spans = []
  for i, message in enumerate(messages):
    if message['role'] != 'assistant':
      continue
    before = render(tokenizer, messages[:i], add_generation_prompt=True)
    through = render(tokenizer, messages[:i + 1])
    if not (full.startswith(before) and full.startswith(through) and len(before) <= len(through)):
      raise ValueError(f'chat template {tokenizer.chat_template_source} does not render the '
                       f'conversation up to message {i} as the start of the whole, so the '
                       "assistant's tokens cannot be found: set data.loss_on='all' to train on "
                       'every token, or use a template that renders turns in order')
    spans.append((len(before), len(through)))
  return spans


def _unmarked_positions(text: str) -> np.ndarray:
  """[len(text) + 1]: each position of `text` in the text without its markers."""
  is_mark = np.fromiter((c in (_MARK_START, _MARK_END) for c in text), bool, len(text))
  return np.arange(len(text) + 1) - np.concatenate([[0], np.cumsum(is_mark)])


def encode_chat(tokenizer: tokenizer_lib.Tokenizer, messages: Sequence[dict], *,
                loss_on: str = 'assistant') -> tuple[np.ndarray, np.ndarray]:
  """(ids int32, mask bool) of a conversation: the ids of its rendering, and True on the tokens
  that carry loss: those of each assistant turn (loss_on='assistant'), or all (loss_on='all')."""
  if loss_on not in LOSS_ON:
    raise ValueError(f'data.loss_on={loss_on!r}: choose one of {", ".join(LOSS_ON)}')
  control = _control_tokens(tokenizer)
  marked = _mark(messages, control)
  full = render(tokenizer, marked)
  ids, spans = _encode_marked(tokenizer, full, control)
  ids = np.asarray(ids, np.int32)
  if loss_on == 'all':
    return ids, np.ones(len(ids), bool)
  mask = np.zeros(len(ids), bool)
  if len(ids):
    starts, ends = np.asarray(spans, np.int64).T
    marks = _MARK_START in full or _MARK_END in full
    position = _unmarked_positions(full) if marks else np.arange(len(full) + 1)
    for a, b in _assistant_spans(tokenizer, marked, full):
      mask |= (ends > position[a]) & (starts < position[b])
  return ids, mask


def prompt_ids(tokenizer: tokenizer_lib.Tokenizer, messages: Sequence[dict]) -> np.ndarray:
  """int32 ids of `messages` and the template's generation prompt: what a model continues with
  the assistant's next turn."""
  control = _control_tokens(tokenizer)
  text = render(tokenizer, _mark(messages, control), add_generation_prompt=True)
  return np.asarray(_encode_marked(tokenizer, text, control)[0], np.int32)


def end_of_turn_ids(tokenizer: tokenizer_lib.Tokenizer) -> list[int]:
  """The ids generation stops at: the control token the template writes right after an
  assistant's content (<|eot_id|>, <|im_end|>; whitespace before it skipped), and EOS."""
  probe = 'Probe reply 7.'
  text = render(tokenizer, [{'role': 'user', 'content': 'Probe question?'},
                            {'role': 'assistant', 'content': probe}])
  if probe not in text:
    raise ValueError(f'chat template {tokenizer.chat_template_source} does not write the '
                     "assistant's content: it cannot be used for chat")
  control = set(_control_tokens(tokenizer).values()) | {tokenizer.eos_id}
  stops = []
  for i in tokenizer.encode_template_text(text[text.rindex(probe) + len(probe):])[0]:
    if i in control:
      stops.append(i)
      break
    if tokenizer.decode([i]).strip():
      break
  return stops + [tokenizer.eos_id] * (tokenizer.eos_id not in stops)
