"""The optimizer: global-norm clip, AdamW with warmup + cosine decay, decay only on matrices."""

from __future__ import annotations

import jax
import optax
from jax.sharding import PartitionSpec as P


def learning_rate_schedule(*, peak_lr: float, warmup_steps: int, decay_steps: int,
                           final_lr_fraction: float) -> optax.Schedule:
  """0 -> peak_lr linearly over warmup_steps, then cosine down to peak_lr x final_lr_fraction."""
  if warmup_steps == 0:
    return optax.cosine_decay_schedule(peak_lr, decay_steps, alpha=final_lr_fraction)
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=peak_lr, warmup_steps=warmup_steps,
      decay_steps=warmup_steps + decay_steps, end_value=peak_lr * final_lr_fraction)


def weight_decay_mask(logical_specs):
  """Weight decay on weight matrices only: leaves with two or more dims besides `layers`, one of
  them the model width (`embed`). Norm scales, biases and q/k norms are not decayed. Takes the
  parameters' logical PartitionSpecs; returns a tree of bools."""
  return jax.tree.map(lambda s: len([n for n in s if n != 'layers']) > 1 and 'embed' in s,
                      logical_specs, is_leaf=lambda x: isinstance(x, P))


def make_optimizer(*, schedule: optax.Schedule, b1: float, b2: float, eps: float,
                   weight_decay: float, clip_norm: float, decay_mask) -> optax.GradientTransformation:
  """The update rule. `decay_mask` (a tree of bools like the parameters, or a function of them)
  says which parameters get weight decay: matrices yes, norm scales and other vectors no.

  Gradient accumulation happens in the train step (a scan over micro-batches, which keeps one
  compiled step per optimizer update), so the optimizer sees one mean gradient per step."""
  return optax.chain(
      optax.clip_by_global_norm(clip_norm) if clip_norm > 0 else optax.identity(),
      optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay,
                  mask=decay_mask),
  )
