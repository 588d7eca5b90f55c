"""Files written whole: a writer writes `path.tmpPID` and renames it over `path`, so a crash
leaves the old file (or none), never half of one; the temps a killed writer left are removed by
the next write of the same path. A leaf, for every module that writes files a run relies on
(tokenizer training, the converters).
"""

import contextlib
import os
import re

from absl import logging


def remove_stale_temps(path: str) -> None:
  """Removes the `path.tmp*` files that a writer of `path` killed mid-write left behind (the
  `replacing` names): they are never read, and each crash would leave another."""
  folder, name = os.path.split(path)
  folder = folder or '.'
  if not os.path.isdir(folder):
    return
  own = re.compile(re.escape(name) + r'\.tmp\d*')
  for stale in sorted(n for n in os.listdir(folder) if own.fullmatch(n)):
    logging.info('removing %s, left by an interrupted write', os.path.join(folder, stale))
    os.remove(os.path.join(folder, stale))


@contextlib.contextmanager
def replacing(path: str, mode: str = 'w'):
  """An open file that becomes `path` only once written whole: it is written as `path.tmpPID`
  and renamed over `path`, so a crash leaves the old `path` (or none), never half of one. The
  temp file is removed on an error, and a killed writer's is removed by the next write of
  `path`. Two processes writing one path at once is a bug either way: the first rename then
  fails, loudly."""
  remove_stale_temps(path)
  tmp = f'{path}.tmp{os.getpid()}'
  try:
    with open(tmp, mode, encoding=None if 'b' in mode else 'utf-8') as f:
      yield f
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
