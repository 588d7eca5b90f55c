"""Checkpoints: exact resume through the CLI, resharding onto other meshes, preemption, keep policy,
and clear errors for checkpoints that do not fit."""

import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys

import grain
import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P
from tensorboard.backend.event_processing import event_accumulator

from jaxllm import checkpoint as checkpoint_lib
from jaxllm import data as data_lib
from jaxllm import metrics
from jaxllm import rundir
from jaxllm import config as config_lib
from jaxllm import sharding
from jaxllm import train
from jaxllm import trainer as trainer_lib
from test_train import small_config, synthetic_batches

REPO = pathlib.Path(__file__).parent.parent
MESHES = {'2,2,2': (2, 2, 2), '1,8,1': (1, 8, 1), '1,1,1': (1, 1, 1)}


# --- Through the CLI, with the real data pipeline ---------------------------------------------

@pytest.fixture(scope='module')
def shared_data(tmp_path_factory):
  """Tokenizer and dataset built once for every CLI run of this module (which name them in
  data.tokenizer and data.cache_dir, as a user sharing a tokenizer between runs does)."""
  shared = tmp_path_factory.mktemp('shared')
  data_lib.make_pipeline(cache_dir=str(shared / 'data'), tokenizer_path=str(shared / 'tok.model'),
                         vocab_size=512, seq_len=32, batch_size=8, eval_files=2, seed=0)
  return shared


def cli(workdir, shared, num_steps, *extra):
  """The command a user runs: tiny config shrunk, mesh (2, 2, 2), every step logged. The cosine
  decay length is fixed so that runs of different lengths share one learning-rate schedule."""
  return [sys.executable, '-m', 'jaxllm.main', '--config=configs/tiny.py', f'--workdir={workdir}',
          f'--config.data.cache_dir={shared}/data', f'--config.data.tokenizer={shared}/tok.model',
          '--config.model.vocab_size=512', '--config.model.d_model=64', '--config.model.n_layers=2',
          '--config.model.head_dim=16', '--config.model.mlp_dim=128', '--config.data.seq_len=32',
          '--config.train.global_batch_size=8', f'--config.train.num_steps={num_steps}',
          '--config.train.log_every=1', '--config.train.eval_every=0',
          '--config.train.eval_batches=1', '--config.optim.warmup_steps=2',
          '--config.optim.decay_steps=50', '--config.mesh.data=2', '--config.mesh.fsdp=2',
          '--config.mesh.tensor=2', *extra]


def run_cli(*args, **kwargs):
  proc = subprocess.run(cli(*args, **kwargs), cwd=REPO, env=os.environ, capture_output=True,
                        text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc.stderr


def logged_losses(workdir) -> dict[int, float]:
  acc = event_accumulator.EventAccumulator(str(workdir / 'tensorboard'))
  acc.Reload()
  return {e.step: e.value for e in acc.Scalars('train/loss')}


def saved_params(ckpt_dir, step):
  """Parameters of a checkpoint as numpy, on one device whatever mesh wrote them."""
  ckpt = checkpoint_lib.Checkpointer(str(ckpt_dir), read_only=True)
  one = NamedSharding(sharding.make_mesh({'data': 1, 'fsdp': 1, 'tensor': 1}, jax.devices()[:1]),
                      P())
  abstract = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=one),
                          ckpt.params_metadata(step))
  return jax.device_get(ckpt.restore_params(step, abstract))


def test_resume_is_exact(tmp_path, shared_data):
  """6 steps straight == 3 steps, process exit, restart, 3 more: every loss and every final
  parameter bit for bit, on a (2, 2, 2) mesh with the real data pipeline."""
  straight, split = tmp_path / 'straight', tmp_path / 'split'
  run_cli(straight, shared_data, 6)
  run_cli(split, shared_data, 3)
  assert sorted(os.listdir(split / 'checkpoints')) == ['3']
  log = run_cli(split, shared_data, 6)
  assert 'resuming from' in log and 'step 4/6' in log and 'step 3/6' not in log
  assert 'config differs from the checkpoint in: train.num_steps: 3 -> 6' in log
  want, got = logged_losses(straight), logged_losses(split)
  assert list(want) == list(range(1, 7))
  assert got == want  # float equality: bit for bit
  a, b = saved_params(straight / 'checkpoints', 6), saved_params(split / 'checkpoints', 6)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_array_equal(x, y)


