"""Causal self-attention kernels and their selection (`model.attention`).

Imports only `sharding` (the layout a Pallas call is split by).

Rows may pack several documents: `segment_ids` [B, L] numbers them 1, 2, ... along each row, and
id 0 marks padding (jaxllm/data.py packs this way; a segment is a run of equal ids, so documents
must be contiguous). A token attends to itself and earlier tokens of its own segment, and with a
sliding window only to the last `sliding_window` of them. What a padding token attends to is not
specified (every kernel gives a finite value; losses ignore padding).

Kernels, and what `model.attention` picks:

| kernel | packed rows reach it as | where it runs | picked by |
|---|---|---|---|
| `xla` | a dense [B, 1, L, L] boolean mask | everywhere (the reference) | 'xla'; the fallback |
| `cudnn` | a dense mask, turned into a [B, 1, L, L] bias by JAX | GPU, bf16/fp16 | 'cudnn'/'auto' (packed rows: below) |
| `cudnn_packed` | per-segment lengths and offsets (cuDNN's packed layout) | Hopper+ GPU | 'cudnn'/'auto' on packed rows |
| `pallas` | segment ids compared inside the kernel's tiles | GPU (Triton); interpret mode elsewhere | 'pallas' |
| `splash` | segment ids compared inside the kernel's tiles | TPU (Mosaic) | 'pallas'/'auto' on a TPU |

`cudnn_packed` calls JAX's internal cuDNN wrapper (`jax._src.cudnn.fused_attention_stablehlo`,
the same function `jax.nn.dot_product_attention` calls, which does not expose the packed layout):
the same signature in jax 0.10.2, 0.11.0 and JAX's main branch of 2026-08 (checked; the GPU
machine's 0.11.2 is checked when the wrapper is found at run time). Where it is missing, or the GPU is
older than Hopper (cuDNN's packed layout needs sm90), packed rows go to `cudnn` with the dense
mask. cuDNN's packed layout needs a static bound on segments per row, `max_segments`; a batch
with a row over it runs that step's attention in the Pallas kernel (with a window: the dense-mask
cuDNN one) through a `lax.cond`: slower, never wrong.

`splash` is JAX's TPU splash attention (jax.experimental.pallas.ops.tpu.splash_attention; the
same API in jax 0.10.2 and JAX's main branch of 2026-08, checked): one kernel per row (vmapped
over the batch) with a lazy causal mask, or a local one for model.sliding_window, and the row's
segment ids; GQA reads kv head h // (H // K) itself, without repeating k and v (one kv head: its
MQA kernel). It does not scale the logits, so q is scaled by 1/sqrt(head_dim) first. Its tiles
are 128 to 512 positions (a multiple of the TPU's 128 lanes dividing seq_len); other lengths
fall back to XLA. Like the GPU Pallas kernel it runs per device in a shard_map (XLA cannot
partition a Pallas call). The platform is the mesh's (`_platform`), so a TPU slice compiled
ahead of time on a CPU gets splash compiled by Mosaic, not interpret mode.
Each fallback is logged once with its reason.
"""

from __future__ import annotations

import functools
import inspect
import math

import jax
import jax.numpy as jnp
from absl import logging
from jax.sharding import PartitionSpec as P

from jaxllm import sharding

IMPLEMENTATIONS = ('xla', 'cudnn', 'pallas', 'auto')  # values of model.attention
KERNELS = ('xla', 'cudnn', 'cudnn_packed', 'pallas', 'splash')  # what `kernel` resolves to
SPLASH_MAX_BLOCK = 512  # longest splash tile (positions); the shortest is a TPU lane row, 128
_logged: set[str] = set()


def _log_once(level: int, message: str) -> None:
  if message not in _logged:
    _logged.add(message)
    logging.log(level, message)


def mask(segment_ids_BL):
  """[B, 1, L, L] mask of the XLA kernel: a token sees its own document, never padding (id 0).
  Causality and the window are added by the kernel."""
  if segment_ids_BL is None:
    return None
  same_BLL = segment_ids_BL[:, :, None] == segment_ids_BL[:, None, :]
  return (same_BLL & (segment_ids_BL[:, None, :] > 0))[:, None, :, :]


