"""Ahead-of-time compile of a config's train step for N devices: per-device memory, and a planner.

Lowers and compiles from abstract shapes (no weights allocated) on the devices present, which
for planning are N fake CPU devices (`tools/aot_compile.py --devices=N`). Three kinds of figure,
kept apart by name:

- measured by XLA (`compiled.memory_analysis()`, this backend's buffer assignment): argument,
  output, aliased (donated) and temporary bytes per device, and the total they make;
- read from the compiled HLO (jaxllm/collectives.py): bytes of each collective kind per mesh axis;
- computed here: the parameters' and optimizer state's shard bytes from their shardings (exact;
  for a LoRA run the trainable parameters are the adapters, and the frozen base is `base_bytes`),
  the gradients' bytes as an estimate (one gradient per parameter shard, in the parameters'
  dtype: XLA reports gradients only inside the temporaries, not apart), and the analytic model
  FLOPs.

The memory is the CPU backend's, a regression signal and a planning estimate, not a GPU
measurement: XLA attention on CPU materialises the [batch, heads, seq, seq] scores, which cuDNN
flash attention on GPU does not, so on GPU the real temporaries are smaller.

`resolve_auto` is the planner at a run's start: the config's 'auto' settings (config.AUTO_KEYS)
become the plan's best (largest per-device batch, then least recompute) that fits the budget,
`train.hbm_gib` or the devices' own memory (`memory_stats()['bytes_limit']`). It is
`tools/aot_compile.py --plan` with the same candidates (PLAN_BATCHES, PLAN_REMATS), so both
choose alike. This module builds trainers itself (`build_trainer`, which `train.setup` calls) so
that the loop can import the planner.
"""

from __future__ import annotations

import copy
import dataclasses
import glob
import math
import os
import tempfile
import time
from collections.abc import Mapping

import jax
import ml_collections
from absl import logging

from jaxllm import collectives
from jaxllm import config as config_lib
from jaxllm import metrics
from jaxllm import model as model_lib
from jaxllm import sharding
from jaxllm import trainer as trainer_lib

GIB = 2 ** 30
# Least recompute first: the planner's tie-break between equal tokens per step.
REMAT_COST = {r: i for i, r in enumerate(['none', 'save_all_dots', 'save_dots', 'full'])}
# The candidates of `resolve_auto` and of `tools/aot_compile.py --plan` (rows per batch shard).
PLAN_BATCHES = (1, 2, 4, 8, 16)
PLAN_REMATS = ('none', 'save_dots', 'full')


@dataclasses.dataclass
class Estimate:
  """One compiled train step; bytes are per device."""

  per_device_batch: int
  remat: str
  seq_len: int
  params_bytes: int  # this device's parameter shards (from the shardings)
  opt_bytes: int  # this device's optimizer-state shards (from the shardings)
  grad_bytes_estimate: int  # not measured: one gradient per parameter shard, as params_bytes
  argument_bytes: int  # XLA: the step's inputs (state and batch)
  output_bytes: int  # XLA: the step's outputs (new state and metrics)
  alias_bytes: int  # XLA: outputs written in place of donated inputs
  temp_bytes: int  # XLA: every temporary (gradients, activations, workspace)
  total_bytes: int  # XLA's figures combined: arguments + outputs - aliases + temporaries
  model_flops: float  # per device and step, analytic (model.flops_per_token)
  compile_s: float
  # From the compiled HLO (jaxllm/collectives.py): per device and step, {kind: {mesh axes: bytes}}.
  collective_bytes: dict = dataclasses.field(default_factory=dict)
  microbatches: int = 1  # the step runs per_device_batch rows per shard this many times
  # A LoRA run (lora.rank > 0): params, opt and grads above are the adapters'; the frozen base's
  # shards (stored dtype, quantized if so) are counted here, from the shardings.
  base_bytes: int = 0

  @property
  def tokens_per_step(self) -> int:
    """Tokens per device and micro-batch (what one forward and backward pass holds)."""
    return self.per_device_batch * self.seq_len

  def fits(self, budget_gib: float) -> bool:
    return self.total_bytes <= budget_gib * GIB


def _shard_bytes(tree) -> int:
  return sum(math.prod(a.sharding.shard_shape(a.shape)) * a.dtype.itemsize
             for a in jax.tree.leaves(tree))


def batch_ways(config: ml_collections.ConfigDict, devices) -> int:
  """How many shards the batch is split into on `devices` (data x fsdp with the default rules;
  devices along `tensor` share a shard): a "per-device batch" is rows per shard."""
  mesh_shape = sharding.resolve_mesh_shape(config.mesh, len(list(devices)))
  return math.prod(mesh_shape[a] for a in sharding.batch_axes(config.sharding.rules))


