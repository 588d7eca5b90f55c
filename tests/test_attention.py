"""Attention kernels against a written-out reference: MHA, GQA, sliding windows, packed rows,
forward and gradient; the packed layout cuDNN gets; which kernel `model.attention` picks.

The Pallas kernel runs in interpret mode here (the same kernel code the GPU compiles). The cuDNN
kernels need a GPU: tests/test_accelerator.py compares them with the same reference there.

Tolerance: everything is float32 with inputs of unit scale. The kernels differ from the reference
only in summation order and in the softmax's form (Pallas: an online softmax in base 2), each a
few float32 roundings (~6e-8 relative) per term over at most 64 terms; measured differences are
at most 3e-7 on outputs and 2e-6 on gradients (whose entries reach 6), so 2e-5 absolute catches any
masking error, which moves values by O(0.1), and leaves 10x room for another XLA's fusions.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxllm import attention
from jaxllm import model as model_lib

B, L, H, DH = 2, 64, 4, 16
ATOL = 2e-5


def reference(q, k, v, segment_ids=None, window=0):
  """Causal softmax attention written out in float32, kv heads repeated to the query heads."""
  g = q.shape[2] // k.shape[2]
  k, v = jnp.repeat(k, g, axis=2), jnp.repeat(v, g, axis=2)
  logits = jnp.einsum('bqhd,bkhd->bhqk', q, k) / np.sqrt(q.shape[-1])
  n = q.shape[1]
  i, j = np.arange(n)[:, None], np.arange(n)[None, :]
  visible = np.broadcast_to(j <= i, (q.shape[0], n, n))
  if window:
    visible = visible & (i - j < window)
  if segment_ids is not None:
    visible = visible & (segment_ids[:, :, None] == segment_ids[:, None, :])
  logits = jnp.where(visible[:, None], logits, -1e30)
  return jnp.einsum('bhqk,bkhd->bqhd', jax.nn.softmax(logits, axis=-1), v)


def packed_rows(doc_lengths=(20, 30, 9), length=L):
  """Row 0: documents of `doc_lengths` tokens, then padding (64: 20, 30, 9 and 5 of padding);
  row 1: one of `length`."""
  seg = np.zeros((B, length), np.int32)
  ends = np.cumsum(doc_lengths)
  for i, (start, end) in enumerate(zip(ends - doc_lengths, ends)):
    seg[0, start:end] = i + 1
  seg[1] = 1
  return seg


def qkv(kv_heads, seed=0, length=L):
  keys = jax.random.split(jax.random.key(seed), 4)
  q = jax.random.normal(keys[0], (B, length, H, DH))
  k = jax.random.normal(keys[1], (B, length, kv_heads, DH))
  v = jax.random.normal(keys[2], (B, length, kv_heads, DH))
  return q, k, v, jax.random.normal(keys[3], (B, length, H, DH))


def value_and_grads(fn, q, k, v, ct):
  out, vjp = jax.vjp(fn, q, k, v)
  return out, vjp(ct)


@pytest.mark.parametrize('implementation,kv_heads,window', [
    ('xla', 4, 0), ('xla', 2, 0), ('xla', 1, 0), ('xla', 2, 24),
    ('pallas', 4, 0), ('pallas', 2, 0)])
def test_kernel_matches_reference(implementation, kv_heads, window):
  check_against_reference(implementation, kv_heads, window, packed_rows())


@pytest.fixture
def as_on_tpu(monkeypatch):
  """Kernels chosen as on a TPU, so 'pallas' is splash attention, which runs here in interpret
  mode (the kernel code Mosaic compiles on a TPU). Tiles of 128 positions: rows of 256 span two,
  so splash's tile skipping (whole tiles above the diagonal or outside the window) runs too."""
  monkeypatch.setattr(attention, '_backend', lambda: 'tpu')
  monkeypatch.setattr(attention, 'SPLASH_MAX_BLOCK', 128)


SPLASH_L = 256
SPLASH_DOCS = (100, 90, 40)  # the second crosses the tile boundary at 128; 26 of padding


@pytest.mark.parametrize('kv_heads,window', [(4, 0), (2, 0), (1, 40)])
def test_splash_matches_reference(as_on_tpu, kv_heads, window):
  """MHA, GQA (two query heads a kv head), and MQA (splash's own kernel) with a sliding window."""
  assert attention.kernel('pallas', dtype='float32', head_dim=DH, seq_len=SPLASH_L, packed=True,
                          sliding_window=window) == 'splash'
  check_against_reference('pallas', kv_heads, window, packed_rows(SPLASH_DOCS, SPLASH_L))


