"""Hyperparameter studies (`jaxllm.tune`): Optuna's TPE sampler and a successive-halving or
Hyperband pruner over ordinary jaxllm runs, kept in a journal file that several workers share.

Choices:
- A trial is `python -m jaxllm.main --config=DIR/trial_N/config.py --workdir=DIR/trial_N`, run as
  a subprocess: exactly the run a user would start, with its own config.json, checkpoints and
  TensorBoard events, which that same command resumes or continues by hand. The worker reads
  the held-out loss (`eval/loss`) from the trial's events as each evaluation is written and
  reports it to the pruner; a pruned trial gets SIGTERM, so it saves a checkpoint and stops at a
  step boundary as a preempted run does.
- Before it trains, a trial's step is compiled here from abstract shapes (jaxllm/aot.py) against
  `train.hbm_gib` or the devices' memory: a step that does not fit, or a config that does not
  validate, is rejected (state FAIL, the reason in the trial's `rejected` attribute) and never
  started. 'auto' settings are resolved here too, so a trial's config.py says what it trains with.
- Storage: Optuna's JournalStorage over a file (its lock works across processes and hosts that
  share the directory). Optuna's heartbeats need a database, so liveness is kept here: a worker
  touches its heartbeat file while it works; a RUNNING trial whose worker is gone (its process
  ended, on this host, or no heartbeat for `stale_s`) is failed and enqueued again with the same
  parameters and workdir, so the retry resumes from the lost trial's last checkpoint. A trial
  process dies with its worker (SIGTERM on the worker's death: it checkpoints and stops).
- `trials` counts the study's trials over all workers and restarts, lost ones excepted: the same
  command after a kill runs only what is missing, and never a finished trial again. Two workers
  that ask for the last trial at once get two numbers; the higher is told FAIL as surplus,
  untrained and not counted, so a study never runs more than `trials`.
"""

from __future__ import annotations

import copy
import ctypes
import dataclasses
import json
import math
import os
import runpy
import signal
import socket
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import jax
import ml_collections
import optuna
from absl import logging
from optuna.distributions import BaseDistribution, CategoricalDistribution
from optuna.trial import TrialState

from jaxllm import aot
from jaxllm import metrics as metrics_lib
from jaxllm import rundir

EVAL_TAG = 'eval/loss'  # what trials are ranked and pruned by: the run's held-out loss
STUDY_NAME = 'jaxllm'
PRUNERS = ('asha', 'hyperband', 'none')
_PR_SET_PDEATHSIG = 1


@dataclasses.dataclass(frozen=True)
class Options:
  """How a study searches; the defaults suit a few dozen trials."""

  trials: int  # trials in the study, over all workers and restarts
  pruner: str = 'asha'  # asha (successive halving) | hyperband | none
  min_resource: int = 0  # steps before a trial can first be pruned; 0 = train.eval_every
  reduction_factor: int = 4  # one in this many trials goes on at each rung (Optuna's default)
  startup_trials: int = 8  # random trials before TPE models the results
  seed: int = 0  # sampler seed (offset by the trials already there, so a restart samples anew)
  poll_s: float = 0.5  # seconds between looks at a running trial's events (reread when they grow)
  stale_s: float = 600.0  # a worker silent this long is presumed dead


@dataclasses.dataclass(frozen=True)
class Space:
  """A search space file: `SPACE`, config key -> Optuna distribution; or `GRID`, config key ->
  list of values, every combination tried once (Optuna's GridSampler)."""

  distributions: dict[str, BaseDistribution]
  grid: dict[str, list] | None = None


