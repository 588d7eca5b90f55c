"""Device mesh, logical-to-mesh sharding, and host-local batches to global arrays.

The mesh has axes (data, fsdp, tensor). Logical names ('batch', 'embed', 'heads', ...) are mapped
to mesh axes by the rules table in the config; this module applies a table, it never defines one.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
import os
from collections.abc import Mapping, Sequence

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ('data', 'fsdp', 'tensor')
Rules = Sequence[tuple[str, str | tuple[str, ...] | None]]


def resolve_mesh_shape(sizes: Mapping[str, int], num_devices: int) -> dict[str, int]:
  """Total size of each mesh axis: the within-slice sizes mesh.{data,fsdp,tensor} (one `-1`
  fills the slice) times the across-slice factors mesh.dcn_{data,fsdp}. Errors name the keys."""
  dcn = dcn_shape(sizes)
  if min(dcn.values()) < 1:
    raise ValueError(f'mesh.dcn_data={dcn["data"]} x mesh.dcn_fsdp={dcn["fsdp"]}: the slice counts '
                     'must be >= 1 (1 = one host or slice)')
  slices = math.prod(dcn.values())
  if num_devices % slices:
    raise ValueError(f'mesh.dcn_data x mesh.dcn_fsdp = {slices} slices do not divide the '
                     f'{num_devices} devices; change the mesh.dcn_* sizes')
  per_slice = num_devices // slices
  shape = {axis: int(sizes[axis]) for axis in MESH_AXES}
  keys = ' x '.join(f'mesh.{a}={shape[a]}' for a in MESH_AXES)
  free = [a for a in MESH_AXES if shape[a] == -1]
  if len(free) > 1 or any(v == 0 or v < -1 for v in shape.values()):
    raise ValueError(f'{keys}: use positive sizes and at most one -1')
  fixed = math.prod(v for v in shape.values() if v != -1)
  if free:
    if per_slice % fixed:
      raise ValueError(f'{keys}: the fixed axes ({fixed}) do not divide the {per_slice} devices;'
                       ' change the mesh.* sizes')
    shape[free[0]] = per_slice // fixed
  elif fixed != per_slice:
    raise ValueError(f'{keys} = {fixed} devices, but {per_slice} are present; change the mesh.* '
                     'sizes or set one of them to -1')
  return {a: shape[a] * dcn[a] for a in MESH_AXES}


def dcn_shape(sizes: Mapping[str, int]) -> dict[str, int]:
  """Across-slice (DCN: between hosts or TPU slices) factor of each axis; tensor never crosses."""
  return {'data': int(sizes.get('dcn_data', 1)), 'fsdp': int(sizes.get('dcn_fsdp', 1)),
          'tensor': 1}


def make_mesh(shape: Mapping[str, int], devices: Sequence[jax.Device] | None = None, *,
              dcn: Mapping[str, int] | None = None) -> Mesh:
  """A mesh over `devices` (default: all) with Auto axes, so logical constraints drive GSPMD.

  With `dcn` factors above 1, devices are grouped by slice (TPU multislice) or else by process
  (GPU hosts), so each axis's DCN factor spans groups and the rest stays on the fast links."""
  devices = jax.devices() if devices is None else list(devices)
  dims = tuple(shape[a] for a in MESH_AXES)
  axis_types = (AxisType.Auto,) * 3
  dcn_dims = tuple((dcn or {}).get(a, 1) for a in MESH_AXES)
  if math.prod(dcn_dims) > 1:
    ici_dims = tuple(d // f for d, f in zip(dims, dcn_dims))
    one_slice = len({getattr(d, 'slice_index', 0) for d in devices}) == 1
    grid = mesh_utils.create_hybrid_device_mesh(ici_dims, dcn_dims, devices,
                                                process_is_granule=one_slice)
    return Mesh(grid, MESH_AXES, axis_types=axis_types)
  if len(devices) == jax.device_count() or devices[0].platform != jax.default_backend():
    # All devices (or an AOT topology's): ordered so that inner axes (tensor, then fsdp) stay on
    # the fastest links.
    return jax.make_mesh(dims, MESH_AXES, axis_types=axis_types, devices=devices)
  return Mesh(np.asarray(devices).reshape(dims), MESH_AXES, axis_types=axis_types)


def logical_to_mesh(spec: P, rules: Rules) -> P:
  """Renames each logical name of `spec` to its mesh axes; an unknown name is an error. A mesh
  axis goes to the first dim that asks for it: in ('batch', 'length', 'embed') `batch` takes
  fsdp, so `embed` stays whole and activations are split over examples only, as FSDP wants.
  Parameters never have a `batch` dim, so for them the table is a plain rename."""
  table = dict(rules)
  missing = [n for n in spec if n is not None and n not in table]
  if missing:
    raise ValueError(f'logical axis {missing[0]!r} has no entry in sharding.rules')
  used, out = set(), []
  for name in spec:
    axes = table[name] if name is not None else None
    axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
    free = tuple(a for a in axes if a not in used)
    used.update(free)
    out.append(None if not free else free[0] if len(free) == 1 else free)
  return P(*out)


def named_shardings(logical_specs, mesh: Mesh, rules: Rules):
  """Tree of logical PartitionSpecs -> tree of NamedShardings on `mesh`."""
  return jax.tree.map(lambda s: NamedSharding(mesh, logical_to_mesh(s, rules)), logical_specs,
                      is_leaf=lambda x: isinstance(x, P))


def without_axes(spec: P, axes: Sequence[str]) -> P:
  """`spec` with the mesh `axes` taken off every dim: the layout of a tensor gathered over them
  (train.microbatch_gather='once' gathers parameters over the batch axes)."""
  out = []
  for entry in spec:
    kept = tuple(a for a in ((entry,) if isinstance(entry, str) else entry or ()) if a not in axes)
    out.append(None if not kept else kept[0] if len(kept) == 1 else kept)
  return P(*out)


def with_axis(spec: P, shape: Sequence[int], axis: str, mesh_shape: Mapping[str, int]) -> P:
  """`spec` further split over mesh `axis` (ZeRO-1: optimizer state over `data`) on the largest
  dim that still divides evenly (the first of equals); `spec` as it is when `axis` has size 1,
  is used already, or divides no dim (small vectors stay replicated)."""
  entries = [(e,) if isinstance(e, str) else tuple(e or ()) for e in spec]
  entries += [()] * (len(shape) - len(entries))
  if mesh_shape[axis] == 1 or any(axis in e for e in entries):
    return spec
  ways = [math.prod(mesh_shape[a] for a in e) * mesh_shape[axis] for e in entries]
  fits = [i for i, n in enumerate(shape) if n % ways[i] == 0]
  if not fits:
    return spec
  best = max(fits, key=lambda i: (shape[i], -i))
  entries[best] += (axis,)
  return P(*(None if not e else e[0] if len(e) == 1 else e for e in entries))


def batch_sharding(mesh: Mesh, rules: Rules) -> NamedSharding:
  """Rows split over the 'batch' mesh axes, positions whole."""
  return NamedSharding(mesh, logical_to_mesh(P('batch', 'length'), rules))


def batch_axes(rules: Rules) -> tuple[str, ...]:
  """The mesh axes the batch dim is split over (data and fsdp with the default rules)."""
  axes = logical_to_mesh(P('batch'), rules)[0] or ()
  return (axes,) if isinstance(axes, str) else tuple(axes)


def batch_ways(mesh: Mesh, rules: Rules) -> int:
  """Devices the batch dim is split over (data x fsdp with the default rules)."""
  return math.prod(mesh.shape[a] for a in batch_axes(rules))


def global_batch(local_batch: Mapping[str, np.ndarray], sharding: NamedSharding) -> dict:
  """This process's rows -> one global jax.Array per key (multi-host safe)."""
  return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local_batch.items()}


