"""LoRA and QLoRA: low-rank adapters on a frozen (optionally quantized) base, as a model transform.

An adapter on projection W (x @ W, W [*in, *out]) adds scale x (x @ A) @ B with A [*in, r],
B [r, *out] and scale = alpha / r (PEFT's convention, so adapters move between the two unchanged).
A starts uniform in +-1/sqrt(fan_in) (PEFT's kaiming-uniform default), B at zero, so a fresh
adapter leaves the model's output exactly as the base's. Dropout, if any, is applied to the
adapter's input only.

The choices:
- Adapters are created stacked along the scanned `layers` dim (nnx.vmap, like the layers
  themselves) and attached to the stacked layer modules as `{projection}_lora`; model.py's
  `_adapted` adds their update inside the scan body, next to the base matmul, which reads the base
  weight as it is: nothing is copied or restacked (Qwix's interception rebuilds the stack per
  adapter; see jaxllm/quant.py for why it is not used). Their dims carry the base weight's
  logical names (the rank dim none), so the one rules table shards them like their base.
- The trainable/frozen split is by path (a `*_lora` key); the trainer keeps the two halves apart
  (`split`, `join`), so gradients and optimizer state exist for adapters only.
- The base may be stored in another dtype (`base_dtype`) or quantized (`quantize`: the seven
  projections of every layer as quant.QuantizedWeight, dequantized per layer inside the scan);
  embeddings, norms and the head stay in `base_dtype`. Adapters are float32 whatever the base.
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

from jaxllm import model as model_lib
from jaxllm import quant

# Target name -> (the layer's submodule, its weight, how many leading dims of the weight are input).
TARGETS = {
    'q': ('self_attn', 'q_proj', 1), 'k': ('self_attn', 'k_proj', 1),
    'v': ('self_attn', 'v_proj', 1), 'o': ('self_attn', 'o_proj', 2),
    'gate': ('mlp', 'gate_proj', 1), 'up': ('mlp', 'up_proj', 1), 'down': ('mlp', 'down_proj', 1),
}
QUANTIZE = ('none', *quant.FORMATS)
BASE_DTYPES = ('', 'float32', 'bfloat16')
SUFFIX = '_lora'  # the attribute (and params key) of a projection's adapter


def parse_targets(targets) -> tuple[str, ...]:
  """lora.targets as a tuple of names: a flag's 'q,v' (which ml_collections keeps as ('q,v',))
  and ('q', 'v') alike."""
  items = (targets,) if isinstance(targets, str) else tuple(targets)
  return tuple(t.strip() for item in items for t in str(item).split(',') if t.strip())


@dataclasses.dataclass(frozen=True, kw_only=True)
class LoraConfig:
  """Mirrors the config's `lora` section; rank 0 means no adapters (a full fine-tune)."""

  rank: int = 0
  alpha: float = 16.0
  dropout: float = 0.0
  targets: tuple[str, ...] = tuple(TARGETS)
  base_dtype: str = ''  # '' = model.param_dtype
  quantize: str = 'none'  # QUANTIZE: the frozen base's seven projections
  group_size: int = 64  # rows of W per 4-bit scale

  def __post_init__(self):
    object.__setattr__(self, 'targets', parse_targets(self.targets))
    unknown = [t for t in self.targets if t not in TARGETS]
    if unknown or not self.targets:
      raise ValueError(f'lora.targets: {", ".join(map(repr, unknown)) or "none given"}; choose '
                       f'among {", ".join(TARGETS)} (--config.lora.targets=q,v)')
    ranges = {'rank': (self.rank >= 0, '>= 0'), 'alpha': (self.alpha > 0, '> 0'),
              'dropout': (0 <= self.dropout < 1, 'in [0, 1)')}
    for key, (ok, allowed) in ranges.items():
      if not ok:
        raise ValueError(f'lora.{key}={getattr(self, key)} must be {allowed}')
    if self.quantize not in QUANTIZE:
      raise ValueError(f'lora.quantize={self.quantize!r}: choose one of {QUANTIZE}')
    if self.base_dtype not in BASE_DTYPES:
      raise ValueError(f'lora.base_dtype={self.base_dtype!r}: choose one of {BASE_DTYPES}')

  @classmethod
  def from_section(cls, section: Mapping[str, Any]) -> LoraConfig:
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in dict(section).items() if k in names})

  @property
  def enabled(self) -> bool:
    return self.rank > 0

  @property
  def scale(self) -> float:
    return self.alpha / self.rank

  def base_model_config(self, cfg: model_lib.ModelConfig) -> model_lib.ModelConfig:
    """The base's ModelConfig: parameters stored in `base_dtype`."""
    return dataclasses.replace(cfg, param_dtype=self.base_dtype or cfg.param_dtype)


