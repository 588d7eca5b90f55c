"""Goodput: the share of a run's wall time spent in productive train steps, the rest by cause.

Plain Python, no JAX; files through jaxllm.files (a workdir may be a gs:// bucket). One clock runs from the start of `train_and_evaluate`; at any
moment its time goes to exactly one cause, so the causes add up to the wall time by construction:

    train       train steps: dispatching them and waiting for their results
    startup     from the start until the first train step is queued (mesh, data, restore,
                compile of the train step)
    data        waiting for a batch the device could not hide (see `data_wait`)
    checkpoint  the loop blocked by a checkpoint (the host copy of a save, waits for commits)
    eval        held-out evaluation and samples (their compiles included)
    lost        train time of steps done after the last checkpoint of a session that died, which
                its restart did again

The totals are kept in `<workdir>/goodput.json` (rundir.GOODPUT) and carried over by each restart
of the run; a process killed with -9 loses at most the time since its last write.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
import contextlib
import json
import time

from jaxllm import files

CAUSES = ('train', 'startup', 'data', 'checkpoint', 'eval', 'lost')
# A wait on a step's results shorter than this means the step had already finished: the device
# sat idle, so the data wait before it was not hidden behind that step.
_HIDDEN_BLOCK_S = 1e-3
_KEEP_SAVES = 32  # checkpoint steps remembered (the restart resumes from one of the newest)


class Goodput:
  """Wall time of one run, by cause, over all its sessions (process starts).

  The loop marks where its time goes: `begin(step)` once the state is restored, `with
  data_wait():` around taking each batch, `with timed(cause):` around everything else that is not
  a train step, `fetched(step, blocked_s)` after reading a step's results, `saved(step)` after
  starting a checkpoint. `path=None` keeps nothing on disk.
  """

  def __init__(self, path: str | None, *, started: float | None = None,
               flush_every_s: float = 10.0, clock: Callable[[], float] = time.monotonic):
    self.path, self.flush_every_s, self._clock = path, flush_every_s, clock
    self.seconds = dict.fromkeys(CAUSES, 0.0)
    self.step = 0  # the newest step whose results were read
    self.lost_steps = 0  # steps trained twice because a session died after its last checkpoint
    self.sessions = 1
    self._saved_train_s: dict[int, float] = {}  # checkpoint step -> train seconds at its save
    if path and files.exists(path):
      old = json.loads(files.read_text(path))
      self.seconds.update(old['seconds'])
      self.step, self.lost_steps = old['step'], old['lost_steps']
      self.sessions = old['sessions'] + 1
      self._saved_train_s = {int(k): v for k, v in old['saved_train_s'].items()}
    self._cause = 'startup'
    self._since = clock() if started is None else started
    self._unresolved_data_s = 0.0  # data waits not yet known to be hidden or not
    self._batches = 0  # taken in this session
    self._last_flush = self._since

  def _switch(self, cause: str) -> str:
    """Books the time since the last switch to the current cause; returns the previous one."""
    now = self._clock()
    self.seconds[self._cause] += now - self._since
    previous, self._cause, self._since = self._cause, cause, now
    return previous

  def begin(self, step: int) -> None:
    """The loop starts after `step` (the restored one): steps trained after it in an earlier
    session, and their train time, were lost."""
    if self.step > step:
      saved = [s for s in self._saved_train_s if s <= step]
      train_at = self._saved_train_s[max(saved)] if saved else 0.0
      lost_s = max(self.seconds['train'] - train_at, 0.0)
      self.seconds['train'] -= lost_s
      self.seconds['lost'] += lost_s
      self.lost_steps += self.step - step
      self._saved_train_s = {s: t for s, t in self._saved_train_s.items() if s <= step}
    self.step = step

  def _end_startup(self) -> None:
    """Start-up ends once the first train step is queued (and so compiled): by the time the
    loop asks for a second batch or reads a step's results."""
    if self._cause == 'startup':
      self._switch('train')

  @contextlib.contextmanager
  def timed(self, cause: str) -> Iterator[None]:
    """Books the time inside the block to `cause`, then returns to the cause before it."""
    if cause not in CAUSES:
      raise ValueError(f'goodput cause {cause!r} is not one of {CAUSES}')
    previous = self._switch(cause)
    try:
      yield
    finally:
      self._switch(previous)

  @contextlib.contextmanager
  def data_wait(self) -> Iterator[None]:
    """Times a wait for the next batch. One step is in flight meanwhile; whether the wait cost
    anything is known only when that step's results are read (`fetched`): if reading them still
    blocked, the device was busy all along and the wait counts as train time, else as data."""
    if self._batches:
      self._end_startup()
    self._batches += 1
    start = self._clock()
    with self.timed('data'):
      yield
    if self._cause != 'startup':
      waited = self._clock() - start
      self.seconds['data'] -= waited
      self._unresolved_data_s += waited

  def fetched(self, step: int, blocked_s: float) -> None:
    """Step `step`'s results were read after blocking `blocked_s` seconds."""
    self._end_startup()
    cause = 'train' if blocked_s > _HIDDEN_BLOCK_S else 'data'
    self.seconds[cause] += self._unresolved_data_s
    self._unresolved_data_s = 0.0
    self.step = max(self.step, step)
    if self._clock() - self._last_flush >= self.flush_every_s:
      self.flush()

  def saved(self, step: int) -> None:
    """A checkpoint of `step` was started: a restart from it loses no train time before it."""
    self._saved_train_s[step] = self.seconds['train'] + self._unbooked('train')
    for old in sorted(self._saved_train_s)[:-_KEEP_SAVES]:
      del self._saved_train_s[old]

  def _unbooked(self, cause: str) -> float:
    return self._clock() - self._since if self._cause == cause else 0.0

  def totals(self) -> dict[str, float]:
    """Seconds by cause so far (the running interval included), plus `wall` and `goodput`."""
    out = {c: self.seconds[c] + self._unbooked(c) for c in CAUSES}
    out['data'] += self._unresolved_data_s  # not hidden, as far as anyone knows yet
    out['wall'] = sum(out.values())
    out['goodput'] = out['train'] / out['wall'] if out['wall'] > 0 else 0.0
    return out

  def flush(self) -> None:
    """Writes the totals (atomically: a kill mid-write leaves the previous file)."""
    self._last_flush = self._clock()
    if not self.path:
      return
    totals = self.totals()
    record = {'seconds': {c: totals[c] for c in CAUSES}, 'wall': totals['wall'],
              'goodput': totals['goodput'], 'step': self.step, 'lost_steps': self.lost_steps,
              'sessions': self.sessions,
              'saved_train_s': {str(s): t for s, t in sorted(self._saved_train_s.items())}}
    with files.replacing(self.path) as f:
      json.dump(record, f, indent=2)

  def summary(self) -> str:
    """'goodput 83.1% of 2m05s: train 1m44s, startup 12.0s (9.6%), ...' for the log."""
    t = self.totals()
    parts = [f'{c} {t[c]:.1f}s ({100 * t[c] / max(t["wall"], 1e-9):.1f}%)' for c in CAUSES]
    lost = f'; {self.lost_steps} steps lost to restarts' if self.lost_steps else ''
    return (f'goodput {100 * t["goodput"]:.1f}% of {t["wall"]:.1f}s over {self.sessions} '
            f'session(s): {", ".join(parts)}{lost}')