def max_segments(seq_len: int, configured: int = 0) -> int:
  """Segments per row the packed cuDNN kernel is compiled for (model.attention_max_segments):
  `configured`, or if 0, seq_len / 256 and at least 16.

  cuDNN treats each of the batch x max_segments slots as a sequence of up to seq_len tokens (its
  softmax statistics are [B x M, H, L] float32, 100 MB a layer for the 1B at batch 12 and M=16),
  so the bound should be small. Rows from jaxllm/data.py hold documents plus one padding run;
  Shakespeare documents are about 560 tokens (at 4096: about 7 documents and a padding run a row,
  at most 11 in `tools/benchmark.py --packed`). Rows over it are still right (module doc)."""
  return min(seq_len, configured or max(16, seq_len // 256))


def _segment_starts(segment_ids_BL):
  """[B, L] bool: where a run of equal ids (a document, or the padding) begins."""
  return jnp.concatenate([jnp.ones_like(segment_ids_BL[:, :1], bool),
                          segment_ids_BL[:, 1:] != segment_ids_BL[:, :-1]], axis=1)


def packed_layout(segment_ids_BL, num_segments: int):
  """Segment ids -> cuDNN's packed layout, inside the jit.

  A segment starts wherever the id changes (padding runs are segments too, so that cuDNN writes
  every output). Returns (seqlens [B, M] int32, offsets [B, M + 1] int32, count [B] int32):
  row b's segment i covers tokens [offsets[b, i], offsets[b, i] + seqlens[b, i]); unused entries
  are -1 (JAX's convention); count is the row's number of segments, which may exceed M (then
  the first two outputs are not valid for that row).
  """
  B, L = segment_ids_BL.shape
  starts_BL = _segment_starts(segment_ids_BL)
  count_B = starts_BL.sum(axis=1, dtype=jnp.int32)
  first_BM1 = jax.vmap(lambda s: jnp.nonzero(s, size=num_segments + 1, fill_value=L)[0])(starts_BL)
  first_BM1 = first_BM1.astype(jnp.int32)
  lengths_BM = first_BM1[:, 1:] - first_BM1[:, :-1]  # segment i ends where i + 1 starts, or at L
  col_M1 = jnp.arange(num_segments + 1)
  used_BM1 = col_M1[None, :] < count_B[:, None]
  seqlens_BM = jnp.where(used_BM1[:, :-1], lengths_BM, -1)
  offsets_BM1 = jnp.where(used_BM1, first_BM1, -1)
  return seqlens_BM, offsets_BM1, count_B


def _gpu_capability() -> tuple[int, int]:
  dev = jax.devices()[0]
  if dev.platform != 'gpu' or not hasattr(dev, 'compute_capability'):
    return (0, 0)
  return tuple(int(x) for x in str(dev.compute_capability).split('.')[:2])


@functools.cache
def _cudnn_internal():
  """JAX's internal cuDNN module if it has the packed-layout arguments, else None."""
  try:
    from jax._src.cudnn import fused_attention_stablehlo as fa
    params = inspect.signature(fa.dot_product_attention).parameters
  except (ImportError, AttributeError, ValueError, TypeError):
    return None
  needed = ('q_seqlen', 'kv_seqlen', 'q_offsets', 'kv_offsets', 'sliding_window_length')
  return fa if all(p in params for p in needed) and hasattr(fa, 'MaskType') else None


@functools.cache
def _packed_gqa_offsets_ok() -> bool:
  """jax <= 0.11.0 scales packed kv offsets by the query heads (fixed in jax commit be78ee0f,
  'Fix cuDNN packed-attention kv_offsets for GQA/MQA'); there GQA repeats the kv heads."""
  try:
    return 'N_kv' in inspect.getsource(_cudnn_internal()._fix_seqlen_offsets)
  except (AttributeError, OSError, TypeError):
    return False


def _pallas_tiles(head_dim: int, seq_len: int) -> bool:
  """Whether the Pallas (Triton) kernel can tile this shape: its blocks span head_dim whole (a
  power of two up to 256) and the sequence in blocks of at least 16."""
  return head_dim & (head_dim - 1) == 0 and head_dim <= 256 and _pallas_block(seq_len) >= 16


def _pallas_block(seq_len: int) -> int:
  """Tile length of the Pallas kernel: the largest power of two <= 128 dividing seq_len."""
  return math.gcd(seq_len, 128)


def _splash_block(seq_len: int) -> int:
  """Tile length of TPU splash attention: the largest multiple of 128 up to SPLASH_MAX_BLOCK
  dividing seq_len (splash's mask and segment-id tiles span whole lanes), or 0 if none does."""
  block = math.gcd(seq_len, SPLASH_MAX_BLOCK)
  return block if block % 128 == 0 else 0


def _platform() -> str:
  """The platform being traced for: the active mesh's devices' (a TPU slice compiled ahead of
  time on a CPU through libtpu is 'tpu'), else the default backend's."""
  device = getattr(jax.sharding.get_abstract_mesh(), 'abstract_device', None)
  return getattr(device, 'platform', None) or jax.default_backend()


def _backend() -> str:
  """The platform kernels are chosen for: `_platform`; tests replace it to choose as on a TPU
  (the kernels still run in interpret mode off one)."""
  return _platform()


def kernel(implementation: str, *, dtype: str, head_dim: int, seq_len: int, packed: bool,
           sliding_window: int = 0) -> str:
  """Resolves `model.attention` to the kernel that runs (one of KERNELS), logging a fallback once.

  Call at trace time: it reads the platform (`_platform`). `packed`: segment ids are given."""
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f'model.attention={implementation!r}: choose one of {IMPLEMENTATIONS}')
  backend = _backend()
  want = implementation
  if want == 'auto':
    want = 'pallas' if backend == 'tpu' else 'cudnn'
  if want == 'pallas' and backend == 'tpu':
    if _splash_block(seq_len):
      _log_once(logging.INFO, f'attention: TPU splash attention, {_splash_block(seq_len)}-position '
                              'tiles')
      return 'splash'
    _log_once(logging.WARNING, f'attention: XLA, not TPU splash attention: data.seq_len={seq_len} '
                               'is not a multiple of 128 (splash tiles the sequence in 128 to '
                               f'{SPLASH_MAX_BLOCK} positions)')
    return 'xla'
  if want == 'pallas':
    reasons = []
    if sliding_window:
      reasons.append(f'model.sliding_window={sliding_window} (the Pallas kernel has no window)')
    if not _pallas_tiles(head_dim, seq_len):
      reasons.append(f'model.head_dim={head_dim} / data.seq_len={seq_len}: the kernel tiles a '
                     'power-of-two head_dim (<= 256) and a multiple of 16 positions')
    if not reasons:
      if backend != 'gpu':
        _log_once(logging.WARNING, f'attention: Pallas flash attention in interpret mode on '
                                   f'{backend} (slow; meant for tests)')
      return 'pallas'
    _log_once(logging.WARNING, 'attention: XLA, not Pallas: ' + '; '.join(reasons))
    return 'xla'
  if want == 'cudnn':
    reasons = []
    if backend != 'gpu':
      reasons.append(f'backend is {backend}')
    if dtype not in ('bfloat16', 'float16'):
      reasons.append(f'model.dtype={dtype} (cuDNN needs bfloat16 or float16)')
    if head_dim % 8 or head_dim > 256:
      reasons.append(f'model.head_dim={head_dim} (cuDNN needs a multiple of 8, at most 256)')
    if reasons:
      level = logging.INFO if implementation == 'auto' else logging.WARNING
      _log_once(level, 'attention: XLA, not cuDNN flash attention: ' + '; '.join(reasons))
      return 'xla'
    if not packed:
      _log_once(logging.INFO, 'attention: cuDNN flash attention')
      return 'cudnn'
    reasons = []
    if _cudnn_internal() is None:
      reasons.append(f'jax {jax.__version__} has no packed-layout cuDNN wrapper')
    if _gpu_capability() < (9, 0):
      reasons.append(f'GPU compute capability {_gpu_capability()} < 9.0 (Hopper)')
    if reasons:
      _log_once(logging.WARNING, 'attention: cuDNN with a dense [B, 1, L, L] mask for packed '
                                 'rows, not the packed layout: ' + '; '.join(reasons))
      return 'cudnn'
    _log_once(logging.INFO, 'attention: cuDNN flash attention, packed layout')
    return 'cudnn_packed'
  return 'xla'


def attend(q_BLHDh, k_BLKDh, v_BLKDh, segment_ids_BL=None, *, implementation: str,
           dtype: str, sliding_window: int = 0, max_segments_per_row: int = 0):
  """Causal attention [B, L, H, Dh] (GQA when K < H: query head h reads kv head h // (H // K)).

  `segment_ids_BL` None means one document per row; `max_segments_per_row`: see max_segments."""
  B, L, H, Dh = q_BLHDh.shape
  packed = segment_ids_BL is not None
  name = kernel(implementation, dtype=dtype, head_dim=Dh, seq_len=L, packed=packed,
                sliding_window=sliding_window)
  if name == 'pallas':
    return _pallas(q_BLHDh, k_BLKDh, v_BLKDh, segment_ids_BL)
  if name == 'splash':
    return _per_shard(functools.partial(_splash_local, sliding_window=sliding_window),
                      q_BLHDh, k_BLKDh, v_BLKDh, segment_ids_BL)
  if name == 'cudnn_packed':
    return _cudnn_packed(q_BLHDh, k_BLKDh, v_BLKDh, segment_ids_BL, sliding_window,
                         max_segments_per_row)
  return _dense(q_BLHDh, k_BLKDh, v_BLKDh, segment_ids_BL, sliding_window, name)


def _dense(q, k, v, segment_ids_BL, sliding_window: int, name: str):
  """jax.nn.dot_product_attention; packed rows as a dense mask."""
  window = (sliding_window - 1, 0) if sliding_window else None
  return jax.nn.dot_product_attention(q, k, v, mask=mask(segment_ids_BL), is_causal=True,
                                      local_window_size=window, implementation=name)


def _cudnn_packed(q, k, v, segment_ids_BL, sliding_window: int, max_segments_per_row: int):
  fa = _cudnn_internal()
  B, L, H, Dh = q.shape
  if k.shape[2] != H and not _packed_gqa_offsets_ok():
    k, v = (jnp.repeat(x, H // x.shape[2], axis=2) for x in (k, v))

  def packed(num_segments, q, k, v):
    seqlens_BM, offsets_BM1, _ = packed_layout(segment_ids_BL, num_segments)
    return fa.dot_product_attention(
        q, k, v, q_seqlen=seqlens_BM, kv_seqlen=seqlens_BM, q_offsets=offsets_BM1,
        kv_offsets=offsets_BM1, scale=1.0 / math.sqrt(Dh),
        mask_type=fa.MaskType.PADDING_CAUSAL, sliding_window_length=sliding_window or None)

  M = max_segments(L, max_segments_per_row)
  if M >= L:
    return packed(L, q, k, v)
  # A row can hold up to L segments (1-token pieces), but planning for L would cost cuDNN
  # B x L x H x L float32 statistics. A batch with a row over M takes a kernel with no bound:
  # Pallas (small residuals), or with a window the dense-mask cuDNN. Rare, slower, never wrong.
  def unbounded(q, k, v):
    # Both branches of the cond compile: Pallas only where it can tile the shape.
    if not sliding_window and _pallas_tiles(Dh, L):
      return _pallas(q, k, v, segment_ids_BL)
    return _dense(q, k, v, segment_ids_BL, sliding_window, 'cudnn')

  most = jnp.max(_segment_starts(segment_ids_BL).sum(axis=1))
  return jax.lax.cond(most <= M, functools.partial(packed, M), unbounded, q, k, v)


def _per_shard(fn, q, k, v, segment_ids_BL):
  """Runs `fn` (a kernel XLA cannot partition: a Pallas call) on each device's rows and heads, as
  the active logical rules shard them; whole rows, since attention needs them. Without a mesh of
  several devices, just calls it."""
  mesh = jax.sharding.get_abstract_mesh()
  q_names = sharding.active_spec(('batch', 'length', 'heads', 'head_dim'))
  if mesh.empty or mesh.size == 1 or q_names is None:
    return fn(q, k, v, segment_ids_BL)
  batch, _, heads, _ = q_names
  kv_heads = sharding.active_spec(('batch', 'length', 'kv_heads', 'head_dim'))[2]
  if heads != kv_heads:  # query head h reads kv head h // G only if both split the same way
    heads = kv_heads = None
  q_spec, kv_spec = P(batch, None, heads, None), P(batch, None, kv_heads, None)
  if segment_ids_BL is None:
    return jax.shard_map(lambda q, k, v: fn(q, k, v, None), in_specs=(q_spec, kv_spec, kv_spec),
                         out_specs=q_spec, check_vma=False)(q, k, v)
  return jax.shard_map(fn, in_specs=(q_spec, kv_spec, kv_spec, P(batch, None)), out_specs=q_spec,
                       check_vma=False)(q, k, v, segment_ids_BL)


def _pallas(q, k, v, segment_ids_BL):
  return _per_shard(_pallas_local, q, k, v, segment_ids_BL)


def _pallas_local(q, k, v, segment_ids_BL):
  from jax.experimental.pallas.ops.gpu import attention as pallas_attention
  B, L, H, Dh = q.shape
  if k.shape[2] != H:  # the kernel reads one kv head per query head
    k, v = (jnp.repeat(x, H // x.shape[2], axis=2) for x in (k, v))
  block = _pallas_block(L)
  bwd = min(block, 32)
  sizes = pallas_attention.BlockSizes(block_q=block, block_k=block, block_q_dkv=bwd,
                                      block_kv_dkv=bwd, block_q_dq=bwd, block_kv_dq=bwd)
  if segment_ids_BL is not None:
    segment_ids_BL = segment_ids_BL.astype(jnp.int32)
  return pallas_attention.mha(q, k, v, segment_ids_BL, sm_scale=1.0 / math.sqrt(Dh), causal=True,
                              block_sizes=sizes, interpret=_platform() != 'gpu')


def _splash_local(q_BLHDh, k_BLKDh, v_BLKDh, segment_ids_BL, *, sliding_window: int):
  """TPU splash attention on one device's rows and heads; interpret mode off a TPU (tests)."""
  from jax.experimental.pallas.ops.tpu import splash_attention as splash
  B, L, H, Dh = q_BLHDh.shape
  K = k_BLKDh.shape[2]
  block = _splash_block(L)
  sizes = splash.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block,
                            block_q_dkv=block, block_kv_dkv=block, block_kv_dkv_compute=block,
                            block_q_dq=block, block_kv_dq=block)
  # Lazy masks: computed tile by tile from positions, and whole tiles above the diagonal (or
  # outside the window) are skipped. LocalMask's left size counts the earlier tokens seen.
  causal = (splash.LocalMask((L, L), window_size=(sliding_window - 1, 0), offset=0)
            if sliding_window else splash.CausalMask((L, L)))
  make = splash.make_splash_mqa if K == 1 else splash.make_splash_mha
  run = make(splash.MultiHeadMask([causal] * H), block_sizes=sizes, head_shards=1, q_seq_shards=1,
             interpret=_platform() != 'tpu')
  q_BHLDh = (q_BLHDh * (1.0 / math.sqrt(Dh))).astype(q_BLHDh.dtype).transpose(0, 2, 1, 3)
  if K == 1:  # MQA: k and v [B, L, Dh]
    k, v = k_BLKDh[:, :, 0], v_BLKDh[:, :, 0]
  else:
    k, v = k_BLKDh.transpose(0, 2, 1, 3), v_BLKDh.transpose(0, 2, 1, 3)
  if segment_ids_BL is None:
    out_BHLDh = jax.vmap(run)(q_BHLDh, k, v)
  else:
    # Padding (id 0) attends to padding: finite, and never seen by a document's token.
    seg_BL = segment_ids_BL.astype(jnp.int32)
    out_BHLDh = jax.vmap(lambda q, k, v, s: run(q, k, v, segment_ids=splash.SegmentIds(s, s)))(
        q_BHLDh, k, v, seg_BL)
  return out_BHLDh.transpose(0, 2, 1, 3)
