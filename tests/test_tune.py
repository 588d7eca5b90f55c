"""Hyperparameter tuning (jaxllm.tune, jaxllm/study.py, jaxllm/study_report.py) and the 'auto'
settings of jaxllm/aot.py.

The studies run `python -m jaxllm.tune` as a user does, on one CPU device (trials are ordinary
`jaxllm.main` runs of the tiny model, 512-token vocabulary): one is killed with SIGKILL while its
second trial trains and resumed with the same command; one prunes a trial whose learning rate is
useless. The memory checks and 'auto' run in-process on the 8 fake devices.
"""

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import jax
import optuna
import pytest
from optuna.trial import TrialState
from test_config import load

from jaxllm import aot
from jaxllm import config as config_lib
from jaxllm import metrics
from jaxllm import rundir
from jaxllm import study as study_lib
from jaxllm import study_report
from jaxllm import train

REPO = pathlib.Path(__file__).parent.parent
# One device for the trials (faster than 8 fake ones on a small CPU); this checkout's jaxllm.
ENV = {**{k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}, 'JAX_PLATFORMS': 'cpu',
       'PYTHONPATH': os.pathsep.join(filter(None, [str(REPO), os.environ.get('PYTHONPATH')]))}
TINY = ('--config=configs/tiny.py', '--config.model.vocab_size=512', '--config.train.log_every=5',
        '--config.optim.warmup_steps=2', '--config.train.sample_tokens=0',
        '--config.train.eval_batches=2')
SPACE = '''from optuna.distributions import FloatDistribution, IntDistribution
SPACE = {'optim.peak_lr': FloatDistribution(1e-6, 1e-2, log=True),
         'optim.warmup_steps': IntDistribution(0, 4)}
'''


def tune_command(tmp: pathlib.Path, *flags: str) -> list[str]:
  space = tmp / 'space.py'
  space.write_text(SPACE)
  return [sys.executable, '-m', 'jaxllm.tune', *TINY, f'--space={space}',
          f'--workdir={tmp / "study"}', *flags]


def journal(workdir) -> optuna.Study:
  storage = optuna.storages.JournalStorage(
      optuna.storages.journal.JournalFileBackend(rundir.StudyDir(str(workdir)).journal))
  return optuna.load_study(study_name=study_lib.STUDY_NAME, storage=storage)


def checkpoint_steps(workdir) -> list[int]:
  path = pathlib.Path(workdir) / 'checkpoints'
  return sorted(int(p.name) for p in path.iterdir() if p.name.isdigit()) if path.exists() else []


def launches(study_dir: rundir.StudyDir, number: int) -> int:
  """How many times the worker started trial `number` (a '$ command' line in its log each)."""
  path = study_dir.log(number)
  return sum(line.startswith('$ ') for line in open(path)) if os.path.exists(path) else 0


def alive(pid: int) -> bool:
  """Running (a zombie, ended but not yet reaped by its new parent, is not)."""
  try:
    with open(f'/proc/{pid}/stat') as f:
      return f.read().rsplit(')', 1)[1].split()[0] != 'Z'
  except OSError:
    return False


@pytest.fixture(scope='module')
def killed_study(tmp_path_factory):
  """3 trials of 40 steps (checkpoints every 5, no pruning): the worker is killed with SIGKILL
  once one trial has finished and the next has saved a checkpoint, then the same command runs
  again. Returns what was seen before the kill and the study after."""
  tmp = tmp_path_factory.mktemp('tune')
  cmd = tune_command(tmp, '--trials=3', '--pruner=none', '--startup_trials=2',
                     '--config.train.num_steps=40', '--config.train.eval_every=20',
                     '--config.checkpoint.every=5')
  study_dir = rundir.StudyDir(str(tmp / 'study'))
  first = subprocess.Popen(cmd, cwd=REPO, env=ENV, stdout=subprocess.DEVNULL,
                           stderr=open(tmp / 'first.log', 'w'))
  deadline, victim = time.time() + 900, None
  while victim is None:
    assert first.poll() is None, (tmp / 'first.log').read_text()[-3000:]
    assert time.time() < deadline, 'no trial ran after a finished one within 15 minutes'
    time.sleep(0.2)
    if not os.path.exists(study_dir.journal):
      continue
    trials = journal(study_dir.workdir).get_trials()
    if any(t.state.is_finished() for t in trials):
      victim = next((t for t in trials if t.state == TrialState.RUNNING and 'pid' in t.user_attrs
                     and checkpoint_steps(t.user_attrs['workdir'])), None)
  before = {t.number: t for t in trials if t.state.is_finished()}
  steps_before = {n: checkpoint_steps(t.user_attrs['workdir']) for n, t in before.items()}
  first.send_signal(signal.SIGKILL)
  first.wait()
  # The trial process dies with its worker (SIGTERM from the kernel: it checkpoints and stops).
  pid, deadline = victim.user_attrs['pid'], time.time() + 300
  while alive(pid) and time.time() < deadline:
    time.sleep(0.2)
  victim_stopped = not alive(pid)
  second = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=1800)
  assert second.returncode == 0, second.stderr[-3000:]
  return dict(study=journal(study_dir.workdir), study_dir=study_dir, before=before,
              steps_before=steps_before, victim=victim, victim_stopped=victim_stopped,
              stdout=second.stdout)


