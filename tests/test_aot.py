"""jaxllm.aot and tools/aot_compile.py: XLA's per-device bytes agree with the shardings and the
donation; the planner falls back to a smaller batch that fits; the --plan CLI ranks and picks;
the mesh search (jaxllm.meshplan) lists the valid splits, ranks by step time, and prints its table."""

import os
import pathlib
import subprocess
import sys

import pytest
from test_config import load

from jaxllm import aot, meshplan

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


def _two_layer(*overrides):
  return load('configs/tiny.py', '--config.model.n_layers=2', '--config.data.seq_len=32',
              *overrides)


def test_mesh_search_enumerates_the_valid_splits_and_says_why_not_the_others():
  """Every split of 8 devices is listed once; a 4-head model with a global batch of 4 runs on
  those whose tensor axis divides the heads and whose data x fsdp divides the batch, and each
  other split carries config.validate's reason (no compile: the search's first step)."""
  import jax
  config = _two_layer('--config.train.global_batch_size=4')
  assert config.model.n_heads == config.model.n_kv_heads == 4
  splits = meshplan.splits(8)
  assert len(set(splits)) == len(splits) == 10  # ordered triples with product 8
  assert all(s.data * s.fsdp * s.tensor == 8 and s.dcn_data * s.dcn_fsdp == 1 for s in splits)
  reasons = {s: meshplan.why_not(config, s, jax.devices()) for s in splits}
  valid = {s for s, why in reasons.items() if why is None}
  assert valid == {s for s in splits if 4 % s.tensor == 0 and 4 % (s.data * s.fsdp) == 0}
  assert len(valid) == 5
  for s, why in reasons.items():
    if s.tensor == 8:
      assert why.startswith('model.n_heads=4 is not divisible by mesh.tensor=8')
    elif s not in valid:
      assert why.endswith('must be divisible by mesh.data x mesh.fsdp = 8'), why
  # Two slices: 4 devices a slice, and the slice factor goes to data or to fsdp, never tensor.
  two = meshplan.splits(8, slices=2)
  assert {(s.dcn_data, s.dcn_fsdp) for s in two} == {(1, 2), (2, 1)}
  assert all(s.data * s.fsdp * s.tensor == 4 for s in two) and len(two) == 2 * 6
  with pytest.raises(ValueError, match='--slices=3 must be >= 1 and divide the 8 devices'):
    meshplan.splits(8, slices=3)
  # The device table's figures, overridable one by one; an unknown device is refused by name.
  assert meshplan.device('v5p', dcn_gb_s=100).dcn_bytes_s == 100e9
  assert meshplan.device('v5p', dcn_gb_s=100).ici_bytes_s == meshplan.DEVICES['v5p'].ici_bytes_s
  with pytest.raises(ValueError, match="--device_kind='tpu9'"):
    meshplan.device('tpu9')


def test_step_time_ranks_fewer_collective_bytes_first_at_equal_flops():
  """data=8 and fsdp=8 do the same FLOPs per device; the split whose compiled step moves fewer
  bytes (counted from its HLO) ranks first. The same fsdp=8 step across two slices (dcn_fsdp=2)
  sends part of its bytes over the slower DCN and ranks after its one-slice twin."""
  dev = meshplan.device('cpu')
  found = []
  for split in (meshplan.Split(8, 1, 1), meshplan.Split(1, 8, 1)):
    config = _two_layer('--config.train.global_batch_size=8', f'--config.mesh.data={split.data}',
                        f'--config.mesh.fsdp={split.fsdp}')
    est = aot.estimate(config, per_device_batch=1, remat='none')
    found.append(meshplan.cost(est, split, dev, global_tokens=8 * 32))
  data8, fsdp8 = found
  assert data8.estimate.model_flops == fsdp8.estimate.model_flops > 0
  total = {c.split: sum(sum(v.values()) for v in c.estimate.collective_bytes.values())
           for c in found}
  fewer, more = sorted(found, key=lambda c: total[c.split])
  assert total[fewer.split] < total[more.split]
  assert meshplan.rank([more, fewer], budget_gib=1.0) == [fewer, more]
  assert fewer.step_s < more.step_s and fewer.compute_s == more.compute_s
  # fsdp=8 as 4 devices x 2 slices: the same compiled step, now partly over DCN.
  across = meshplan.cost(fsdp8.estimate, meshplan.Split(1, 4, 1, dcn_fsdp=2), dev,
                         global_tokens=8 * 32)
  assert fsdp8.dcn_s == 0 < across.dcn_s
  assert meshplan.rank([across, fsdp8], budget_gib=1.0) == [fsdp8, across]
  # Per device, a two-level ring moves as many wire bytes as the one-level ring, split by link.
  one = meshplan.link_bytes(fsdp8.estimate.collective_bytes, fsdp8.split)
  two = meshplan.link_bytes(fsdp8.estimate.collective_bytes, across.split)
  assert two['ici'] + two['dcn'] == pytest.approx(one['ici'])


def test_plan_mesh_command_line_prints_the_ranked_table():
  env = {**{k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}, 'JAX_PLATFORMS': 'cpu',
         'PYTHONPATH': str(REPO)}
  proc = subprocess.run(
      [sys.executable, 'tools/aot_compile.py', '--config=configs/tiny.py', '--devices=8',
       '--config.model.n_layers=2', '--config.data.seq_len=32',
       '--config.train.global_batch_size=2', '--plan_mesh', '--device_kind=cpu', '--hbm_gib=1',
       '--plan_batches=1,2', '--plan_remat=none'],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  lines = proc.stdout.splitlines()
  assert lines[0].startswith('tiny: 8 devices in 1 slice(s), global batch 2, budget 1 GiB')
  assert lines[1] == meshplan.HEADER
  # A batch of 2 rows runs on splits with data x fsdp <= 2, and 4 heads on tensor <= 4: of the
  # ten splits of 8 devices, 2x1x4 and 1x2x4 remain; one row each, ranked by the step time.
  rows = [line.split() for line in lines[2:4]]
  assert sorted(r[0] for r in rows) == ['1x2x4', '2x1x4']
  step_ms = [float(r[9]) for r in rows]
  assert step_ms == sorted(step_ms) and all(r[5] == 'yes' for r in rows)
  skipped = [line for line in lines if line.startswith('skipped ')]
  assert len(skipped) == 8 and sum('mesh.tensor=8' in line for line in skipped) == 1
  assert lines[-1].startswith(f'best: --config.mesh.data={rows[0][0][0]} ')
