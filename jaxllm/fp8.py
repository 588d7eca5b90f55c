"""fp8 matrix products for training, with per-tensor current scaling.

`matmul(x_MK, w_KN)` quantizes both operands to float8_e4m3fn and, in the backward pass, the
incoming gradient to float8_e5m2 (two more exponent bits: gradients span a wider range), each
with one scale per tensor taken from the tensor itself (amax / fp8 max). The master weights, the
optimizer and everything outside the product stay as they are; the result comes back in the
operands' dtype.

Why current scaling and not delayed scaling (Transformer Engine, `flax.linen.fp8_ops`): delayed
scaling reads each scale from an amax history of earlier steps, state that every matmul of every
layer would carry through the train state and that the loop would have to write back. Current
scaling needs no state; it costs one max-reduction per operand, which XLA fuses with the quantize.

What XLA sees: `dot_general(f8, f8, preferred_element_type=dtype)` times the product of the two
scales (the form Qwix and flax.linen.fp8_ops emit too). On NVIDIA GPUs of compute capability 8.9
and later (Ada, Hopper, Blackwell) XLA's GEMM rewriter turns an f8 x f8 dot into a cuBLASLt fp8
GEMM (`__cublas$lt$matmul$f8`), or its Triton GEMMs take it; the backward's two products are
e5m2 x e4m3, which cuBLASLt accepts (it needs at least one e4m3 operand, so never e5m2 x e5m2).
Other GPUs and the CPU upcast the f8 operands and run an ordinary dot: the same numbers, slower.

Non-finite inputs stay non-finite (an inf or nan amax gives nan outputs), so the train loop's
non-finite check still stops a diverging run; an all-zero tensor gets scale 1.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from absl import logging

E4M3 = jnp.float8_e4m3fn  # operands: 3 mantissa bits, max 448
E5M2 = jnp.float8_e5m2  # gradients: 2 mantissa bits, max 57344


def native_fp8_gemms() -> tuple[bool, str]:
  """Whether the default device runs fp8 GEMMs (NVIDIA sm_89+: Ada, Hopper, Blackwell), and what
  it is, for logs and test skips."""
  dev = jax.devices()[0]
  cc = getattr(dev, 'compute_capability', None) if dev.platform == 'gpu' else None
  what = f'{dev.device_kind} ({dev.platform}' + (f', sm_{cc})' if cc else ')')
  try:
    return cc is not None and tuple(int(v) for v in str(cc).split('.')) >= (8, 9), what
  except ValueError:  # a compute capability that is not 'major.minor' (ROCm's gfx names)
    return False, what


def scale_of(x, dtype) -> jax.Array:
  """The float32 per-tensor scale that maps max|x| onto `dtype`'s largest finite value."""
  amax = jnp.max(jnp.abs(x)).astype(jnp.float32)
  # The floor keeps x / scale finite when amax / max underflows float32 (a subnormal amax).
  scale = jnp.maximum(amax / float(jnp.finfo(dtype).max), jnp.finfo(jnp.float32).tiny)
  return jnp.where(amax > 0, scale, jnp.float32(1.0))  # a nan amax also lands here: nan stays nan


def quantize(x, dtype, scale) -> jax.Array:
  """x / scale rounded to `dtype` (clipped first: e4m3fn has no inf, an overflow would be nan)."""
  fmax = float(jnp.finfo(dtype).max)
  return jnp.clip(x.astype(jnp.float32) / scale, -fmax, fmax).astype(dtype)


def _scaled_dot(a, b, scale, contracting, out_dtype, precision=jax.lax.Precision.DEFAULT):
  """dot of two f8 tensors, dequantized by the product of their scales. For f8 operands XLA:GPU
  reads `precision` as the accumulation mode: DEFAULT lets cuBLASLt accumulate fast (less
  precisely), HIGHEST makes it promote partial sums to float32 (the usual choice for gradients)."""
  y = jax.lax.dot_general(a, b, (contracting, ((), ())), precision=precision,
                          preferred_element_type=out_dtype)
  # The dot's own output is in `out_dtype`, as in the bf16 path, so remat policies that save
  # matmul outputs save as many bytes as before; the rescale is elementwise and fuses.
  return (y.astype(jnp.float32) * scale).astype(out_dtype)


@jax.custom_vjp
def _matmul(x_MK, w_KN):
  return _matmul_fwd(x_MK, w_KN)[0]


def _matmul_fwd(x_MK, w_KN):
  sx, sw = scale_of(x_MK, E4M3), scale_of(w_KN, E4M3)
  qx_MK, qw_KN = quantize(x_MK, E4M3, sx), quantize(w_KN, E4M3, sw)
  y_MN = _scaled_dot(qx_MK, qw_KN, sx * sw, ((1,), (0,)), x_MK.dtype)
  # The residuals are the fp8 operands: half the bytes of bf16 ones.
  return y_MN, (qx_MK, qw_KN, sx, sw)


def _matmul_bwd(residuals, g_MN):
  qx_MK, qw_KN, sx, sw = residuals
  sg = scale_of(g_MN, E5M2)
  qg_MN = quantize(g_MN, E5M2, sg)
  # Gradients accumulate in full precision (torchao's default recipe too): they sum over
  # many more terms (all tokens, for dw) and feed the optimizer directly.
  full = jax.lax.Precision.HIGHEST
  dx_MK = _scaled_dot(qg_MN, qw_KN, sg * sw, ((1,), (1,)), g_MN.dtype, full)  # g @ w.T
  dw_KN = _scaled_dot(qx_MK, qg_MN, sx * sg, ((0,), (0,)), g_MN.dtype, full)  # x.T @ g
  return dx_MK, dw_KN


_matmul.defvjp(_matmul_fwd, _matmul_bwd)


def matmul(x_MK, w_KN) -> jax.Array:
  """[M, K] @ [K, N] -> [M, N] in fp8 (see the module docstring), in the operands' common dtype.
  Differentiable: the gradients come back in each operand's own dtype."""
  if x_MK.ndim != 2 or w_KN.ndim != 2 or x_MK.shape[1] != w_KN.shape[0]:
    raise ValueError(f'fp8.matmul takes [M, K] @ [K, N]; got {x_MK.shape} @ {w_KN.shape}')
  dtype = jnp.result_type(x_MK, w_KN)
  native, what = native_fp8_gemms()  # at trace time: once per compile, not per step
  if not native:
    logging.log_first_n(logging.WARNING, 'model.fp8: %s has no fp8 GEMMs that jaxllm knows of; '
                        'XLA upcasts the f8 operands (fp8 numerics, slower than model.fp8=false)',
                        1, what)
  # One dtype inside the custom_vjp, so both cotangents have the incoming gradient's dtype;
  # the casts' own VJPs return each gradient in its operand's dtype.
  return _matmul(x_MK.astype(dtype), w_KN.astype(dtype))