def test_kill_9_then_resume_reruns_no_finished_trial(killed_study):
  study, study_dir = killed_study['study'], killed_study['study_dir']
  after = {t.number: t for t in study.get_trials()}
  assert killed_study['before']
  for number, t in killed_study['before'].items():
    assert (after[number].state, after[number].params, after[number].value) == (
        t.state, t.params, t.value)
    assert launches(study_dir, number) == 1
    assert checkpoint_steps(t.user_attrs['workdir']) == killed_study['steps_before'][number]
  assert len(study_lib.counted(study.get_trials())) == 3  # --trials, the lost one not counted


def test_the_lost_trial_resumes_from_its_checkpoint(killed_study):
  study, victim = killed_study['study'], killed_study['victim']
  assert killed_study['victim_stopped'], 'the trial process outlived its killed worker'
  trials = study.get_trials()
  assert trials[victim.number].state == TrialState.FAIL
  retries = [t for t in trials if t.user_attrs.get('retry_of') == victim.number]
  assert len(retries) == 1
  retry = retries[0]
  assert retry.params == victim.params
  assert retry.user_attrs['workdir'] == victim.user_attrs['workdir']
  assert retry.state == TrialState.COMPLETE and retry.user_attrs['steps'] == 40
  log = open(killed_study['study_dir'].log(retry.number)).read()
  assert 'resuming from' in log and f'{victim.user_attrs["workdir"]}/checkpoints/' in log


def test_report_matches_the_trials_events_and_the_best_config_reproduces_it(killed_study):
  study, study_dir = killed_study['study'], killed_study['study_dir']
  trials = study.get_trials()
  rows = list(__import__('csv').DictReader(open(study_dir.trials_csv)))
  assert [int(r['trial']) for r in rows] == [t.number for t in trials]
  statuses = {int(r['trial']): r['status'] for r in rows}
  assert statuses[killed_study['victim'].number] == 'lost'
  assert sorted(statuses.values()).count('complete') == 3
  for t in trials:
    if t.state != TrialState.COMPLETE:
      continue
    steps, values = metrics.read_scalars(
        rundir.RunDir(t.user_attrs['workdir']).tensorboard)['eval/loss']
    assert t.intermediate_values == dict(zip(steps, values))  # every eval, reported as written
    assert t.value == values[steps.index(40)]
  best = min((t for t in trials if t.state == TrialState.COMPLETE), key=lambda t: t.value)
  assert f'| **{best.number}** |' in (open(study_dir.trials_md).read())
  saved = json.load(open(rundir.RunDir(best.user_attrs['workdir']).config_json))
  reloaded = json.loads(load(study_dir.best_config).to_json_best_effort())
  assert reloaded == saved  # what `jaxllm.main --config=best_config.py` trains is that run
  assert saved['optim']['peak_lr'] == best.params['optim.peak_lr']
  for name in ('history', 'params', 'curves'):
    assert open(study_dir.plot(name), 'rb').read(8) == b'\x89PNG\r\n\x1a\n'
  assert killed_study['stdout'].startswith('| trial | status | eval_loss |')


def test_a_pruned_trial_stops_at_a_checkpoint_and_trains_no_further(tmp_path):
  cmd = tune_command(tmp_path, '--trials=2', '--pruner=asha', '--reduction_factor=2',
                     '--config.train.num_steps=12', '--config.train.eval_every=4')
  study = optuna.create_study(study_name=study_lib.STUDY_NAME, direction='minimize',
                              storage=journal_storage(tmp_path / 'study'))
  study.enqueue_trial({'optim.peak_lr': 3e-3, 'optim.warmup_steps': 2})
  study.enqueue_trial({'optim.peak_lr': 1e-6, 'optim.warmup_steps': 2})  # learns nothing
  proc = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=1200)
  assert proc.returncode == 0, proc.stderr[-3000:]
  good, bad = journal(tmp_path / 'study').get_trials()
  assert good.state == TrialState.COMPLETE and good.user_attrs['steps'] == 12
  assert bad.state == TrialState.PRUNED and bad.user_attrs['pruned_at'] == 4
  assert bad.intermediate_values[4] > good.intermediate_values[4]
  # Stopped by SIGTERM: a checkpoint at the step it stopped, before the end.
  assert 4 <= bad.user_attrs['steps'] < 12
  assert checkpoint_steps(bad.user_attrs['workdir'])[-1] == bad.user_attrs['steps']
  log = open(rundir.StudyDir(str(tmp_path / 'study')).log(bad.number)).read()
  assert f'stopped by SIGTERM after step {bad.user_attrs["steps"]}' in log