def check_against_reference(implementation, kv_heads, window, seg):
  """Unpacked and packed rows, output and gradients; padding queries get a zero cotangent (their
  output is unspecified), so every gradient must match, padding keys and values included."""
  q, k, v, ct = qkv(kv_heads, length=seg.shape[1])
  ct_packed = ct * (seg > 0)[:, :, None, None]

  @jax.jit
  def both(q, k, v):
    def run(segment_ids):
      return lambda q, k, v: attention.attend(q, k, v, segment_ids, implementation=implementation,
                                              dtype='float32', sliding_window=window)
    return (value_and_grads(run(None), q, k, v, ct),
            value_and_grads(run(jnp.asarray(seg)), q, k, v, ct_packed))

  (out, grads), (out_p, grads_p) = both(q, k, v)
  ref, ref_grads = value_and_grads(lambda q, k, v: reference(q, k, v, window=window), q, k, v, ct)
  ref_p, ref_grads_p = value_and_grads(lambda q, k, v: reference(q, k, v, seg, window), q, k, v,
                                       ct_packed)
  np.testing.assert_allclose(out, ref, atol=ATOL)
  real = seg > 0
  np.testing.assert_allclose(np.asarray(out_p)[real], np.asarray(ref_p)[real], atol=ATOL)
  assert np.isfinite(np.asarray(out_p)).all()
  for got, want in zip(grads + grads_p, ref_grads + ref_grads_p):
    np.testing.assert_allclose(got, want, atol=ATOL)
  # The packed result really differs from the unpacked one (the mask is not a no-op).
  later_docs = real[0] & (seg[0] > 1)
  assert np.abs(np.asarray(out_p)[0, later_docs] - np.asarray(out)[0, later_docs]).max() > 0.1


def test_packed_layout_matches_a_loop():
  M = 4
  seg = np.array([
      [1, 1, 1, 2, 2, 3, 0, 0],  # three documents and padding: four segments
      [1, 1, 1, 1, 1, 1, 1, 1],  # one
      [0, 0, 0, 0, 0, 0, 0, 0],  # only padding (a whole padding row of the eval split)
      [1, 2, 3, 4, 5, 6, 6, 0],  # seven: over M
  ], np.int32)
  seqlens, offsets, count = jax.jit(attention.packed_layout, static_argnums=1)(seg, M)
  assert seqlens.shape == (4, M) and offsets.shape == (4, M + 1)
  assert seqlens.dtype == offsets.dtype == jnp.int32
  np.testing.assert_array_equal(count, [4, 1, 1, 7])
  for b in range(3):
    starts = [i for i in range(seg.shape[1]) if i == 0 or seg[b, i] != seg[b, i - 1]]
    ends = starts[1:] + [seg.shape[1]]
    want_len = [e - s for s, e in zip(starts, ends)] + [-1] * (M - len(starts))
    np.testing.assert_array_equal(seqlens[b], want_len)
    np.testing.assert_array_equal(offsets[b], starts + [-1] * (M + 1 - len(starts)))
    assert seqlens[b][seqlens[b] > 0].sum() == seg.shape[1]  # every token is in one segment


def test_max_segments_bound():
  assert attention.max_segments(4096) == 16 and attention.max_segments(8192) == 32
  assert attention.max_segments(256) == 16 and attention.max_segments(8) == 8
  assert attention.max_segments(4096, 12) == 12 and attention.max_segments(8, 12) == 8
  with pytest.raises(ValueError, match='model.attention_max_segments=-1'):
    model_lib.ModelConfig(vocab_size=8, d_model=8, n_layers=1, n_heads=1, n_kv_heads=1,
                          head_dim=8, mlp_dim=8, attention_max_segments=-1)


@pytest.mark.parametrize('window', [0, 24])
def test_cudnn_packed_path_traces_with_its_fallback(monkeypatch, window):
  """The cuDNN packed path cannot run on a CPU, but its gradient traces here once JAX's GPU
  checks are stubbed: JAX's own argument checks (shapes, dtypes, ranks of the seqlens and offsets)
  pass, cuDNN sees B x max_segments sequences, and the lax.cond's other branch is the Pallas
  kernel (with a window: the dense-mask cuDNN kernel)."""
  fa = attention._cudnn_internal()
  if fa is None:
    pytest.skip(f'jax {jax.__version__} has no packed-layout cuDNN wrapper (the dense mask is used)')
  monkeypatch.setattr(fa, 'check_cudnn_version', lambda: 91000)
  monkeypatch.setattr(fa, 'check_compute_capability', lambda capability: True)
  monkeypatch.setattr(fa, 'is_cuda_compute_capability_equal', lambda capability: False)
  q, k, v, _ = (x.astype(jnp.bfloat16) for x in qkv(2))
  seg = jnp.asarray(packed_rows())

  def loss(q, k, v):
    out = attention._cudnn_packed(q, k, v, seg, window, 4)
    return out.astype(jnp.float32).sum()
  text = str(jax.make_jaxpr(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v))
  assert 'cond[' in text and 'dot_product_attention_bwd_wrapper' in text
  assert f'f32[{B * 4},{H},{L}]' in text  # softmax statistics of B x M sequences
  assert ('pallas_call' in text) == (window == 0)


