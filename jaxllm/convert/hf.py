"""jaxllm <-> Hugging Face transformers: one key table, the config mapping both ways.

Families: Llama 2 and 3.x (`rope_scaling` of type llama3), Mistral (sliding window), Qwen2 (q/k/v
biases), Qwen3 (q/k RMSNorm). Every tensor goes through `KEY_TABLE`: a jaxllm parameter path, the
HF tensor name and a layout that says how one becomes the other; both shapes are asserted on the
way. jaxllm stacks layers (leading `layers` dim); HF names them `model.layers.{i}`.

No file IO and no torch here: tensors are numpy arrays handed in and out one at a time (an export
that reads one stored parameter at a time never holds the whole model), configs are JSON-able
dicts. `export.py` and `import_.py` beside it do the reading and writing.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import jax
import ml_dtypes
import numpy as np
from flax import nnx

from jaxllm import metrics
from jaxllm import model as model_lib
from jaxllm.convert import UnsupportedError

# model_type -> the architecture class transformers builds for it.
FAMILIES = {'llama': 'LlamaForCausalLM', 'mistral': 'MistralForCausalLM',
            'qwen2': 'Qwen2ForCausalLM', 'qwen3': 'Qwen3ForCausalLM'}
DTYPES = {'float32': np.dtype(np.float32), 'bfloat16': np.dtype(ml_dtypes.bfloat16)}
CONFIG_FILE = 'config.json'  # of an HF model folder (HF's layout; a workdir's is rundir's)
GENERATION_CONFIG_FILE = 'generation_config.json'
# Tensors some checkpoints carry that hold nothing the model needs (old Llama saves wrote the
# RoPE table as a buffer).
IGNORED_SUFFIXES = ('rotary_emb.inv_freq',)


@dataclasses.dataclass(frozen=True)
class Layout:
  """How one per-layer jaxllm tensor maps to its HF twin (a torch Linear stores [out, in])."""

  name: str
  to_hf: Callable[[np.ndarray], np.ndarray]
  from_hf: Callable[[np.ndarray, tuple], np.ndarray]  # (HF tensor, jaxllm shape) -> jaxllm
  hf_shape: Callable[[tuple], tuple]  # jaxllm shape -> HF shape


SAME = Layout('same', lambda x: x, lambda w, s: w, lambda s: s)
TRANSPOSE = Layout('transpose', lambda x: x.T, lambda w, s: w.T, lambda s: s[::-1])
# q/k/v [D, N, Dh] <-> [N*Dh, D]: heads are contiguous blocks of rows in HF too. No RoPE
# permutation, since jaxllm rotates (first half, second half) like HF's rotate_half.
HEADS_IN = Layout('heads_in', lambda x: x.reshape(x.shape[0], -1).T,
                  lambda w, s: w.T.reshape(s), lambda s: (s[1] * s[2], s[0]))
# o [N, Dh, D] <-> [D, N*Dh]
HEADS_OUT = Layout('heads_out', lambda x: x.reshape(-1, x.shape[-1]).T,
                   lambda w, s: w.T.reshape(s), lambda s: (s[2], s[0] * s[1]))
# q/k/v biases [N, Dh] <-> [N*Dh]
FLAT = Layout('flat', lambda x: x.reshape(-1), lambda w, s: w.reshape(s),
              lambda s: (math.prod(s),))

_ATTN, _LAYER = 'model.layers.{i}.self_attn', 'model.layers.{i}'
# (jaxllm parameter path, HF tensor name, layout). A row applies when the model config has that
# parameter; `{i}` marks a stacked-layer tensor.
KEY_TABLE = (
    ('embed_tokens', 'model.embed_tokens.weight', SAME),
    ('layers.input_layernorm.weight', f'{_LAYER}.input_layernorm.weight', SAME),
    ('layers.self_attn.q_proj', f'{_ATTN}.q_proj.weight', HEADS_IN),
    ('layers.self_attn.k_proj', f'{_ATTN}.k_proj.weight', HEADS_IN),
    ('layers.self_attn.v_proj', f'{_ATTN}.v_proj.weight', HEADS_IN),
    ('layers.self_attn.o_proj', f'{_ATTN}.o_proj.weight', HEADS_OUT),
    ('layers.self_attn.q_bias', f'{_ATTN}.q_proj.bias', FLAT),
    ('layers.self_attn.k_bias', f'{_ATTN}.k_proj.bias', FLAT),
    ('layers.self_attn.v_bias', f'{_ATTN}.v_proj.bias', FLAT),
    ('layers.self_attn.o_bias', f'{_ATTN}.o_proj.bias', SAME),
    ('layers.self_attn.q_norm.weight', f'{_ATTN}.q_norm.weight', SAME),
    ('layers.self_attn.k_norm.weight', f'{_ATTN}.k_norm.weight', SAME),
    ('layers.post_attention_layernorm.weight', f'{_LAYER}.post_attention_layernorm.weight', SAME),
    ('layers.mlp.gate_proj', f'{_LAYER}.mlp.gate_proj.weight', TRANSPOSE),
    ('layers.mlp.up_proj', f'{_LAYER}.mlp.up_proj.weight', TRANSPOSE),
    ('layers.mlp.down_proj', f'{_LAYER}.mlp.down_proj.weight', TRANSPOSE),
    ('norm.weight', 'model.norm.weight', SAME),
    ('lm_head', 'lm_head.weight', TRANSPOSE),
)


@dataclasses.dataclass(frozen=True)
class TensorSpec:
  """One HF tensor: where it lives in the jaxllm params and both shapes."""

  hf_name: str
  path: tuple[str, ...]  # into the params pure dict
  layer: int | None  # index into the stacked `layers` dim, None for unstacked
  layout: Layout
  shape: tuple[int, ...]  # jaxllm shape of this tensor (one layer's slice if stacked)
  hf_shape: tuple[int, ...]


# --- parameters -----------------------------------------------------------------------------


def param_shapes(cfg: model_lib.ModelConfig) -> dict[tuple[str, ...], tuple[int, ...]]:
  """Path -> shape of every jaxllm parameter, from the model itself (nothing allocated)."""
  state = nnx.to_pure_dict(nnx.state(nnx.eval_shape(
      lambda: model_lib.Llama(cfg, rngs=nnx.Rngs(0)))))
  flat = jax.tree_util.tree_flatten_with_path(state)[0]
  return {tuple(k.key for k in path): tuple(leaf.shape) for path, leaf in flat}


def abstract_params(cfg: model_lib.ModelConfig, *, dtype: str | None = None,
                    sharding: jax.sharding.Sharding | None = None) -> dict:
  """The params pure dict as jax.ShapeDtypeStructs (`dtype` or cfg.param_dtype): what a
  checkpoint read or restore of the whole model, or of one parameter, is given as its target."""
  dt = DTYPES[dtype or cfg.param_dtype]
  return nest({path: jax.ShapeDtypeStruct(shape, dt, sharding=sharding)
               for path, shape in param_shapes(cfg).items()})


def tensor_specs(cfg: model_lib.ModelConfig) -> list[TensorSpec]:
  """Every HF tensor of `cfg`'s model in checkpoint order (layer by layer)."""
  shapes = param_shapes(cfg)
  rows = [(tuple(p.split('.')), name, layout) for p, name, layout in KEY_TABLE]
  unmapped = set(shapes) - {path for path, _, _ in rows}
  assert not unmapped, f'jaxllm parameters missing from KEY_TABLE: {sorted(unmapped)}'
  specs, stacked = [], []
  for path, name, layout in rows:
    if path not in shapes:
      continue  # a variant parameter this config does not have
    if '{i}' in name:
      stacked.append((path, name, layout))
    else:
      shape = shapes[path]
      specs.append(TensorSpec(name, path, None, layout, shape, layout.hf_shape(shape)))
  layers = [TensorSpec(name.format(i=i), path, i, layout, shapes[path][1:],
                       layout.hf_shape(shapes[path][1:]))
            for i in range(cfg.n_layers) for path, name, layout in stacked]
  # HF order: embeddings, the layers, final norm, head.
  return specs[:1] + layers + specs[1:]