class DropoutKey(nnx.Variable):
  """A per-layer PRNG key for adapter dropout, set inside the train step only (set_dropout)."""


class Adapter(nnx.Module):
  """A [*in, r], B [r, *out]; `__call__(x)` is scale x (x @ A) @ B in x's dtype."""

  def __init__(self, *, in_shape: tuple[int, ...], out_shape: tuple[int, ...], names: tuple,
               n_in: int, rank: int, scale: float, dropout: float, rngs: nnx.Rngs):
    bound = 1.0 / math.sqrt(math.prod(in_shape))
    a = jax.random.uniform(rngs.params(), (*in_shape, rank), jnp.float32, -bound, bound)
    self.a = nnx.Param(a, out_sharding=(*names[:n_in], None), eager_sharding=False)
    self.b = nnx.Param(jnp.zeros((rank, *out_shape), jnp.float32),
                       out_sharding=(None, *names[n_in:]), eager_sharding=False)
    self.scale, self.dropout = scale, dropout

  def __call__(self, x, *, n_in: int = 1):
    dt = x.dtype
    key = getattr(self, 'dropout_key', None)
    if self.dropout and key is not None:
      keep = jax.random.bernoulli(key[...], 1.0 - self.dropout, x.shape)
      x = jnp.where(keep, x / (1.0 - self.dropout), jnp.zeros_like(x)).astype(dt)
    a, b = self.a[...].astype(dt), self.b[...].astype(dt)
    lead, rank = x.shape[:x.ndim - n_in], a.shape[-1]
    h = jnp.matmul(x.reshape(-1, a.size // rank), a.reshape(-1, rank))
    y = jnp.matmul(h, b.reshape(rank, -1)) * jnp.asarray(self.scale, dt)
    return y.reshape(*lead, *b.shape[1:])


def _weight_of(model: model_lib.Llama, target: str):
  sub, name, n_in = TARGETS[target]
  return getattr(model.layers, sub), name, n_in


def attach(model: model_lib.Llama, lcfg: LoraConfig, *, rngs: nnx.Rngs) -> None:
  """Adds one stacked adapter per target to `model` (in place), shaped and named after the
  stacked base weight it adapts."""
  n_layers = model.cfg.n_layers
  for target in lcfg.targets:
    module, name, n_in = _weight_of(model, target)
    param = getattr(module, name)
    shape, names = param.shape[1:], tuple(param.get_metadata()['out_sharding'])[1:]
    make = _stacked(n_layers, lambda rngs, shape=shape, names=names, n_in=n_in: Adapter(
        in_shape=shape[:n_in], out_shape=shape[n_in:], names=names, n_in=n_in, rank=lcfg.rank,
        scale=lcfg.scale, dropout=lcfg.dropout, rngs=rngs))
    setattr(module, name + SUFFIX, make(rngs))


def _stacked(n_layers: int, make_one):
  """make_one(rngs) vmapped into n_layers stacked copies (leading `layers` dim)."""
  @nnx.split_rngs(splits=n_layers)
  @nnx.vmap(in_axes=0, out_axes=0, transform_metadata={nnx.PARTITION_NAME: 'layers'})
  def make(rngs):
    return make_one(rngs)
  return make


def quantize_base(model: model_lib.Llama, lcfg: LoraConfig) -> None:
  """Replaces the seven stacked projections of `model` by quant.QuantizedWeight (in place)."""
  if lcfg.quantize == 'none':
    return
  for target in TARGETS:
    module, name, n_in = _weight_of(model, target)
    param = getattr(module, name)
    setattr(module, name, _quantized(param[...], param.get_metadata()['out_sharding'], n_in, lcfg))


def _quantized(w, names, n_in: int, lcfg: LoraConfig) -> quant.QuantizedWeight:
  return quant.QuantizedWeight(w, n_lead=1, n_in=n_in, names=names, fmt=lcfg.quantize,
                               group_size=lcfg.group_size)


def build(cfg: model_lib.ModelConfig, lcfg: LoraConfig, *, seed: int) -> model_lib.Llama:
  """The model of a LoRA run: the base (random init from `seed`, the same as a plain run's, in
  base_dtype, quantized if asked) with adapters (their own seed) attached."""
  model = model_lib.Llama(lcfg.base_model_config(cfg), rngs=nnx.Rngs(seed))
  attach(model, lcfg, rngs=nnx.Rngs(params=jax.random.fold_in(jax.random.key(seed), 17)))
  quantize_base(model, lcfg)
  return model


def weight_path(target: str) -> tuple[str, str, str]:
  """Where the stacked base weight of `target` sits in a params dict."""
  sub, name, _ = TARGETS[target]
  return ('layers', sub, name)


def weight_quantizer(target: str, cfg: model_lib.ModelConfig, lcfg: LoraConfig):
  """A function from the stacked float base weight of `target` (a checkpoint's, in base_dtype)
  to its stored form in `build`'s quantized base (`{'values', 'scale'}`), to jit: a quantized
  base is read and quantized one weight at a time (trainer.load_base)."""
  model = nnx.eval_shape(lambda: model_lib.Llama(lcfg.base_model_config(cfg), rngs=nnx.Rngs(0)))
  module, name, n_in = _weight_of(model, target)
  names = getattr(module, name).get_metadata()['out_sharding']
  return lambda w: nnx.to_pure_dict(nnx.state(_quantized(w, names, n_in, lcfg)))


def is_adapter(path) -> bool:
  """Whether a params path (a tuple of keys, or jax key entries) lies inside an adapter."""
  return any(str(getattr(k, 'key', k)).endswith(SUFFIX) for k in path)


def split(params: Mapping) -> tuple[dict, dict]:
  """A params dict -> (adapters, base): the `*_lora` subtrees, and the rest."""
  adapters, base = {}, {}
  for key, value in params.items():
    if str(key).endswith(SUFFIX):
      adapters[key] = value
    elif isinstance(value, Mapping):
      a, b = split(value)
      if a:
        adapters[key] = a
      if b or not a:
        base[key] = b
    else:
      base[key] = value
  return adapters, base


def join(base: Mapping, adapters: Mapping) -> dict:
  """The inverse of split: one params dict that nnx.merge(graphdef, ...) takes."""
  out = dict(base)
  for key, value in adapters.items():
    out[key] = join(out.get(key, {}), value) if key in base and isinstance(value, Mapping) \
        else value
  return out


def set_dropout(model: model_lib.Llama, key: jax.Array) -> None:
  """Gives every adapter of `model` (a module merged inside the train step) per-layer dropout
  keys drawn from `key`; a model never given keys applies no dropout (eval, sampling)."""
  for i, target in enumerate(TARGETS):
    module, name, _ = _weight_of(model, target)
    adapter = getattr(module, name + SUFFIX, None)
    if adapter is not None and adapter.dropout:
      adapter.dropout_key = DropoutKey(jax.random.split(jax.random.fold_in(key, i),
                                                        model.cfg.n_layers))


def delta(a: np.ndarray, b: np.ndarray, *, scale: float) -> np.ndarray:
  """The dense update scale x A @ B of one layer's adapter, shaped like its weight [*in, *out]."""
  rank = a.shape[-1]
  d = (a.reshape(-1, rank).astype(np.float32) @ b.reshape(rank, -1).astype(np.float32)) * scale
  return d.reshape(*a.shape[:-1], *b.shape[1:])


def abstract_adapters(cfg: model_lib.ModelConfig | Mapping[str, Any], lcfg: LoraConfig) -> dict:
  """The adapters of a LoRA model as ShapeDtypeStructs (no mesh): for readers of checkpoints
  and adapter files. `cfg`: a ModelConfig or a config's `model` section."""
  if not isinstance(cfg, model_lib.ModelConfig):
    cfg = model_lib.ModelConfig.from_section(cfg)
  shapes = jax.eval_shape(lambda: nnx.to_pure_dict(nnx.state(build(cfg, lcfg, seed=0))))
  return split(shapes)[0]


def target_path(target: str) -> tuple[str, ...]:
  """The params path of `target`'s stacked adapter ({'a', 'b'}) and of its base weight."""
  sub, name, _ = TARGETS[target]
  return ('layers', sub, name + SUFFIX)