def validate(config: ml_collections.ConfigDict, devices=None) -> dict[str, int]:
  """config.validate against the mesh of `devices` (default: those present); the mesh shape."""
  devices = jax.devices() if devices is None else list(devices)
  shape = sharding.resolve_mesh_shape(config.mesh, len(devices))
  config_lib.validate(config, shape)
  return shape


def build_trainer(config: ml_collections.ConfigDict, devices) -> trainer_lib.Trainer:
  """Validates `config` (with no 'auto' left) against `devices` and builds the trainer."""
  devices = list(devices)
  shape = validate(config, devices)
  return trainer_lib.make_trainer(config, sharding.make_mesh(shape, devices,
                                                 dcn=sharding.dcn_shape(config.mesh)))


def estimate(config: ml_collections.ConfigDict, per_device_batch: int, remat: str,
             devices=None, *, microbatches: int = 1) -> Estimate:
  """Compiles the step of `config` with `per_device_batch` rows per batch shard (batch_ways) and
  micro-batch, `microbatches` of them a step, and this remat policy for `devices` (default: those
  present; or a TPU topology's, see `topology_devices`), and reads its memory. `config` is
  changed (remat, batch, microbatches)."""
  devices = jax.devices() if devices is None else list(devices)
  ways = batch_ways(config, devices)
  with config.unlocked():
    config.model.remat = remat
    config.train.global_batch_size = per_device_batch * ways * microbatches
    config.train.microbatches = microbatches
  trainer = build_trainer(config, devices)
  seq = config.data.seq_len
  start = time.perf_counter()
  compiled = trainer.compile_train_step(config.train.global_batch_size, seq)
  compile_s = time.perf_counter() - start
  mem = compiled.memory_analysis()
  params = _shard_bytes(trainer.abstract_state['params'])
  return Estimate(base_bytes=_shard_bytes(trainer.abstract_state.get('base', {})),
      per_device_batch=per_device_batch, remat=remat, seq_len=seq, params_bytes=params,
      opt_bytes=_shard_bytes(trainer.abstract_state['opt_state']),
      grad_bytes_estimate=params,
      argument_bytes=mem.argument_size_in_bytes, output_bytes=mem.output_size_in_bytes,
      alias_bytes=mem.alias_size_in_bytes, temp_bytes=mem.temp_size_in_bytes,
      total_bytes=(mem.argument_size_in_bytes + mem.output_size_in_bytes
                   - mem.alias_size_in_bytes + mem.temp_size_in_bytes),
      model_flops=(model_lib.flops_per_token(trainer.model_cfg, seq) * per_device_batch * ways
                   * microbatches
                   * seq / len(devices)),
      compile_s=compile_s,
      collective_bytes=collectives.count(compiled.as_text(), dict(trainer.mesh.shape))['bytes'],
      microbatches=microbatches)


def partitioned_collectives(config: ml_collections.ConfigDict, devices=None) -> dict:
  """{kind: {mesh axes: bytes}} per device and step (collectives.count) in the train step's HLO
  right after SPMD partitioning, before the backend's passes: what the partitioner asks the
  devices to move. XLA:CPU widens bf16 collectives to float32 later (the optimized HLO that
  `estimate` reads), so on fake CPU devices this is the figure closer to a GPU's or TPU's. The
  config's batch and settings as they are ('auto' must be resolved)."""
  devices = jax.devices() if devices is None else list(devices)
  trainer = build_trainer(config, devices)
  lowered = trainer.lower_step_for(
      trainer.abstract_batch(config.train.global_batch_size, config.data.seq_len))
  with tempfile.TemporaryDirectory() as dump:
    lowered.compile(compiler_options={**(trainer.compiler_options or {}), 'xla_dump_to': dump,
                                      'xla_dump_hlo_pass_re': 'spmd-partitioning'})
    found = sorted(glob.glob(os.path.join(dump, '*after_spmd-partitioning*.txt')),
                   key=os.path.getsize)
    if not found:
      raise RuntimeError(f'XLA wrote no HLO after SPMD partitioning into {dump}')
    with open(found[-1]) as f:  # the train step's module (the largest)
      return collectives.count(f.read(), dict(trainer.mesh.shape))['bytes']