def test_sigterm_saves_and_exits_0_then_resumes(tmp_path, shared_data):
  workdir = tmp_path / 'run'
  proc = subprocess.Popen(cli(workdir, shared_data, 1000, '--config.checkpoint.every=1000'),
                          cwd=REPO, env=os.environ, stderr=subprocess.PIPE, text=True)
  lines = []
  for line in proc.stderr:
    lines.append(line)
    if 'step 3/1000' in line:
      proc.send_signal(signal.SIGTERM)
  assert proc.wait(timeout=300) == 0, ''.join(lines[-40:])
  log = ''.join(lines)
  stopped = re.search(r'stopped by SIGTERM after step (\d+); checkpoint saved in (\S+);', log)
  assert stopped, log[-3000:]
  step = int(stopped.group(1))
  assert step >= 3 and stopped.group(2) == str(workdir / 'checkpoints' / str(step))
  assert sorted(os.listdir(workdir / 'checkpoints')) == [str(step)]
  log = run_cli(workdir, shared_data, step + 2)
  assert f'step {step + 1}/{step + 2}' in log and f'step {step}/' not in log
  assert sorted(map(int, os.listdir(workdir / 'checkpoints'))) == [step, step + 2]


# --- In process, on a tiny model -----------------------------------------------------------------

def data_iter():
  return iter(grain.MapDataset.range(1000).to_iter_dataset())


def make_trainer(shape, config=None):
  config = config or small_config()
  mesh_shape = dict(zip(sharding.MESH_AXES, shape))
  config_lib.validate(config, mesh_shape)
  devices = jax.devices()[:int(np.prod(shape))]
  return trainer_lib.make_trainer(config, sharding.make_mesh(mesh_shape, devices))


def one_step(trainer, state):
  with sharding.activate(trainer.mesh, trainer.rules):
    batch = sharding.global_batch(synthetic_batches()[0], trainer.batch_sharding)
    return trainer.train_step(state, batch)


@pytest.fixture(scope='module')
def saved(tmp_path_factory):
  """Two steps on (2, 2, 2), saved at step 2; plus the loss of step 3 from there."""
  directory = tmp_path_factory.mktemp('ckpt') / 'checkpoints'
  trainer = make_trainer((2, 2, 2))
  state = trainer.init_state()
  it = data_iter()
  for _ in range(2):
    next(it)
    state, _ = one_step(trainer, state)
  ckpt = checkpoint_lib.Checkpointer(str(directory))
  ckpt.save(2, state, it, {'name': 'test'})
  ckpt.wait()
  ckpt.close()
  params = jax.device_get(state['params'])
  _, metrics = one_step(trainer, state)
  return directory, params, float(metrics['loss'])


@pytest.mark.parametrize('shape', ['1,8,1', '1,1,1'])
def test_restore_onto_another_mesh(saved, shape):
  directory, params, next_loss = saved
  trainer = make_trainer(MESHES[shape])
  it = data_iter()
  state = checkpoint_lib.Checkpointer(str(directory)).restore(2, trainer.abstract_state, it)
  assert int(state['step']) == 2 and next(it) == 2  # the data position came back too
  leaf = state['params']['embed_tokens']
  assert leaf.sharding == trainer.state_shardings['params']['embed_tokens']
  for a, b in zip(jax.tree.leaves(jax.device_get(state['params'])), jax.tree.leaves(params),
                  strict=True):
    np.testing.assert_array_equal(a, b)
  _, metrics = one_step(trainer, state)
  np.testing.assert_allclose(float(metrics['loss']), next_loss, rtol=2e-5)


def test_incompatible_shapes_name_the_parameter(saved):
  directory, _, _ = saved
  config = small_config()
  with config.unlocked():
    config.model.mlp_dim = 96
  trainer = make_trainer((2, 2, 2), config)
  before = sorted(os.listdir(directory))
  ckpt = checkpoint_lib.Checkpointer(str(directory))
  with pytest.raises(checkpoint_lib.CheckpointError,
                     match=r"parameter 'layers\.mlp\.down_proj' has shape \(2, 128, 64\) in the "
                           r"checkpoint but \(2, 96, 64\) in this config"):
    ckpt.restore(2, trainer.abstract_state, data_iter())
  assert sorted(os.listdir(directory)) == before


def test_empty_and_corrupt_checkpoints_fail_clearly(saved, tmp_path):
  directory, _, _ = saved
  trainer = make_trainer((2, 2, 2))
  empty = tmp_path / 'empty'
  empty.mkdir()
  with pytest.raises(checkpoint_lib.CheckpointError, match='holds no complete checkpoint'):
    checkpoint_lib.open_for_init(str(empty))
  corrupt = tmp_path / 'corrupt'
  shutil.copytree(directory, corrupt)
  for f in (corrupt / '2' / 'params').rglob('*'):
    if f.is_file():
      f.write_bytes(b'garbage')
  ckpt = checkpoint_lib.Checkpointer(str(corrupt))
  with pytest.raises(checkpoint_lib.CheckpointError, match=r'2 is incomplete or corrupt'):
    ckpt.restore(2, trainer.abstract_state, data_iter())
  assert sorted(os.listdir(corrupt)) == ['2']  # nothing deleted