def journal_storage(workdir: pathlib.Path):
  workdir.mkdir(parents=True, exist_ok=True)
  return optuna.storages.JournalStorage(
      optuna.storages.journal.JournalFileBackend(rundir.StudyDir(str(workdir)).journal))


def test_an_impossible_memory_budget_rejects_every_trial_before_it_trains(tmp_path):
  config = load('configs/tiny.py', '--config.train.hbm_gib=0.0001')
  space = tmp_path / 'space.py'
  space.write_text(SPACE)
  workdir = str(tmp_path / 'study')
  study = study_lib.run(config, space=study_lib.load_space(str(space), config), workdir=workdir,
                        options=study_lib.Options(trials=2))
  trials = study.get_trials()
  assert [t.state for t in trials] == [TrialState.FAIL] * 2
  for t in trials:
    assert 'GiB per device' in t.user_attrs['rejected']
    assert 'over the budget of 0.0001 GiB' in t.user_attrs['rejected']
    assert not os.path.exists(t.user_attrs['workdir'])  # nothing started, nothing written
  assert not os.path.exists(rundir.StudyDir(workdir).path(rundir.TRIAL_LOGS))
  table = study_report.write(study, workdir)
  assert table.count('| rejected |') == 2 and '2 trials (2 rejected)' in table
  assert not os.path.exists(rundir.StudyDir(workdir).best_config)


def test_a_trial_asked_for_beyond_the_count_is_surplus_and_not_counted():
  """Two workers that both saw one trial missing both ask for one: the higher number is surplus
  (the study runs no more than --trials), a retry of a lost trial never is, and the report says
  'surplus' and counts it nowhere."""
  optuna.logging.set_verbosity(optuna.logging.WARNING)
  study = optuna.create_study()
  for _ in range(2):
    study.tell(study.ask(), 1.0)
  first, second = study.ask(), study.ask()  # two workers, each seeing 2 of 3 trials
  assert not study_lib.surplus(study, first, 3) and study_lib.surplus(study, second, 3)
  second.set_user_attr(study_lib.SURPLUS, True)
  study.tell(second, state=TrialState.FAIL)
  study.tell(first, 1.0)
  trials = study.get_trials()
  assert len(study_lib.counted(trials)) == 3
  assert study_report.status(trials[3], set()) == 'surplus'
  retry = study.ask()
  retry.set_user_attr('retry_of', 0)  # as _retry enqueues a lost one
  assert not study_lib.surplus(study, retry, 3)


def test_a_trial_config_that_does_not_validate_is_rejected_naming_the_key():
  check = study_lib.FitCheck(load('configs/tiny.py'))  # no budget on CPU: validation only
  config = study_lib.trial_config(load('configs/tiny.py'), {'optim.warmup_steps': 900})
  assert 'optim.warmup_steps=900' in check.reject(config)
  assert check.reject(load('configs/tiny.py')) is None


def test_space_files_name_their_errors(tmp_path):
  config = load('configs/tiny.py')
  with pytest.raises(FileNotFoundError, match='--space=nope.py does not exist'):
    study_lib.load_space('nope.py', config)
  bad = tmp_path / 'bad.py'
  bad.write_text('from optuna.distributions import FloatDistribution\n'
                 "SPACE = {'optim.peak_lrr': FloatDistribution(1e-4, 1e-2, log=True)}\n")
  with pytest.raises(ValueError, match="'optim.peak_lrr' is not a config key"):
    study_lib.load_space(str(bad), config)
  bad.write_text("SPACE = {'optim.peak_lr': [1e-3, 3e-3]}\n")
  with pytest.raises(ValueError, match='optim.peak_lr must be an optuna.distributions object'):
    study_lib.load_space(str(bad), config)
  grid = study_lib.load_space(str(REPO / 'configs/spaces/lr_grid.py'), config)
  assert len(grid.grid['optim.peak_lr']) == 12


# 'auto' settings ----------------------------------------------------------------------------


def auto_config(*overrides):
  return load('configs/tiny.py', '--config.train.global_batch_size=auto',
              '--config.model.remat=auto', *overrides)


def resolved(config) -> tuple:
  return config.train.global_batch_size, config.train.microbatches, config.model.remat