def plan(config: ml_collections.ConfigDict, batches: list[int], remats: list[str],
         budget_gib: float, devices=None, *, microbatches: int = 1,
         global_batch: int = 0) -> list[Estimate]:
  """Every (remat, batch) tried, largest batch first per remat until one fits (a smaller batch
  with that policy fits too and carries fewer tokens); ranked: fitting first, then by tokens per
  step, then by the least recompute (none < save_dots < full). Each step runs `microbatches`
  micro-batches or, with `global_batch` > 0, as many as make that many rows (batches that do not
  divide it are skipped)."""
  found = []
  ways = batch_ways(config, jax.devices() if devices is None else devices)
  for remat in metrics.progress(remats, desc='planner', total=len(remats), unit='remat policy'):
    for batch in sorted(batches, reverse=True):
      if global_batch and global_batch % (batch * ways):
        continue
      micro = global_batch // (batch * ways) if global_batch else microbatches
      # A deep copy keeps the AUTO_KEYS' `object` type (a resolved copy would fix them as str).
      est = estimate(copy.deepcopy(config), batch, remat, devices, microbatches=micro)
      found.append(est)
      if est.fits(budget_gib):
        break
  return sorted(found, key=lambda e: (not e.fits(budget_gib), -e.tokens_per_step,
                                      REMAT_COST.get(e.remat, len(REMAT_COST))))


def memory_budget_gib(config: ml_collections.ConfigDict, devices=None) -> float:
  """Per-device budget: `train.hbm_gib` if set, else the allocator limit of this process's first
  device (GPU/TPU `memory_stats()`); CPUs report none, so there the key must be set."""
  if config.train.hbm_gib:
    return float(config.train.hbm_gib)
  devices = jax.devices() if devices is None else list(devices)
  local = [d for d in devices if d.process_index == jax.process_index()] or devices
  try:
    stats = local[0].memory_stats() or {}
  except Exception:  # backends without stats raise instead of returning None
    stats = {}
  if not stats.get('bytes_limit'):
    raise ValueError(f'train.hbm_gib=0 and the {local[0].device_kind} devices report no memory '
                     'limit: set --config.train.hbm_gib to the memory per device, in GiB')
  return stats['bytes_limit'] / GIB


def check_budget(config: ml_collections.ConfigDict, devices=None) -> float | None:
  """`memory_budget_gib`, or None where none is known (a CPU without train.hbm_gib), which is a
  ValueError if the config has 'auto' settings (they need one)."""
  try:
    return memory_budget_gib(config, devices)
  except ValueError:
    if config_lib.auto_keys(config):
      raise
    return None


def resolve_auto(config: ml_collections.ConfigDict, devices=None, *,
                 saved: Mapping | None = None) -> list[Estimate]:
  """Replaces the 'auto' values of config.AUTO_KEYS in `config`, in place: with `saved`'s (the
  config.json of the run being resumed) if it has them, else with the plan's best; logs the
  choice and the rejected settings, and returns the ranked plan ([] when nothing was planned).
  A fixed train.global_batch_size with 'auto' micro-batches keeps its rows per step and splits
  them into the fewest micro-batches that fit."""
  keys = config_lib.auto_keys(config)
  if not keys:
    return []
  parts = [k.split('.') for k in keys]
  if saved is not None and all(saved[s][n] != config_lib.AUTO for s, n in parts):
    for s, n in parts:
      config[s][n] = saved[s][n]
    logging.info("'auto' settings as the run started with them (its config.json): %s",
                 ', '.join(f'{s}.{n}={saved[s][n]!r}' for s, n in parts))
    return []
  devices = jax.devices() if devices is None else list(devices)
  budget, ways, t = memory_budget_gib(config, devices), batch_ways(config, devices), config.train
  remats = PLAN_REMATS if config.model.remat == config_lib.AUTO else (config.model.remat,)
  batches, micro, rows = PLAN_BATCHES, 1 if t.microbatches == config_lib.AUTO else t.microbatches, 0
  if t.global_batch_size != config_lib.AUTO:
    rows = t.global_batch_size
    per_shard = rows // (ways * micro) if t.microbatches != config_lib.AUTO else rows // ways
    if rows % ways or (t.microbatches != config_lib.AUTO and rows % (ways * micro)):
      raise ValueError(f'train.global_batch_size={rows} must be a multiple of mesh.data x '
                       f'mesh.fsdp = {ways} x train.microbatches for the planner')
    # 'auto' micro-batches: every split of the rows into equal micro-batches; else the one given.
    batches = ([b for b in range(per_shard, 0, -1) if per_shard % b == 0]
               if t.microbatches == config_lib.AUTO else [per_shard])
  ranked = plan(config, batches, remats, budget, devices, microbatches=micro, global_batch=rows)
  logging.info("planning 'auto' %s against %g GiB per device:\n%s\n%s", ', '.join(keys), budget,
               HEADER, '\n'.join(row(e, budget) for e in ranked))
  best = ranked[0]
  if not best.fits(budget):
    smallest = min(ranked, key=lambda e: e.total_bytes)
    raise ValueError(f"no setting for {', '.join(keys)}='auto' fits train.hbm_gib={budget:g} GiB "
                     f'per device (the smallest tried needs {smallest.total_bytes / GIB:.2f} GiB): '
                     'add devices, lower data.seq_len or raise the budget')
  chosen = {'train.global_batch_size': best.per_device_batch * ways * best.microbatches,
            'train.microbatches': best.microbatches, 'model.remat': best.remat}
  for s, n in parts:
    config[s][n] = chosen[f'{s}.{n}']
  logging.info("'auto' resolved: %s (%.2f GiB of %g per device)",
               ', '.join(f'{k}={chosen[k]!r}' for k in keys), best.total_bytes / GIB, budget)
  return ranked