def load_space(path: str, config: ml_collections.ConfigDict) -> Space:
  """Reads `path` (--space) and checks that each key is one of `config`'s."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f'--space={path} does not exist: pass a Python file that defines '
                            'SPACE or GRID (see configs/spaces/lr_warmup.py)')
  names = runpy.run_path(path)
  grid = names.get('GRID')
  space = ({k: CategoricalDistribution(list(v)) for k, v in grid.items()}
           if isinstance(grid, Mapping) else names.get('SPACE'))
  if not isinstance(space, Mapping) or not space:
    raise ValueError(f'--space={path} defines neither SPACE (config key -> optuna distribution) '
                     'nor GRID (config key -> list of values); see configs/spaces/lr_warmup.py')
  known = metrics_lib.flatten_config(config)
  for key, dist in space.items():
    if key not in known:
      raise ValueError(f'--space={path}: {key!r} is not a config key; spell it as in '
                       'jaxllm/config.py, for example optim.peak_lr')
    if not isinstance(dist, BaseDistribution):
      raise ValueError(f'--space={path}: {key} must be an optuna.distributions object '
                       f'(FloatDistribution, IntDistribution, CategoricalDistribution), not {dist!r}')
  return Space(dict(space), {k: list(v) for k, v in grid.items()} if grid else None)


def trial_config(config: ml_collections.ConfigDict, params: Mapping[str, Any]
                 ) -> ml_collections.ConfigDict:
  """`config` with a trial's values set (a deep copy: 'auto' keys keep their `object` type)."""
  out = copy.deepcopy(config)
  for key, value in params.items():
    *sections, name = key.split('.')
    node = out
    for section in sections:
      node = node[section]
    node[name] = value
  return out


def open_study(study_dir: rundir.StudyDir, space: Space, options: Options) -> optuna.Study:
  """The study in `study_dir`'s journal, created on first use."""
  os.makedirs(study_dir.workdir, exist_ok=True)
  storage = optuna.storages.JournalStorage(
      optuna.storages.journal.JournalFileBackend(study_dir.journal))
  existing = [s.study_name for s in storage.get_all_studies()]
  seed = options.seed + (len(storage.get_all_trials(storage.get_study_id_from_name(STUDY_NAME)))
                         if STUDY_NAME in existing else 0)
  if space.grid:
    sampler = optuna.samplers.GridSampler(space.grid, seed=seed)
  else:
    sampler = optuna.samplers.TPESampler(n_startup_trials=options.startup_trials, seed=seed,
                                         multivariate=True)
  return optuna.create_study(study_name=STUDY_NAME, storage=storage, sampler=sampler,
                             pruner=_pruner(options), direction='minimize', load_if_exists=True)


def _pruner(o: Options) -> optuna.pruners.BasePruner:
  if o.pruner not in PRUNERS:
    raise ValueError(f'--pruner={o.pruner}: choose one of {", ".join(PRUNERS)}')
  if o.pruner == 'none':
    return optuna.pruners.NopPruner()
  if o.pruner == 'hyperband':
    return optuna.pruners.HyperbandPruner(min_resource=o.min_resource,
                                          reduction_factor=o.reduction_factor)
  return optuna.pruners.SuccessiveHalvingPruner(min_resource=o.min_resource,
                                                reduction_factor=o.reduction_factor)


class Worker:
  """This process: its id (host:pid), its heartbeat file, and the liveness of others."""

  def __init__(self, study_dir: rundir.StudyDir):
    self.study_dir = study_dir
    self.host = socket.gethostname()
    self.id = f'{self.host}:{os.getpid()}'
    os.makedirs(os.path.dirname(study_dir.heartbeat(self.id)), exist_ok=True)
    self.beat()

  def beat(self) -> None:
    with open(self.study_dir.heartbeat(self.id), 'w') as f:
      f.write(f'{time.time()}\n')

  def lost_reason(self, trial: optuna.trial.FrozenTrial, stale_s: float) -> str | None:
    """Why a RUNNING trial has no live worker, or None if it may still have one."""
    who = trial.user_attrs.get('worker')
    if who is None:  # the worker died between asking for the trial and naming itself
      started = trial.datetime_start.timestamp() if trial.datetime_start else time.time()
      return f'no worker named itself in {stale_s:.0f} s' if time.time() - started > stale_s else None
    if who == self.id:
      return None
    host, pid = who.rsplit(':', 1)
    if host == self.host and not _alive(int(pid)):
      return f'its worker {who} is no longer running'
    try:
      age = time.time() - os.path.getmtime(self.study_dir.heartbeat(who))
    except OSError:
      age = float('inf')
    return f'no heartbeat from its worker {who} for {age:.0f} s' if age > stale_s else None


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


def retried(trials) -> set[int]:
  return {t.user_attrs['retry_of'] for t in trials if 'retry_of' in t.user_attrs}


