"""The mesh split search: which (data, fsdp, tensor) split of N devices, and with several slices
which of data and fsdp crosses them, gives the shortest estimated step within a memory budget.

Choices:

- Candidates are every ordered split of the devices of one slice into data x fsdp x tensor, times
  every split of the slice count into mesh.dcn_data x mesh.dcn_fsdp (tensor never crosses slices).
  A split the config cannot run (heads, kv-heads, mlp or vocab over tensor; d_model over fsdp;
  the global batch over data x fsdp) is skipped with config.validate's own message; none raises.
- The global batch (train.global_batch_size) is fixed, so every split does the same work per step;
  per split, `aot.plan` picks the per-device batch (micro-batches make up the rest) and remat
  policy as it does for 'auto' settings, and every row it compiled is ranked here.
- Splits with the same total axis sizes compile to the same program (a collective's bytes depend
  on the axis, not on which links carry it), so each total shape is compiled once, on a flat mesh
  of the devices present (fake CPUs can form no multi-slice mesh), and costed per DCN assignment.
- Estimated step time = compute + communication, not overlapped: model FLOPs per
  device (x 4/3 for full remat, which runs the forward twice) / peak FLOP/s, plus each collective's
  wire bytes / the bandwidth of the links it crosses. Wire bytes are those of a ring, two-level
  across slices: a collective over a group of a devices within a slice times b slices moves
  k x S x (a-1)/a bytes per device over ICI and k x S x (b-1)/(a b) over DCN, with S the bytes
  jaxllm/collectives.py counts and k = 2 for all-reduce (reduce-scatter + all-gather), 1 for
  all-gather and reduce-scatter; an all-to-all sends S (a-1)/(a b) over ICI and S (b-1)/b over
  DCN; a collective-permute sends S, over DCN if its axis crosses slices.
- The device table (DEVICES) holds datasheet figures; the bandwidth is per device and direction.
  A ring along one mesh axis uses only some of a TPU chip's ICI links, so ICI time is optimistic;
  the ranking, not the milliseconds, is the product. Each figure can be overridden (`device`).
- The bytes are those of the program compiled for the devices present: on fake CPU devices
  XLA:CPU's (collectives in float32, all-reduce where a GPU or TPU would reduce-scatter), so
  compare splits with one another rather than with a profile; with a TPU topology, libtpu's.

Mesh 'auto' in the config is not offered: the mesh keys are read before any planning (the run
directory records them, a resume reshards by them), so a search belongs before the run, here.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Sequence

import ml_collections

from jaxllm import aot
from jaxllm import config as config_lib
from jaxllm import metrics

MIB = 2 ** 20


@dataclasses.dataclass(frozen=True)
class Device:
  """Per device: dense bf16 peak, memory, and link bandwidth in one direction."""

  name: str
  peak_flops: float  # FLOP/s, dense bf16
  hbm_gib: float  # capacity; the allocator's limit is a little lower (pass --hbm_gib for it)
  ici_bytes_s: float  # within a slice: NVLink, TPU ICI
  dcn_bytes_s: float  # across slices: InfiniBand / the data-centre network, this device's share


_G = 1e9
_PEAK = metrics.PEAK_FLOPS  # dense bf16, with its datasheet sources
DEVICES = {
    # NVIDIA H100 SXM5 datasheet: 80 GB HBM3; NVLink 900 GB/s per GPU (both directions). DGX H100
    # user guide: one 400 Gb/s ConnectX-7 InfiniBand port per GPU = 50 GB/s.
    'h100': Device('h100', _PEAK['h100'], 80, 450 * _G, 50 * _G),
    # NVIDIA H200 datasheet: 141 GB HBM3e, NVLink 900 GB/s; DGX H200: one 400 Gb/s InfiniBand
    # port per GPU.
    'h200': Device('h200', _PEAK['h200'], 141, 450 * _G, 50 * _G),
    # Cloud TPU docs, "TPU v5e": 16 GB HBM, bidirectional ICI 400 GBps per chip; per host
    # 2 x 100 Gbps NICs for 8 chips = 25 Gbps a chip.
    'v5e': Device('v5e', _PEAK['tpu v5e'], 16, 200 * _G, 25 / 8 * _G),
    # Cloud TPU docs, "TPU v5p": 95 GiB HBM, bidirectional ICI 1,200 GBps per chip, DCN 50 Gbps
    # per chip.
    'v5p': Device('v5p', _PEAK['tpu v5p'], 95, 600 * _G, 50 / 8 * _G),
    # Cloud TPU docs, "TPU v6e": 32 GB HBM, bidirectional ICI 800 GBps per chip. The page gives
    # no DCN figure: v5e's 25 Gbps a chip is assumed (override with --dcn_gb_s).
    'v6e': Device('v6e', _PEAK['tpu v6e'], 32, 400 * _G, 25 / 8 * _G),
    # Not a machine: round numbers for tests and for ranking on a CPU alone.
    'cpu': Device('cpu', 1e12, 16, 10 * _G, 1 * _G),
}


def device(name: str, *, peak_tflops: float = 0, hbm_gib: float = 0, ici_gb_s: float = 0,
           dcn_gb_s: float = 0) -> Device:
  """The DEVICES row `name` with the figures given (> 0) in place of its own."""
  if name not in DEVICES:
    raise ValueError(f'--device_kind={name!r}: choose one of {", ".join(DEVICES)} (and override '
                     'its figures with --peak_tflops, --hbm_gib, --ici_gb_s, --dcn_gb_s)')
  row = DEVICES[name]
  return dataclasses.replace(row, peak_flops=peak_tflops * 1e12 or row.peak_flops,
                             hbm_gib=hbm_gib or row.hbm_gib,
                             ici_bytes_s=ici_gb_s * _G or row.ici_bytes_s,
                             dcn_bytes_s=dcn_gb_s * _G or row.dcn_bytes_s)


@dataclasses.dataclass(frozen=True)
class Split:
  """Per-slice axis sizes and the slice factors of data and fsdp (config.mesh's keys)."""

  data: int
  fsdp: int
  tensor: int
  dcn_data: int = 1
  dcn_fsdp: int = 1

  @property
  def ici(self) -> dict[str, int]:
    return {'data': self.data, 'fsdp': self.fsdp, 'tensor': self.tensor}

  @property
  def dcn(self) -> dict[str, int]:
    return {'data': self.dcn_data, 'fsdp': self.dcn_fsdp, 'tensor': 1}

  @property
  def total(self) -> dict[str, int]:
    """The mesh's axis sizes (what the step compiles for)."""
    return {a: self.ici[a] * self.dcn[a] for a in self.ici}

  @property
  def label(self) -> str:
    """'2x4x1' (data x fsdp x tensor per slice), then ' dcn 2x1' with slices."""
    out = f'{self.data}x{self.fsdp}x{self.tensor}'
    return out + (f' dcn {self.dcn_data}x{self.dcn_fsdp}' if self.dcn_data * self.dcn_fsdp > 1
                  else '')

  def flags(self) -> str:
    return ' '.join(f'--config.mesh.{k}={v}' for k, v in dataclasses.asdict(self).items())


def _factor_pairs(n: int) -> list[tuple[int, int]]:
  return [(a, n // a) for a in range(1, n + 1) if n % a == 0]


def splits(num_devices: int, *, slices: int = 1) -> list[Split]:
  """Every split of `num_devices` over `slices` slices (largest fsdp first within a slice)."""
  if slices < 1 or num_devices % slices:
    raise ValueError(f'--slices={slices} must be >= 1 and divide the {num_devices} devices')
  per_slice = num_devices // slices
  out = []
  for tensor in sorted(a for a, _ in _factor_pairs(per_slice)):
    for data, fsdp in _factor_pairs(per_slice // tensor):
      for dcn_data, dcn_fsdp in _factor_pairs(slices):
        out.append(Split(data, fsdp, tensor, dcn_data, dcn_fsdp))
  return out


def _with_split(config: ml_collections.ConfigDict, split: Split, *, flat: bool,
                remat: str) -> ml_collections.ConfigDict:
  """A copy of `config` on `split` (flat: its total sizes, one slice), one micro-batch, and
  `remat` if the config's is 'auto'."""
  config = copy.deepcopy(config)
  sizes = {**split.total, 'dcn_data': 1, 'dcn_fsdp': 1} if flat else dataclasses.asdict(split)
  with config.unlocked():
    config.mesh.update(sizes)
    config.train.microbatches = 1  # the search chooses micro-batches (aot.plan)
    if config.model.remat == config_lib.AUTO:
      config.model.remat = remat
  return config


def why_not(config: ml_collections.ConfigDict, split: Split, devices) -> str | None:
  """Why `config` cannot run on `split` (config.validate's message), or None if it can."""
  try:
    aot.validate(_with_split(config, split, flat=False, remat='full'), devices)
  except ValueError as e:
    return str(e).removeprefix('invalid config: ')
  return None


def link_bytes(collective_bytes: dict, split: Split) -> dict[str, float]:
  """{'ici': bytes, 'dcn': bytes} each device sends per step (module doc: two-level rings), from
  collectives.count()['bytes'] of the step compiled on `split`'s total shape."""
  out = {'ici': 0.0, 'dcn': 0.0}
  for kind, per_axes in collective_bytes.items():
    for axes, size in per_axes.items():
      names = [a for a in axes.split('+') if a in split.ici]
      a = math.prod(split.ici[n] for n in names)
      b = math.prod(split.dcn[n] for n in names)
      if a * b == 1:
        continue
      if kind == 'collective-permute':
        out['dcn' if b > 1 else 'ici'] += size
      elif kind == 'all-to-all':
        out['ici'] += size * (a - 1) / (a * b)
        out['dcn'] += size * (b - 1) / b
      else:
        k = 2 if kind == 'all-reduce' else 1
        out['ici'] += k * size * (a - 1) / a
        out['dcn'] += k * size * (b - 1) / (a * b)
  return out


# Hardware FLOPs over model FLOPs: full remat runs each layer's forward again (8N against 6N a
# token); the save_* policies recompute only elementwise work, which this model ignores.
RECOMPUTE = {'full': 4 / 3}


@dataclasses.dataclass
class Candidate:
  """One compiled (split, per-device batch, remat) and its estimated step."""

  split: Split
  estimate: aot.Estimate
  compute_s: float
  ici_s: float
  dcn_s: float
  global_tokens: int  # tokens per step over all devices

  @property
  def step_s(self) -> float:
    return self.compute_s + self.ici_s + self.dcn_s

  @property
  def tokens_per_s(self) -> float:
    return self.global_tokens / self.step_s

  def mib_per_axis(self) -> dict[str, float]:
    """Counted bytes (all kinds) per mesh axes, MiB per device and step."""
    out = {}
    for per_axes in self.estimate.collective_bytes.values():
      for axes, size in per_axes.items():
        out[axes] = out.get(axes, 0) + size / MIB
    return dict(sorted(out.items()))


def cost(est: aot.Estimate, split: Split, dev: Device, *, global_tokens: int) -> Candidate:
  """The step-time model of the module doc for `est` run on `split` of `dev` devices."""
  wire = link_bytes(est.collective_bytes, split)
  return Candidate(split=split, estimate=est, global_tokens=global_tokens,
                   compute_s=est.model_flops * RECOMPUTE.get(est.remat, 1) / dev.peak_flops,
                   ici_s=wire['ici'] / dev.ici_bytes_s, dcn_s=wire['dcn'] / dev.dcn_bytes_s)


def rank(found: Sequence[Candidate], budget_gib: float) -> list[Candidate]:
  """Fitting first, then by estimated step time, then the least recompute."""
  return sorted(found, key=lambda c: (not c.estimate.fits(budget_gib), c.step_s,
                                      aot.REMAT_COST.get(c.estimate.remat, 9), c.split.label))


def search(config: ml_collections.ConfigDict, devices, *, dev: Device, budget_gib: float,
           batches: Sequence[int], remats: Sequence[str], slices: int = 1
           ) -> tuple[list[Candidate], list[tuple[Split, str]]]:
  """(ranked candidates, [(split, why skipped)]) for `config`'s global batch on `devices`."""
  rows = config.train.global_batch_size
  if rows == config_lib.AUTO:
    raise ValueError("train.global_batch_size='auto': the mesh search keeps the global batch "
                     'fixed; set --config.train.global_batch_size')
  devices = list(devices)
  found, skipped, compiled = [], [], {}
  todo = splits(len(devices), slices=slices)
  for split in metrics.progress(todo, desc='mesh search', total=len(todo), unit='split'):
    reason = why_not(config, split, devices)
    ways = split.total['data'] * split.total['fsdp']
    if reason is None and not any((rows // ways) % b == 0 for b in batches):
      reason = (f'no per-device batch in {list(batches)} divides the {rows // ways} rows per '
                'batch shard (--plan_batches)')
    if reason:
      skipped.append((split, reason))
      continue
    shape = tuple(split.total.values())
    if shape not in compiled:  # the same total sizes compile to the same step
      flat = _with_split(config, split, flat=True, remat=remats[0])
      try:
        compiled[shape] = aot.plan(flat, list(batches), list(remats), budget_gib, devices,
                                   global_batch=rows)
      except Exception as e:  # a split XLA cannot compile is a finding, not the search's end
        first = (str(e).splitlines() or [''])[0][:200]
        compiled[shape] = f'compile failed: {type(e).__name__}: {first}'
    if isinstance(compiled[shape], str):
      skipped.append((split, compiled[shape]))
      continue
    found += [cost(e, split, dev, global_tokens=rows * config.data.seq_len)
              for e in compiled[shape]]
  return rank(found, budget_gib), skipped


HEADER = (f'{"mesh d x f x t":>18} {"batch":>5} {"micro":>5} {"remat":>9} {"GiB":>7} fits '
          f'{"comp ms":>8} {"ICI ms":>8} {"DCN ms":>8} {"step ms":>8} {"tokens/s":>10}  '
          'collective MiB per axis')


def row(c: Candidate, budget_gib: float) -> str:
  """One line under HEADER."""
  e = c.estimate
  axes = ', '.join(f'{a} {m:,.0f}' if m >= 10 else f'{a} {m:.2g}'
                   for a, m in c.mib_per_axis().items()) or '-'
  return (f'{c.split.label:>18} {e.per_device_batch:>5} {e.microbatches:>5} {e.remat:>9} '
          f'{e.total_bytes / aot.GIB:>7.2f} {"yes" if e.fits(budget_gib) else " no"}  '
          f'{c.compute_s * 1e3:>8.1f} {c.ici_s * 1e3:>8.1f} {c.dcn_s * 1e3:>8.1f} '
          f'{c.step_s * 1e3:>8.1f} {c.tokens_per_s:>10,.0f}  {axes}')
