"""Llama-family decoder in Flax NNX.

Parameters carry logical axis names (see the sharding vocabulary in README.md); activations are
constrained at block boundaries. Layers are created stacked (one leading `layers` dim) and run
with a scan, so compile time does not grow with depth. Module and parameter names mirror Hugging
Face Llama (`embed_tokens`, `q_proj`, ..., `input_layernorm`, `norm`, `lm_head`), so checkpoint
conversion is a key table plus transposes and reshapes. RoPE rotates (first half, second half) like
HF's `rotate_half`, so HF weights need no q/k permutation. The few switches of the Llama-family
variants (q/k/v and output biases, q/k norm, sliding window, llama3 RoPE scaling) default off.

Shape suffixes: B batch, L length, D width, H query heads, K kv heads, G = H // K, Dh head width,
F mlp width, V vocab.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxllm import sharding

from jaxllm import attention as attention_lib

from jaxllm import fp8 as fp8_lib

REMAT_POLICIES = {
    'none': None,  # keep every activation (most memory, no recompute)
    'full': jax.checkpoint_policies.nothing_saveable,  # recompute the whole layer in backward
    # Save the outputs of weight matmuls (x @ W: no batch dims in dot_general terms) and recompute
    # attention scores, norms and elementwise ops: the usual best trade on accelerators.
    'save_dots': jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    'save_all_dots': jax.checkpoint_policies.checkpoint_dots,  # also keep attention matmuls
}
ATTENTION_IMPLS = attention_lib.IMPLEMENTATIONS
ROPE_SCALINGS = ('none', 'llama3')


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelConfig:
  """Shape and numerics of a decoder; mirrors the `model` section of the config."""

  vocab_size: int
  d_model: int
  n_layers: int
  n_heads: int
  n_kv_heads: int
  head_dim: int
  mlp_dim: int
  rope_theta: float = 10_000.0
  norm_eps: float = 1e-5
  tie_embeddings: bool = False
  init_std: float = 0.02  # normal init of every matrix; norms start at 1
  param_dtype: str = 'float32'  # storage dtype of parameters (and so of optimizer moments)
  dtype: str = 'float32'  # compute dtype of activations and matmuls; logits come out float32
  remat: str = 'none'  # key of REMAT_POLICIES
  scan_layers: bool = True  # False unrolls the layer loop (same math; for tests and profiling)
  attention: str = 'xla'  # attention kernel: 'xla', 'cudnn', 'pallas' or 'auto' (attention.py)
  attention_max_segments: int = 0  # packed cuDNN: documents per row it plans for; 0 = by length
  fp8: bool = False  # q/k/v/o and MLP matmuls in float8 (jaxllm/fp8.py); the head stays in dtype
  gather_in_compute_dtype: bool = False  # cast weights on their shards, so FSDP gathers dtype bytes
  # Switches of the Llama-family variants (see jaxllm/convert/hf.py); the defaults are plain Llama.
  qkv_bias: bool = False  # biases on q/k/v projections (Qwen2)
  o_bias: bool = False  # bias on the attention output projection (Llama/Qwen3 attention_bias)
  qk_norm: bool = False  # RMSNorm over head_dim on queries and keys before RoPE (Qwen3)
  sliding_window: int = 0  # see self and the sliding_window - 1 tokens before; 0 = all (Mistral)
  rope_scaling: str = 'none'  # ROPE_SCALINGS: 'llama3' stretches low frequencies (Llama 3.1+)
  rope_scaling_factor: float = 8.0  # llama3: how much the low frequencies are stretched
  rope_low_freq_factor: float = 1.0  # llama3: wavelengths above original_max / this are stretched
  rope_high_freq_factor: float = 4.0  # llama3: wavelengths below original_max / this are kept
  rope_original_max_len: int = 8192  # llama3: the context length of pre-training

  def __post_init__(self):
    if self.remat not in REMAT_POLICIES:
      raise ValueError(f'model.remat={self.remat!r}: choose one of {sorted(REMAT_POLICIES)}')
    if self.attention not in ATTENTION_IMPLS:
      raise ValueError(f'model.attention={self.attention!r}: choose one of {ATTENTION_IMPLS}')
    if self.attention_max_segments < 0:
      raise ValueError(f'model.attention_max_segments={self.attention_max_segments} must be >= 0 '
                       '(0 picks it from the sequence length)')
    if self.rope_scaling not in ROPE_SCALINGS:
      raise ValueError(f'model.rope_scaling={self.rope_scaling!r}: choose one of {ROPE_SCALINGS}')
    if not isinstance(self.fp8, bool):
      raise ValueError(f'model.fp8={self.fp8!r}: set it to True or False')
    if self.n_kv_heads < 1 or self.n_heads % self.n_kv_heads:
      raise ValueError(f'model.n_heads={self.n_heads} is not a multiple of '
                       f'model.n_kv_heads={self.n_kv_heads}')

  @classmethod
  def from_section(cls, model: Mapping[str, Any]) -> ModelConfig:
    """From a config's `model` section (a ConfigDict or dict). Keys a section lacks (a run saved
    before they were added) take the defaults above; a key that is not a field is an error."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(dict(model)) - names)
    if unknown:
      raise ValueError(f'model.{unknown[0]} is not a model setting; known: {sorted(names)}')
    return cls(**dict(model))

  def num_params(self) -> int:
    """Exact parameter count (embeddings and head included)."""
    d, f, v = self.d_model, self.mlp_dim, self.vocab_size
    attn = d * self.head_dim * (2 * self.n_heads + 2 * self.n_kv_heads)
    attn += self.qkv_bias * self.head_dim * (self.n_heads + 2 * self.n_kv_heads)
    attn += self.o_bias * d + self.qk_norm * 2 * self.head_dim
    per_layer = attn + 3 * d * f + 2 * d
    head = 0 if self.tie_embeddings else d * v
    return v * d + self.n_layers * per_layer + d + head


