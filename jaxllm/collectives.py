"""Bytes moved by the collectives of a compiled program, per kind and per mesh axis, from its HLO.

`count(hlo_text, mesh_shape)` walks the optimized HLO (`compiled.as_text()`) from its entry
computation, multiplying what a `while` body does by its known trip count (scanned layers,
micro-batches, loss chunks), and sums, for each collective, the bytes of the whole tensor it
produces or consumes on one device:

| kind | bytes counted (per device, per execution) |
|---|---|
| all-gather | the gathered result |
| reduce-scatter | the operand, before scattering (result x group size) |
| all-reduce | the reduced operand(s) |
| all-to-all, collective-permute | the result |

The wire traffic of a ring implementation is (group size - 1) / group size of these figures; they
are the tensor sizes one reads off a profile, and they compare options (dtypes, gather once or per
micro-batch) exactly. Each collective is attributed to the mesh axes along which its replica
groups vary: device id i is mesh coordinate `np.unravel_index(i, mesh_shape)` (logical ids follow
the mesh's device order). Async pairs count once (at `-start`; an all-gather or permute start
gives (operands, results, context), an all-reduce start its results, combined ones as tuples). Conditionals count every branch
(an upper bound); a while loop without a known trip count counts once and is listed in `unknown`.
"""

from __future__ import annotations

import collections
import math
import re
from collections.abc import Mapping

import numpy as np

KINDS = ('all-gather', 'reduce-scatter', 'all-reduce', 'all-to-all', 'collective-permute')
_DTYPE_BYTES = {'pred': 1, 's8': 1, 'u8': 1, 'f8e4m3fn': 1, 'f8e5m2': 1, 's16': 2, 'u16': 2,
                'f16': 2, 'bf16': 2, 's32': 4, 'u32': 4, 'f32': 4, 's64': 8, 'u64': 8, 'f64': 8}
_COMPUTATION = re.compile(r'^(ENTRY )?%([\w.\-]+) .*\{$')
_OP = re.compile(r'^\s*(?:ROOT )?%[\w.\-]+ = (.+?) ([a-z\-]+)\(')
_ARRAY = re.compile(r'([a-z0-9]+)\[([\d,]*)\]')
_TRIP = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')


def _bytes(shape_text: str) -> int:
  """Bytes of an HLO result type: an array `f32[4,8]{1,0}` or a tuple of them."""
  return sum(_DTYPE_BYTES.get(dtype, 4) * math.prod(int(d) for d in dims.split(',') if d)
             for dtype, dims in _ARRAY.findall(shape_text))


def _tuple_elements(type_text: str) -> list[str]:
  """The top-level elements of an HLO tuple type, or [the type] for an array."""
  t = type_text.strip()
  if not t.startswith('('):
    return [t]
  parts, depth, start = [], 0, 1
  for i, ch in enumerate(t[1:-1], 1):
    if ch in '([{':
      depth += 1
    elif ch in ')]}':
      depth -= 1
    elif ch == ',' and not depth:
      parts.append(t[start:i])
      start = i + 1
  return [p.strip() for p in parts + [t[start:-1]]]


def _device_ids(text: str | None, size: int) -> np.ndarray:
  """The device order of a named mesh: `device_ids=([2,4]T(1,0))` (an iota, transposed), an
  explicit list `(0,4,1,5,...)`, or none (0..size-1). XLA:CPU writes the first when the mesh's
  axes are not in the device order (data x fsdp > 1 with fsdp innermost, for example)."""
  if not text:
    return np.arange(size)
  iota = re.fullmatch(r'\[([\d,]+)\](?:T\(([\d,]+)\))?', text.strip())
  if iota:
    ids = np.arange(size).reshape([int(d) for d in iota.group(1).split(',')])
    if iota.group(2):
      ids = ids.transpose([int(p) for p in iota.group(2).split(',')])
    return ids.reshape(-1)
  return np.array([int(i) for i in text.split(',') if i.strip()])


def replica_groups(line: str) -> list[list[int]] | None:
  """The replica groups of a collective's HLO line: explicit `{{0,1},{2,3}}`, iota
  `[G,S]<=[dims]T(perm)`, or named `mesh['axis_0'=2,'axis_1'=4] {'axis_1'}` (TPU; XLA:CPU too, with
  a `device_ids=(...)` order when the mesh's axes are not in device order); None when the
  line has none (one group of every device)."""
  explicit = re.search(r'replica_groups=\{(\{[\d,]*\}(?:,\{[\d,]*\})*)\}', line)
  if explicit:
    return [[int(i) for i in g.split(',') if i] for g in re.findall(r'\{([\d,]*)\}',
                                                                    explicit.group(1))]
  iota = re.search(r'replica_groups=\[([\d,]+)\]<=\[([\d,]+)\](?:T\(([\d,]+)\))?', line)
  if iota:
    shape = [int(d) for d in iota.group(1).split(',')]
    ids = np.arange(math.prod(int(d) for d in iota.group(2).split(',')))
    ids = ids.reshape([int(d) for d in iota.group(2).split(',')])
    if iota.group(3):
      ids = ids.transpose([int(p) for p in iota.group(3).split(',')])
    return ids.reshape(shape).tolist()
  named = re.search(r"replica_groups=mesh\[([^\]]*)\](?:,\s*device_ids=\(([^)]*\)?)\))?"
                    r"\s*\{([^}]*)\}", line)
  if named:  # mesh['axis_0'=2,'axis_1'=4] {'axis_1'}: groups vary over the named axes
    axes = re.findall(r"'(\w+)'=(\d+)", named.group(1))
    varying = re.findall(r"'(\w+)'", named.group(3))
    ids = _device_ids(named.group(2), math.prod(int(n) for _, n in axes))
    ids = ids.reshape([int(n) for _, n in axes])
    order = [i for i, (a, _) in enumerate(axes) if a not in varying] + \
            [i for i, (a, _) in enumerate(axes) if a in varying]
    size = math.prod(int(n) for a, n in axes if a in varying)
    return ids.transpose(order).reshape(-1, size).tolist()
  pairs = re.search(r'source_target_pairs=\{(.*?)\}\}', line)
  if pairs:  # collective-permute: each pair is a group of two
    return [[int(a), int(b)] for a, b in re.findall(r'\{(\d+),(\d+)', pairs.group(0))]
  return None