def at_path(params: Mapping, path: tuple[str, ...]):
  """params[path[0]][path[1]]...: one leaf of a nested dict."""
  for key in path:
    params = params[key]
  return params


def export_order(cfg: model_lib.ModelConfig) -> list[TensorSpec]:
  """tensor_specs with all layers of one jaxllm parameter together: an export then reads each
  stored parameter once and holds only it."""
  first: dict[tuple[str, ...], int] = {}
  specs = tensor_specs(cfg)
  for i, spec in enumerate(specs):
    first.setdefault(spec.path, i)
  return sorted(specs, key=lambda s: (first[s.path], s.layer or 0))


def to_hf(params: Mapping | Callable[[tuple[str, ...]], np.ndarray], cfg: model_lib.ModelConfig,
          *, dtype: str = 'float32') -> Iterator[tuple[str, np.ndarray]]:
  """(HF name, numpy tensor in `dtype`) for every tensor in `export_order`, one at a time.
  `params` is the pure dict of the model state, or a function of a parameter path that reads
  that parameter (called once per parameter: only it and the tensor being yielded are held)."""
  out_dtype = DTYPES[dtype]
  shapes = param_shapes(cfg)
  if not callable(params):
    for path, want in shapes.items():
      got = tuple(at_path(params, path).shape)
      assert got == want, f'params[{".".join(path)}] has shape {got}, the config says {want}'
  get = params if callable(params) else lambda path: at_path(params, path)
  path, whole = None, None
  order = export_order(cfg)
  for spec in metrics.progress(order, desc='export', total=len(order), unit='tensor'):
    if spec.path != path:
      path = spec.path
      whole = x = y = None  # let the previous parameter (and views of it) go before the next
      whole = get(path)
      assert tuple(whole.shape) == shapes[path], (path, whole.shape, shapes[path])
    x = np.asarray(whole if spec.layer is None else whole[spec.layer], np.float32)
    y = np.ascontiguousarray(spec.layout.to_hf(x)).astype(out_dtype)
    assert y.shape == spec.hf_shape, (spec.hf_name, y.shape, spec.hf_shape)
    yield spec.hf_name, y


