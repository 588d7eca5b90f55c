"""Text sources -> documents: which files a source names, and the documents each file holds.

Choices:
- Sources: `sources` is a comma-separated list of `SPEC[@WEIGHT]`. A SPEC is a directory (read
  recursively, hidden entries left out as a glob leaves them), a file or a glob of `.txt`, `.jsonl`
  and `.parquet` files (suffixes in any case; `.txt` and `.jsonl` also compressed as `.gz`, `.bz2`
  or `.xz`, read as they stream), or `tfds:NAME:SPLIT` for a dataset already prepared (as
  array_record) in `tfds_data_dir` (NAME may carry a config and version: `tfds:c4/en:3.0.1:train`).
  `jaxllm/documents.py` builds them into random-access datasets.
- Conversations: a `.jsonl` row without the text field that has `messages` ([{role, content}]) or
  `prompt` and `completion` is a conversation (`jaxllm.chat.conversation` reads it): its document
  is a `Conversation`, the JSON of its messages, which the data pipeline renders with the chat
  template. A source's rows are all text or all conversations.
- Document: a `.txt` file is cut at blank lines into pieces of at least `DOC_CHARS` (2048) characters
  (a piece with no blank line for 8x that is cut at a newline), so the 5 MB Shakespeare corpus gives
  about 2,300 documents; every document is an exact substring of its file. A `.jsonl` line or a
  `.parquet` row is one document: its `text_field`, whole, however long. Whitespace-only documents
  are dropped.
- Built in: `builtin:shakespeare_chat` is a chat demo made from the embedded corpus on first use
  (`shakespeare_chat`): one jsonl file per play, so data.eval_files holds out whole plays.
- Bad input is an error naming the path (and line) and the fix: a missing path, a directory or glob
  with no source files, a file of another kind in it, a damaged compressed file, a file that is not
  UTF-8, a jsonl line that is not JSON or lacks the field, a parquet file without the column. With
  `skip_bad_records=True` bad files and records are skipped instead, counted in `Sources.skipped`
  (and so `Pipeline.skipped`) and logged.
"""

from __future__ import annotations

import bz2
import configparser
import glob
import gzip
import importlib.resources
import itertools
import json
import lzma
import re
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path

from absl import logging

from jaxllm import chat
from jaxllm import files

DOC_CHARS = 2048
MAX_DOC_CHARS = 8 * DOC_CHARS
SUFFIXES = ('.txt', '.jsonl', '.parquet')
# Compressed text is read as it streams, like Levanter's and HF datasets' readers do.
_OPENERS = {'.gz': gzip.open, '.bz2': bz2.open, '.xz': lzma.open, '': open}
_CORRUPT = (OSError, EOFError, zlib.error, lzma.LZMAError)  # what a damaged compressed file raises
KINDS = '.txt, .jsonl or .parquet'  # in any case; .txt and .jsonl also as .gz, .bz2 or .xz
_KINDS_IN_FULL = f'{KINDS}, in any case; .txt and .jsonl also as .gz, .bz2 or .xz'


def default_source_dir() -> str:
  """The Shakespeare corpus shipped inside the package: its .txt files (its README is not a play)."""
  return str(importlib.resources.files('jaxllm') / 'corpus' / 'shakespeare' / '*.txt')


def source_kind(path: Path) -> tuple[str, str] | None:
  """(suffix, compression) of a file jaxllm reads, case-insensitively: 'a.JSONL.gz' -> ('.jsonl',
  '.gz'); None for any other kind (parquet compresses inside the file, so never .parquet.gz)."""
  name = path.name.lower()
  compression = next((c for c in _OPENERS if c and name.endswith(c)), '')
  suffix = Path(name.removesuffix(compression)).suffix
  readable = suffix in SUFFIXES and not (compression and suffix == '.parquet')
  return (suffix, compression) if readable else None


def _walk(directory: Path, seen: set[Path], hidden: list[Path]) -> Iterator[Path]:
  """Files under `directory` (links to directories followed once); hidden entries (.git, .DS_Store)
  go to `hidden`, left out as a glob leaves them out."""
  for entry in directory.iterdir():
    if entry.name.startswith('.'):
      hidden.append(entry)
    elif entry.is_dir():
      real = entry.resolve()
      if real not in seen:  # a link back up the tree would loop
        seen.add(real)
        yield from _walk(entry, seen, hidden)
    else:
      yield entry


