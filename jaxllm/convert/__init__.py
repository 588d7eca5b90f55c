"""Checkpoint conversion to and from Hugging Face transformers.

    hf.py              the key table (jaxllm parameter <-> HF tensor) and the config mapping
    hf_tokenizer.py    sentencepiece model -> tokenizer.json / tokenizer_config.json
    safetensors_io.py  safetensors reading, streaming writing, shard planning
    export.py          a jaxllm run (or params in memory) -> an HF model folder
    import_.py         an HF model folder -> a jaxllm run directory to fine-tune from

The first three are leaves (no file layout of a run, no torch); the last two compose them with
the run directory and the checkpointer, and `tools/convert_*_hf.py` are their CLIs.
"""

import contextlib
import os
import re

from absl import logging


class UnsupportedError(ValueError):
  """An HF model, option or file that jaxllm cannot convert faithfully; the message names it."""


def check_out(out: str, *, source: str, overwrite: bool) -> None:
  """Refuses an --out that is the source folder (it would be overwritten), and one that already
  holds files unless `overwrite` (a re-conversion would mix old and new files)."""
  if os.path.realpath(out) == os.path.realpath(source):
    raise ValueError(f'--out={out} is the folder being converted: choose another one')
  if os.path.islink(out) and not os.path.exists(out):
    raise FileNotFoundError(f'--out={out} links to {os.readlink(out)}, which does not exist: '
                            'create that folder, or choose another --out')
  if os.path.isdir(out) and os.listdir(out) and not overwrite:
    raise FileExistsError(f'--out={out} is not empty: choose a new folder, or pass --overwrite to '
                          'replace the files this conversion writes there')


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
