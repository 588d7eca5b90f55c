"""Tests of jaxllm.sources: the embedded corpus, document rules, SPEC syntax, bad input named by path."""

import json
import re
from pathlib import Path

import pytest

from jaxllm import sources


def _open(spec, cache_dir, **overrides):
  return sources.open_sources([(str(spec), 1.0)], cache_dir=str(cache_dir), **{'eval_files': 2, **overrides})


def test_corpus_is_found_in_the_package():
  files = sources.list_text_files(sources.default_source_dir())
  assert len(files) == 42 and (Path(sources.default_source_dir()) / 'README.md').exists()


def test_split_documents_keeps_text_and_size():
  text = ('para one\nline\n\n' * 400) + ('x' * 40000) + '\n\n\n'
  docs = sources.split_documents(text)
  assert ''.join(docs) == text  # nothing lost, order kept
  assert all(len(d) <= 8 * sources.DOC_CHARS for d in docs) and len(docs) > 3
  assert all(len(d) >= sources.DOC_CHARS for d in docs[:2])


def test_parse_sources():
  assert sources.parse_sources('a/*.jsonl@0.7, tfds:c4/en:3.0.1:train@0.3,b') == [
      ('a/*.jsonl', 0.7), ('tfds:c4/en:3.0.1:train', 0.3), ('b', 1.0)]
  for bad in ('a@x', 'a@0', '', ' , '):
    with pytest.raises(ValueError, match='SPEC|no sources'):
      sources.parse_sources(bad)


def test_bad_inputs_name_the_path(tmp_path):
  cache = tmp_path / 'data'
  missing = tmp_path / 'nope'
  with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
    _open(missing, cache)
  empty = tmp_path / 'empty'
  empty.mkdir()
  with pytest.raises(ValueError, match=re.escape(str(empty))):
    _open(empty, cache)
  bad = tmp_path / 'bad'
  bad.mkdir()
  (bad / 'a.txt').write_text('fine text\n' * 10, 'utf-8')
  (bad / 'b.txt').write_bytes(b'caf\xe9 au lait\n')  # latin-1, not UTF-8
  with pytest.raises(ValueError, match=re.escape(str(bad / 'b.txt'))) as err:
    _open(bad, cache, eval_files=1)
  assert '\n' not in str(err.value)
  with pytest.raises(ValueError, match='eval_files'):
    _open(sources.default_source_dir(), cache, eval_files=42)


def test_bad_records_name_the_line_or_are_skipped_and_counted(tmp_path):
  src = tmp_path / 'src'
  src.mkdir()
  good = ''.join(json.dumps({'text': f'document {i} ' * 50}) + '\n' for i in range(20))
  (src / 'a.jsonl').write_text(good + '{"txt": "oops"}\n' + good, 'utf-8')
  opts = dict(eval_source=sources.default_source_dir(), cache_dir=tmp_path / 'c')
  with pytest.raises(ValueError, match=re.escape(f"{src / 'a.jsonl'}:21: no string field 'text' (has: txt)")) as e:
    _open(src, **opts)
  assert '\n' not in str(e.value) and 'text_field' in str(e.value)
  found = _open(src, skip_bad_records=True, **opts)
  assert found.skipped == {str(src / 'a.jsonl'): 1} and len(found.train[0]) == 40
  (src / 'a.jsonl').write_text(good, 'utf-8')
  (src / 'b.jsonl').write_bytes(b'{"text": "caf\xe9"}\n')
  with pytest.raises(ValueError, match=re.escape(f"{src / 'b.jsonl'}:1: not valid UTF-8")):
    _open(src, **opts)
  (src / 'b.jsonl').write_text('not json\n', 'utf-8')
  with pytest.raises(ValueError, match=re.escape(f"{src / 'b.jsonl'}:1: not a JSON object")):
    _open(src, **opts)
  (src / 'b.jsonl').unlink()
  import pyarrow as pa
  import pyarrow.parquet as pq
  pq.write_table(pa.table({'content': ['x']}), src / 'c.parquet')
  with pytest.raises(ValueError, match=re.escape(f"{src / 'c.parquet'}: no column 'text' (has: content)")):
    _open(src, **opts)
  with pytest.raises(FileNotFoundError, match='glob matches nothing'):
    _open(tmp_path / 'none' / '*.jsonl', **opts)