def _retry(study: optuna.Study, trial: optuna.trial.FrozenTrial, reason: str) -> None:
  """Fails a trial whose worker is gone and enqueues it again (same values and workdir). Of two
  workers racing here, the one whose FAIL lands first enqueues; the other gets an error."""
  try:
    study.tell(trial.number, state=TrialState.FAIL)
  except (RuntimeError, ValueError) as e:  # already finished: another worker was first
    logging.info('trial %d: not retried here (%s)', trial.number, e)
    return
  workdir = trial.user_attrs.get('workdir')
  study.enqueue_trial(trial.params, user_attrs={'retry_of': trial.number, 'retry_reason': reason,
                                                **({'workdir': workdir} if workdir else {})})
  logging.warning('trial %d is lost (%s): enqueued again, to resume in %s', trial.number, reason,
                  workdir or 'a new workdir')


def _recover(study: optuna.Study, worker: Worker, stale_s: float) -> None:
  for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
    if reason := worker.lost_reason(t, stale_s):
      _retry(study, t, reason)


def counted(trials) -> list[optuna.trial.FrozenTrial]:
  """The trials that count towards --trials: all but those lost and enqueued again, and those
  asked for beyond the count (surplus)."""
  lost = retried(trials)
  return [t for t in trials if not (t.state == TrialState.FAIL and
                                    (t.number in lost or SURPLUS in t.user_attrs))]


SURPLUS = 'surplus'  # user attr of a trial asked for after the study had its --trials


def surplus(study: optuna.Study, trial: optuna.Trial, total: int) -> bool:
  """Whether `trial`, just asked for, is beyond the study's `total`: two workers that both saw
  one trial missing both ask for one, and the later (higher number) must not train. A retry of
  a lost trial is never surplus (it replaces one that counted)."""
  if 'retry_of' in trial.user_attrs:
    return False
  earlier = [t for t in study.get_trials(deepcopy=False) if t.number < trial.number]
  return len(counted(earlier)) >= total


class FitCheck:
  """Rejects a trial config before it trains: invalid, 'auto' unresolvable, or a compiled step
  over the memory budget. Compiles are cached by what shapes the step's memory; validation and
  'auto' run for each config (the planner caches nothing: different values may fit anew)."""

  def __init__(self, config: ml_collections.ConfigDict):
    self.budget = aot.check_budget(config)  # None: no budget known, nothing to compare with
    if self.budget is None:
      logging.warning('no memory budget (train.hbm_gib=0 and the devices report none): trials '
                      'are validated but not checked for fit; set --config.train.hbm_gib')
    self._cache: dict[str, str | None] = {}

  def reject(self, config: ml_collections.ConfigDict) -> str | None:
    """Why `config` must not train (None: it may), resolving its 'auto' settings in place."""
    try:
      aot.resolve_auto(config)
      aot.validate(config)
    except ValueError as e:
      return str(e)
    if self.budget is None:
      return None
    t, m = config.train, config.model
    key = json.dumps([m.to_dict(), config.mesh.to_dict(), config.sharding.to_dict(),
                      config.data.seq_len, t.global_batch_size, t.microbatches, t.loss_chunk,
                      config.optim.skip_nonfinite], sort_keys=True, default=str)
    if key not in self._cache:
      self._cache[key] = self._check(copy.deepcopy(config))
    return self._cache[key]

  def _check(self, config: ml_collections.ConfigDict) -> str | None:
    t = config.train
    ways = aot.batch_ways(config, jax.devices())  # validate() saw the batch divide
    est = aot.estimate(config, t.global_batch_size // (ways * t.microbatches), config.model.remat,
                       microbatches=t.microbatches)
    if est.fits(self.budget):
      return None
    return (f'the step needs {est.total_bytes / aot.GIB:.3f} GiB per device (XLA, batch '
            f'{t.global_batch_size} in {t.microbatches} micro-batches, remat {config.model.remat}), '
            f'over the budget of {self.budget:g} GiB (train.hbm_gib or the devices\' memory)')