# data.sources of a config that has no default data (a fine-tune's, tools/convert_from_hf.py).
REQUIRED = 'REQUIRED'


def resolve_specs(sources: str | Sequence[tuple[str, float]] = '', source_dir: str | None = None,
                  ) -> list[tuple[str, float]]:
  """The (SPEC, weight) list a run reads: `sources` ('SPEC[@WEIGHT],...' or pairs), else
  `source_dir`, else the embedded corpus; both set is an error."""
  if source_dir and sources:
    raise ValueError('set data.source_dir or data.sources, not both')
  if sources == REQUIRED:
    raise ValueError('data.sources is required by this config (a fine-tune has no default data): '
                     f'pass --config.data.sources=SPEC, e.g. chats.jsonl or {CHAT_DEMO}')
  specs = parse_sources(sources) if isinstance(sources, str) and sources else list(sources)
  return specs or [(source_dir or default_source_dir(), 1.0)]


def parse_sources(text: str) -> list[tuple[str, float]]:
  """'SPEC[@WEIGHT], ...' -> [(spec, weight)]; weights default to 1 and need not sum to 1."""
  out = []
  for item in filter(None, (s.strip() for s in text.split(','))):
    spec, _, weight = item.rpartition('@') if '@' in item else (item, '', '1')
    try:
      w = float(weight)
    except ValueError:
      w = -1.0
    if not spec or not w > 0:
      raise ValueError(f'source {item!r}: write SPEC or SPEC@WEIGHT with a weight > 0')
    out.append((spec, w))
  if not out:
    raise ValueError('no sources given: name a directory, a glob, a file or tfds:NAME:SPLIT')
  return out


def list_source_files(spec: str, bad: BadRecords | None = None, exclude: Sequence[str] = ()) -> list[Path]:
  """The source files of a directory (read recursively), a file or a glob, sorted. Every file it
  names must be of a kind jaxllm reads (source_kind): another kind is an error naming it, or, with a
  skipping `bad`, counted and logged; hidden entries and `exclude` (a cache dir) are left out."""
  fix = f'point the source at UTF-8 {KINDS} files'
  bad = bad or BadRecords(skip=False)
  hidden: list[Path] = []
  if glob.has_magic(spec):
    found = sorted(Path(p) for p in glob.glob(spec, recursive=True))
    if not found:
      raise FileNotFoundError(f'{spec}: the glob matches nothing; {fix}')
  else:
    found = [Path(spec)]
    if not found[0].exists():
      raise FileNotFoundError(f'{spec}: no such file or directory; {fix}, or leave the source empty '
                              'for the embedded corpus')
  # jaxllm's cache may sit in the source; a source inside the cache (a built-in one) is read.
  anchor = Path(*itertools.takewhile(lambda part: not glob.has_magic(part), Path(spec).parts),
                '.')
  anchor = anchor.resolve()
  files, skip = [], {d for d in map(lambda p: Path(p).resolve(), exclude)
                     if d != anchor and d not in anchor.parents}
  for path in found:
    if skip.isdisjoint([path.resolve(), *path.resolve().parents]):  # a glob lists files inside too
      files += _walk(path, {path.resolve(), *skip}, hidden) if path.is_dir() else [path]
  if hidden:
    logging.info('%s: left out %d hidden entries (%s)', spec, len(hidden), ', '.join(p.name for p in hidden[:5]))
  readable = []
  for f in sorted(set(files)):  # set: a recursive glob matches a file and the directories above it
    if not f.is_file():
      bad(str(f), 'not a regular file (a broken link, a pipe or a device)', 'remove it from the source')
    elif source_kind(f) is None:
      bad(str(f), f'not a kind of file jaxllm reads ({_KINDS_IN_FULL})',
          'convert or remove it, or name only readable files with a glob (DIR/**/*.txt)')
    else:
      readable.append(f)
  if not readable:
    raise ValueError(f'{spec}: no {KINDS} files in it; {fix}')
  return readable