def hf_tensor_shapes(cfg: model_lib.ModelConfig) -> dict[str, tuple[int, ...]]:
  """HF name -> shape, for planning shards before any tensor is read."""
  return {s.hf_name: s.hf_shape for s in tensor_specs(cfg)}


def from_hf(names: Iterable[str], get_tensor: Callable[[str], np.ndarray],
            cfg: model_lib.ModelConfig, *, dtype: str | None = None) -> dict:
  """The params pure dict (numpy, `dtype` or cfg.param_dtype) from HF tensors read by name.

  `names` are all tensors in the checkpoint: one that no table row takes is refused (it would be
  a weight the jaxllm model silently lacks), except the tied head and IGNORED_SUFFIXES."""
  np_dtype = DTYPES[dtype or cfg.param_dtype]
  specs = tensor_specs(cfg)
  by_name = {s.hf_name: s for s in specs}
  names = set(names)
  extra = {n for n in names - set(by_name) if not n.endswith(IGNORED_SUFFIXES)}
  if cfg.tie_embeddings:
    extra.discard('lm_head.weight')  # some tied checkpoints store the head anyway
  if extra:
    raise UnsupportedError(f'tensor {sorted(extra)[0]!r} (and {len(extra) - 1} more) has no '
                           'place in the jaxllm model: an option of this checkpoint is not '
                           'supported')
  missing = set(by_name) - names
  if missing:
    raise UnsupportedError(f'the checkpoint lacks tensor {sorted(missing)[0]!r} '
                           f'(and {len(missing) - 1} more) that its config.json implies')
  shapes = param_shapes(cfg)
  # Filled tensor by tensor: besides these arrays only the tensor being read is held (one
  # layer's slice of a stacked parameter). The assignment casts (bfloat16 -> float32 say) as it
  # copies, so no converted copy of the tensor is made either.
  flat = {path: np.empty(shape, np_dtype) for path, shape in shapes.items()}
  for spec in metrics.progress(specs, desc='import', total=len(specs), unit='tensor'):
    w = np.asarray(get_tensor(spec.hf_name))
    if tuple(w.shape) != spec.hf_shape:
      raise UnsupportedError(f'tensor {spec.hf_name!r} has shape {tuple(w.shape)}, config.json '
                             f'implies {spec.hf_shape}')
    target = flat[spec.path] if spec.layer is None else flat[spec.path][spec.layer]
    target[...] = spec.layout.from_hf(w, spec.shape)
    del w, target  # before the next read
  return nest(flat)


def nest(flat: Mapping[tuple[str, ...], Any]) -> dict:
  """{('a', 'b'): x} -> {'a': {'b': x}}: a flat path map as the params pure dict."""
  out: dict = {}
  for path, value in flat.items():
    node = out
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = value
  return out


