"""Next-token cross entropy and distillation, in float32: from logits, or fused with the output
head in chunks.

`nll_sum` takes logits [B, L, V]. `head_nll_sum` takes the final hidden states and the head
instead and never holds the logits of more than `chunk` positions per row: for a 128k vocabulary
at 4096 tokens a row the full float32 logits are 2 GiB per row, which caps the batch on a GPU.
Its gradient is computed in the same pass as the loss (the loss is the last op of the step, so
d loss / d logits is known there up to a scalar), which spares the recompute that a checkpointed
chunk loop would pay: the head's three matmuls run once each, as without chunks. With the batch
split over devices each chunk's head-gradient contribution is summed across them inside the loop,
so fewer, longer chunks communicate less.

Distillation (`kd_sum`, `head_kd_sum`): alpha x T^2 x KL(teacher || student, both softmaxes at
temperature T) + (1 - alpha) x cross entropy, per token. T^2 keeps the KL term's gradient, which
scales as 1/T, comparable across temperatures (Hinton et al. 2015). The chunked form takes the
teacher's final hidden states and head too and forms both models' logits a chunk at a time, so
neither [B, L, V] exists; the teacher is frozen (no gradient flows to it).
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


def _kd_tokens(logits_BLV, teacher_BLV, targets_BL, alpha: float, temperature: float,
               grads: bool):
  """Per token: (cross entropy, T^2 x KL(teacher || student at T)) and, if `grads`, d (alpha x kl
  + (1 - alpha) x ce) / d student logits, all float32."""
  t = temperature
  nll_BL, logz_BL = _token_nll(logits_BLV, targets_BL)
  logp_s_BLV = jax.nn.log_softmax(logits_BLV / t, axis=-1)
  logp_t_BLV = jax.nn.log_softmax(teacher_BLV / t, axis=-1)
  p_t_BLV = jnp.exp(logp_t_BLV)
  kl_BL = t * t * jnp.sum(p_t_BLV * (logp_t_BLV - logp_s_BLV), axis=-1)
  if not grads:
    return nll_BL, kl_BL, None
  # d T^2 KL / d logits = T (softmax(s / T) - softmax(t / T)); d ce / d logits = softmax - onehot.
  vocab_V = jnp.arange(logits_BLV.shape[-1], dtype=targets_BL.dtype)
  onehot_BLV = vocab_V[None, None] == targets_BL[..., None]
  dlogits_BLV = (alpha * t * (jnp.exp(logp_s_BLV) - p_t_BLV)
                 + (1 - alpha) * (jnp.exp(logits_BLV - logz_BL[..., None]) - onehot_BLV))
  return nll_BL, kl_BL, dlogits_BLV


def kd_sum(logits_BLV, teacher_logits_BLV, targets_BL, weights_BL, *, alpha: float,
           temperature: float):
  """(sum over tokens of weight x (alpha x T^2 x KL + (1 - alpha) x CE), the CE sum, the
  T^2 x KL sum), from both models' full logits; differentiable by autodiff."""
  nll_BL, kl_BL, _ = _kd_tokens(logits_BLV.astype(jnp.float32),
                                jax.lax.stop_gradient(teacher_logits_BLV.astype(jnp.float32)),
                                targets_BL, alpha, temperature, grads=False)
  ce, kl = jnp.sum(weights_BL * nll_BL), jnp.sum(weights_BL * kl_BL)
  return alpha * kl + (1 - alpha) * ce, ce, kl


def _matmul(a, b):
  """[..., K] @ [K, N] as one 2-D product (see model._dense), accumulating in float32."""
  return jnp.matmul(a.reshape(-1, a.shape[-1]), b,
                    preferred_element_type=jnp.float32).reshape(*a.shape[:-1], b.shape[-1])