def flops_per_token(cfg: ModelConfig, seq_len: int, *, causal_half: bool = True) -> float:
  """Training FLOPs per token (forward + backward = 3x forward; a multiply-add counts 2).

  6 x (every matmul parameter: attention and MLP projections and the output head; the embedding
  lookup is a gather and does not count) + attention scores and values: 2 matmuls of
  L x Dh per head and layer, 12 x n_layers x n_heads x head_dim x L per token, halved when causal
  attention is counted as half (only the lower triangle is useful work). Remat recompute is not
  counted (MFU, not hardware FLOPs utilisation).
  """
  d = cfg.d_model
  matmul_params = cfg.n_layers * (d * cfg.head_dim * (2 * cfg.n_heads + 2 * cfg.n_kv_heads)
                                  + 3 * d * cfg.mlp_dim) + d * cfg.vocab_size
  attention = 12 * cfg.n_layers * cfg.n_heads * cfg.head_dim * seq_len
  return 6 * matmul_params + (attention / 2 if causal_half else attention)


def _param(rngs: nnx.Rngs, shape, names, cfg: ModelConfig, *, std=None, zeros=False) -> nnx.Param:
  """A parameter with logical axis names; `std=None` means ones (norm scales), `zeros` biases."""
  dtype = jnp.dtype(cfg.param_dtype)
  init = nnx.initializers.ones if std is None else nnx.initializers.normal(std)
  init = nnx.initializers.zeros if zeros else init
  # Layout comes from the jit's out_shardings (derived from these names), not from eager
  # placement, so the model can also be built with no mesh at all (tests, conversion).
  return nnx.Param(init(rngs.params(), shape, dtype), out_sharding=names, eager_sharding=False)


class RMSNorm(nnx.Module):

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, dim: int | None = None):
    self.weight = _param(rngs, (dim or cfg.d_model,), ('norm',), cfg)
    self.eps = cfg.norm_eps

  def __call__(self, x):
    # Normalise in float32 whatever the compute dtype, as HF does.
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    w = jax.lax.broadcast_to_rank(self.weight[...].astype(jnp.float32), y.ndim)  # [1, .., D]
    return (y * w).astype(x.dtype)


def rope_frequencies(cfg: ModelConfig) -> np.ndarray:
  """Inverse frequencies [Dh/2] float32, with cfg.rope_scaling applied."""
  half = cfg.head_dim // 2
  inv_freq = (1.0 / cfg.rope_theta ** (np.arange(half, dtype=np.float32) / half)).astype(np.float32)
  if cfg.rope_scaling == 'llama3':
    inv_freq = _llama3_scaling(inv_freq, cfg)
  return inv_freq