@pytest.mark.parametrize('implementation,window,packed,expected', [
    ('xla', 0, True, 'xla'), ('auto', 0, True, 'xla'), ('cudnn', 0, False, 'xla'),
    ('pallas', 0, True, 'pallas'), ('pallas', 8, True, 'xla')])
def test_kernel_choice_on_cpu(implementation, window, packed, expected):
  assert jax.default_backend() == 'cpu'
  assert attention.kernel(implementation, dtype='bfloat16', head_dim=64, seq_len=256,
                          packed=packed, sliding_window=window) == expected


@pytest.mark.parametrize('implementation,seq_len,window,expected', [
    ('pallas', 256, 0, 'splash'), ('auto', 4096, 0, 'splash'), ('auto', 4096, 512, 'splash'),
    ('pallas', 200, 0, 'xla'), ('cudnn', 256, 0, 'xla'), ('xla', 256, 0, 'xla')])
def test_kernel_choice_on_tpu(monkeypatch, implementation, seq_len, window, expected):
  """On a TPU 'pallas' and 'auto' are splash attention (windows included) where it tiles the
  sequence (a multiple of 128), else XLA with the reason logged; cuDNN is XLA there."""
  logged = []
  monkeypatch.setattr(attention, '_backend', lambda: 'tpu')
  monkeypatch.setattr(attention, '_logged', set())
  monkeypatch.setattr(attention.logging, 'log', lambda level, msg: logged.append(msg))
  assert attention.kernel(implementation, dtype='bfloat16', head_dim=64, seq_len=seq_len,
                          packed=True, sliding_window=window) == expected
  if implementation == 'pallas' and expected == 'xla':
    assert logged == ['attention: XLA, not TPU splash attention: data.seq_len=200 is not a '
                      'multiple of 128 (splash tiles the sequence in 128 to 512 positions)']
  assert attention._splash_block(4096) == 512 and attention._splash_block(384) == 128


def test_kernel_choice_logs_the_fallback_once(monkeypatch):
  logged = []
  monkeypatch.setattr(attention, '_logged', set())
  monkeypatch.setattr(attention.logging, 'log', lambda level, msg: logged.append(msg))
  for _ in range(3):
    attention.kernel('pallas', dtype='float32', head_dim=16, seq_len=100, packed=True)
  assert logged == ['attention: XLA, not Pallas: model.head_dim=16 / data.seq_len=100: the kernel '
                    'tiles a power-of-two head_dim (<= 256) and a multiple of 16 positions']
  # A head_dim the Triton kernel cannot tile (cuDNN could) is a fallback too, whatever the length.
  assert attention.kernel('pallas', dtype='float32', head_dim=48, seq_len=128, packed=True) == 'xla'
  assert attention.kernel('pallas', dtype='float32', head_dim=64, seq_len=128,
                          packed=True) == 'pallas'  # interpret mode off the GPU
  with pytest.raises(ValueError, match=r"model.attention='flash'"):
    attention.kernel('flash', dtype='float32', head_dim=16, seq_len=64, packed=False)


def test_model_with_pallas_matches_xla_on_packed_rows():
  """The whole decoder (GQA, packed rows with positions restarting per document) gives the same
  logits and gradients with the Pallas kernel as with XLA's."""
  cfg = model_lib.ModelConfig(vocab_size=128, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                              head_dim=8, mlp_dim=64)
  seg = jnp.asarray(packed_rows()[:, :32])
  pos = jnp.asarray(np.stack([np.r_[np.arange(20), np.arange(12)], np.arange(32)]))
  tokens = jax.random.randint(jax.random.key(1), (2, 32), 0, 128)

  def loss_and_grads(impl):
    graphdef, state = nnx.split(model_lib.Llama(dataclasses.replace(cfg, attention=impl),
                                                rngs=nnx.Rngs(0)))

    def loss(state):
      logits = nnx.merge(graphdef, state)(tokens, positions_BL=pos, segment_ids_BL=seg)
      return jnp.sum(jnp.where(seg[..., None] > 0, logits, 0.0) ** 2) / 1e3
    return jax.jit(jax.value_and_grad(loss))(state)

  (lx, gx), (lp, gp) = loss_and_grads('xla'), loss_and_grads('pallas')
  np.testing.assert_allclose(lp, lx, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(gp), jax.tree.leaves(gx)):
    np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize('kernel', ['pallas', 'splash'])
