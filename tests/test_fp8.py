"""fp8 matmuls (jaxllm/fp8.py, model.fp8): error bounds from the formats, edge values, the model.

Bounds. Rounding to a float with m explicit mantissa bits errs by at most 2^-(m+1) of the value
(half an ulp) while the value is normal, and by half the subnormal spacing below that: e4m3fn
(m = 3, min normal 2^-6) errs by <= 2^-4 |v| + 2^-10 in scaled units, e5m2 (m = 2, min normal
2^-14) by <= 2^-3 |v| + 2^-17. Times the scale s = amax / fmax, an operand a carries
e_a <= u |a| + sub * s elementwise, and a product of two operands then errs by at most
e_a @ (|b| + e_b) + |a| @ e_b, plus float32 accumulation (K ulps of |a|@|b|) and the rounding of
the output to its dtype. The tests check that bound elementwise, and that the error is real (the
result equals an emulation of the fp8 rounding and is worse than bf16's): a path that silently
stayed in bf16 would fail.
"""

import dataclasses
import re

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx

from jaxllm import fp8
from jaxllm import model as model_lib
from jaxllm import sharding
from test_train import run_steps

M, K, N = 32, 64, 48
FORMATS = {  # unit roundoff, half the subnormal spacing (both in scaled units), largest value
    'e4m3': (2.0**-4, 2.0**-10, 448.0),
    'e5m2': (2.0**-3, 2.0**-17, 57344.0),
}
OUT_U = {'float32': 2.0**-24, 'bfloat16': 2.0**-8}  # rounding of the result to its dtype


def wide_range(rng, shape, decades=3):
  """Normal values times 10^U(-decades, 0): small ones reach e4m3's subnormals after scaling."""
  return rng.normal(size=shape) * 10.0 ** rng.uniform(-decades, 0, shape)


def quant_error(a, fmt):
  """Elementwise bound on |dequantize(quantize(a)) - a| with a per-tensor current scale."""
  u, sub, fmax = FORMATS[fmt]
  # (1 + 2^-20): the float32 division by the scale rounds once before the fp8 rounding.
  return u * (1 + 2.0**-20) * np.abs(a) + sub * np.abs(a).max() / fmax


def product_bound(a, fmt_a, b, fmt_b, out_dtype):
  """Elementwise bound on |fp8(a @ b) - a @ b| (float64 numpy operands, a [M, K], b [K, N])."""
  ea, eb = quant_error(a, fmt_a), quant_error(b, fmt_b)
  abs_a, abs_b = np.abs(a), np.abs(b)
  quantized = ea @ (abs_b + eb) + abs_a @ eb
  magnitude = (abs_a + ea) @ (abs_b + eb)
  accumulate = (a.shape[1] + 2) * 2.0**-24 * magnitude  # float32 sums and the rescale
  rounding = 2 * OUT_U[out_dtype] * magnitude  # the dot's output dtype, then the final cast
  return quantized + accumulate + rounding


def as64(x):
  return np.asarray(jnp.asarray(x, jnp.float32), np.float64)


@pytest.fixture(scope='module')
def operands():
  rng = np.random.default_rng(0)
  x = wide_range(rng, (M, K))
  w = rng.normal(size=(K, N)) * 0.02
  g = wide_range(rng, (M, N))  # an incoming gradient
  return x, w, g


# One compiled forward + backward shared by the tests (jit caches per dtype and shape).
@jax.jit
def fwd_bwd(x, w, g):
  y, vjp = jax.vjp(fp8.matmul, x, w)
  return (y, *vjp(g))


@pytest.mark.parametrize('dtype', ['float32', 'bfloat16'])
def test_forward_within_e4m3_bound(operands, dtype):
  x, w, _ = operands
  xd, wd = jnp.asarray(x, dtype), jnp.asarray(w, dtype)
  x, w = as64(xd), as64(wd)  # the exact values the product sees
  y = fp8.matmul(xd, wd)
  assert y.dtype == jnp.dtype(dtype)
  err = np.abs(as64(y) - x @ w)
  assert np.all(err <= product_bound(x, 'e4m3', w, 'e4m3', dtype))
  # The error is fp8's, not bf16's: well above bf16's half ulp relative to |x| @ |w|.
  assert np.max(err / (np.abs(x) @ np.abs(w))) > 2.0**-8


def test_forward_equals_fp8_emulation(operands):
  """The result is exactly the dot of the e4m3-rounded operands (round-to-nearest-even, as
  ml_dtypes converts), up to float32 accumulation."""
  x, w, _ = operands
  x32, w32 = x.astype(np.float32), w.astype(np.float32)
  sx, sw = np.abs(x32).max() / np.float32(448), np.abs(w32).max() / np.float32(448)
  qx = (x32 / sx).astype(ml_dtypes.float8_e4m3fn).astype(np.float64) * sx
  qw = (w32 / sw).astype(ml_dtypes.float8_e4m3fn).astype(np.float64) * sw
  y = as64(fp8.matmul(jnp.asarray(x32), jnp.asarray(w32)))
  tol = (K + 2) * 2.0**-24 * (np.abs(qx) @ np.abs(qw))
  assert np.all(np.abs(y - qx @ qw) <= tol)


