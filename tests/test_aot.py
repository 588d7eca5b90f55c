"""jaxllm.aot and tools/aot_compile.py: XLA's per-device bytes agree with the shardings and the
donation; the planner falls back to a smaller batch that fits; the --plan CLI ranks and picks."""

import os
import pathlib
import subprocess
import sys

import pytest
from test_config import load

from jaxllm import aot

REPO = pathlib.Path(__file__).parent.parent
P7B = 6_738_415_616


def test_7b_bytes_per_device_xla_agrees_with_the_shardings():
  est = aot.estimate(load('configs/7b.py'), per_device_batch=1, remat='full')
  state = est.params_bytes + est.opt_bytes
  # From the shardings: float32 params + AdamW mu and nu = 12 bytes per parameter over fsdp=8.
  assert state == pytest.approx(12 * P7B / 8, rel=0.01)
  # Measured by XLA: the step's inputs are that state plus one row of tokens (64 KiB), and the
  # donated state is updated in place (a lost donation would make alias_bytes 0 and double it).
  assert est.argument_bytes == pytest.approx(state, rel=1e-4)
  assert est.alias_bytes == pytest.approx(state, rel=1e-4)
  # The gradient estimate is one float32 value per local parameter, and XLA's temporaries hold it.
  assert est.grad_bytes_estimate == pytest.approx(4 * P7B / 8, rel=0.01)
  assert est.temp_bytes > est.grad_bytes_estimate
  assert est.model_flops > 6 * P7B * 4096  # at least 6 N per token


def test_planner_takes_the_largest_batch_that_fits():
  # A budget every batch fits: the largest is compiled and the search for that remat stops.
  roomy = aot.plan(load('configs/tiny.py'), batches=[1, 2], remats=['full'], budget_gib=1.0)
  assert [(e.per_device_batch, e.fits(1.0)) for e in roomy] == [(2, True)]
  # One byte less than batch 2 needs: batch 2 is refused, batch 1 chosen and ranked first.
  budget = (roomy[0].total_bytes - 1) / aot.GIB
  tight = aot.plan(load('configs/tiny.py'), batches=[1, 2], remats=['full'], budget_gib=budget)
  assert [(e.per_device_batch, e.fits(budget)) for e in tight] == [(1, True), (2, False)]
  assert tight[0].total_bytes < roomy[0].total_bytes


def test_plan_command_line_ranks_and_prints_the_overrides():
  env = {**{k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}, 'JAX_PLATFORMS': 'cpu',
         'PYTHONPATH': str(REPO)}
  proc = subprocess.run(
      [sys.executable, 'tools/aot_compile.py', '--config=configs/tiny.py', '--devices=2',
       '--hbm_gib=1', '--plan', '--plan_batches=1,2', '--plan_remat=full,none'],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  lines = proc.stdout.splitlines()
  assert lines[0] == 'tiny: 2 devices, budget 1 GiB per device (cpu)'
  assert lines[1] == aot.HEADER
  rows = [line.split() for line in lines[2:-1]]
  # Batch 2 fits 1 GiB with either policy, so batch 1 is never compiled; equal tokens per step
  # rank the policy without recompute first.
  assert [(r[0], r[1], r[2], r[-1]) for r in rows] == [('2', 'none', '256', 'yes'),
                                                        ('2', 'full', '256', 'yes')]
  assert lines[-1] == 'best: --config.train.global_batch_size=4 --config.model.remat=none'


def test_compiles_for_a_tpu_slice_through_libtpu():
  """The TPU compiler, run on this CPU machine (MaxText's train_compile does the same): the tiny
  step for a v5e-8 slice, with its per-chip memory and collectives read from TPU HLO."""
  pytest.importorskip('libtpu', reason="libtpu is not installed (pip install 'jax[tpu]' in a "
                      'separate venv: it makes JAX look for TPUs); the topology compile needs it')
  devices = aot.topology_devices('v5e-8')
  assert len(devices) == 8 and devices[0].device_kind == 'TPU v5 lite'
  config = load('configs/tiny.py', '--config.model.dtype=bfloat16')
  est = aot.estimate(config, per_device_batch=1, remat='none', devices=devices)
  assert est.argument_bytes >= est.params_bytes + est.opt_bytes > 0
  assert set(est.collective_bytes['all-gather']) == {'fsdp'}
  with pytest.raises(ValueError, match='--topology=v9-8: use a slice name'):
    aot.topology_devices('v9-8')
