"""Tests of jaxllm.sources: the embedded corpus, document rules, SPEC syntax, bad input named by path."""

import bz2
import gzip
import json
import re
from pathlib import Path

import pytest

from jaxllm import checkpoint
from jaxllm import documents, sources


def _open(spec, cache_dir, **overrides):
  return documents.open_sources([(str(spec), 1.0)], cache_dir=str(cache_dir), **{'eval_files': 2, **overrides})


def test_corpus_is_found_in_the_package():
  files = sources.list_source_files(sources.default_source_dir())
  corpus_dir = Path(sources.default_source_dir()).parent
  assert len(files) == 42 and (corpus_dir / 'README.md').exists()
  # The directory itself holds a README: a file of another kind is named, never skipped silently.
  with pytest.raises(ValueError, match=re.escape(f'{corpus_dir / "README.md"}: not a kind of file '
                                                 'jaxllm reads') + '.*skip_bad_records=True'):
    sources.list_source_files(str(corpus_dir))
  bad = sources.BadRecords(skip=True)
  assert sources.list_source_files(str(corpus_dir), bad) == files
  assert set(bad.counts) == {str(corpus_dir / 'README.md'), str(corpus_dir / 'SOURCES.ini')}


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


def _doc(i):
  return f'document {i} ' * 20


def _tree(root):
  """Nested directories, upper-case suffixes, compressed files and a hidden directory."""
  (root / 'sub' / 'deeper').mkdir(parents=True)
  (root / '.git').mkdir()
  (root / 'a.txt').write_text(_doc(0), 'utf-8')
  (root / 'sub' / 'B.TXT').write_text(_doc(1), 'utf-8')
  with gzip.open(root / 'sub' / 'deeper' / 'c.JSONL.gz', 'wt', encoding='utf-8') as f:
    f.write(''.join(json.dumps({'text': _doc(i)}) + '\n' for i in (2, 3)))
  with bz2.open(root / 'sub' / 'd.txt.bz2', 'wt', encoding='utf-8') as f:
    f.write(_doc(4))
  (root / '.git' / 'e.txt').write_text(_doc(5), 'utf-8')  # hidden: left out, as a glob leaves it
  return {_doc(i) for i in range(5)}


def test_nested_dirs_any_case_and_compressed_files_are_read(tmp_path):
  src = tmp_path / 'src'
  want = _tree(src)
  found = _open(src, tmp_path / 'c', eval_files=0, eval_source=sources.default_source_dir())
  docs = found.train[0]
  assert {docs.text(i) for i in range(len(docs))} == want
  # The same files through a recursive glob, with the dataset cache inside the source (twice: the
  # second time the cache exists and must not be read as a source).
  (tmp_path / 'ev.txt').write_text(_doc(8), 'utf-8')
  for _ in range(2):
    found = _open(f'{src}/**/*', src / 'cache', eval_files=0, eval_source=str(tmp_path / 'ev.txt'))
  assert len(found.train[0]) == 5 and len(found.eval) == 1


