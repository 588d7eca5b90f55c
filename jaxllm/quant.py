"""Quantized weight formats: int8 per output channel, 4-bit per group, each with a float scale.

A leaf (no jaxllm imports), for the frozen base of QLoRA (jaxllm/lora.py) and post-training
quantization. A weight is seen as a matrix W [K, N] (K: the contracted input dims flattened, N:
the output dims flattened), with any leading dims (the stacked `layers` dim) carried along:

  'int8'  values int8 [..., K, N], scale float32 [..., 1, N]: symmetric, one scale per output
          channel, scale = max |W[:, n]| / 127.
  'int4'  values uint8 [..., K/2, N] holding two 4-bit codes each (row 2i in the low nibble, row
          2i+1 in the high one), scale float32 [..., K/G, N]: symmetric, one scale per group of G
          consecutive input rows and output channel, scale = max |W[group, n]| / 7, codes
          q + 8 in [1, 15].

Rounding is to nearest, so |W - dequantize(quantize(W))| <= scale / 2 elementwise (the test's
bound). Packing is done here rather than with jnp.int4 arrays: XLA's CPU backend stores an int4
array one byte per element, so its memory figures (the AOT planner) would count 4-bit weights
twice; uint8 pairs are half a byte per weight on every backend.

Why not Qwix (google/qwix 0.1.8, on PyPI): it works by intercepting the matmuls a module's call
makes (`jax.lax.dot_general`/einsum), recognising the right operand as one of the module's
parameters and creating its LoRA parameters lazily, at that first intercepted call. On jaxllm's
scanned decoder, `qwix.apply_lora_to_model(Llama, LoraProvider(...), tokens, rngs=...)` fails
inside `nnx.scan` (an IndexError from `jax.lax.scan`; the adapters it creates would be born inside the
scan body), and the weights reach `jnp.matmul` cast and reshaped, so they would not
be recognised as parameters anyway. What is needed here is small: a dequantize per layer inside
the scan, which XLA fuses into the matmul's operand.

API: `quantize(w, fmt=, group_size=) -> (values, scale)`, `dequantize(values, scale, fmt=,
dtype=) -> w`, both on [..., K, N]; `QuantizedWeight`, an NNX module holding a quantized
parameter of any shape (`dequantize(dtype)` gives it back shaped as it was);
`bytes_per_weight(fmt, group_size)` for planning.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

FORMATS = ('int8', 'int4')
_QMAX = {'int8': 127, 'int4': 7}


def check_format(fmt: str, group_size: int, k: int, *, key: str = 'quantize') -> None:
  """Raises ValueError naming `key` if `fmt` cannot store a [K, N] matrix with K = `k`."""
  if fmt not in FORMATS:
    raise ValueError(f'{key}={fmt!r}: choose one of {FORMATS}')
  if fmt == 'int4' and (group_size < 2 or group_size % 2 or k % group_size):
    raise ValueError(f'4-bit groups of {group_size} rows do not tile an input width of {k}: set '
                     f'the group size to an even divisor of {k} (64 or 128 usually)')


def quantize(w, *, fmt: str, group_size: int = 64):
  """W [..., K, N] (any float dtype) -> (values, scale); see the module docstring."""
  k = w.shape[-2]
  check_format(fmt, group_size, k)
  w = w.astype(jnp.float32)
  qmax = _QMAX[fmt]
  if fmt == 'int8':
    scale = jnp.max(jnp.abs(w), axis=-2, keepdims=True) / qmax  # [..., 1, N]
    safe = jnp.where(scale > 0, scale, 1.0)
    return jnp.clip(jnp.round(w / safe), -qmax, qmax).astype(jnp.int8), scale
  groups = w.reshape(*w.shape[:-2], k // group_size, group_size, w.shape[-1])  # [..., K/G, G, N]
  scale = jnp.max(jnp.abs(groups), axis=-2) / qmax  # [..., K/G, N]
  safe = jnp.where(scale > 0, scale, 1.0)
  q = jnp.clip(jnp.round(groups / safe[..., None, :]), -qmax, qmax).astype(jnp.int32) + 8
  q = q.reshape(*w.shape[:-2], k // 2, 2, w.shape[-1]).astype(jnp.uint8)  # row pairs
  return q[..., 0, :] | (q[..., 1, :] << 4), scale


def dequantize(values, scale, *, fmt: str, dtype='float32'):
  """(values, scale) -> W [..., K, N] in `dtype`. int8's scale multiply is done in float32;
  int4's in `dtype` (its codes -8..7 are exact in bf16): a bf16 unpack halves the one-layer
  temporaries it makes, and the product is rounded to bf16 for the matmul either way."""
  if fmt == 'int8':
    return (values.astype(jnp.float32) * scale).astype(dtype)
  if fmt != 'int4':
    raise ValueError(f'unknown quantized format {fmt!r}; known: {FORMATS}')
  low = (values & 0xF).astype(jnp.int32) - 8
  high = (values >> 4).astype(jnp.int32) - 8
  q = jnp.stack([low, high], axis=-2)  # [..., K/2, 2, N]
  k, n = values.shape[-2] * 2, values.shape[-1]
  groups = q.reshape(*values.shape[:-2], scale.shape[-2], k // scale.shape[-2], n)
  w = groups.astype(dtype) * scale.astype(dtype)[..., None, :]
  return w.reshape(*values.shape[:-2], k, n)


def bytes_per_weight(fmt: str, group_size: int = 64) -> float:
  """Stored bytes per weight, scales included, for a matrix with many rows (planning)."""
  if fmt == 'int8':
    return 1.0  # + 4 bytes per output channel
  return 0.5 + 4 / group_size


class QuantizedWeight(nnx.Module):
  """A weight stored quantized: `values` and `scale` parameters of `quantize`, from a float
  parameter `w` of shape [*lead, *in_dims, *out_dims] (`lead`: the stacked `layers` dim, if
  any). `names`: w's logical dim names, which the stored arrays keep where they can (K takes the
  first input dim's name, N the first output dim's: a split of the flattened dim along its major
  part is the split of that dim; the scale's K/G dim is never split). `dequantize(dtype)` gives
  w back in its own shape, per layer inside a scan as for the whole stack."""

  def __init__(self, w, *, n_lead: int, n_in: int, names: Sequence[str | None], fmt: str,
               group_size: int = 64):
    lead, rest = w.shape[:n_lead], w.shape[n_lead:]
    k, n = math.prod(rest[:n_in]), math.prod(rest[n_in:])
    check_format(fmt, group_size, k)
    values, scale = quantize(w.reshape(*lead, k, n), fmt=fmt, group_size=group_size)
    names = tuple(names)
    k_name, n_name = names[n_lead], names[n_lead + n_in]
    self.values = nnx.Param(values, out_sharding=(*names[:n_lead], k_name, n_name),
                            eager_sharding=False)
    self.scale = nnx.Param(scale, out_sharding=(*names[:n_lead], None, n_name),
                           eager_sharding=False)
    self.shape, self.fmt = tuple(rest), fmt  # one layer's shape: what the scan body sees

  def dequantize(self, dtype='float32') -> jax.Array:
    # The barrier makes the TPU compiler retile the 4-bit codes (stored T(32,128), unpacked from
    # T(8,128)) one layer at a time inside the scan; without it it retiles the whole stack in
    # one copy before the scan, kept through the backward pass (about 100 MiB a layer at 8B).
    values, scale = jax.lax.optimization_barrier((self.values[...], self.scale[...]))
    w = dequantize(values, scale, fmt=self.fmt, dtype=dtype)
    return w.reshape(*w.shape[:-2], *self.shape)