def read_text(path: Path) -> str:
  try:
    return path.read_bytes().decode('utf-8')
  except UnicodeDecodeError as e:
    raise ValueError(f'{path}: not valid UTF-8 (byte {e.start}); re-encode it '
                     '(iconv -t UTF-8) or remove it from the source') from None


def split_documents(text: str) -> list[str]:
  """Cuts text at blank lines into documents of at least DOC_CHARS characters (see module doc)."""
  pieces, start = [], 0
  for m in re.finditer(r'\n\n+', text):
    if m.end() - start >= DOC_CHARS:
      pieces.append(text[start:m.end()])
      start = m.end()
  pieces.append(text[start:])
  docs = []
  for piece in pieces:
    while len(piece) > MAX_DOC_CHARS:  # text without blank lines: cut at a newline if any
      cut = piece.rfind('\n', 0, MAX_DOC_CHARS) + 1 or MAX_DOC_CHARS
      docs.append(piece[:cut])
      piece = piece[cut:]
    docs.append(piece)
  return [d for d in docs if d.strip()]


class BadRecords:
  """Raises on bad input, or with skip=True counts it (per file) and logs the first few."""

  def __init__(self, skip: bool):
    self.skip, self.counts = skip, {}

  def __call__(self, where: str, problem: str, fix: str) -> None:
    if not self.skip:
      raise ValueError(f'{where}: {problem}; {fix}, or set skip_bad_records=True to skip and count '
                       'such records')
    path = where.rsplit(':', 1)[0] if where.rsplit(':', 1)[-1].isdigit() else where
    self.counts[path] = self.counts.get(path, 0) + 1
    if sum(self.counts.values()) <= 10:
      logging.warning('skipping %s: %s', where, problem)


class Conversation(str):
  """A document that is a conversation: the JSON of its messages (jaxllm.chat renders it)."""


def _conversation(record: dict, where: str, bad: BadRecords) -> Conversation | None:
  try:
    return Conversation(json.dumps(chat.conversation(record, where), ensure_ascii=False))
  except ValueError as e:
    bad(where, str(e).removeprefix(f'{where}: '), 'fix or delete the line')
    return None


def _jsonl_documents(path: Path, field: str, bad: BadRecords) -> Iterator[str]:
  with _OPENERS[source_kind(path)[1]](path, 'rb') as f:
    for n, line in enumerate(f, 1):
      if not line.strip():
        continue
      where = f'{path}:{n}'
      try:
        record = json.loads(line.decode('utf-8'))
      except UnicodeDecodeError:
        bad(where, 'not valid UTF-8', 're-encode the file (iconv -t UTF-8)')
        continue
      except ValueError:
        bad(where, 'not a JSON object', 'fix or delete the line')
        continue
      text = record.get(field) if isinstance(record, dict) else None
      if text is None and isinstance(record, dict) and chat.is_conversation(record):
        if (conversation := _conversation(record, where, bad)) is not None:
          yield conversation
        continue
      if not isinstance(text, str):
        keys = ', '.join(record) if isinstance(record, dict) else type(record).__name__
        bad(where, f'no string field {field!r} (has: {keys})', 'set text_field to the field that holds the text')
        continue
      yield text


def _parquet_documents(path: Path, field: str, bad: BadRecords) -> Iterator[str]:
  # Imported here: pyarrow starts a thread (and with it a malloc arena) on import, which would
  # keep runtime.reuse_host_memory from covering XLA's threads.
  import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
  try:
    f = pq.ParquetFile(path)
  except ValueError as e:  # pyarrow's ArrowInvalid: no parquet footer (cut short, or not parquet)
    raise OSError(e) from None  # file_documents names the damaged file
  if field not in f.schema_arrow.names:
    raise ValueError(f'{path}: no column {field!r} (has: {", ".join(f.schema_arrow.names)}); set '
                     'text_field to the column that holds the text')
  row = 0
  for batch in f.iter_batches(columns=[field], batch_size=4096):
    for text in batch.column(0).to_pylist():
      row += 1
      if isinstance(text, bytes):
        try:
          text = text.decode('utf-8')
        except UnicodeDecodeError:
          text = None
      if not isinstance(text, str):
        bad(f'{path}:{row}', f'row {row} has no UTF-8 text in {field!r}', 'fill or drop the row')
        continue
      yield text


