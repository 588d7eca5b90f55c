"""A real multi-host run: two JAX processes with 4 CPU devices each, joined over 127.0.0.1.

Each process reads its own shard of the documents, so the global batch of step k is process 0's
rows followed by process 1's. The reference is one process with 8 devices fed exactly those global
batches (two pipelines built with process_index 0 and 1): the losses must agree, and the
checkpoint the two processes wrote must restore in this single process to the reference's
parameters.
"""

import os
import pathlib
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import jax
import numpy as np
from tensorboard.backend.event_processing import event_accumulator

from jaxllm import checkpoint, data as data_lib, sharding, train
from test_config import load

REPO = pathlib.Path(__file__).parent.parent
STEPS = 4
OVERRIDES = ['--config.train.num_steps=4', '--config.train.log_every=1',
             '--config.train.eval_every=0', '--config.train.eval_batches=1',
             '--config.optim.warmup_steps=1', '--config.model.vocab_size=512',
             '--config.data.seq_len=64', '--config.model.n_layers=2',
             '--config.checkpoint.every=4']
# The two processes build a hybrid mesh: data across them (DCN), fsdp=4 within each.
TWO_PROCESS = ['--config.mesh.dcn_data=2']
ONE_PROCESS = ['--config.mesh.data=2']


def free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def run_two_processes(workdir):
  port = free_port()
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
  env['XLA_FLAGS'] = '--xla_force_host_platform_device_count=4'
  procs = [subprocess.Popen(
      [sys.executable, '-m', 'jaxllm.main', '--config=configs/tiny.py', f'--workdir={workdir}',
       *OVERRIDES, *TWO_PROCESS, f'--config.distributed.coordinator_address=127.0.0.1:{port}',
       '--config.distributed.num_processes=2', f'--config.distributed.process_id={i}'],
      cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
      for i in range(2)]
  outputs = [p.communicate(timeout=600)[0] for p in procs]
  for p, out in zip(procs, outputs):
    assert p.returncode == 0, out[-3000:]
  return outputs


def reference(workdir):
  """One process, 8 devices, fed the two processes' rows side by side."""
  config = load('configs/tiny.py', *OVERRIDES, *ONE_PROCESS)
  trainer = train.setup(config)
  half = config.train.global_batch_size // 2
  pipes = [data_lib.make_pipeline(
      source_dir=None, cache_dir=str(workdir / 'data'),
      tokenizer_path=str(workdir / 'tokenizer.model'), vocab_size=512, seq_len=64,
      batch_size=half, eval_files=2, seed=0, process_index=i, process_count=2) for i in range(2)]
  iters = [p.train_iter() for p in pipes]
  state, losses = trainer.init_state(), []
  with sharding.activate(trainer.mesh, trainer.rules):
    for _ in range(STEPS):
      rows = [next(it) for it in iters]
      batch = {k: np.concatenate([r[k] for r in rows]) for k in rows[0]}
      state, metrics = trainer.train_step(state, sharding.global_batch(batch,
                                                                       trainer.batch_sharding))
      losses.append(float(metrics['loss']))
  return trainer, losses, jax.device_get(state['params'])


def test_two_processes_match_one(tmp_path):
  workdir = tmp_path / 'run'
  run_two_processes(workdir)
  acc = event_accumulator.EventAccumulator(str(workdir / 'tensorboard'))
  acc.Reload()
  losses = [e.value for e in acc.Scalars('train/loss')]
  assert len(losses) == STEPS

  trainer, ref_losses, ref_params = reference(workdir)
  np.testing.assert_allclose(losses, ref_losses, rtol=2e-5)

  # The checkpoint both processes wrote restores in this one process, on 8 devices.
  ckpt = checkpoint.Checkpointer(str(workdir / 'checkpoints'), read_only=True)
  assert ckpt.latest_step() == STEPS
  params = jax.device_get(ckpt.restore_params(STEPS, trainer.abstract_state['params']))
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(ref_params)):
    assert np.linalg.norm(a - b) <= 1e-4 * np.linalg.norm(b)


def start_two_processes(workdir, *overrides):
  """Both processes, their output lines collected by a thread each (a full pipe would block)."""
  port = free_port()
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
  env['XLA_FLAGS'] = '--xla_force_host_platform_device_count=4'
  procs, lines, readers = [], [], []
  for i in range(2):
    procs.append(subprocess.Popen(
        [sys.executable, '-m', 'jaxllm.main', '--config=configs/tiny.py', f'--workdir={workdir}',
         *OVERRIDES, *TWO_PROCESS, *overrides,
         f'--config.distributed.coordinator_address=127.0.0.1:{port}',
         '--config.distributed.num_processes=2', f'--config.distributed.process_id={i}'],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    lines.append([])
    readers.append(threading.Thread(target=lambda p=procs[-1], out=lines[-1]: out.extend(p.stdout),
                                    daemon=True))
    readers[-1].start()
  return procs, lines, readers


def wait_all(procs, lines, readers):
  try:
    for p, out in zip(procs, lines):
      assert p.wait(timeout=600) == 0, ''.join(out[-60:])
  finally:
    for p in procs:
      p.kill()  # no-op for a process that has exited
  for reader in readers:
    reader.join(timeout=60)  # each ends at its process's end of output
  return [''.join(out) for out in lines]


def test_sigterm_to_one_process_stops_both_at_the_same_step(tmp_path):
  """JAX's preemption sync point: a notice to process 1 alone makes both save the same step."""
  workdir = tmp_path / 'run'
  procs, lines, readers = start_two_processes(workdir, '--config.train.num_steps=1000',
                                     '--config.checkpoint.every=1000')
  deadline = time.monotonic() + 600
  try:
    while not any('step 3/1000' in line for line in list(lines[0])):
      assert all(p.poll() is None for p in procs), ''.join(lines[0][-60:] + lines[1][-60:])
      assert time.monotonic() < deadline, 'no step 3 after 600 s'
      time.sleep(0.2)
  except BaseException:
    for p in procs:
      p.kill()
    raise
  procs[1].send_signal(signal.SIGTERM)
  logs = wait_all(procs, lines, readers)
  stops = [re.search(r'stopped by preemption after step (\d+); checkpoint saved in (\S+);', log)
           for log in logs]
  assert all(stops), logs[0][-3000:] + logs[1][-3000:]
  step = int(stops[0].group(1))
  assert int(stops[1].group(1)) == step >= 3
  assert stops[0].group(2) == str(workdir / 'checkpoints' / str(step))
  assert sorted(os.listdir(workdir / 'checkpoints')) == [str(step)]

  # The same command (a shorter run here) resumes both processes from that step.
  procs, lines, readers = start_two_processes(workdir, f'--config.train.num_steps={step + 1}',
                                              '--config.checkpoint.every=1000')
  log = wait_all(procs, lines, readers)[0]
  assert f'step {step + 1}/{step + 1}' in log and f'step {step}/' not in log, log[-3000:]
  assert sorted(map(int, os.listdir(workdir / 'checkpoints'))) == [step, step + 1]