def _llama3_scaling(inv_freq, cfg: ModelConfig) -> np.ndarray:
  """Llama 3.1's context extension: wavelengths longer than the pre-training context / low
  factor are stretched by `factor`, shorter than context / high factor kept, those between
  interpolated smoothly (Meta's reference `apply_scaling`)."""
  old_len, factor = cfg.rope_original_max_len, cfg.rope_scaling_factor
  low, high = cfg.rope_low_freq_factor, cfg.rope_high_freq_factor
  wavelen = (2 * np.pi / inv_freq).astype(np.float32)
  scaled = np.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
  smooth = (old_len / wavelen - low) / (high - low)
  between = (wavelen >= old_len / high) & (wavelen <= old_len / low)
  out = np.where(between, (1 - smooth) * scaled / factor + smooth * scaled, scaled)
  return out.astype(np.float32)


def rope(x_BLNDh, positions_BL, theta: float, inv_freq_h=None):
  """Rotary embedding in HF's half-split layout: pairs are (i, i + Dh/2). `inv_freq_h` (from
  rope_frequencies) overrides the plain frequencies of `theta`."""
  half = x_BLNDh.shape[-1] // 2
  if inv_freq_h is None:
    inv_freq_h = 1.0 / theta ** (jnp.arange(half, dtype=jnp.float32) / half)
  angles_BLh = positions_BL[..., None].astype(jnp.float32) * inv_freq_h[None, None]
  sin, cos = jnp.sin(angles_BLh)[:, :, None, :], jnp.cos(angles_BLh)[:, :, None, :]
  x1, x2 = jnp.split(x_BLNDh.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x_BLNDh.dtype)


def _weight(param: nnx.Param, cfg: ModelConfig):
  """A weight in the compute dtype. With model.gather_in_compute_dtype the cast is pinned to the
  parameter's own (FSDP-sharded) layout, so the all-gather before its matmul moves compute-dtype
  bytes: half of float32's for bfloat16. The same values either way (a cast commutes with a
  gather); without the pin XLA gathers the float32 shards and casts after."""
  if hasattr(param, 'dequantize'):  # a frozen quantized base (jaxllm/quant.py QuantizedWeight)
    return param.dequantize(jnp.dtype(cfg.dtype))
  w = param[...].astype(jnp.dtype(cfg.dtype))
  if cfg.gather_in_compute_dtype and w.dtype != param.dtype:
    w = sharding.constrain(w, param.get_metadata()['out_sharding'])
  return w


def _adapted(module: nnx.Module, name: str, x, y, n_in: int = 1):
  """`y` (= x @ module.{name}) plus the low-rank update of the adapter jaxllm/lora.py attaches as
  `{name}_lora`, if there is one; the base weight is used as it is, never copied."""
  adapter = getattr(module, f'{name}_lora', None)
  return y if adapter is None else y + adapter(x, n_in=n_in).astype(y.dtype)


def _dense(x, w, n_in: int = 1, *, fp8: bool = False, **kwargs):
  """Contracts the last `n_in` dims of `x` with the first `n_in` of `w`, as one 2-D matrix
  product: [tokens, in] @ [in, out]. Same math as the einsum; XLA's CPU backend runs the backward
  of a plain 2-D product far faster than of a 3-D einsum (1.0 s vs 1.6 s for a 32000-way head at
  2,048 tokens here), and on GPU/TPU the reshapes are free. `fp8`: the product runs in float8
  with per-tensor scales (jaxllm/fp8.py)."""
  lead, out = x.shape[:x.ndim - n_in], w.shape[n_in:]
  k = math.prod(w.shape[:n_in])
  x_MK, w_KN = x.reshape(-1, k), w.reshape(k, -1)
  if fp8:
    if kwargs:
      raise TypeError(f'_dense(fp8=True) takes no jnp.matmul options; got {sorted(kwargs)}')
    y_MN = fp8_lib.matmul(x_MK, w_KN)
  else:
    y_MN = jnp.matmul(x_MK, w_KN, **kwargs)
  return y_MN.reshape(*lead, *out)


