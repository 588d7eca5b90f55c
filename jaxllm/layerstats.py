"""Per-layer statistics of a train step: the L2 norms of the parameters, gradients and updates of
each parameter, one value per layer for the scanned stack, as TensorBoard scalars.

The choices:
- `norms` is traced inside the compiled step (a few reductions over arrays the step holds anyway)
  and compiled in only when `train.layer_stats_every > 0`: a run without it compiles the step it
  always did. The loop reads them every N steps only, and after the step's scalar metrics (its
  one wait on the device): the step has finished by then, so the read copies a few hundred floats
  already computed and adds no device sync.
- A leaf under `layers` is stacked by the scan with a leading n_layers dim: its norm is over every
  other dim, one value per layer. Elsewhere (embed_tokens, norm, lm_head) a leaf has one value.
- The statistics are of what trains: the train state's `params`, so with LoRA the adapters.
- A parameter's norm is that of the value its gradient was taken at (before the update); the
  update is what the optimizer adds to it (after clipping, AdamW, learning rate and weight
  decay), so update_norm / param_norm is the layer's relative step. A step skipped for a
  non-finite loss (optim.skip_nonfinite) reports the update it computed, which was not applied.
- Norms are summed in float32, whatever the parameter dtype.

This module is a leaf: it imports no jaxllm module.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

STACKED = 'layers'  # the params key of the scanned decoder stack (model.Llama)
KINDS = ('param_norm', 'grad_norm', 'update_norm')


def is_stacked(name: str) -> bool:
  """Whether the parameter `name` ('layers/mlp/up_proj') has a leading layer dim."""
  return name.split('/', 1)[0] == STACKED


def norms(*, params: Any, grads: Any, updates: Any) -> dict[str, jax.Array]:
  """'{name}/{kind}' -> the L2 norm, for each leaf of the three (same-structured) pure dicts and
  each kind of KINDS; `name` is the leaf's key path joined by '/' ('layers/self_attn/q_proj').
  A stacked leaf gives a float32 [n_layers] vector, any other a float32 scalar."""
  out = {}
  for kind, tree in zip(KINDS, (params, grads, updates)):
    for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
      name = jax.tree_util.keystr(path, simple=True, separator='/')
      axes = tuple(range(1, x.ndim)) if is_stacked(name) else None
      out[f'{name}/{kind}'] = jnp.sqrt(jnp.sum(jnp.square(x.astype(jnp.float32)), axis=axes))
  return out


def scalars(stats: Mapping[str, Any]) -> dict[str, float]:
  """`norms`' output, read back to the host, as TensorBoard tags: a stacked vector becomes one
  tag per layer ('layers/self_attn/q_proj/grad_norm' -> 'layers/03/self_attn/q_proj/grad_norm',
  layers numbered from 00), any other value 'params/<name>' ('params/embed_tokens/grad_norm')."""
  out = {}
  for name, value in stats.items():
    value = np.asarray(value)
    if not is_stacked(name):
      out[f'params/{name}'] = float(value)
      continue
    rest, width = name.split('/', 1)[1], max(2, len(str(value.size - 1)))
    for i, v in enumerate(value):
      out[f'{STACKED}/{i:0{width}d}/{rest}'] = float(v)
  return out