# --- config ---------------------------------------------------------------------------------


def _rope_from_hf(hf: Mapping[str, Any]) -> dict[str, Any]:
  """RoPE keys of the jaxllm model section from 5.x `rope_parameters` or 4.x `rope_theta` plus
  `rope_scaling` (either `type` or `rope_type`)."""
  params = dict(hf.get('rope_parameters') or hf.get('rope_scaling') or {})
  if any(isinstance(v, Mapping) for v in params.values()):
    raise UnsupportedError(f'rope_parameters per layer type ({sorted(params)}) is not supported')
  theta = params.get('rope_theta', hf.get('rope_theta', 10_000.0))
  kind = params.get('rope_type', params.get('type', 'default'))
  partial = params.get('partial_rotary_factor', hf.get('partial_rotary_factor', 1.0))
  if partial != 1.0:
    raise UnsupportedError(f'partial_rotary_factor={partial} is not supported (jaxllm rotates '
                           'the whole head)')
  out = dict(rope_theta=float(theta))
  if kind == 'default':
    return out | dict(rope_scaling='none')
  if kind != 'llama3':
    raise UnsupportedError(f"rope_scaling type {kind!r} is not supported; jaxllm supports "
                           "'default' and 'llama3'")
  return out | dict(rope_scaling='llama3', rope_scaling_factor=float(params['factor']),
                    rope_low_freq_factor=float(params['low_freq_factor']),
                    rope_high_freq_factor=float(params['high_freq_factor']),
                    rope_original_max_len=int(params.get('original_max_position_embeddings',
                                                         hf.get('max_position_embeddings'))))


def _refuse_unsupported(hf: Mapping[str, Any], family: str) -> None:
  if hf.get('architectures') not in (None, [FAMILIES[family]]):
    raise UnsupportedError(f'architectures={hf["architectures"]} is not supported for '
                           f'model_type={family!r}; expected [{FAMILIES[family]!r}]')
  checks = {
      'hidden_act': (hf.get('hidden_act', 'silu') == 'silu', 'only silu (SwiGLU) is supported'),
      'mlp_bias': (not hf.get('mlp_bias'), 'MLP biases are not supported'),
      'quantization_config': ('quantization_config' not in hf, 'quantized weights are not'),
      'use_sliding_window': (not hf.get('use_sliding_window'),
                             'per-layer sliding windows (Qwen) are not supported'),
      'pretraining_tp': (hf.get('pretraining_tp', 1) == 1, 'only 1 is supported'),
  }
  for key, (ok, why) in checks.items():
    if not ok:
      raise UnsupportedError(f'{key}={hf.get(key)!r} in config.json: {why}')
  layer_types = set(hf.get('layer_types') or ['full_attention'])
  if layer_types != {'full_attention'} and family != 'mistral':
    raise UnsupportedError(f'layer_types={sorted(layer_types)}: only full attention is supported')


def model_config_from_hf(hf: Mapping[str, Any]) -> dict[str, Any]:
  """The `model` config section (jaxllm keys) of an HF config.json dict; refuses what the jaxllm
  model cannot compute exactly, naming the option."""
  family = hf.get('model_type')
  if family not in FAMILIES:
    raise UnsupportedError(f'model_type={family!r} is not supported; jaxllm converts '
                           f'{sorted(FAMILIES)}')
  _refuse_unsupported(hf, family)
  heads = hf['num_attention_heads']
  bias = bool(hf.get('attention_bias', False))
  window = hf.get('sliding_window') if family == 'mistral' else None
  return dict(
      vocab_size=hf['vocab_size'], d_model=hf['hidden_size'], n_layers=hf['num_hidden_layers'],
      n_heads=heads, n_kv_heads=hf.get('num_key_value_heads') or heads,
      head_dim=hf.get('head_dim') or hf['hidden_size'] // heads,
      mlp_dim=hf['intermediate_size'], norm_eps=float(hf.get('rms_norm_eps', 1e-6)),
      tie_embeddings=bool(hf.get('tie_word_embeddings', False)),
      init_std=float(hf.get('initializer_range', 0.02)),
      # Qwen2 always has q/k/v biases and no output bias; Llama and Qwen3 set all four together.
      qkv_bias=family == 'qwen2' or bias, o_bias=family != 'qwen2' and bias,
      qk_norm=family == 'qwen3', sliding_window=int(window or 0),
      **_rope_from_hf(hf))