def _chunks(x, chunk: int):
  """[B, L, ...] -> [L / chunk, B, chunk, ...]: the scan runs over positions, so every chunk
  keeps the batch dim (and its sharding) whole."""
  b, length = x.shape[:2]
  return x.reshape(b, length // chunk, chunk, *x.shape[2:]).swapaxes(0, 1)


def _head_pass(x_BLD, head_DV, per_chunk, chunked: tuple, chunk: int, grads: bool):
  """Sums over chunks of `per_chunk(logits_BCV, *chunk of each of chunked, grads)` -> (a tuple
  of loss sums, d first sum / d logits_BCV or None); returns (the tuple of sums, and if `grads`
  the gradients of the first sum with respect to x and the head)."""
  def body(dhead_DV, inputs):
    x_BCD = inputs[0]
    dhead_DV = sharding.constrain(dhead_DV, _HEAD)
    logits_BCV = sharding.constrain(_matmul(x_BCD, head_DV), _LOGITS)
    losses, dlogits_BCV = per_chunk(logits_BCV, *inputs[1:], grads)
    if not grads:
      return dhead_DV, (losses, None)
    # d loss / d logits is rounded to the compute dtype for the two matmuls (as fused
    # cross-entropy kernels do): with bfloat16 compute the gradients carry bfloat16 rounding of
    # d logits that autodiff of the unfused path, which multiplies the float32 cotangent, does not.
    dlogits_BCV = dlogits_BCV.astype(x_BCD.dtype)
    dx_BCD = _matmul(dlogits_BCV, head_DV.T).astype(x_BCD.dtype)
    dhead_DV += _matmul(x_BCD.reshape(-1, x_BCD.shape[-1]).T,
                        dlogits_BCV.reshape(-1, dlogits_BCV.shape[-1]))
    return dhead_DV, (losses, dx_BCD)

  # Laid out as the head itself, so each chunk's sum over the batch shards is a reduce-scatter.
  dhead_DV = sharding.constrain(jnp.zeros(head_DV.shape, jnp.float32), _HEAD)
  dhead_DV, (losses, dx_NBCD) = jax.lax.scan(
      body, dhead_DV, tuple(_chunks(a, chunk) for a in (x_BLD, *chunked)))
  sums = tuple(jnp.sum(s) for s in losses)
  if not grads:
    return sums, None
  dx_BLD = dx_NBCD.swapaxes(0, 1).reshape(x_BLD.shape)
  return sums, (dx_BLD, dhead_DV.astype(head_DV.dtype))


def _nll_chunk(logits_BCV, targets_BC, weights_BC, grads: bool):
  nll_BC, logz_BC = _token_nll(logits_BCV, targets_BC)
  losses = (jnp.sum(weights_BC * nll_BC),)
  if not grads:
    return losses, None
  # d loss / d logits = (softmax - one_hot(target)) x weight, formed in one fused pass.
  vocab_V = jnp.arange(logits_BCV.shape[-1], dtype=targets_BC.dtype)
  onehot_BCV = vocab_V[None, None] == targets_BC[..., None]
  return losses, (jnp.exp(logits_BCV - logz_BC[..., None]) - onehot_BCV) * weights_BC[..., None]


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def head_nll_sum(x_BLD, head_DV, targets_BL, weights_BL, chunk: int):
  """sum over tokens of weight x -log softmax(x @ head)[target], `chunk` positions of every row
  at a time (L % chunk == 0). The same value as nll_sum(x @ head, ...); differentiable in x and
  head only."""
  return _head_pass(x_BLD, head_DV, _nll_chunk, (targets_BL, weights_BL), chunk, False)[0][0]


def _head_nll_sum_fwd(x_BLD, head_DV, targets_BL, weights_BL, chunk):
  (loss,), grads = _head_pass(x_BLD, head_DV, _nll_chunk, (targets_BL, weights_BL), chunk, True)
  return loss, grads


def _head_nll_sum_bwd(chunk, grads, g):
  del chunk
  dx_BLD, dhead_DV = grads
  return (g * dx_BLD).astype(dx_BLD.dtype), (g * dhead_DV).astype(dhead_DV.dtype), None, None


head_nll_sum.defvjp(_head_nll_sum_fwd, _head_nll_sum_bwd)


def _kd_pass(x_BLD, head_DV, tx_BLD, thead_DV, targets_BL, weights_BL, chunk, alpha,
             temperature, grads):
  def per_chunk(logits_BCV, tx_BCD, targets_BC, weights_BC, grads):
    teacher_BCV = sharding.constrain(_matmul(tx_BCD, thead_DV), _LOGITS)
    nll_BC, kl_BC, dlogits_BCV = _kd_tokens(logits_BCV, teacher_BCV, targets_BC, alpha,
                                            temperature, grads)
    ce, kl = jnp.sum(weights_BC * nll_BC), jnp.sum(weights_BC * kl_BC)
    losses = (alpha * kl + (1 - alpha) * ce, ce, kl)
    return losses, None if dlogits_BCV is None else dlogits_BCV * weights_BC[..., None]

  tx_BLD = jax.lax.stop_gradient(tx_BLD)
  return _head_pass(x_BLD, head_DV, per_chunk, (tx_BLD, targets_BL, weights_BL), chunk, grads)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8))
def head_kd_sum(x_BLD, head_DV, teacher_x_BLD, teacher_head_DV, targets_BL, weights_BL,
                chunk: int, alpha: float, temperature: float):
  """kd_sum(x @ head, teacher_x @ teacher_head, ...) over `chunk` positions of every row at a
  time (L % chunk == 0): (objective, CE sum, T^2 x KL sum). Differentiable in x and head
  through the objective only: the two parts are reported values (as under stop_gradient) and the
  teacher is frozen."""
  return _kd_pass(x_BLD, head_DV, teacher_x_BLD, teacher_head_DV, targets_BL, weights_BL, chunk,
                  alpha, temperature, False)[0]


def _head_kd_sum_fwd(x_BLD, head_DV, teacher_x_BLD, teacher_head_DV, targets_BL, weights_BL,
                     chunk, alpha, temperature):
  return _kd_pass(x_BLD, head_DV, teacher_x_BLD, teacher_head_DV, targets_BL, weights_BL, chunk,
                  alpha, temperature, True)


def _head_kd_sum_bwd(chunk, alpha, temperature, grads, g):
  del chunk, alpha, temperature
  dx_BLD, dhead_DV = grads
  g = g[0]  # the objective's cotangent; the parts carry no gradient
  return ((g * dx_BLD).astype(dx_BLD.dtype), (g * dhead_DV).astype(dhead_DV.dtype), None, None,
          None, None)


head_kd_sum.defvjp(_head_kd_sum_fwd, _head_kd_sum_bwd)