class Attention(nnx.Module):

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    d, h, k, dh = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    std = cfg.init_std
    self.q_proj = _param(rngs, (d, h, dh), ('embed', 'heads', 'head_dim'), cfg, std=std)
    self.k_proj = _param(rngs, (d, k, dh), ('embed', 'kv_heads', 'head_dim'), cfg, std=std)
    self.v_proj = _param(rngs, (d, k, dh), ('embed', 'kv_heads', 'head_dim'), cfg, std=std)
    self.o_proj = _param(rngs, (h, dh, d), ('heads', 'head_dim', 'embed'), cfg, std=std)
    # Variant parameters are created after the Llama ones, so plain Llama's init is unchanged.
    if cfg.qkv_bias:
      self.q_bias = _param(rngs, (h, dh), ('heads', 'head_dim'), cfg, zeros=True)
      self.k_bias = _param(rngs, (k, dh), ('kv_heads', 'head_dim'), cfg, zeros=True)
      self.v_bias = _param(rngs, (k, dh), ('kv_heads', 'head_dim'), cfg, zeros=True)
    if cfg.o_bias:
      self.o_bias = _param(rngs, (d,), ('embed',), cfg, zeros=True)
    if cfg.qk_norm:
      self.q_norm = RMSNorm(cfg, rngs=rngs, dim=dh)
      self.k_norm = RMSNorm(cfg, rngs=rngs, dim=dh)
    self.cfg = cfg

  def _project(self, x_BLD, name):
    """x @ {name}_proj (+ its bias), [B, L, heads, Dh] in the compute dtype."""
    dt = jnp.dtype(self.cfg.dtype)
    y = _dense(x_BLD, _weight(getattr(self, f'{name}_proj'), self.cfg), fp8=self.cfg.fp8)
    y = _adapted(self, f'{name}_proj', x_BLD, y)
    if self.cfg.qkv_bias:
      y = y + getattr(self, f'{name}_bias')[...].astype(dt)[None, None]  # [1, 1, heads, Dh]
    return y

  def _qkv(self, x_BLD, positions_BL):
    """Queries, keys and values [B, L, heads, Dh]: projected, q/k-normed, rotated, constrained."""
    cfg = self.cfg
    q, k, v = (self._project(x_BLD, name) for name in 'qkv')
    if cfg.qk_norm:
      q, k = self.q_norm(q), self.k_norm(k)
    inv_freq = rope_frequencies(cfg)
    q = sharding.constrain(rope(q, positions_BL, cfg.rope_theta, inv_freq),
                   ('batch', 'length', 'heads', 'head_dim'))
    k = sharding.constrain(rope(k, positions_BL, cfg.rope_theta, inv_freq),
                   ('batch', 'length', 'kv_heads', 'head_dim'))
    return q, k, sharding.constrain(v, ('batch', 'length', 'kv_heads', 'head_dim'))

  def _output(self, out_BLHDh):
    dt = jnp.dtype(self.cfg.dtype)
    out_BLD = _dense(out_BLHDh, _weight(self.o_proj, self.cfg), n_in=2, fp8=self.cfg.fp8)
    out_BLD = _adapted(self, 'o_proj', out_BLHDh, out_BLD, n_in=2)
    if self.cfg.o_bias:
      out_BLD = out_BLD + self.o_bias[...].astype(dt)[None, None]  # [1, 1, D]
    return out_BLD

  def __call__(self, x_BLD, positions_BL, segment_ids_BL):
    """`segment_ids_BL`: packed documents (0 = padding), or None for one document per row."""
    return self._output(self.heads(x_BLD, positions_BL, segment_ids_BL))

  def heads(self, x_BLD, positions_BL, segment_ids_BL):
    """Every head's output [B, L, H, Dh], before o_proj mixes them (pruning reads its norms)."""
    cfg = self.cfg
    q, k, v = self._qkv(x_BLD, positions_BL)
    return attention_lib.attend(q, k, v, segment_ids_BL, implementation=cfg.attention,
                                dtype=cfg.dtype, sliding_window=cfg.sliding_window,
                                max_segments_per_row=cfg.attention_max_segments)

  def decode(self, x_BTD, positions_BT, mask_B1TS, k_BSKDh, v_BSKDh, index):
    """T new tokens at cache slots [index, index + T): writes their keys and values into the
    cache, attends over all S slots under `mask_B1TS`; returns (out, k cache, v cache)."""
    q, k, v = self._qkv(x_BTD, positions_BT)
    names = ('batch', 'length', 'kv_heads', 'head_dim')
    k_BSKDh = sharding.constrain(jax.lax.dynamic_update_slice_in_dim(
        k_BSKDh, k.astype(k_BSKDh.dtype), index, axis=1), names)
    v_BSKDh = sharding.constrain(jax.lax.dynamic_update_slice_in_dim(
        v_BSKDh, v.astype(v_BSKDh.dtype), index, axis=1), names)
    # The mask carries causality, padding and the sliding window; XLA's kernel takes any mask.
    out_BTHDh = jax.nn.dot_product_attention(q, k_BSKDh, v_BSKDh, mask=mask_B1TS,
                                             implementation='xla')
    return self._output(out_BTHDh), k_BSKDh, v_BSKDh