def family_of(model: Mapping[str, Any]) -> str:
  """The HF family that expresses a jaxllm model section most plainly."""
  if model.get('qk_norm'):
    return 'qwen3'
  if model.get('qkv_bias') and not model.get('o_bias'):
    return 'qwen2'
  if model.get('sliding_window'):
    return 'mistral'
  return 'llama'


def _check_family(m: Mapping[str, Any], family: str) -> None:
  bias, window = (m['qkv_bias'], m['o_bias']), m['sliding_window']
  rules = {
      'llama': [(not m['qk_norm'], 'qk_norm'), (bias[0] == bias[1], 'qkv_bias != o_bias'),
                (not window, 'sliding_window')],
      'mistral': [(not m['qk_norm'], 'qk_norm'), (not any(bias), 'attention biases')],
      'qwen2': [(not m['qk_norm'], 'qk_norm'), (bias == (True, False), 'biases other than q/k/v'),
                (not window, 'sliding_window'),
                # transformers 4.4x derives Qwen2's head_dim from the width.
                (m['head_dim'] * m['n_heads'] == m['d_model'], 'head_dim != d_model / n_heads')],
      'qwen3': [(m['qk_norm'], 'no qk_norm'), (bias[0] == bias[1], 'qkv_bias != o_bias'),
                (not window, 'sliding_window')],
  }
  for ok, what in rules[family]:
    if not ok:
      raise UnsupportedError(f'the HF {family} family cannot express this model ({what})')


def model_config_to_hf(model: Mapping[str, Any], *, family: str | None = None,
                       dtype: str = 'float32', max_position_embeddings: int | None = None,
                       bos_token_id: int | None = 1, eos_token_id: int | None = 2) -> dict:
  """config.json for a jaxllm `model` section, loadable by transformers 4.4x and 5.x: both RoPE
  forms (5.x `rope_parameters`; 4.x `rope_theta` + `rope_scaling`) and both dtype keys."""
  # from_section fills in the defaults of keys an old config lacks.
  m = dataclasses.asdict(model_lib.ModelConfig.from_section(model))
  family = family or family_of(m)
  if family not in FAMILIES:
    raise UnsupportedError(f'family={family!r}: choose one of {sorted(FAMILIES)}')
  _check_family(m, family)
  rope = {'rope_type': 'default', 'rope_theta': m['rope_theta']}
  scaling = None
  if m['rope_scaling'] == 'llama3':
    scaling = {'rope_type': 'llama3', 'factor': m['rope_scaling_factor'],
               'low_freq_factor': m['rope_low_freq_factor'],
               'high_freq_factor': m['rope_high_freq_factor'],
               'original_max_position_embeddings': m['rope_original_max_len']}
    rope = scaling | {'rope_theta': m['rope_theta']}
  max_len = max_position_embeddings or (
      int(m['rope_original_max_len'] * m['rope_scaling_factor']) if scaling else 4096)
  hf = dict(
      architectures=[FAMILIES[family]], model_type=family, vocab_size=m['vocab_size'],
      hidden_size=m['d_model'], intermediate_size=m['mlp_dim'],
      num_hidden_layers=m['n_layers'], num_attention_heads=m['n_heads'],
      num_key_value_heads=m['n_kv_heads'], head_dim=m['head_dim'], hidden_act='silu',
      rms_norm_eps=m['norm_eps'], tie_word_embeddings=m['tie_embeddings'],
      initializer_range=m['init_std'], max_position_embeddings=max_len,
      bos_token_id=bos_token_id, eos_token_id=eos_token_id, attention_dropout=0.0,
      use_cache=True, rope_theta=m['rope_theta'], rope_scaling=scaling, rope_parameters=rope,
      dtype=dtype, torch_dtype=dtype)
  if family in ('llama', 'qwen3'):
    hf['attention_bias'] = m['o_bias']
  if family == 'llama':
    hf['mlp_bias'] = False
  if family in ('qwen2', 'qwen3'):
    hf.update(use_sliding_window=False, sliding_window=None, max_window_layers=m['n_layers'])
  if family == 'mistral':
    hf['sliding_window'] = m['sliding_window'] or None
  return hf


def generation_config(*, bos_token_id: int | None = 1, eos_token_id: int | None = 2) -> dict:
  return {'bos_token_id': bos_token_id, 'eos_token_id': eos_token_id}
