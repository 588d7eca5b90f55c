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
"""

from __future__ import annotations

import dataclasses
import math
import os
import time

import jax
import ml_collections

from jaxllm import collectives
from jaxllm import model as model_lib
from jaxllm import sharding
from jaxllm import train

GIB = 2 ** 30
# Least recompute first: the planner's tie-break between equal tokens per step.
_REMAT_COST = {r: i for i, r in enumerate(['none', 'save_all_dots', 'save_dots', 'full'])}


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
  # A LoRA run (lora.rank > 0): params, opt and grads above are the adapters'; the frozen base's
  # shards (stored dtype, quantized if so) are counted here, from the shardings.
  base_bytes: int = 0

  @property
  def tokens_per_step(self) -> int:
    """Tokens per device and step."""
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


def estimate(config: ml_collections.ConfigDict, per_device_batch: int, remat: str,
             devices=None) -> Estimate:
  """Compiles the step of `config` with `per_device_batch` rows per batch shard (batch_ways) and
  this remat policy for `devices` (default: those present; or a TPU topology's, see
  `topology_devices`), and reads its memory. `config` is changed (remat, batch, microbatches=1)."""
  devices = jax.devices() if devices is None else list(devices)
  ways = batch_ways(config, devices)
  with config.unlocked():
    config.model.remat = remat
    config.train.global_batch_size = per_device_batch * ways
    config.train.microbatches = 1
  trainer = train.setup(config, devices)
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
                   * seq / len(devices)),
      compile_s=compile_s,
      collective_bytes=collectives.count(compiled.as_text(), dict(trainer.mesh.shape))['bytes'])


def plan(config: ml_collections.ConfigDict, batches: list[int], remats: list[str],
         budget_gib: float, devices=None) -> list[Estimate]:
  """Every (remat, batch) tried, largest batch first per remat until one fits (a smaller batch
  with that policy fits too and carries fewer tokens); ranked: fitting first, then by tokens per
  step, then by the least recompute (none < save_dots < full)."""
  found = []
  for remat in remats:
    for batch in sorted(batches, reverse=True):
      est = estimate(config.copy_and_resolve_references(), batch, remat, devices)
      found.append(est)
      if est.fits(budget_gib):
        break
  return sorted(found, key=lambda e: (not e.fits(budget_gib), -e.tokens_per_step,
                                      _REMAT_COST.get(e.remat, len(_REMAT_COST))))


# Cloud TPU slice names -> (topology name for JAX, chips). v5p counts TensorCores (2 a chip);
# v5e and v6e count chips.
_SLICES = {f'v5p-{2 * x * y * z}': f'v5p:{x}x{y}x{z}' for x, y, z in
           [(2, 2, 1), (2, 2, 2), (2, 2, 4), (2, 4, 4), (4, 4, 4), (4, 4, 8), (4, 8, 8), (8, 8, 8)]}
_SLICES.update({f'{g}-{x * y}': f'{g}:{x}x{y}' for g in ('v5e', 'v6e')
                for x, y in [(2, 2), (2, 4), (4, 4), (4, 8), (8, 8), (8, 16), (16, 16)]})


def topology_devices(name: str) -> list:
  """The devices of a TPU slice (`v5p-128`, `v6e-256`, or JAX's `v5p:4x4x4`), for compiling on a
  machine without TPUs through libtpu's ahead-of-time compiler (`pip install 'jax[tpu]'`)."""
  from jax.experimental import topologies
  # Off a TPU VM libtpu has no worker list to read, and it locks itself to one process; neither
  # matters to a compile-only use (setdefault: a TPU VM's own settings win).
  os.environ.setdefault('TPU_WORKER_HOSTNAMES', 'localhost')
  os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')
  topology = _SLICES.get(name, name)
  if ':' not in topology:
    raise ValueError(f'--topology={name}: use a slice name ({", ".join(sorted(_SLICES))}) or '
                     "JAX's form such as v5p:4x4x4")
  try:
    return list(topologies.get_topology_desc(platform='tpu', topology_name=topology).devices)
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
