"""Compiles a config's train step ahead of time for N devices and says whether it fits.

    python tools/aot_compile.py --config=configs/7b.py --devices=8 --hbm_gib=80
    python tools/aot_compile.py --config=configs/7b.py --devices=8 --hbm_gib=80 --plan

Lowers and compiles from abstract shapes on N fake CPU devices (no weights allocated), then
prints per-device bytes for parameters, optimizer state, gradients and the rest of the
temporaries (activations, workspace), the model FLOPs per device and step, and whether the step
fits `--hbm_gib`. `--plan` searches per-device batch and remat policy for the most tokens per
step that fits and prints a ranked table with the overrides to use.

The memory figures are XLA's buffer assignment for the CPU backend: a regression signal and a
planning estimate, not a GPU measurement. In particular XLA attention materialises the
[batch, heads, seq, seq] scores, which cuDNN flash attention on GPU does not: on GPU the real
temporaries are smaller.
"""

import dataclasses
import json
import math
import time

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file.', lock_config=True)
_DEVICES = flags.DEFINE_integer('devices', 8, 'Fake CPU devices to compile for.')
_HBM_GIB = flags.DEFINE_float('hbm_gib', 80.0, 'Memory budget per device, GiB.')
_PLAN = flags.DEFINE_bool('plan', False, 'Search per-device batch and remat for the best fit.')
_BATCHES = flags.DEFINE_list('plan_batches', ['1', '2', '4', '8', '16'],
                             'Per-device batch sizes the planner tries.')
_REMATS = flags.DEFINE_list('plan_remat', ['none', 'save_dots', 'full'],
                            'Remat policies the planner tries.')
flags.mark_flags_as_required(['config'])

GIB = 2 ** 30


@dataclasses.dataclass
class Estimate:
  per_device_batch: int
  remat: str
  seq_len: int
  params_bytes: int  # this device's shards of the parameters
  opt_bytes: int  # this device's shards of the optimizer state
  grad_bytes: int  # gradients, as large as the parameters' shards (part of the temporaries)
  temp_bytes: int  # every temporary XLA allocates: gradients, activations, workspace
  total_bytes: int  # arguments + outputs - donated aliases + temporaries
  model_flops: float  # per device and step (analytic, tools/benchmark.py's formula)
  compile_s: float

  @property
  def tokens_per_step(self) -> int:
    return self.per_device_batch * self.seq_len

  def fits(self, budget_gib: float) -> bool:
    return self.total_bytes <= budget_gib * GIB


def _shard_bytes(tree) -> int:
  import jax
  return sum(math.prod(a.sharding.shard_shape(a.shape)) * a.dtype.itemsize
             for a in jax.tree.leaves(tree))


def estimate(config, per_device_batch: int, remat: str) -> Estimate:
  """Compiles the step for this batch/remat on the devices present and reads its memory."""
  import jax
  from jaxllm import model, train
  with config.unlocked():
    config.model.remat = remat
    config.train.global_batch_size = per_device_batch * jax.device_count()
    config.train.microbatches = 1
  trainer = train.setup(config)
  seq = config.data.seq_len
  start = time.perf_counter()
  compiled = trainer.compile_train_step(config.train.global_batch_size, seq)
  compile_s = time.perf_counter() - start
  mem = compiled.memory_analysis()
  params = _shard_bytes(trainer.abstract_state['params'])
  return Estimate(
      per_device_batch=per_device_batch, remat=remat, seq_len=seq, params_bytes=params,
      opt_bytes=_shard_bytes(trainer.abstract_state['opt_state']), grad_bytes=params,
      temp_bytes=mem.temp_size_in_bytes,
      total_bytes=(mem.argument_size_in_bytes + mem.output_size_in_bytes
                   - mem.alias_size_in_bytes + mem.temp_size_in_bytes),
      model_flops=model.flops_per_token(trainer.model_cfg, seq) * per_device_batch * seq,
      compile_s=compile_s)


def plan(config, batches: list[int], remats: list[str], budget_gib: float) -> list[Estimate]:
  """Every (remat, batch) tried, largest batch first per remat until one fits; ranked by
  tokens per step, then by the least recompute (none < save_dots < full)."""
  found = []
  for remat in remats:
    for batch in sorted(batches, reverse=True):
      est = estimate(config.copy_and_resolve_references(), batch, remat)
      found.append(est)
      if est.fits(budget_gib):
        break  # smaller batches with this policy fit too and carry fewer tokens
  cost = {r: i for i, r in enumerate(['none', 'save_all_dots', 'save_dots', 'full'])}
  return sorted(found, key=lambda e: (not e.fits(budget_gib), -e.tokens_per_step,
                                      cost.get(e.remat, 9)))


def _row(e: Estimate, budget_gib: float) -> str:
  return (f'{e.per_device_batch:>5} {e.remat:>13} {e.tokens_per_step:>8,} '
          f'{e.params_bytes / GIB:>7.2f} {e.opt_bytes / GIB:>7.2f} {e.grad_bytes / GIB:>7.2f} '
          f'{(e.temp_bytes - e.grad_bytes) / GIB:>8.2f} {e.total_bytes / GIB:>8.2f} '
          f'{e.model_flops / 1e12:>8.1f} {e.compile_s:>6.1f}  {"yes" if e.fits(budget_gib) else "no"}')


HEADER = (f'{"batch":>5} {"remat":>13} {"tokens":>8} {"params":>7} {"opt":>7} {"grads":>7} '
          f'{"act+tmp":>8} {"total":>8} {"TFLOP":>8} {"comp s":>6}  fits   (GiB per device)')


def main(argv):
  del argv
  import jax
  # Fake devices must be requested before JAX starts its backends.
  jax.config.update('jax_platforms', 'cpu')
  jax.config.update('jax_num_cpu_devices', _DEVICES.value)
  config, budget = _CONFIG.value, _HBM_GIB.value
  print(f'{config.name}: {jax.device_count()} devices, budget {budget:g} GiB per device')
  print(HEADER)
  if not _PLAN.value:
    per_device = config.train.global_batch_size // jax.device_count()
    est = estimate(config, per_device, config.model.remat)
    print(_row(est, budget))
    print(json.dumps({**dataclasses.asdict(est), 'fits': est.fits(budget)}))
    return
  ranked = plan(config, [int(b) for b in _BATCHES.value], _REMATS.value, budget)
  for est in ranked:
    print(_row(est, budget))
  best = ranked[0]
  if not best.fits(budget):
    raise SystemExit(f'nothing fits {budget:g} GiB per device; add devices or lower data.seq_len')
  print(f'best: --config.train.global_batch_size={best.per_device_batch * jax.device_count()} '
        f'--config.model.remat={best.remat}')


if __name__ == '__main__':
  app.run(main)
