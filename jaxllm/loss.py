"""Next-token cross entropy, in float32: from logits, or fused with the output head in chunks.

`nll_sum` takes logits [B, L, V]. `head_nll_sum` takes the final hidden states and the head
instead and never holds the logits of more than `chunk` positions per row: for a 128k vocabulary
at 4096 tokens a row the full float32 logits are 2 GiB per row, which caps the batch on a GPU.
Its gradient is computed in the same pass as the loss (the loss is the last op of the step, so
d loss / d logits is known there up to a scalar), which spares the recompute that a checkpointed
chunk loop would pay: the head's three matmuls run once each, as without chunks. With the batch
split over devices each chunk's head-gradient contribution is summed across them inside the loop,
so fewer, longer chunks communicate less.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jaxllm import sharding

_LOGITS = ('batch', 'length', 'vocab')
_HEAD = ('embed', 'vocab')


def _token_nll(logits_BLV, targets_BL):
  """-log softmax(logits)[target] per token and log Z, float32."""
  logz_BL = jax.nn.logsumexp(logits_BLV, axis=-1)
  gold_BL = jnp.take_along_axis(logits_BLV, targets_BL[..., None], axis=-1)[..., 0]
  return logz_BL - gold_BL, logz_BL


def nll_sum(logits_BLV, targets_BL, weights_BL):
  """sum over tokens of weight x -log softmax(logits)[target]."""
  nll_BL, _ = _token_nll(logits_BLV.astype(jnp.float32), targets_BL)
  return jnp.sum(weights_BL * nll_BL)


def _matmul(a, b):
  """[..., K] @ [K, N] as one 2-D product (see model._dense), accumulating in float32."""
  return jnp.matmul(a.reshape(-1, a.shape[-1]), b,
                    preferred_element_type=jnp.float32).reshape(*a.shape[:-1], b.shape[-1])


def _chunks(x, chunk: int):
  """[B, L, ...] -> [L / chunk, B, chunk, ...]: the scan runs over positions, so every chunk
  keeps the batch dim (and its sharding) whole."""
  b, length = x.shape[:2]
  return x.reshape(b, length // chunk, chunk, *x.shape[2:]).swapaxes(0, 1)


def _head_pass(x_BLD, head_DV, targets_BL, weights_BL, chunk: int, grads: bool):
  """The loss and, if `grads`, its gradients with respect to x and the head (cotangent 1)."""
  def body(dhead_DV, inputs):
    x_BCD, targets_BC, weights_BC = inputs
    dhead_DV = sharding.constrain(dhead_DV, _HEAD)
    logits_BCV = sharding.constrain(_matmul(x_BCD, head_DV), _LOGITS)
    nll_BC, logz_BC = _token_nll(logits_BCV, targets_BC)
    loss = jnp.sum(weights_BC * nll_BC)
    if not grads:
      return dhead_DV, (loss, None)
    # d loss / d logits = (softmax - one_hot(target)) x weight, formed in one fused pass and
    # rounded to the compute dtype for the two matmuls (as fused cross-entropy kernels do): with
    # bfloat16 compute the gradients carry bfloat16 rounding of d logits that autodiff of the
    # unfused path, which multiplies the float32 cotangent, does not.
    vocab_V = jnp.arange(logits_BCV.shape[-1], dtype=targets_BC.dtype)
    onehot_BCV = vocab_V[None, None] == targets_BC[..., None]
    dlogits_BCV = ((jnp.exp(logits_BCV - logz_BC[..., None]) - onehot_BCV)
                   * weights_BC[..., None]).astype(x_BCD.dtype)
    dx_BCD = _matmul(dlogits_BCV, head_DV.T).astype(x_BCD.dtype)
    dhead_DV += _matmul(x_BCD.reshape(-1, x_BCD.shape[-1]).T,
                        dlogits_BCV.reshape(-1, dlogits_BCV.shape[-1]))
    return dhead_DV, (loss, dx_BCD)

  # Laid out as the head itself, so each chunk's sum over the batch shards is a reduce-scatter.
  dhead_DV = sharding.constrain(jnp.zeros(head_DV.shape, jnp.float32), _HEAD)
  dhead_DV, (losses, dx_NBCD) = jax.lax.scan(
      body, dhead_DV, (_chunks(x_BLD, chunk), _chunks(targets_BL, chunk),
                       _chunks(weights_BL, chunk)))
  loss = jnp.sum(losses)
  if not grads:
    return loss, None
  dx_BLD = dx_NBCD.swapaxes(0, 1).reshape(x_BLD.shape)
  return loss, (dx_BLD, dhead_DV.astype(head_DV.dtype))


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def head_nll_sum(x_BLD, head_DV, targets_BL, weights_BL, chunk: int):
  """sum over tokens of weight x -log softmax(x @ head)[target], `chunk` positions of every row
  at a time (L % chunk == 0). The same value as nll_sum(x @ head, ...); differentiable in x and
  head only."""
  return _head_pass(x_BLD, head_DV, targets_BL, weights_BL, chunk, grads=False)[0]


def _head_nll_sum_fwd(x_BLD, head_DV, targets_BL, weights_BL, chunk):
  return _head_pass(x_BLD, head_DV, targets_BL, weights_BL, chunk, grads=True)  # (loss, grads)


def _head_nll_sum_bwd(chunk, grads, g):
  del chunk
  dx_BLD, dhead_DV = grads
  return (g * dx_BLD).astype(dx_BLD.dtype), (g * dhead_DV).astype(dhead_DV.dtype), None, None


head_nll_sum.defvjp(_head_nll_sum_fwd, _head_nll_sum_bwd)