def test_pallas_runs_per_device_shard_on_a_mesh(request, kernel):
  """On a mesh the Pallas call (the GPU kernel, or TPU splash) runs inside shard_map over the rows
  and heads the logical rules shard (XLA cannot partition it): the same values as the reference,
  and the batch really is split (each device holds 1 of the 2 rows, 2 of the 4 query heads and 1
  of the 2 kv heads: splash runs its MQA kernel there)."""
  from jaxllm import config as config_lib, sharding
  if kernel == 'splash':
    request.getfixturevalue('as_on_tpu')
  length = SPLASH_L if kernel == 'splash' else L
  mesh = jax.make_mesh((2, 1, 2), ('data', 'fsdp', 'tensor'),
                       axis_types=(jax.sharding.AxisType.Auto,) * 3, devices=jax.devices()[:4])
  q, k, v, ct = qkv(2, length=length)
  seg = packed_rows(SPLASH_DOCS, length) if kernel == 'splash' else packed_rows()
  ct = ct * (seg > 0)[:, :, None, None]
  shapes = []

  def f(q, k, v):
    out = attention.attend(q, k, v, jnp.asarray(seg), implementation='pallas', dtype='float32')
    return out
  name = f'_{kernel}_local'
  local = getattr(attention, name)
  with sharding.activate(mesh, config_lib.DEFAULT_RULES):
    with pytest.MonkeyPatch.context() as mp:
      mp.setattr(attention, name,
                 lambda q, k, *a, **kw: shapes.append((q.shape, k.shape)) or local(q, k, *a, **kw))
      out, grads = jax.jit(lambda q, k, v: value_and_grads(f, q, k, v, ct))(q, k, v)
  assert shapes[0] == ((1, length, 2, DH), (1, length, 1, DH))
  ref, ref_grads = value_and_grads(lambda q, k, v: reference(q, k, v, seg), q, k, v, ct)
  real = seg > 0
  np.testing.assert_allclose(np.asarray(out)[real], np.asarray(ref)[real], atol=ATOL)
  for got, want in zip(grads, ref_grads):
    np.testing.assert_allclose(got, want, atol=ATOL)


def test_splash_compiles_for_a_tpu_slice_through_libtpu():
  """On a mesh of TPU devices (a v5e-8 slice, compiled on this CPU through libtpu) 'pallas' is
  splash, chosen from the mesh's platform, and Mosaic compiles it: its forward and both backward
  kernels are TPU custom calls in the HLO, with no interpret-mode loop left."""
  pytest.importorskip('libtpu', reason="libtpu is not installed (pip install 'jax[tpu]' in a "
                      'separate venv: it makes JAX look for TPUs); the TPU compile needs it')
  from jaxllm import aot, config as config_lib, sharding
  devices = aot.topology_devices('v5e-8')
  mesh = jax.sharding.Mesh(np.array(devices[:4]).reshape(2, 1, 2), ('data', 'fsdp', 'tensor'),
                           axis_types=(jax.sharding.AxisType.Auto,) * 3)
  q_spec = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(('data', 'fsdp'), None,
                                                                       'tensor'))
  q = jax.ShapeDtypeStruct((2, 512, 4, 64), jnp.bfloat16, sharding=q_spec)
  kv = jax.ShapeDtypeStruct((2, 512, 2, 64), jnp.bfloat16, sharding=q_spec)
  seg = jax.ShapeDtypeStruct((2, 512), jnp.int32, sharding=jax.sharding.NamedSharding(
      mesh, jax.sharding.PartitionSpec(('data', 'fsdp'))))

  def loss(q, k, v, seg):
    out = attention.attend(q, k, v, seg, implementation='pallas', dtype='bfloat16')
    return out.astype(jnp.float32).sum()
  with sharding.activate(mesh, config_lib.DEFAULT_RULES):
    lowered = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(q, kv, kv, seg)
  text = lowered.compile().as_text()
  assert text.count('custom_call_target="tpu_custom_call"') == 3
  for name in ('fwd', 'dq', 'dkv'):
    assert f'splash_mqa_{name}_segmented' in text  # one kv head a device
