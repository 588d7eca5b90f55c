"""Compiles a config's train step ahead of time for N devices and says whether it fits.

    python tools/aot_compile.py --config=configs/7b.py --devices=8 --hbm_gib=80 [--plan]
    python tools/aot_compile.py --config=configs/7b.py --topology=v5p-128 --hbm_gib=95
    python tools/aot_compile.py --config=configs/1b.py --devices=64 --plan_mesh --device_kind=h100
    python tools/aot_compile.py --config=configs/7b.py --devices=8 --partitioned

From abstract shapes (no weights allocated), on N fake CPU devices or, with --topology and libtpu
installed, for a TPU slice with the TPU compiler. Prints per-device memory, collective bytes and
FLOPs per step and whether it fits `--hbm_gib`; `--plan` ranks per-device batch and remat
policies by tokens per step that fit (jaxllm/aot.py says which figures are measured). A LoRA
config (--config.lora.rank=16, --config.lora.quantize=int4 for QLoRA) is planned the same way:
params, opt and ~grads are then the adapters', and the frozen base is printed apart.
`--partitioned` adds the collective bytes of the HLO right after SPMD partitioning, before XLA:CPU
widens bf16 collectives to float32 (what a GPU or TPU would move, as the partitioner decides).
`--plan_mesh` also searches the mesh split (data x fsdp x tensor; with --slices, which of data and
fsdp crosses slices) at the config's global batch and ranks the splits by an estimated step time
for --device_kind (jaxllm/meshplan.py: its model and its device table).
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
_PLAN_MESH = flags.DEFINE_bool('plan_mesh', False, 'Also search the mesh split (data x fsdp x '
                                'tensor, DCN with --slices); rank by estimated step time.')
_SLICES = flags.DEFINE_integer('slices', 1, '--plan_mesh: slices (hosts or TPU slices) joined by '
                               'DCN; the devices are split evenly among them.')
_KIND = flags.DEFINE_string('device_kind', '', '--plan_mesh: the device of the step-time model '
                            '(h100, h200, v5e, v5p, v6e, cpu; default: the --topology generation, '
                            'else h100); its HBM is the budget unless --hbm_gib is given.')
_PEAK = flags.DEFINE_float('peak_tflops', 0, '--plan_mesh: peak bf16 TFLOP/s per device; 0 = '
                           'the device table\'s.')
_ICI = flags.DEFINE_float('ici_gb_s', 0, '--plan_mesh: GB/s per device and direction within a '
                          'slice (NVLink, ICI); 0 = the device table\'s.')
_DCN = flags.DEFINE_float('dcn_gb_s', 0, '--plan_mesh: GB/s per device and direction across '
                          'slices; 0 = the device table\'s.')
_PARTITIONED = flags.DEFINE_bool('partitioned', False, 'Also count the collectives in the HLO '
                                  'right after SPMD partitioning (XLA:CPU widens bf16 ones later).')
flags.mark_flags_as_required(['config'])


def plan_mesh(config, devices) -> None:
  """--plan_mesh: the ranked table, the skipped splits and the best split's flags."""
  from jaxllm import meshplan
  kind = _KIND.value or next((g for g in ('v5e', 'v5p', 'v6e') if _TOPOLOGY.value.startswith(g)),
                             'h100')
  dev = meshplan.device(kind, peak_tflops=_PEAK.value, ici_gb_s=_ICI.value, dcn_gb_s=_DCN.value)
  budget = _HBM_GIB.value if flags.FLAGS['hbm_gib'].present else dev.hbm_gib
  print(f'{config.name}: {len(devices)} devices in {_SLICES.value} slice(s), global batch '
        f'{config.train.global_batch_size}, budget {budget:g} GiB per device; step time for '
        f'{dev.name}: {dev.peak_flops / 1e12:g} TFLOP/s, ICI {dev.ici_bytes_s / 1e9:g} GB/s, '
        f'DCN {dev.dcn_bytes_s / 1e9:g} GB/s')
  ranked, skipped = meshplan.search(config, devices, dev=dev, budget_gib=budget,
                                    batches=[int(b) for b in _BATCHES.value],
                                    remats=_REMATS.value, slices=_SLICES.value)
  print(meshplan.HEADER)
  for c in ranked:
    print(meshplan.row(c, budget))
  for split, why in skipped:
    print(f'skipped {split.label}: {why}')
  if not ranked or not ranked[0].estimate.fits(budget):
    raise SystemExit(f'no split fits {budget:g} GiB per device; add devices, lower data.seq_len '
                     'or widen --plan_batches/--plan_remat')
  best = ranked[0]
  print(f'best: {best.split.flags()} --config.train.microbatches={best.estimate.microbatches} '
        f'--config.model.remat={best.estimate.remat}')


def check_flags() -> None:
  """Flags that would be ignored in this combination are a usage error, naming them."""
  given = lambda name: flags.FLAGS[name].present
  mesh_only = [f'--{n}' for n in ('slices', 'device_kind', 'peak_tflops', 'ici_gb_s', 'dcn_gb_s')
               if given(n)]
  if mesh_only and not _PLAN_MESH.value:
    raise ValueError(f'{", ".join(mesh_only)} apply to --plan_mesh only: add it')
  if _PLAN_MESH.value and _PLAN.value:
    raise ValueError('--plan_mesh plans batch and remat for each split already: drop --plan')
  if _PARTITIONED.value and (_PLAN.value or _PLAN_MESH.value):
    raise ValueError('--partitioned counts one compiled step: drop --plan/--plan_mesh')


def main(argv):
  del argv
  check_flags()
  import jax
  # Fake devices must be requested before JAX starts its backends (jaxllm.aot imports jax only).
  jax.config.update('jax_platforms', 'cpu')
  jax.config.update('jax_num_cpu_devices', 1 if _TOPOLOGY.value else _DEVICES.value)
  from jaxllm import aot, collectives
  config, budget = _CONFIG.value, _HBM_GIB.value
  devices = aot.topology_devices(_TOPOLOGY.value) if _TOPOLOGY.value else jax.devices()
  if _PLAN_MESH.value:
    return plan_mesh(config, devices)
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
    if _PARTITIONED.value:
      print('collectives per device and step (HLO after SPMD partitioning):\n'
            + collectives.summary(aot.partitioned_collectives(config, devices)))
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
