"""Structured pruning: a model -> a smaller, ordinary one (fewer layers, kv groups, MLP channels).

`importance` runs the model over calibration batches and scores, on real tokens only:

- each layer (depth) by block importance, 1 - mean cos(layer input, layer output) (ShortGPT,
  Men et al. 2024): a layer whose output is most like its input changes least when dropped;
- each query head by the mean L2 norm of its output before o_proj, and each MLP channel by the
  mean |silu(x @ gate) x (x @ up)| (Minitron, Muralidharan et al. 2024: activation importance).

`prune` keeps the most important `n_layers` layers (in their order), in every kept layer the
most important `n_kv_heads` kv groups (a kv head with its n_heads / n_kv_heads query heads, whose
scores are summed: GQA's grouping is kept) and `mlp_dim` channels. Each layer keeps its own
heads and channels; the result is a plain model section + parameters of the same layout (scanned
layers, HF names), so it trains, samples and exports like any other. No retraining happens here:
a pruned model is a starting point for distillation (loss.kd_sum, config `distill`).

The scores are computed on the devices the parameters live on; the cut is numpy on the host (a
7B model's float32 parameters, 28 GB, must fit in host memory).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxllm import model as model_lib


@dataclasses.dataclass(frozen=True)
class Importance:
  """Scores from calibration batches; higher = more important."""

  layers: np.ndarray  # [n_layers] block importance, 1 - mean cos(input, output)
  heads: np.ndarray  # [n_layers, n_heads] mean L2 norm of each head's output
  mlp: np.ndarray  # [n_layers, mlp_dim] mean |activation| of each channel
  tokens: int  # real tokens scored


def _scores(graphdef, params, batch):
  """Sums over the batch's real tokens: (cos per layer [N], head norms [N, H], |act| [N, F],
  tokens)."""
  model = nnx.merge(graphdef, params)
  segment_ids_BL, positions_BL = batch.get('segment_ids'), batch.get('positions')
  tokens_BL = batch['inputs']
  mask_BL = (jnp.ones(tokens_BL.shape, bool) if segment_ids_BL is None else segment_ids_BL > 0)
  if positions_BL is None:
    positions_BL = jnp.broadcast_to(jnp.arange(tokens_BL.shape[1]), tokens_BL.shape)
  m_BL = mask_BL.astype(jnp.float32)
  x_BLD = jnp.take(model.embed_tokens[...].astype(model.cfg.dtype), tokens_BL, axis=0)

  def body(x_BLD, layer: model_lib.DecoderLayer):
    normed_BLD = layer.input_layernorm(x_BLD)
    heads_BLHDh = layer.self_attn.heads(normed_BLD, positions_BL, segment_ids_BL)
    mid_BLD = x_BLD + layer.self_attn(normed_BLD, positions_BL, segment_ids_BL)
    act_BLF = layer.mlp.hidden(layer.post_attention_layernorm(mid_BLD))
    out_BLD = layer(x_BLD, positions_BL, segment_ids_BL)
    a, b = x_BLD.astype(jnp.float32), out_BLD.astype(jnp.float32)
    cos_BL = jnp.sum(a * b, -1) / (jnp.linalg.norm(a, axis=-1) * jnp.linalg.norm(b, axis=-1)
                                   + 1e-12)
    head_norm_BLH = jnp.linalg.norm(heads_BLHDh.astype(jnp.float32), axis=-1)
    sums = (jnp.sum(cos_BL * m_BL),
            jnp.einsum('blh,bl->h', head_norm_BLH, m_BL),
            jnp.einsum('blf,bl->f', jnp.abs(act_BLF.astype(jnp.float32)), m_BL))
    return out_BLD, sums

  scan = nnx.scan(body, in_axes=(nnx.Carry, 0), out_axes=(nnx.Carry, 0),
                  transform_metadata={nnx.PARTITION_NAME: 'layers'})
  _, (cos_N, heads_NH, act_NF) = scan(x_BLD, model.layers)
  return cos_N, heads_NH, act_NF, jnp.sum(mask_BL)


def importance(cfg: model_lib.ModelConfig, params: Mapping[str, Any],
               batches: Iterable[Mapping[str, np.ndarray]]) -> Importance:
  """Scores of `params` (a pure dict of `cfg`'s model) over `batches` (dicts with `inputs` and,
  for packed rows, `segment_ids` and `positions`)."""
  graphdef = nnx.graphdef(nnx.eval_shape(lambda: model_lib.Llama(cfg, rngs=nnx.Rngs(0))))
  step = jax.jit(lambda p, b: _scores(graphdef, p, b))
  cos = heads = act = None
  tokens = 0
  for batch in batches:
    keys = [k for k in ('inputs', 'segment_ids', 'positions') if k in batch]
    out = jax.device_get(step(params, {k: jnp.asarray(batch[k]) for k in keys}))
    cos, heads, act = (np.asarray(o, np.float64) + (0 if s is None else s)
                       for o, s in zip(out[:3], (cos, heads, act)))
    tokens += int(out[3])
  if not tokens:
    raise ValueError('pruning needs calibration batches with real tokens; none were given')
  return Importance(layers=1 - cos / tokens, heads=heads / tokens, mlp=act / tokens,
                    tokens=tokens)


def _keep(scores: np.ndarray, n: int) -> np.ndarray:
  """Indices of the `n` highest scores along the last dim, in ascending order."""
  return np.sort(np.argsort(-scores, axis=-1, kind='stable')[..., :n], axis=-1)


def _take(x: np.ndarray, index_NK: np.ndarray, axis: int) -> np.ndarray:
  """Per layer (dim 0), the entries `index_NK[layer]` of dim `axis`."""
  shape = [1] * x.ndim
  shape[0], shape[axis] = index_NK.shape
  return np.take_along_axis(x, index_NK.reshape(shape), axis=axis)


def _check(what: str, new: int, old: int) -> None:
  if not 1 <= new <= old:
    raise ValueError(f'prune {what}={new}: choose 1 to the model\'s {old}')


def cut(model: Mapping[str, Any], params: Mapping[str, Any], scores: Importance, *,
        n_layers: int, n_kv_heads: int, mlp_dim: int) -> tuple[dict, dict]:
  """(the smaller model section, its parameters as numpy): the most important layers, kv groups
  and MLP channels of `params` by `scores` (see the module docstring)."""
  cfg = model_lib.ModelConfig.from_section(model)
  _check('n_layers', n_layers, cfg.n_layers)
  _check('n_kv_heads', n_kv_heads, cfg.n_kv_heads)
  _check('mlp_dim', mlp_dim, cfg.mlp_dim)
  group = cfg.n_heads // cfg.n_kv_heads
  layers_N = _keep(scores.layers, n_layers)
  kv_NK = _keep(scores.heads[layers_N].reshape(n_layers, cfg.n_kv_heads, group).sum(-1),
                n_kv_heads)
  heads_NH = (kv_NK[:, :, None] * group + np.arange(group)[None, None]).reshape(n_layers, -1)
  mlp_NF = _keep(scores.mlp[layers_N], mlp_dim)
  # Which index picks each stacked parameter's dim (axis counted with the leading layers dim).
  cuts = {('self_attn', 'q_proj'): (heads_NH, 2), ('self_attn', 'k_proj'): (kv_NK, 2),
          ('self_attn', 'v_proj'): (kv_NK, 2), ('self_attn', 'o_proj'): (heads_NH, 1),
          ('self_attn', 'q_bias'): (heads_NH, 1), ('self_attn', 'k_bias'): (kv_NK, 1),
          ('self_attn', 'v_bias'): (kv_NK, 1), ('mlp', 'gate_proj'): (mlp_NF, 2),
          ('mlp', 'up_proj'): (mlp_NF, 2), ('mlp', 'down_proj'): (mlp_NF, 1)}
  host = jax.tree.map(np.asarray, jax.device_get(dict(params)))

  def layer_leaf(path, x):
    keys = tuple(str(getattr(k, 'key', k)) for k in path)
    x = x[layers_N]
    if keys[:2] in cuts:
      index, axis = cuts[keys[:2]]
      x = _take(x, index, axis)
    return x

  out = {**host, 'layers': jax.tree_util.tree_map_with_path(layer_leaf, host['layers'])}
  section = {**dict(model), 'n_layers': n_layers, 'n_kv_heads': n_kv_heads,
             'n_heads': n_kv_heads * group, 'mlp_dim': mlp_dim}
  return section, out


def prune(model: Mapping[str, Any], params: Mapping[str, Any],
          batches: Iterable[Mapping[str, np.ndarray]], *, n_layers: int | None = None,
          n_kv_heads: int | None = None, mlp_dim: int | None = None,
          ) -> tuple[dict, dict, Importance]:
  """`model` (a config's model section) and `params` -> (smaller section, its parameters, the
  scores): `importance` over the calibration `batches`, then `cut`. A size left None is kept."""
  cfg = model_lib.ModelConfig.from_section(model)
  scores = importance(cfg, params, batches)
  section, out = cut(model, params, scores, n_layers=n_layers or cfg.n_layers,
                     n_kv_heads=n_kv_heads or cfg.n_kv_heads, mlp_dim=mlp_dim or cfg.mlp_dim)
  return section, out, scores