def test_auto_resolves_deterministically_and_the_run_records_it(tmp_path):
  # A budget one byte under what 16 rows per device (the most tried) need without remat: the
  # planner must look further (fewer rows, or recompute) and reject something on the way.
  run = ('--config.train.eval_every=0', '--config.train.eval_batches=1',
         '--config.optim.warmup_steps=1', '--config.train.sample_tokens=0',
         '--config.model.vocab_size=512')
  budget = (aot.estimate(auto_config(*run), 16, 'none').total_bytes - 1) / aot.GIB
  workdir = str(tmp_path / 'run')
  train.train_and_evaluate(
      auto_config(*run, f'--config.train.hbm_gib={budget!r}', '--config.train.num_steps=2'),
      workdir)
  saved = rundir.RunDir(workdir).load_config()
  again = auto_config(*run, f'--config.train.hbm_gib={budget!r}')
  ranked = aot.resolve_auto(again)  # planned anew: the same compiles give the same choice
  assert resolved(saved) == resolved(again)
  best = ranked[0]
  assert best.fits(budget) and any(not e.fits(budget) for e in ranked)
  assert resolved(again) == (best.per_device_batch * 8, 1, best.remat)
  # Resumed with 'auto' and a budget nothing fits: the run keeps what it started with.
  train.train_and_evaluate(
      auto_config(*run, '--config.train.hbm_gib=1e-6', '--config.train.num_steps=3'), workdir)
  resumed = rundir.RunDir(workdir).load_config()
  assert (*resolved(resumed), resumed.train.num_steps) == (*resolved(saved), 3)
  assert checkpoint_steps(workdir)[-1] == 3


def test_auto_microbatches_split_a_fixed_batch_into_the_fewest_that_fit():
  # 16 rows on 8 devices: 2 per device in one pass, or 1 per device in two micro-batches.
  one = aot.estimate(load('configs/tiny.py'), 2, 'none', microbatches=1)
  two = aot.estimate(load('configs/tiny.py'), 1, 'none', microbatches=2)
  assert two.total_bytes < one.total_bytes
  budget = (one.total_bytes - 1) / aot.GIB
  config = load('configs/tiny.py', '--config.train.microbatches=auto',
                f'--config.train.hbm_gib={budget!r}')
  aot.resolve_auto(config)
  assert (config.train.global_batch_size, config.train.microbatches) == (16, 2)
  roomy = load('configs/tiny.py', '--config.train.microbatches=auto', '--config.train.hbm_gib=1')
  aot.resolve_auto(roomy)
  assert roomy.train.microbatches == 1


def test_auto_is_refused_where_nothing_resolves_it():
  config = auto_config()
  with pytest.raises(ValueError, match="train.global_batch_size='auto' is resolved only when a "
                     'training run starts'):
    config_lib.validate(config, {'data': 1, 'fsdp': 8, 'tensor': 1})
  with pytest.raises(ValueError, match="model.remat='auto' is resolved only"):
    config_lib.validate(config, {'data': 1, 'fsdp': 8, 'tensor': 1})
  with pytest.raises(ValueError, match='train.hbm_gib=0 and the cpu devices report no memory '
                     'limit: set --config.train.hbm_gib'):
    aot.resolve_auto(config, jax.devices())
  with pytest.raises(ValueError, match=r"no setting for train.microbatches='auto' fits "
                     r'train.hbm_gib=1e-06 GiB per device \(the smallest tried needs'):
    aot.resolve_auto(load('configs/tiny.py', '--config.train.microbatches=auto',
                          '--config.train.hbm_gib=1e-6'))


def test_aot_compile_plans_with_the_candidates_auto_uses():
  proc = subprocess.run([sys.executable, 'tools/aot_compile.py', '--helpfull'], cwd=REPO, env=ENV,
                        capture_output=True, text=True, timeout=120)
  text = proc.stdout
  batches = ','.join(map(str, aot.PLAN_BATCHES))
  remats = ','.join(aot.PLAN_REMATS)
  assert f"(default: '{batches}')" in text and f"(default: '{remats}')" in text


def test_tune_command_line_errors_are_one_line_and_write_nothing(tmp_path):
  for flags, message in (
      (('--space=nope.py', '--trials=2'), 'error: --space=nope.py does not exist'),
      ((f'--space={REPO / "configs/spaces/lr_warmup.py"}', '--trials=0'),
       'error: --trials=0: give at least 1'),
  ):
    proc = subprocess.run([sys.executable, '-m', 'jaxllm.tune', '--config=configs/tiny.py',
                           f'--workdir={tmp_path / "study"}', *flags], cwd=REPO, env=ENV,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1].startswith(message), proc.stderr[-2000:]
    assert not (tmp_path / 'study').exists()
