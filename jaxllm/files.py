"""Files a run relies on, on a local disk or in a `gs://` bucket, each written whole. A leaf, for
every module that writes files a run relies on (the run directory, tokenizer training, goodput,
the converters).

Paths stay strings. A local path is read and written with `os`; a `gs://bucket/...` URL through
`etils.epath` (gcsfs, or TensorFlow's gfile where TensorFlow is installed), the filesystem Orbax
uses beside TensorStore's own GCS driver for the arrays. No other URL scheme: Orbax 0.12 writes
checkpoints to local paths and gs:// only, and a URL taken as a local path (`./gs:/bucket/run` on
each host) loses the run without a word, so `check_storage` refuses the rest by name.

Whole files: a local writer writes `path.tmpPID` and renames it over `path`, so a crash leaves the
old file (or none), never half of one; the temps a killed writer left are removed by the next
write of the same path. A bucket has no rename (it is a copy), but an object upload is already
all or nothing: the file is written to a local temporary file, then uploaded in one go.
"""

import contextlib
import importlib.util
import io
import os
import re
import shutil
import tempfile

from absl import logging

REMOTE_SCHEMES = ('gs',)


def is_url(path: str) -> bool:
  """True for `scheme://...` (a bucket), False for a local path."""
  return '://' in str(path)


def _epath(path: str):
  from etils import epath  # only for URLs: local paths need nothing beyond os
  return epath.Path(path)


def check_storage(path: str, what: str) -> str:
  """`path`, if this process can write there: a local path, or a gs:// URL with a client for
  it installed. Otherwise a one-line ValueError naming `what` (the flag or config key that gave
  `path`), raised before anything is written."""
  if not is_url(path):
    return path
  scheme = str(path).split('://', 1)[0]
  if scheme not in REMOTE_SCHEMES:
    raise ValueError(f'{what}={path}: jaxllm writes runs to local paths and gs:// buckets only '
                     f'(Orbax cannot keep checkpoints under {scheme}://); mount that storage and '
                     'pass the local path')
  if importlib.util.find_spec('tensorflow') is None:
    try:
      import gcsfs  # noqa: F401  (epath's gs:// backend without TensorFlow)
    except ImportError:
      raise ValueError(f'{what}={path}: gs:// needs the gcsfs package, which is not installed '
                       '(pip install gcsfs); or mount the bucket (gcsfuse) and pass the local '
                       'path') from None
  return path


def exists(path: str) -> bool:
  return _epath(path).exists() if is_url(path) else os.path.exists(path)


def isdir(path: str) -> bool:
  return _epath(path).is_dir() if is_url(path) else os.path.isdir(path)


def isfile(path: str) -> bool:
  """Exists and is not a directory (a bucket object)."""
  if is_url(path):
    p = _epath(path)
    return p.exists() and not p.is_dir()
  return os.path.isfile(path)


def makedirs(path: str) -> None:
  """Creates `path` and its parents (a bucket needs no folders: a no-op there is fine too)."""
  if is_url(path):
    _epath(path).mkdir(parents=True, exist_ok=True)
  else:
    os.makedirs(path, exist_ok=True)


def listdir(path: str) -> list[str]:
  """Names in the folder `path` ([] if there is none)."""
  if not isdir(path):
    return []
  if is_url(path):
    return sorted(p.name for p in _epath(path).iterdir())
  return sorted(os.listdir(path))


def file_sizes(root: str) -> dict[str, int]:
  """{path relative to the folder `root` ('/'-separated): size in bytes} of every file under it,
  sorted by (folder, name): a folder's own files before those of its subfolders."""
  if is_url(root):  # epath refuses a recursive glob on a bucket: one listing per folder
    def walk(folder, prefix):
      for p in folder.iterdir():
        if p.is_dir():
          yield from walk(p, f'{prefix}{p.name}/')
        else:
          yield prefix + p.name, p.stat().length
    found = dict(walk(_epath(root), ''))
  else:
    found = {os.path.relpath(os.path.join(folder, name), root):
             os.path.getsize(os.path.join(folder, name))
             for folder, _, names in os.walk(root) for name in names}
  return dict(sorted(found.items(), key=lambda kv: os.path.split(kv[0])))


def read_bytes(path: str) -> bytes:
  if is_url(path):
    return _epath(path).read_bytes()
  with open(path, 'rb') as f:
    return f.read()


def read_text(path: str) -> str:
  return read_bytes(path).decode('utf-8')


def remove_stale_temps(path: str) -> None:
  """Removes the `path.tmp*` files that a writer of `path` killed mid-write left behind (the
  `replacing` names): they are never read, and each crash would leave another. Call it before
  writing `path` (replacing does); a folder written whole (`path.tmpPID/`, renamed over `path`)
  is removed the same way."""
  folder, name = os.path.split(str(path))
  folder = folder or '.'
  own = re.compile(re.escape(name) + r'\.tmp\d*')
  for stale in [n for n in listdir(folder) if own.fullmatch(n)]:
    stale = os.path.join(folder, stale)
    logging.info('removing %s, left by an interrupted write', stale)
    if is_url(stale):
      _epath(stale).rmtree() if isdir(stale) else _epath(stale).unlink()
    elif os.path.isdir(stale) and not os.path.islink(stale):
      shutil.rmtree(stale)
    else:
      os.remove(stale)


@contextlib.contextmanager
def replacing(path: str, mode: str = 'w'):
  """An open file that becomes `path` only once written whole: locally it is written as
  `path.tmpPID` and renamed over `path`, so a crash leaves the old `path` (or none), never half of
  one; the temp is removed on an error, and a killed writer's by the next write of `path`. For a
  URL it is a local temporary file, uploaded as `path` in one object write once closed. Two
  processes writing one path at once is a bug either way: the first rename then fails, loudly."""
  if is_url(path):
    with tempfile.TemporaryFile() as raw:
      f = raw if 'b' in mode else io.TextIOWrapper(raw, encoding='utf-8')
      yield f
      if f is not raw:
        f.detach()  # flushes into `raw`, which stays open
      raw.seek(0)
      with _epath(path).open('wb') as out:
        shutil.copyfileobj(raw, out)
    return
  remove_stale_temps(path)
  tmp = f'{path}.tmp{os.getpid()}'
  try:
    with open(tmp, mode, encoding=None if 'b' in mode else 'utf-8') as f:
      yield f
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