class MLP(nnx.Module):

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    d, f, std = cfg.d_model, cfg.mlp_dim, cfg.init_std
    self.gate_proj = _param(rngs, (d, f), ('embed', 'mlp'), cfg, std=std)
    self.up_proj = _param(rngs, (d, f), ('embed', 'mlp'), cfg, std=std)
    self.down_proj = _param(rngs, (f, d), ('mlp', 'embed'), cfg, std=std)
    self.cfg = cfg

  def __call__(self, x_BLD):
    h_BLF = self.hidden(x_BLD)
    return _adapted(self, 'down_proj', h_BLF,
                    _dense(h_BLF, _weight(self.down_proj, self.cfg), fp8=self.cfg.fp8))

  def hidden(self, x_BLD):
    """silu(x @ gate) * (x @ up) [B, L, F]: down_proj's input (pruning reads its channels)."""
    fp8 = self.cfg.fp8
    gate_BLF = _adapted(self, 'gate_proj', x_BLD,
                        _dense(x_BLD, _weight(self.gate_proj, self.cfg), fp8=fp8))
    up_BLF = _adapted(self, 'up_proj', x_BLD,
                      _dense(x_BLD, _weight(self.up_proj, self.cfg), fp8=fp8))
    return sharding.constrain(jax.nn.silu(gate_BLF) * up_BLF, ('batch', 'length', 'mlp'))


class DecoderLayer(nnx.Module):

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.input_layernorm = RMSNorm(cfg, rngs=rngs)
    self.self_attn = Attention(cfg, rngs=rngs)
    self.post_attention_layernorm = RMSNorm(cfg, rngs=rngs)
    self.mlp = MLP(cfg, rngs=rngs)

  def __call__(self, x_BLD, positions_BL, segment_ids_BL):
    x_BLD = x_BLD + self.self_attn(self.input_layernorm(x_BLD), positions_BL, segment_ids_BL)
    x_BLD = x_BLD + self.mlp(self.post_attention_layernorm(x_BLD))
    return sharding.constrain(x_BLD, ('batch', 'length', 'embed'))

  def decode(self, x_BTD, positions_BT, mask_B1TS, k_BSKDh, v_BSKDh, index):
    attn_BTD, k_BSKDh, v_BSKDh = self.self_attn.decode(
        self.input_layernorm(x_BTD), positions_BT, mask_B1TS, k_BSKDh, v_BSKDh, index)
    x_BTD = x_BTD + attn_BTD
    x_BTD = x_BTD + self.mlp(self.post_attention_layernorm(x_BTD))
    return sharding.constrain(x_BTD, ('batch', 'length', 'embed')), k_BSKDh, v_BSKDh


