"""The main job, end to end through the CLI, as a user runs it."""

import os
import pathlib
import subprocess
import sys

from tensorboard.backend.event_processing import event_accumulator

REPO = pathlib.Path(__file__).parent.parent


def test_main_job_trains_and_writes_tensorboard(tmp_path):
  workdir = tmp_path / 'run'
  cmd = [sys.executable, '-m', 'jaxllm.main', '--config=configs/tiny.py', f'--workdir={workdir}',
         '--config.train.num_steps=6', '--config.train.log_every=2', '--config.train.eval_every=3',
         '--config.train.eval_batches=2', '--config.optim.warmup_steps=2',
         '--config.model.vocab_size=512', '--config.mesh.data=2']  # mesh (2, 4, 1) on 8 devices
  proc = subprocess.run(cmd, cwd=REPO, env=os.environ, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert 'step 6/6' in proc.stderr and 'eval at step 6' in proc.stderr
  assert (workdir / 'tokenizer.model').exists() and (workdir / 'config.json').exists()
  acc = event_accumulator.EventAccumulator(str(workdir / 'tensorboard'))
  acc.Reload()
  tags = acc.Tags()['scalars']
  assert [e.step for e in acc.Scalars('train/loss')] == [2, 4, 6]
  assert [e.step for e in acc.Scalars('eval/loss')] == [3, 6]
  assert 'train/tokens_per_s' in tags
  losses = [e.value for e in acc.Scalars('train/loss')]
  assert 4.0 < losses[-1] < losses[0]  # ln(512) = 6.24 at init; it must have learnt something


def test_misspelt_override_fails_with_the_key(tmp_path):
  proc = subprocess.run(
      [sys.executable, '-m', 'jaxllm.main', '--config=configs/tiny.py',
       f'--workdir={tmp_path}', '--config.train.num_stepz=3'],
      cwd=REPO, env=os.environ, capture_output=True, text=True, timeout=120)
  assert proc.returncode != 0
  assert 'num_stepz' in proc.stderr
  assert not any(tmp_path.iterdir())  # nothing written