def test_gradients_within_e5m2_bound(operands):
  x, w, g = (np.asarray(a, np.float32).astype(np.float64) for a in operands)
  _, dx, dw = fwd_bwd(*(jnp.asarray(a, jnp.float32) for a in (x, w, g)))
  # dx = g @ w.T: e5m2 gradient times the e4m3 weight; dw = x.T @ g: the e4m3 input times it.
  err_dx = np.abs(as64(dx) - g @ w.T)
  assert np.all(err_dx <= product_bound(g, 'e5m2', w.T, 'e4m3', 'float32'))
  err_dw = np.abs(as64(dw) - x.T @ g)
  assert np.all(err_dw <= product_bound(x.T, 'e4m3', g, 'e5m2', 'float32'))
  assert np.max(err_dx / (np.abs(g) @ np.abs(w.T))) > 2.0**-8  # e5m2, not a float32 gradient


def test_scale_handles_zeros_tiny_and_large_values(operands):
  x, w, g = (jnp.asarray(a, jnp.float32) for a in operands)
  # All zeros: scale 1, a zero product, finite gradients (dw = 0, dx = g @ w.T).
  assert float(fp8.scale_of(jnp.zeros((4,)), fp8.E4M3)) == 1.0
  y, dx, dw = fwd_bwd(jnp.zeros_like(x), w, g)
  assert np.all(np.asarray(y) == 0) and np.all(np.asarray(dw) == 0)
  assert np.all(np.isfinite(dx)) and np.any(np.asarray(dx) != 0)
  # float32 subnormals: amax / 448 would flush to zero; the floored scale keeps x / s finite.
  tiny = x * 1e-40
  assert float(fp8.scale_of(tiny, fp8.E4M3)) > 0
  for out in fwd_bwd(tiny, w, g):
    assert np.all(np.isfinite(out))
  # Near float32's largest values: 3e38 x 1e-3 weights; the exact product is finite and the
  # bound holds (quantized values stay within +-448, the scales carry the magnitude).
  big, small_w = x * (3e38 / jnp.max(jnp.abs(x))), w * 0.05
  y, dx, dw = fwd_bwd(big, small_w, g)
  for out in (y, dx, dw):
    assert np.all(np.isfinite(out))
  b64, w64 = as64(big), as64(small_w)
  assert np.all(np.abs(as64(y) - b64 @ w64) <= product_bound(b64, 'e4m3', w64, 'e4m3', 'float32'))
  # A non-finite input is not hidden: it reaches the output (the train loop's check stops there).
  y, _, _ = fwd_bwd(x.at[0, 0].set(jnp.inf), w, g)
  assert not np.all(np.isfinite(y))


def test_matmul_rejects_non_matrices():
  with pytest.raises(ValueError, match=r'\[M, K\] @ \[K, N\]'):
    fp8.matmul(jnp.ones((2, 3, 4)), jnp.ones((4, 5)))


CFG = model_lib.ModelConfig(vocab_size=256, d_model=64, n_layers=2, n_heads=8, n_kv_heads=4,
                            head_dim=8, mlp_dim=128)


def rel_err(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.linalg.norm(a - b) / np.linalg.norm(b)


@pytest.fixture(scope='module')
def model_runs():
  """(loss, grads, lowered text) of the tiny model with and without fp8, the same parameters."""
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 256, (2, 16)), jnp.int32)
  out = {}
  for use_fp8 in (False, True):
    graphdef, state = nnx.split(model_lib.Llama(dataclasses.replace(CFG, fp8=use_fp8),
                                                rngs=nnx.Rngs(0)))
    state = nnx.to_pure_dict(state)

    def loss(s):
      logits = nnx.merge(graphdef, s)(tokens[:, :-1])
      return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), tokens[:, 1:, None], -1))

    step = jax.jit(jax.value_and_grad(loss))
    out[use_fp8] = (*step(state), step.lower(state).as_text())
  return out