def run(config: ml_collections.ConfigDict, *, space: Space, workdir: str, options: Options,
        on_trial: Callable[[optuna.Study], None] | None = None) -> optuna.Study:
  """Runs trials of the study in `workdir` until it has `options.trials` (or every grid point),
  counting those of other workers and earlier runs, calling `on_trial(study)` after each one it
  ran; returns the study. Paths are made absolute: the report and the trials' config files
  then work from any directory."""
  study_dir = rundir.StudyDir(os.path.abspath(workdir))
  if not config.train.eval_every and options.pruner != 'none':
    logging.warning('train.eval_every=0: trials are evaluated only at the end, so none is pruned')
  options = dataclasses.replace(
      options, min_resource=options.min_resource or config.train.eval_every or config.train.num_steps)
  study = open_study(study_dir, space, options)
  total = options.trials
  if space.grid:
    total = min(total, math.prod(len(v) for v in space.grid.values()))
  check, worker = FitCheck(config), Worker(study_dir)
  while True:
    worker.beat()
    _recover(study, worker, options.stale_s)
    trials = study.get_trials(deepcopy=False)
    waiting = any(t.state == TrialState.WAITING for t in trials)
    if len(counted(trials)) >= total and not waiting:
      return study
    trial = study.ask(space.distributions)
    if surplus(study, trial, total):
      trial.set_user_attr(SURPLUS, True)
      study.tell(trial, state=TrialState.FAIL)
      logging.info('trial %d not run: the study has its %d trials (another worker started the '
                   'last one)', trial.number, total)
      continue
    _run_trial(study, trial, config, study_dir, worker, check, options)
    if on_trial:
      on_trial(study)


def _describe(params: Mapping[str, Any]) -> str:
  return ', '.join(f'{k}={v:.4g}' if isinstance(v, float) else f'{k}={v}' for k, v in params.items())


def _frozen(study: optuna.Study, number: int) -> optuna.trial.FrozenTrial:
  return next(t for t in study.get_trials(deepcopy=False) if t.number == number)


def _run_trial(study: optuna.Study, trial: optuna.Trial, config: ml_collections.ConfigDict,
               study_dir: rundir.StudyDir, worker: Worker, check: FitCheck, o: Options) -> None:
  trial.set_user_attr('worker', worker.id)
  retry = 'retry_of' in trial.user_attrs
  run = rundir.RunDir(trial.user_attrs.get('workdir') or study_dir.trial(trial.number).workdir)
  trial.set_user_attr('workdir', run.workdir)
  what = f'trial {trial.number} ({_describe(trial.params)})'
  cfg = trial_config(config, trial.params)
  reason = check.reject(cfg)
  if not reason and not retry and os.path.exists(run.workdir):
    reason = (f'{run.workdir} exists but no trial of the journal {study_dir.journal} owns it: move '
              'it away (a trial never trains over another run)')
  if reason:
    trial.set_user_attr('rejected', reason)
    study.tell(trial, state=TrialState.FAIL)
    logging.warning('%s rejected before training: %s', what, reason)
    return
  rundir.write_config_py(run.config_py, cfg, doc=(
      f'Trial {trial.number} of the study in {study_dir.workdir} (jaxllm.tune): {_describe(trial.params)}.'
      f'\n\n    python -m jaxllm.main --config={run.config_py} --workdir={run.workdir}\n'))
  logging.info('%s: training in %s%s', what, run.workdir,
               f' (resuming lost trial {trial.user_attrs["retry_of"]})' if retry else '')
  log_path = study_dir.log(trial.number)
  proc = _launch(run, log_path)
  trial.set_user_attr('pid', proc.pid)
  try:
    outcome, detail = _watch(trial, proc, run, cfg.train.num_steps, worker, o.poll_s)
    if outcome == 'failed':
      detail = f'{detail}; the last lines of {log_path}: {_log_tail(log_path)}'
  except BaseException:  # KeyboardInterrupt, or SIGTERM (jaxllm.tune raises it as one)
    _stop(proc)
    _retry(study, _frozen(study, trial.number), 'interrupted')
    raise
  trial.set_user_attr('steps', _steps_trained(run, cfg))
  if outcome == 'pruned':
    trial.set_user_attr('pruned_at', detail)
    study.tell(trial, state=TrialState.PRUNED)
  elif outcome == 'complete':
    study.tell(trial, detail)
  else:
    trial.set_user_attr('error', detail)
    study.tell(trial, state=TrialState.FAIL)
  logging.info('%s: %s %s', what, outcome, detail)


_PRCTL = getattr(ctypes.CDLL(None), 'prctl', None)  # Linux