def test_leftover_tmp_dir_is_ignored(saved, tmp_path):
  """What SIGKILL during a save leaves behind: a temporary directory that never becomes a step."""
  directory, params, _ = saved
  copy = tmp_path / 'ckpt'
  shutil.copytree(directory, copy)
  shutil.copytree(copy / '2', copy / '3.orbax-checkpoint-tmp')
  (copy / '3.orbax-checkpoint-tmp' / 'params' / 'manifest.ocdbt').unlink(missing_ok=True)
  ckpt = checkpoint_lib.Checkpointer(str(copy))
  assert ckpt.latest_step() == 2
  trainer = make_trainer((2, 2, 2))
  state = ckpt.restore(2, trainer.abstract_state, data_iter())
  np.testing.assert_array_equal(jax.device_get(state['params']['norm']['weight']),
                                params['norm']['weight'])


def test_keep_latest_k_plus_every_mth(tmp_path):
  ckpt = checkpoint_lib.Checkpointer(str(tmp_path), keep_latest=2, keep_every=4)
  state = {'params': {'w': np.zeros(3, np.float32)}, 'opt_state': {'m': np.zeros(3, np.float32)}}
  it = data_iter()
  for step in range(1, 11):
    ckpt.save(step, state, it, {})
  ckpt.wait()
  assert ckpt.all_steps() == [4, 8, 9, 10]
  ckpt.close()


def test_non_finite_step_is_never_saved(tmp_path, shared_data):
  workdir = tmp_path / 'run'
  proc = subprocess.run(cli(workdir, shared_data, 20, '--config.optim.peak_lr=1e10',
                            '--config.checkpoint.every=1', '--config.train.layer_stats_every=1000'),
                        cwd=REPO, env=os.environ, capture_output=True, text=True, timeout=600)
  assert proc.returncode != 0
  bad = int(re.search(r'non-finite loss or gradient at step (\d+)', proc.stderr).group(1))
  # The bad step's per-layer norms are written, although 1000 does not divide its number.
  scalars = metrics.read_scalars(rundir.RunDir(str(workdir)).tensorboard)
  assert scalars['layers/00/mlp/down_proj/grad_norm'][0] == [bad]
  steps = sorted(map(int, os.listdir(workdir / 'checkpoints')))
  assert steps and steps[-1] == bad - 1  # the last good step is the latest
  # ... and the message says a rerun resumes there, whose parameters gave the bad step.
  assert f'a rerun resumes from step {bad - 1}' in proc.stderr
  assert f'to resume from step {bad - 2}' in proc.stderr


_KILLED_MID_SAVE = '''
import os, signal, sys
import grain, numpy as np
from jaxllm import checkpoint
ckpt = checkpoint.Checkpointer(sys.argv[1])
it = iter(grain.MapDataset.range(10).to_iter_dataset())
big = {'params': {'w': np.random.default_rng(0).normal(size=(4096, 2048)).astype(np.float32)},
       'opt_state': {'m': np.zeros(3, np.float32)}}
ckpt.save(1, big, it, {})
ckpt.wait()
ckpt.save(2, big, it, {})  # returns once the host copy exists; the write goes on in a thread
os.kill(os.getpid(), signal.SIGKILL)
'''


def test_sigkill_during_save_keeps_the_previous_checkpoint(tmp_path):
  directory = tmp_path / 'checkpoints'
  proc = subprocess.run([sys.executable, '-c', _KILLED_MID_SAVE, str(directory)], cwd=REPO,
                        env=os.environ, capture_output=True, text=True, timeout=300)
  assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
  assert sorted(os.listdir(directory)) == ['1', '2.orbax-checkpoint-tmp']  # killed mid-write
  ckpt = checkpoint_lib.Checkpointer(str(directory))
  assert ckpt.latest_step() == 1
  one = NamedSharding(sharding.make_mesh({'data': 1, 'fsdp': 1, 'tensor': 1}, jax.devices()[:1]),
                      P())
  w = ckpt.restore_params(1, {'w': jax.ShapeDtypeStruct((4096, 2048), np.float32, sharding=one)})
  assert w['w'].shape == (4096, 2048)
  ckpt.save(2, {'params': w, 'opt_state': {'m': np.zeros(3, np.float32)}}, data_iter(), {})
  ckpt.wait()  # the next start saves over the leftover without trouble
  assert ckpt.all_steps() == [1, 2] and sorted(os.listdir(directory)) == ['1', '2']
  ckpt.close()


