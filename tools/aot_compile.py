"""Compiles a config's train step ahead of time for N devices and says whether it fits.

    python tools/aot_compile.py --config=configs/7b.py --devices=8 --hbm_gib=80 [--plan]
    python tools/aot_compile.py --config=configs/7b.py --topology=v5p-128 --hbm_gib=95

From abstract shapes (no weights allocated), on N fake CPU devices or, with --topology and libtpu
installed, for a TPU slice with the TPU compiler. Prints per-device memory, collective bytes and
FLOPs per step and whether it fits `--hbm_gib`; `--plan` ranks per-device batch and remat
policies by tokens per step that fit (jaxllm/aot.py says which figures are measured). A LoRA
config (--config.lora.rank=16, --config.lora.quantize=int4 for QLoRA) is planned the same way:
params, opt and ~grads are then the adapters', and the frozen base is printed apart.
"""

import dataclasses
import json

from absl import flags
from ml_collections import config_flags

from jaxllm import cli  # imports jax, whose backends start only on first use

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file.', lock_config=True)
_DEVICES = flags.DEFINE_integer('devices', 8, 'Fake CPU devices to compile for.')
_HBM_GIB = flags.DEFINE_float('hbm_gib', 80.0, 'Memory budget per device, GiB.')
_PLAN = flags.DEFINE_bool('plan', False, 'Search per-device batch and remat for the best fit.')
_TOPOLOGY = flags.DEFINE_string('topology', '', 'Compile for this TPU slice (v5p-128, v6e-256, '
                                'v5p:4x4x4) through libtpu instead of --devices fake CPUs.')
# The defaults are aot.PLAN_BATCHES and aot.PLAN_REMATS (what 'auto' settings try); this tool
# must not import jaxllm before main() has set the devices up.
_BATCHES = flags.DEFINE_list('plan_batches', ['1', '2', '4', '8', '16'],
                             "Per-device batch sizes the planner tries (as 'auto' does).")
_REMATS = flags.DEFINE_list('plan_remat', ['none', 'save_dots', 'full'],
                            "Remat policies the planner tries (as 'auto' does).")
flags.mark_flags_as_required(['config'])


def main(argv):
  del argv
  import jax
  # Fake devices must be requested before JAX starts its backends (jaxllm.aot imports jax only).
  jax.config.update('jax_platforms', 'cpu')
  jax.config.update('jax_num_cpu_devices', 1 if _TOPOLOGY.value else _DEVICES.value)
  from jaxllm import aot, collectives
  config, budget = _CONFIG.value, _HBM_GIB.value
  devices = aot.topology_devices(_TOPOLOGY.value) if _TOPOLOGY.value else jax.devices()
  print(f'{config.name}: {len(devices)} devices, budget {budget:g} GiB per device '
        f'({devices[0].device_kind})')
  print(aot.HEADER)
  if not _PLAN.value:
    with config.unlocked():
      config.train.hbm_gib = budget
    aot.resolve_auto(config, devices)  # 'auto' settings: the planner's choice (logged)
    ways, micro = aot.batch_ways(config, devices), config.train.microbatches
    if config.train.global_batch_size % (ways * micro):
      raise ValueError(f'train.global_batch_size={config.train.global_batch_size} does not divide '
                       f'into the {ways} batch shards of this mesh x train.microbatches={micro}; '
                       f'use a multiple of {ways * micro}')
    est = aot.estimate(config, config.train.global_batch_size // ways // micro, config.model.remat,
                       devices, microbatches=micro)
    print(aot.row(est, budget))
    if est.base_bytes:
      print(f'LoRA: frozen base {est.base_bytes / aot.GIB:.2f} GiB per device; params, opt and '
            '~grads above are the adapters\'')
    print('collectives per device and step (HLO):\n' + collectives.summary(est.collective_bytes))
    print(json.dumps({**dataclasses.asdict(est), 'fits': est.fits(budget)}))
    return
  ranked = aot.plan(config, [int(b) for b in _BATCHES.value], _REMATS.value, budget, devices)
  for est in ranked:
    print(aot.row(est, budget))
  best = ranked[0]
  if not best.fits(budget):
    raise SystemExit(f'nothing fits {budget:g} GiB per device; add devices or lower data.seq_len')
  ways = aot.batch_ways(config, devices)
  print(f'best: --config.train.global_batch_size={best.per_device_batch * ways} '
        f'--config.model.remat={best.remat}')


if __name__ == '__main__':
  cli.run(main)