def test_unreadable_kinds_and_damaged_files_are_named_or_counted(tmp_path):
  src = tmp_path / 'src'
  _tree(src)
  opts = dict(eval_files=0, eval_source=sources.default_source_dir())
  (src / 'sub' / 'notes.parquet.gz').write_bytes(b'x')
  with pytest.raises(ValueError, match=re.escape(f"{src / 'sub' / 'notes.parquet.gz'}: not a kind of "
                                                 'file jaxllm reads')) as e:
    _open(src, tmp_path / 'c', **opts)
  assert '\n' not in str(e.value)
  found = _open(src, tmp_path / 'c', skip_bad_records=True, **opts)
  assert found.skipped == {str(src / 'sub' / 'notes.parquet.gz'): 1} and len(found.train[0]) == 5
  (src / 'sub' / 'notes.parquet.gz').unlink()
  whole = (src / 'sub' / 'deeper' / 'c.JSONL.gz').read_bytes()
  (src / 'sub' / 'deeper' / 'c.JSONL.gz').write_bytes(whole[:len(whole) // 2])  # truncated
  with pytest.raises(ValueError, match=re.escape(f"{src / 'sub' / 'deeper' / 'c.JSONL.gz'}: a damaged "
                                                 '.gz file (EOFError')):
    _open(src, tmp_path / 'c', **opts)


def test_an_empty_eval_split_is_an_error_naming_the_key(tmp_path):
  src = tmp_path / 'src'
  src.mkdir()
  (src / 'a.txt').write_text(_doc(0), 'utf-8')
  (src / 'b.txt').write_text('\n \n', 'utf-8')  # the held-out file: whitespace only
  with pytest.raises(ValueError, match=r'the data.eval_files=1 files held out of \S+ \(b.txt\) hold '
                                       r'no documents .*loss 0'):
    _open(src, tmp_path / 'c', eval_files=1)
  (tmp_path / 'empty.jsonl').write_text('\n', 'utf-8')
  with pytest.raises(ValueError, match=re.escape(f'data.eval_source={tmp_path / "empty.jsonl"} holds no '
                                                 'documents') + '.*loss 0'):
    _open(src / 'a.txt', tmp_path / 'c', eval_files=0, eval_source=str(tmp_path / 'empty.jsonl'))
  with pytest.raises(ValueError, match=re.escape(f'{src / "b.txt"}: no documents (empty, whitespace '
                                                 'only or skipped as bad) in it')):
    _open(src / 'b.txt', tmp_path / 'c', eval_files=0, eval_source=str(src / 'a.txt'))


def test_an_eval_source_overlapping_the_train_files_is_an_error(tmp_path):
  src = tmp_path / 'src'
  src.mkdir()
  for i in range(3):
    (src / f'{i}.txt').write_text(_doc(i), 'utf-8')
  (tmp_path / 'copy.txt').write_text(_doc(9) + '\n\n' + _doc(1), 'utf-8')  # not a document of src
  cache = tmp_path / 'c'
  with pytest.raises(ValueError, match=re.escape(f'data.eval_source={src} is the train source {src}')):
    _open(src, cache, eval_files=0, eval_source=str(src))
  with pytest.raises(ValueError, match=re.escape(f'data.eval_source={src}/1.* and the train source '
                                                 f'{src} share 1 files (first: {src / "1.txt"})')):
    _open(src, cache, eval_files=0, eval_source=f'{src}/1.*')
  _open(src, cache, eval_files=0, eval_source=str(tmp_path / 'copy.txt'))  # one document, not in src
  (tmp_path / 'copy.txt').write_text(_doc(9) + '\n\n' + 'x' * 3000 + '\n\n' + _doc(1), 'utf-8')
  (tmp_path / 'dup.jsonl').write_text(json.dumps({'text': _doc(2)}) + '\n' +
                                      json.dumps({'text': _doc(7)}) + '\n', 'utf-8')
  with pytest.raises(ValueError, match=re.escape(f'data.eval_source={tmp_path / "dup.jsonl"}: 1 of its 2 '
                                                 'distinct documents (of 100+ characters) are also in the '
                                                 f'train source {src}')):
    _open(src, cache, eval_files=0, eval_source=str(tmp_path / 'dup.jsonl'))


def test_fingerprint_names_a_changed_source(tmp_path):
  src = tmp_path / 'src'
  src.mkdir()
  for i in range(3):
    (src / f'{i}.txt').write_text(_doc(i), 'utf-8')
  before = _open(src, tmp_path / 'c', eval_files=1).fingerprint()
  assert _open(src, tmp_path / 'c', eval_files=1).fingerprint() == before
  (src / '2.txt').write_text(_doc(2) + 'more', 'utf-8')
  after = _open(src, tmp_path / 'c', eval_files=1).fingerprint()
  assert checkpoint.fingerprint_changes(before, after) == f'train source {src} changed'
  assert after['eval'] == before['eval']  # the held-out file's documents did not change


def test_fingerprint_is_the_documents_not_their_paths_or_mtimes(tmp_path):
  """Hosts of a pod hold their own copies of the data (other mtimes, maybe other paths): the same
  documents must give the same fingerprint, or every multi-host resume would refuse."""
  import os
  import shutil
  first, second = tmp_path / 'a', tmp_path / 'b'
  first.mkdir()
  for i in range(3):
    (first / f'{i}.txt').write_text(_doc(i), 'utf-8')
  shutil.copytree(first, second)
  for f in second.iterdir():
    os.utime(f, (1_000_000, 1_000_000))
  a = _open(first, tmp_path / 'c1', eval_files=1).fingerprint()
  b = _open(second, tmp_path / 'c2', eval_files=1).fingerprint()
  assert list(a['train'].values()) == list(b['train'].values())
  assert list(a['eval'].values()) == list(b['eval'].values())