def file_documents(path: Path, *, text_field: str, bad: BadRecords) -> Iterator[str]:
  """The documents of one source file (see the module doc); bad input goes to `bad`."""
  suffix, compression = source_kind(path)
  try:
    if suffix == '.jsonl':
      docs = _jsonl_documents(path, text_field, bad)
    elif suffix == '.parquet':
      docs = _parquet_documents(path, text_field, bad)
    else:
      with _OPENERS[compression](path, 'rb') as f:
        raw = f.read()
      try:
        docs = split_documents(raw.decode('utf-8'))
      except UnicodeDecodeError as e:
        bad(str(path), f'not valid UTF-8 (byte {e.start})', 're-encode it (iconv -t UTF-8) or remove it')
        return
    yield from (d for d in docs if d.strip())
  except _CORRUPT as e:
    if not compression and suffix != '.parquet':
      raise
    # Documents before the damage were already yielded; with skip_bad_records they stay.
    bad(str(path), f'a damaged {compression or suffix} file ({type(e).__name__}: {e})',
        f'download or {"compress" if compression else "write"} it again, or remove it')


CHAT_DEMO = 'builtin:shakespeare_chat'
_CHAT_DEMO_VERSION = 1  # bump when the conversations change
_SPEAKER = re.compile(r"[A-Z][A-Za-z' ]{0,30}\.")  # 'Ber.', 'FIRST CITIZEN.'
_DEMO_MAX_CHARS = 400  # speeches of a few lines: conversations fit a short seq_len


def _speeches(text: str) -> Iterator[tuple[str, str] | None]:
  """(speaker, speech) of each speech of a play in order; None for anything else (a stage
  direction, a scene heading), which breaks the dialogue."""
  for block in re.split(r'\n[ \t]*\n', text):
    lines = [line.strip() for line in block.strip().splitlines()]
    speech = [line for line in lines[1:] if not line.startswith('[')]
    if len(lines) >= 2 and _SPEAKER.fullmatch(lines[0]) and speech:
      yield lines[0][:-1].title(), '\n'.join(speech)
    else:
      yield None


def play_conversations(text: str, title: str) -> list[dict]:
  """A play's consecutive pairs of short speeches by two speakers, as conversations: the first
  speech is the user's turn, the reply the assistant's, under a system prompt naming the play
  and the replying character."""
  out, previous = [], None
  for speech in _speeches(text):
    if (speech and previous and speech[0] != previous[0]
        and max(len(previous[1]), len(speech[1])) <= _DEMO_MAX_CHARS):
      system = f"You are {speech[0]} in Shakespeare's {title}. Reply in character."
      out.append({'messages': [{'role': 'system', 'content': system},
                               {'role': 'user', 'content': previous[1]},
                               {'role': 'assistant', 'content': speech[1]}]})
      speech = None  # pairs do not overlap
    previous = speech
  return out


def shakespeare_chat(directory: str) -> str:
  """The chat demo written under `directory` (once; one `<play>.jsonl` per play); its glob."""
  out = Path(directory) / f'shakespeare_chat_v{_CHAT_DEMO_VERSION}'
  if not (out / 'DONE').exists():
    corpus = Path(default_source_dir()).parent
    titles = configparser.ConfigParser(interpolation=None)
    titles.read(corpus / 'SOURCES.ini', encoding='utf-8')
    out.mkdir(parents=True, exist_ok=True)
    for play in sorted(corpus.glob('*.txt')):
      title = titles.get(f'{play.stem}_gut', 'title', fallback=play.stem.replace('_', ' ').title())
      rows = play_conversations(play.read_text(encoding='utf-8'), title)
      with files.replacing(str(out / f'{play.stem}.jsonl')) as f:
        f.writelines(json.dumps(row, ensure_ascii=False) + '\n' for row in rows)
    (out / 'DONE').write_text(f'{_CHAT_DEMO_VERSION}\n')
  return str(out / '*.jsonl')


def builtin_source(spec: str, cache_dir: str) -> str:
  """A source SPEC with a built-in name (CHAT_DEMO) made under `cache_dir`; others as they are."""
  return shakespeare_chat(cache_dir) if spec == CHAT_DEMO else spec