def test_init_from_takes_only_the_parameters(saved, tmp_path):
  directory, params, _ = saved
  config = small_config()
  with config.unlocked():
    config.checkpoint.init_from = str(directory)
  trainer = make_trainer((2, 2, 2), config)
  own = checkpoint_lib.Checkpointer(str(tmp_path / 'own'))  # empty: nothing to resume
  state, _ = train.initial_state(trainer, own, config, FakePipeline({}))
  assert int(state['step']) == 0
  for a, b in zip(jax.tree.leaves(jax.device_get(state['params'])), jax.tree.leaves(params),
                  strict=True):
    np.testing.assert_array_equal(a, b)
  assert all(not np.any(x) for x in jax.tree.leaves(jax.device_get(state['opt_state'])))
  own.close()


def _as_if_two_processes_wrote(directory, step):
  """The data item as two JAX processes leave it: one grain iterator file each."""
  data = directory / str(step) / 'data'
  (only,) = data.glob('process_0-of-1.json')
  text = only.read_text()
  only.unlink()
  for i in range(2):
    (data / f'process_{i}-of-2.json').write_text(text)


class FakePipeline:
  """What initial_state asks of a data pipeline: its sources' fingerprint and train iterators."""

  def __init__(self, fingerprint):
    self.saved_fingerprint, self.restarts = fingerprint, []
    self.sources = self

  def fingerprint(self):
    return self.saved_fingerprint

  def train_iter(self, restart_step=0):
    self.restarts.append(restart_step)
    return data_iter()

  def restart_seed(self, step):
    return step


def test_another_process_count_is_an_error_or_restarts_the_data_order(saved, tmp_path):
  directory, params, _ = saved
  copy = tmp_path / 'ckpt'
  shutil.copytree(directory, copy)
  _as_if_two_processes_wrote(copy, 2)
  trainer = make_trainer((2, 2, 2))
  ckpt = checkpoint_lib.Checkpointer(str(copy))
  with pytest.raises(checkpoint_lib.CheckpointError,
                     match=r'holds the data position of 2 processes but this run has 1; resume on 2 '
                           r'processes, or set checkpoint.restore_data=False .* from step 2') as e:
    ckpt.restore(2, trainer.abstract_state, data_iter())
  assert 'corrupt' not in str(e.value) and '\n' not in str(e.value)
  config = small_config()
  pipeline = FakePipeline({'train': {'a': '1'}, 'eval': {'b': '2'}})
  with pytest.raises(checkpoint_lib.CheckpointError, match='2 processes'):
    train.initial_state(trainer, ckpt, config, pipeline)
  with config.unlocked():
    config.checkpoint.restore_data = False
  state, it = train.initial_state(trainer, ckpt, config, pipeline)
  assert int(state['step']) == 2 and pipeline.restarts[-1] == 2 and next(it) == 0
  for a, b in zip(jax.tree.leaves(jax.device_get(state['params'])), jax.tree.leaves(params),
                  strict=True):
    np.testing.assert_array_equal(a, b)
  assert ckpt.data_fingerprint == pipeline.saved_fingerprint  # later saves record the sources
  # A save after the restart records it: an exact resume from there rebuilds the restarted order.
  ckpt.save(3, state, it, {})
  ckpt.wait()
  with config.unlocked():
    config.checkpoint.restore_data = True
  state, it = train.initial_state(trainer, ckpt, config, pipeline)
  assert int(state['step']) == 3 and pipeline.restarts[-1] == 2 and next(it) == 1
  ckpt.close()


def test_changed_sources_are_an_error_naming_the_source(tmp_path):
  before = {'train': {'data/a': 'f00 10', 'data/b': 'f01 5'}, 'eval': {'data/ev': 'f02 3'}}
  ckpt = checkpoint_lib.Checkpointer(str(tmp_path), data_fingerprint=before)
  state = {'params': {'w': np.zeros(3, np.float32)}, 'opt_state': {'m': np.zeros(3, np.float32)}}
  ckpt.save(4, state, data_iter(), {})
  ckpt.wait()
  ckpt.check_data_position(4)  # unchanged: fine
  changed = {**before, 'train': {**before['train'], 'data/b': 'e99 6'}}
  for now, what in ((changed, 'train source data/b changed'),
                    ({**before, 'eval': {'data/ev2': 'f03 3'}}, 'eval source data/ev was removed'),
                    ({**before, 'train': {**before['train'], 'c': '1'}}, 'train source c was added')):
    ckpt.data_fingerprint = now
    with pytest.raises(checkpoint_lib.CheckpointError,
                       match=re.escape(what) + r' since checkpoint \S+4 was saved .*restore the '
                             r'sources as they were, or set checkpoint.restore_data=False'):
      ckpt.check_data_position(4)
  ckpt.close()