def process_batch_size(batch_sharding: NamedSharding, global_batch: int, seq_len: int) -> int:
  """Rows this process feeds: those its devices hold. Each process must own distinct rows (the
  data pipeline shards by process), so a batch axis may span hosts but `tensor` may not."""
  index = batch_sharding.addressable_devices_indices_map((global_batch, seq_len))
  rows = set().union(*(range(*idx[0].indices(global_batch)) for idx in index.values()))
  if len(rows) * jax.process_count() != global_batch:
    raise ValueError(f'this process holds {len(rows)} of {global_batch} rows over '
                     f'{jax.process_count()} processes: keep mesh.tensor within one host and make '
                     'train.global_batch_size divisible by mesh.data x mesh.fsdp')
  return len(rows)


def initialize_distributed(*, initialize: str, coordinator_address: str, num_processes: int,
                           process_id: int) -> None:
  """Joins a multi-process job (see the `distributed` config section). Explicit values win; JAX
  detects the rest from SLURM, Open MPI, Cloud TPU or Kubernetes. One process needs nothing."""
  if initialize not in ('auto', 'always', 'never'):
    raise ValueError(f'distributed.initialize={initialize!r}: choose auto, always or never')
  explicit = coordinator_address or os.environ.get('JAX_COORDINATOR_ADDRESS')
  detected = any(int(os.environ.get(v, '1')) > 1 for v in ('SLURM_NTASKS', 'OMPI_COMM_WORLD_SIZE'))
  detected |= 'JOB_COMPLETION_INDEX' in os.environ or bool(os.environ.get('TPU_WORKER_HOSTNAMES'))
  if initialize == 'never' or (initialize == 'auto' and not (explicit or detected)):
    return
  jax.distributed.initialize(
      coordinator_address=coordinator_address or None,
      num_processes=num_processes if num_processes > 0 else None,
      process_id=process_id if process_id >= 0 else None)


_RULES: contextvars.ContextVar[tuple | None] = contextvars.ContextVar('jaxllm_rules', default=None)


@contextlib.contextmanager
def activate(mesh: Mesh, rules: Rules):
  """Mesh and rules in scope while tracing, so `constrain` resolves logical names to mesh axes."""
  token = _RULES.set(tuple(tuple(r) for r in rules))
  try:
    with jax.set_mesh(mesh):
      yield
  finally:
    _RULES.reset(token)


def active_spec(names: Sequence[str | None]) -> P | None:
  """The mesh PartitionSpec of logical `names` under the enclosing `activate`'s rules; None
  outside one."""
  rules = _RULES.get()
  return None if rules is None else logical_to_mesh(P(*names), rules)


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
  """Pins the layout of activation `x`, one logical name per dim (None: whole), through the
  rules of the enclosing `activate`; a no-op outside one (tests, conversion, a single device)."""
  spec = active_spec(names)
  return x if spec is None else jax.lax.with_sharding_constraint(x, spec)