def axes_of(groups: list[list[int]] | None, mesh_shape: Mapping[str, int]) -> str:
  """'fsdp', 'data+fsdp', ...: the mesh axes whose coordinate varies within a replica group (any
  group: a permute's pairs differ from one another)."""
  names, dims = list(mesh_shape), list(mesh_shape.values())
  if not groups:
    return '+'.join(n for n, d in zip(names, dims) if d > 1) or 'none'
  varying = set()
  for group in groups:
    coords = np.array(np.unravel_index(np.asarray(group), dims)).T  # [group, axes]
    varying |= {i for i in range(len(names)) if len(set(coords[:, i])) > 1}
  return '+'.join(names[i] for i in sorted(varying)) or 'none'


def _trip_count(line: str, comps: Mapping[str, list[str]]) -> int | None:
  """A while loop's trip count: XLA's known_trip_count, else (TPU HLO has none) the bound of its
  condition `i < N` with a constant N (JAX's scan and fori loops count from 0 by 1)."""
  known = _TRIP.search(line)
  if known:
    return int(known.group(1))
  cond = re.search(r'condition=%([\w.\-]+)', line)
  body = comps.get(cond.group(1), []) if cond else []
  constants = [int(c) for l in body for c in re.findall(r'[su]32\[\]\S* constant\((\d+)\)', l)]
  if len(constants) == 1 and any('direction=LT' in l for l in body):
    return constants[0]
  return None


def _computations(hlo_text: str) -> tuple[dict[str, list[str]], str]:
  comps, name, entry = {}, None, None
  for line in hlo_text.splitlines():
    m = _COMPUTATION.match(line)
    if m:
      name = m.group(2)
      comps[name] = []
      entry = name if m.group(1) else entry
    elif line.startswith('}'):
      name = None
    elif name is not None:
      comps[name].append(line)
  return comps, entry


def count(hlo_text: str, mesh_shape: Mapping[str, int]) -> dict:
  """{'bytes': {kind: {axes: bytes}}, 'ops': {kind: executions}, 'unknown': [while loops without
  a trip count]} for one execution of the program (see the module doc)."""
  comps, entry = _computations(hlo_text)
  out = {'bytes': collections.defaultdict(lambda: collections.defaultdict(int)),
         'ops': collections.defaultdict(int), 'unknown': []}

  def walk(name: str, times: int, depth: int = 0):
    if depth > 50 or name not in comps:
      return
    for line in comps[name]:
      op = _OP.match(line)
      if not op:
        continue
      result, opcode = op.groups()
      kind = opcode[:-len('-start')] if opcode.endswith('-start') else opcode
      if kind in KINDS and not opcode.endswith('-done'):
        size = _bytes(result)
        if opcode.endswith('-start') and kind in ('all-gather', 'collective-permute'):
          # ((operands...), (results...), context...) or (operand, result, context...).
          parts = _tuple_elements(result)
          size = _bytes(parts[1] if len(parts) > 1 else parts[0])
        groups = replica_groups(line)
        if kind == 'reduce-scatter':
          size *= len(groups[0]) if groups else math.prod(mesh_shape.values())
        out['bytes'][kind][axes_of(groups, mesh_shape)] += size * times
        out['ops'][kind] += times
      if opcode == 'while':
        trip = _trip_count(line, comps)
        if trip is None:
          out['unknown'].append(line.split('=')[0].strip())
        body = re.search(r'body=%([\w.\-]+)', line).group(1)
        walk(body, times * (trip or 1), depth + 1)
      if kind not in KINDS:  # a collective's to_apply is its reduction, not a call
        callees = re.findall(r'(?:to_apply|calls)=%([\w.\-]+)', line)
        for branches in re.findall(r'branch_computations=\{([^}]*)\}', line):
          callees += re.findall(r'%([\w.\-]+)', branches)
        for callee in callees:
          walk(callee, times, depth + 1)

  walk(entry, 1)
  return {'bytes': {k: dict(v) for k, v in out['bytes'].items()}, 'ops': dict(out['ops']),
          'unknown': out['unknown']}


def summary(bytes_by_kind: Mapping[str, Mapping[str, int]]) -> str:
  """One line per kind: total and per-axis MiB (count()['bytes'])."""
  lines = []
  for kind in KINDS:
    per_axis = bytes_by_kind.get(kind)
    if per_axis:
      parts = ', '.join(f'{axes} {b / 2**20:,.2f}' for axes, b in sorted(per_axis.items()))
      lines.append(f'  {kind}: {sum(per_axis.values()) / 2**20:,.2f} MiB ({parts})')
  return '\n'.join(lines) or '  no collectives'