def test_model_fp8_forward_and_backward_close_to_float32(model_runs):
  (l0, g0, _), (l1, g1, _) = model_runs[False], model_runs[True]
  assert np.isfinite(l1)
  # The loss at init is ln(256) +- noise; fp8 moves it by a fraction of a per cent.
  assert abs(float(l1) - float(l0)) < 1e-2 * float(l0)
  for path, a in jax.tree_util.tree_leaves_with_path(g1):
    b = g0
    for k in path:
      b = b[k.key]
    assert np.all(np.isfinite(a)), path
    # A gradient passes through two or three fp8 roundings in a row (e5m2 alone: relative RMS
    # error 2^-4/sqrt(3) to 2^-3/sqrt(3), 4-7%), so per-parameter gradients differ by 4-11%
    # (relative 2-norm, measured) but point the same way: cosine > 0.99, what AdamW follows.
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    assert rel_err(a, b) < 0.15, (path, rel_err(a, b))
    assert a @ b / np.linalg.norm(a) / np.linalg.norm(b) > 0.99, path


def test_model_fp8_dots_are_the_projections_not_the_head(model_runs):
  """7 projections a layer (q, k, v, o, gate, up, down): 7 f8 dots in the scanned forward body
  and 14 (dx and dw each) in the backward body; attention and the output head stay out."""
  text = model_runs[True][2]
  dots = [line for line in text.splitlines() if 'stablehlo.dot_general' in line]
  f8_dots = [line for line in dots if 'f8E' in line]
  assert len(f8_dots) == 21, f8_dots
  assert sum('f8E5M2' in line for line in f8_dots) == 14  # every backward product takes e5m2
  assert len(dots) > len(f8_dots)  # attention and the head: still in the compute dtype
  assert not any('f8E' in line for line in model_runs[False][2].splitlines())


def test_bad_fp8_value_names_the_key():
  with pytest.raises(ValueError, match='model.fp8'):
    dataclasses.replace(CFG, fp8='yes')


def run_train_steps(use_fp8, shape=(1, 1, 1)):
  devices = jax.devices()[:1] if shape == (1, 1, 1) else None
  return run_steps(dict(zip(sharding.MESH_AXES, shape)), devices=devices, dtype='bfloat16',
                   fp8=use_fp8)[0]


def test_train_steps_fp8_close_to_bf16():
  """The tiny config's train step (float32 master weights, AdamW) with bf16 matmuls on one device
  and fp8 ones sharded over data, fsdp and tensor (per-tensor scales then need a max over the
  shards): every loss within 1% (the issue's target after 100 steps on the GPU)."""
  bf16, f8 = run_train_steps(False), run_train_steps(True, shape=(2, 2, 2))
  assert bf16[-1] < bf16[0] - 0.01 and f8[-1] < f8[0] - 0.01  # both learn
  np.testing.assert_allclose(f8, bf16, rtol=1e-2)
  assert not np.array_equal(f8, bf16)  # and fp8 really ran


def fp8_gemms(hlo: str) -> int:
  """GEMMs of a compiled GPU program that run in fp8: cuBLASLt fp8 calls, plus dots with f8
  operands left inside fusions (XLA's Triton GEMMs may take a dot instead of cuBLAS). A dot that
  XLA upcast reads bf16 operands and counts for neither."""
  return (hlo.count('custom_call_target="__cublas$lt$matmul$f8"')
          + len(re.findall(r' dot\(f8e', hlo)))


@pytest.mark.accelerator
def test_fp8_products_run_as_fp8_gemms_on_gpu():
  """On NVIDIA sm_89+ (Ada, Hopper, Blackwell) all three products of a forward + backward, and
  every projection of the model's train step, run as fp8 GEMMs (not upcast); elsewhere fp8 runs
  upcast and this says so by skipping."""
  native, what = fp8.native_fp8_gemms()
  if not native:
    pytest.skip(f'{what}: no fp8 tensor cores; XLA upcasts')
  x, w, g = (jnp.ones(s, jnp.bfloat16) for s in ((256, 512), (512, 384), (256, 384)))
  hlo = fwd_bwd.lower(x, w, g).compile().as_text()
  targets = sorted(set(re.findall(r'custom_call_target="([^"]+)"', hlo)))
  assert fp8_gemms(hlo) == 3, targets
  # The model: 7 projections a layer, forward and both backward products (cuBLASLt wants every
  # dim a multiple of 16: these are), under the remat policy of the benchmark rows.
  cfg = model_lib.ModelConfig(vocab_size=256, d_model=128, n_layers=2, n_heads=4, n_kv_heads=2,
                              head_dim=32, mlp_dim=256, dtype='bfloat16', fp8=True,
                              remat='save_dots')
  graphdef, state = nnx.split(model_lib.Llama(cfg, rngs=nnx.Rngs(0)))
  tokens = jnp.zeros((2, 64), jnp.int32)
  loss = lambda s: jnp.mean(nnx.merge(graphdef, s)(tokens))
  hlo = jax.jit(jax.grad(loss)).lower(nnx.to_pure_dict(state)).compile().as_text()
  assert fp8_gemms(hlo) >= 21, (fp8_gemms(hlo), sorted(set(re.findall(
      r'custom_call_target="([^"]+)"', hlo))))