def _die_with_worker() -> None:
  """Runs in the trial process before exec: SIGTERM to it when the worker dies, even by SIGKILL
  (the trial then checkpoints and stops; a restarted worker resumes it)."""
  _PRCTL(_PR_SET_PDEATHSIG, int(signal.SIGTERM))


# Set by `prepare_process`: environment variables this worker changed for itself only.
_OWN_ENV: dict[str, str | None] = {}


def prepare_process() -> None:
  """Before JAX starts in the worker: on a GPU, allocate memory on demand (the worker only
  compiles; its trials need the memory). Trials get the environment as it was."""
  for key, value in (('XLA_PYTHON_CLIENT_PREALLOCATE', 'false'),):
    if key not in os.environ:
      _OWN_ENV[key] = None
      os.environ[key] = value


def _launch(run: rundir.RunDir, log_path: str) -> subprocess.Popen:
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # this jaxllm, not another
  env = {k: v for k, v in os.environ.items() if k not in _OWN_ENV}
  env['PYTHONPATH'] = os.pathsep.join(filter(None, [root, os.environ.get('PYTHONPATH')]))
  cmd = [sys.executable, '-m', 'jaxllm.main', f'--config={run.config_py}', f'--workdir={run.workdir}']
  os.makedirs(os.path.dirname(log_path), exist_ok=True)
  with open(log_path, 'a', encoding='utf-8') as log, warnings.catch_warnings():
    log.write(f'$ {" ".join(cmd)}\n')
    log.flush()
    # A preexec_fn makes subprocess fork (not spawn), and JAX warns that forking a threaded
    # process may deadlock: a child that touches locks other threads held could. This one makes
    # one system call and execs.
    warnings.filterwarnings('ignore', 'os.fork', RuntimeWarning)
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                            preexec_fn=_die_with_worker if _PRCTL else None)


def _stop(proc: subprocess.Popen, timeout_s: float = 300) -> None:
  """SIGTERM: the run saves a checkpoint at the next step boundary and exits."""
  if proc.poll() is None:
    proc.send_signal(signal.SIGTERM)
  try:
    proc.wait(timeout=timeout_s)
  except subprocess.TimeoutExpired:
    proc.kill()
    proc.wait()


def _signature(path: str):
  try:
    return tuple(sorted((e.name, e.stat().st_size) for e in os.scandir(path)))
  except OSError:
    return None


def _watch(trial: optuna.Trial, proc: subprocess.Popen, run: rundir.RunDir, num_steps: int,
           worker: Worker, poll_s: float) -> tuple[str, Any]:
  """Reports each new held-out loss of the running trial; ('pruned', step) once the pruner says
  so (the trial stopped), else when it exits ('complete', final loss) or ('failed', why)."""
  losses, seen = {}, None
  while True:
    finished = proc.poll() is not None  # before reading, so the last events are read
    worker.beat()
    if (signature := _signature(run.tensorboard)) and signature != seen:
      seen = signature
      steps, values = metrics_lib.read_scalars(run.tensorboard).get(EVAL_TAG, ([], []))
      for step, value in zip(steps, values):
        if step in losses:
          continue
        losses[step] = value
        trial.report(value, step)
        if step < num_steps and not finished and trial.should_prune():
          _stop(proc)
          return 'pruned', step
    if finished:
      break
    time.sleep(poll_s)
  if proc.returncode:
    return 'failed', f'exit status {proc.returncode}'
  if num_steps not in losses:
    return 'failed', f'no {EVAL_TAG} at step {num_steps} in {run.tensorboard}'
  return 'complete', losses[num_steps]


def _log_tail(path: str, lines: int = 3) -> str:
  with open(path, 'rb') as f:
    f.seek(max(0, os.path.getsize(path) - 4000))
    text = f.read().decode('utf-8', 'replace')
  return ' | '.join(line.strip() for line in text.splitlines()[-lines:])


def _steps_trained(run: rundir.RunDir, config: ml_collections.ConfigDict) -> int:
  """The step of the trial's latest checkpoint (0 if it saved none)."""
  try:
    ckpt, step = run.open_checkpoint(config)
  except Exception:  # no checkpoint directory or step yet
    return 0
  ckpt.close()
  return step