# Cloud TPU slice names -> (topology name for JAX, chips). v5p counts TensorCores (2 a chip);
# v5e and v6e count chips.
_SLICES = {f'v5p-{2 * x * y * z}': f'v5p:{x}x{y}x{z}' for x, y, z in
           [(2, 2, 1), (2, 2, 2), (2, 2, 4), (2, 4, 4), (4, 4, 4), (4, 4, 8), (4, 8, 8), (8, 8, 8)]}
_SLICES.update({f'{g}-{x * y}': f'{g}:{x}x{y}' for g in ('v5e', 'v6e')
                for x, y in [(2, 2), (2, 4), (4, 4), (4, 8), (8, 8), (8, 16), (16, 16)]})


def topology_devices(name: str) -> list:
  """The devices of a TPU slice (`v5p-128`, `v6e-256`, or JAX's `v5p:4x4x4`, `v6e:1x1`), for
  compiling on a machine without TPUs through libtpu's ahead-of-time compiler (`pip install
  'jax[tpu]'`)."""
  from jax.experimental import topologies
  # Off a TPU VM libtpu has no worker list to read, and it locks itself to one process; neither
  # matters to a compile-only use (setdefault: a TPU VM's own settings win).
  os.environ.setdefault('TPU_WORKER_HOSTNAMES', 'localhost')
  os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')
  topology = _SLICES.get(name, name)
  if ':' not in topology:
    raise ValueError(f'--topology={name}: use a slice name ({", ".join(sorted(_SLICES))}) or '
                     "JAX's form such as v5p:4x4x4")
  # libtpu assumes 2x2x1 chips a host and refuses a smaller slice (v6e:1x1: "not divisible by
  # chips_per_host_bounds"): a slice under one host is then that host.
  dims = [int(d) for d in topology.split(':', 1)[1].split('x') if d.isdigit()]
  bounds = [min(d, b) for d, b in zip([*dims, 1, 1, 1][:3], (2, 2, 1))]
  extra = {'chips_per_host_bounds': bounds} if bounds != [2, 2, 1] else {}
  try:
    return list(topologies.get_topology_desc(platform='tpu', topology_name=topology,
                                             **extra).devices)
  except Exception as e:  # no libtpu, or a name it does not know
    raise RuntimeError(f'--topology={name}: libtpu could not describe {topology} ({e}); install '
                       "it with pip install 'jax[tpu]' (a separate venv: see README)") from None


HEADER = (f'{"batch":>5} {"remat":>13} {"tokens":>8} {"params":>7} {"opt":>7} {"~grads":>7} '
          f'{"args":>7} {"temp":>8} {"total":>8} {"TFLOP":>8} {"comp s":>6}  fits'
          '   (GiB per device; args, temp, total: XLA; ~grads: estimate, inside temp)')


def row(e: Estimate, budget_gib: float) -> str:
  """One line under HEADER."""
  return (f'{e.per_device_batch:>5} {e.remat:>13} {e.tokens_per_step:>8,} '
          f'{e.params_bytes / GIB:>7.2f} {e.opt_bytes / GIB:>7.2f} '
          f'{e.grad_bytes_estimate / GIB:>7.2f} {e.argument_bytes / GIB:>7.2f} '
          f'{e.temp_bytes / GIB:>8.2f} {e.total_bytes / GIB:>8.2f} '
          f'{e.model_flops / 1e12:>8.1f} {e.compile_s:>6.1f}  '
          f'{"yes" if e.fits(budget_gib) else "no"}')
