"""GPU/TPU checks: cuDNN flash attention agrees with XLA's; a bf16 train step learns.

Run on an accelerator host: JAXLLM_TEST_ACCELERATOR=1 pytest -m accelerator
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm import model as model_lib

pytestmark = pytest.mark.accelerator


def rel_err(a, b):
  a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
  return np.linalg.norm(a - b) / np.linalg.norm(b)


@pytest.mark.parametrize('kv_heads', [8, 2])
def test_cudnn_attention_matches_xla(kv_heads):
  if jax.default_backend() != 'gpu':
    pytest.skip('cuDNN attention is GPU-only')
  keys = jax.random.split(jax.random.key(0), 4)
  q = jax.random.normal(keys[0], (2, 1024, 8, 128), jnp.bfloat16)
  k = jax.random.normal(keys[1], (2, 1024, kv_heads, 128), jnp.bfloat16)
  v = jax.random.normal(keys[2], (2, 1024, kv_heads, 128), jnp.bfloat16)
  ct = jax.random.normal(keys[3], q.shape, jnp.bfloat16)

  def run(impl):
    f = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=impl)
    out, vjp = jax.vjp(f, q, k, v)
    return out, vjp(ct)

  (out_x, grads_x), (out_c, grads_c) = jax.jit(lambda: run('xla'))(), jax.jit(lambda: run('cudnn'))()
  assert rel_err(out_c, out_x) < 1e-2
  for gc, gx in zip(grads_c, grads_x):
    assert rel_err(gc, gx) < 2e-2


def test_auto_attention_picks_cudnn_for_bf16_on_gpu():
  cfg = model_lib.ModelConfig(vocab_size=256, d_model=64, n_layers=1, n_heads=4, n_kv_heads=4,
                              head_dim=16, mlp_dim=128, dtype='bfloat16', attention='auto')
  expected = 'cudnn' if jax.default_backend() == 'gpu' else 'xla'
  assert model_lib.attention_implementation(cfg) == expected
  assert model_lib.attention_implementation(dataclasses.replace(cfg, dtype='float32')) == 'xla'
