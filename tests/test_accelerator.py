"""GPU/TPU checks: cuDNN flash attention (dense, and packed rows in cuDNN's packed layout), the
Pallas kernel and TPU splash attention agree with XLA's; `model.attention=auto` picks cuDNN for
bf16 on a GPU (splash on a TPU); a bf16 train step learns.

Run on an accelerator host: JAXLLM_TEST_ACCELERATOR=1 pytest -m accelerator. The bf16 train step is
also marked `also_on_cpu` (XLA:CPU computes in bfloat16 too): every run of the suite checks it,
and an accelerator host checks it on its own device.

Tolerances: bf16 inputs, outputs and gradients (8 significant bits, relative rounding 4e-3);
the reference is XLA's kernel on the same bf16 inputs computed in float32, so differences are the
kernels' bf16 roundings of probabilities and outputs: relative 1e-2 (outputs) and 2e-2 (gradients,
one more bf16 product) in the Frobenius norm. A masking error moves them by O(1).
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxllm import attention
from jaxllm import model as model_lib
from test_train import run_steps

pytestmark = pytest.mark.accelerator
L = 1024


def rel_err(a, b):
  a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
  return np.linalg.norm(a - b) / np.linalg.norm(b)


def inputs(kv_heads, heads=8, head_dim=128, batch=2):
  keys = jax.random.split(jax.random.key(0), 4)
  q = jax.random.normal(keys[0], (batch, L, heads, head_dim), jnp.bfloat16)
  k = jax.random.normal(keys[1], (batch, L, kv_heads, head_dim), jnp.bfloat16)
  v = jax.random.normal(keys[2], (batch, L, kv_heads, head_dim), jnp.bfloat16)
  return q, k, v, jax.random.normal(keys[3], q.shape, jnp.bfloat16)


def packed_segment_ids(doc_lengths, batch=2):
  """Row 0: documents of `doc_lengths` then padding; row 1: one whole-row document."""
  seg = np.zeros((batch, L), np.int32)
  start = 0
  for i, n in enumerate(doc_lengths):
    seg[0, start:start + n] = i + 1
    start += n
  seg[1:] = 1
  return seg


def compare(implementation, q, k, v, ct, seg, window=0):
  ct = ct if seg is None else ct * (seg > 0)[:, :, None, None].astype(ct.dtype)
  seg_j = None if seg is None else jnp.asarray(seg)

  def run(impl, dtype):
    def f(q, k, v):
      return attention.attend(q, k, v, seg_j, implementation=impl, dtype=dtype,
                              sliding_window=window).astype(jnp.float32)
    out, vjp = jax.vjp(f, q, k, v)
    return out, vjp(ct.astype(jnp.float32))

  # XLA in float32 on the same bf16 values is the reference.
  ref = jax.jit(lambda q, k, v: run('xla', 'float32'))(*(x.astype(jnp.float32) for x in (q, k, v)))
  got = jax.jit(lambda q, k, v: run(implementation, 'bfloat16'))(q, k, v)
  real = np.ones(q.shape[:2], bool) if seg is None else seg > 0
  assert rel_err(np.asarray(got[0])[real], np.asarray(ref[0])[real]) < 1e-2
  assert np.isfinite(np.asarray(got[0])).all()
  for g, r in zip(got[1], ref[1]):
    assert rel_err(g, r) < 2e-2


def gpu_only():
  if jax.default_backend() != 'gpu':
    pytest.skip('cuDNN and the Pallas GPU kernel need a GPU')


@pytest.mark.parametrize('kv_heads', [8, 2])
def test_cudnn_attention_matches_xla(kv_heads):
  gpu_only()
  compare('cudnn', *inputs(kv_heads), None)


@pytest.mark.parametrize('kv_heads,window', [(8, 0), (2, 0), (2, 192)])
def test_cudnn_packed_matches_xla(kv_heads, window):
  """Seven documents and padding in row 0 (within attention.max_segments), one in row 1."""
  gpu_only()
  seg = packed_segment_ids([300, 17, 200, 1, 150, 100, 200])
  assert attention.kernel('cudnn', dtype='bfloat16', head_dim=128, seq_len=L, packed=True,
                          sliding_window=window) == 'cudnn_packed', 'not Hopper or no packed API'
  compare('cudnn', *inputs(kv_heads), seg, window)


def test_cudnn_packed_rows_over_the_bound_are_still_right():
  """40 documents of 25 tokens: over max_segments(1024) = 16, so the lax.cond takes the Pallas
  kernel (with a window, the dense-mask cuDNN one); the result must be the same."""
  gpu_only()
  assert attention.max_segments(L) < 40
  seg = packed_segment_ids([25] * 40)
  compare('cudnn', *inputs(2), seg)
  compare('cudnn', *inputs(2), seg, window=100)


@pytest.mark.parametrize('kv_heads', [8, 2])
def test_pallas_matches_xla_on_gpu(kv_heads):
  gpu_only()
  compare('pallas', *inputs(kv_heads), packed_segment_ids([300, 17, 200, 1, 150, 100, 200]))


@pytest.mark.parametrize('kv_heads,window', [(8, 0), (2, 0), (1, 192)])
def test_splash_matches_xla_on_tpu(kv_heads, window):
  """TPU splash attention (model.attention=pallas on a TPU): MHA, GQA, and MQA with a window."""
  if jax.default_backend() != 'tpu':
    pytest.skip('splash attention compiles for a TPU (tests/test_attention.py runs it in '
                'interpret mode on the CPU)')
  assert attention.kernel('pallas', dtype='bfloat16', head_dim=128, seq_len=L, packed=True,
                          sliding_window=window) == 'splash'
  compare('pallas', *inputs(kv_heads), packed_segment_ids([300, 17, 200, 1, 150, 100, 200]),
          window)


def test_auto_attention_picks_cudnn_for_bf16_on_gpu():
  cfg = model_lib.ModelConfig(vocab_size=256, d_model=64, n_layers=1, n_heads=4, n_kv_heads=4,
                              head_dim=16, mlp_dim=128, dtype='bfloat16', attention='auto')

  def pick(cfg, packed):
    return attention.kernel(cfg.attention, dtype=cfg.dtype, head_dim=cfg.head_dim, seq_len=L,
                            packed=packed, sliding_window=cfg.sliding_window)
  on_gpu = jax.default_backend() == 'gpu'
  if jax.default_backend() == 'tpu':  # splash attention, whatever the dtype
    assert pick(cfg, False) == pick(cfg, True) == 'splash'
    return
  assert pick(cfg, False) == ('cudnn' if on_gpu else 'xla')
  hopper = on_gpu and attention._gpu_capability() >= (9, 0)
  assert pick(cfg, True) == ('cudnn_packed' if hopper else 'cudnn' if on_gpu else 'xla')
  assert pick(dataclasses.replace(cfg, dtype='float32'), True) == 'xla'


def bf16_train_losses():
  """test_train.run_steps (STEPS steps on one fixed batch, step 0 at lr 0) on one device with
  bfloat16 compute: (losses, trainer, final state)."""
  return run_steps({'data': 1, 'fsdp': 1, 'tensor': 1}, devices=jax.devices()[:1],
                   with_trainer=True, dtype='bfloat16')


@pytest.mark.also_on_cpu  # and, as every test here, accelerator
def test_bf16_train_step_learns_like_float32(single_device):
  """bfloat16 compute over float32 parameters: the loss falls on a batch it sees again and
  tracks the float32 run (`single_device`, conftest.py) within bfloat16's precision, without
  being the float32 run."""
  bf16, trainer, state = bf16_train_losses()
  f32 = single_device[0]
  # On CPU: 5.571, 5.571, 5.140 (float32: 5.571, 5.571, 5.138).
  assert np.all(np.isfinite(bf16)) and bf16[-1] < bf16[0] - 0.3
  np.testing.assert_allclose(bf16, f32, atol=0.01)
  assert not np.array_equal(bf16, f32)  # the compute dtype really changed
  # Parameters and AdamW moments stay float32; only the activations are bfloat16.
  assert {x.dtype for x in jax.tree.leaves(state['params'])} == {np.dtype('float32')}
  assert {x.dtype for x in jax.tree.leaves(state['opt_state']) if x.ndim} == {np.dtype('float32')}
  tokens = jnp.zeros((2, 8), jnp.int32)
  hidden = jax.eval_shape(lambda p: nnx.merge(trainer.graphdef, p).hidden(tokens), state['params'])
  assert hidden.dtype == jnp.bfloat16