class Llama(nnx.Module):
  """tokens [B, L] int -> logits [B, L, V] float32."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.embed_tokens = _param(rngs, (cfg.vocab_size, cfg.d_model), ('vocab', 'embed'), cfg,
                               std=cfg.init_std)

    @nnx.split_rngs(splits=cfg.n_layers)
    @nnx.vmap(in_axes=0, out_axes=0, transform_metadata={nnx.PARTITION_NAME: 'layers'})
    def make_layers(rngs):
      return DecoderLayer(cfg, rngs=rngs)

    self.layers = make_layers(rngs)  # every parameter gets a leading `layers` dim
    self.norm = RMSNorm(cfg, rngs=rngs)
    if not cfg.tie_embeddings:
      self.lm_head = _param(rngs, (cfg.d_model, cfg.vocab_size), ('embed', 'vocab'), cfg,
                            std=cfg.init_std)

  def __call__(self, tokens_BL, *, positions_BL=None, segment_ids_BL=None):
    return self.logits(self.hidden(tokens_BL, positions_BL=positions_BL,
                                   segment_ids_BL=segment_ids_BL))

  def hidden(self, tokens_BL, *, positions_BL=None, segment_ids_BL=None):
    """The final-normed hidden states [B, L, D] (compute dtype) that `logits` projects."""
    x_BLD = jnp.take(_weight(self.embed_tokens, self.cfg), tokens_BL, axis=0)
    return self.norm(self._stack(x_BLD, positions_BL, segment_ids_BL))

  def _stack(self, x_BLD, positions_BL, segment_ids_BL):
    cfg = self.cfg
    if positions_BL is None:
      positions_BL = jnp.broadcast_to(jnp.arange(x_BLD.shape[1]), x_BLD.shape[:2])
    x_BLD = sharding.constrain(x_BLD, ('batch', 'length', 'embed'))

    def body(x_BLD, layer: DecoderLayer):
      return layer(x_BLD, positions_BL, segment_ids_BL)

    policy = REMAT_POLICIES[cfg.remat]
    if cfg.remat != 'none':
      body = nnx.remat(body, prevent_cse=False, policy=policy)
    # unroll=True emits the layers as straight-line code: the same math, compile time grows
    # with depth. Scanned is the default.
    scan = nnx.scan(body, in_axes=(nnx.Carry, 0), out_axes=nnx.Carry,
                    unroll=1 if cfg.scan_layers else True,
                    transform_metadata={nnx.PARTITION_NAME: 'layers'})
    return scan(x_BLD, self.layers)

  def head_DV(self):
    """The output projection [D, V] in the compute dtype (the embedding's transpose if tied)."""
    if self.cfg.tie_embeddings:
      return _weight(self.embed_tokens, self.cfg).T
    return _weight(self.lm_head, self.cfg)

  def logits(self, x_BLD):
    """Normed hidden states [B, L, D] -> logits [B, L, V] in float32."""
    logits_BLV = _dense(x_BLD, self.head_DV(), preferred_element_type=jnp.float32)
    return sharding.constrain(logits_BLV, ('batch', 'length', 'vocab'))

  def decode(self, tokens_BT, cache: dict, *, index, starts_B):
    """Runs T new tokens per row against a KV cache from init_cache; returns (logits [B, T, V],
    the updated cache). Rows are left-padded: row b's first real token sits at cache slot
    starts_B[b], so its RoPE position at slot s is s - starts_B[b]. The new tokens take slots
    [index, index + T): the prompt is index 0 and T its padded length, then one token a step."""
    cfg = self.cfg
    S = cache['k'].shape[2]
    slots_T = index + jnp.arange(tokens_BT.shape[1])
    positions_BT = jnp.maximum(slots_T[None, :] - starts_B[:, None], 0)
    mask_B1TS = decode_mask(slots_T, starts_B, S, cfg.sliding_window)
    x_BTD = jnp.take(_weight(self.embed_tokens, cfg), tokens_BT, axis=0)
    x_BTD = sharding.constrain(x_BTD, ('batch', 'length', 'embed'))

    def body(x_BTD, layer: DecoderLayer, k_BSKDh, v_BSKDh):
      x_BTD, k_BSKDh, v_BSKDh = layer.decode(x_BTD, positions_BT, mask_B1TS, k_BSKDh, v_BSKDh,
                                             index)
      return x_BTD, (k_BSKDh, v_BSKDh)

    scan = nnx.scan(body, in_axes=(nnx.Carry, 0, 0, 0), out_axes=(nnx.Carry, 0),
                    unroll=1 if cfg.scan_layers else True,
                    transform_metadata={nnx.PARTITION_NAME: 'layers'})
    x_BTD, (k_cache, v_cache) = scan(x_BTD, self.layers, cache['k'], cache['v'])
    return self.logits(self.norm(x_BTD)), {'k': k_cache, 'v': v_cache}


def init_cache(cfg: ModelConfig, batch: int, length: int) -> dict:
  """Zero keys and values [layers, B, S, K, Dh] in the compute dtype for decode()."""
  shape = (cfg.n_layers, batch, length, cfg.n_kv_heads, cfg.head_dim)
  return {'k': jnp.zeros(shape, cfg.dtype), 'v': jnp.zeros(shape, cfg.dtype)}


CACHE_NAMES = ('layers', 'batch', 'length', 'kv_heads', 'head_dim')  # logical dims of a cache


def decode_mask(slots_T, starts_B, cache_len: int, sliding_window: int = 0):
  """[B, 1, T, S]: the query at slot i sees key slots j <= i from its row's first real token on
  (and, with a window, only the last `sliding_window`). A padding query sees itself, so that no
  softmax row is empty."""
  i_T1, j_1S = slots_T[:, None], jnp.arange(cache_len)[None, :]
  visible_BTS = (j_1S <= i_T1)[None] & (j_1S[None] >= starts_B[:, None, None])
  if sliding_window:
    visible_BTS &= (i_T1 - j_1S < sliding_window)[None]
  return (visible_BTS | (j_1S == i_T1)[None])[:, None]
