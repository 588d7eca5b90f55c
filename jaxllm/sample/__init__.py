"""KV-cache decoding: batched, greedy or sampled (temperature, top-k, top-p), stops at EOS.

Prompts are token ids (this module never tokenizes). They are left-padded to a bucket length
(a power of two) so a few compiled programs serve every prompt; each row keeps its own RoPE
positions and never attends to its padding (see model.Llama.decode). `generate` is one jitted
program: the prefill of the whole padded prompt, then a lax.while_loop of one-token steps that
ends when every row has produced EOS or `max_new_tokens`. Sampling settings are traced scalars,
so changing them does not recompile. Run it under the training mesh and rules
(sharding.activate): the cache is constrained like the activations, batch over (data, fsdp) and
kv heads over tensor, so the rows must divide data x fsdp (`left_pad(rows=...)` pads them).

    python -m jaxllm.sample --workdir=runs/tiny --prompt="ROMEO:" [--max_new_tokens=100
        --temperature=0.8 --top_k=0 --top_p=0.95 --seed=0]
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxllm import model as model_lib
from jaxllm import sharding
from jaxllm import tokenizer as tokenizer_lib


def bucket_length(n: int, minimum: int = 16) -> int:
  """The smallest power of two >= n (and >= minimum): prompt lengths that share a compile."""
  return max(minimum, 1 << max(n - 1, 0).bit_length())


def left_pad(prompts: Sequence[Sequence[int]], *, length: int | None = None, rows: int = 1,
             pad_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """Prompts -> (tokens [B, P] int32 left-padded, starts [B] int32: index of each first real
  token). B is len(prompts) rounded up to a multiple of `rows` (extra rows repeat the last
  prompt, so they cost nothing to drop); P is `length` or the bucket of the longest prompt."""
  if not prompts or min(len(p) for p in prompts) < 1:
    raise ValueError('every prompt needs at least one token (a BOS is enough)')
  P = length or bucket_length(max(len(p) for p in prompts))
  if max(len(p) for p in prompts) > P:
    raise ValueError(f'a prompt of {max(len(p) for p in prompts)} tokens exceeds length={P}')
  prompts = list(prompts) + [prompts[-1]] * (-len(prompts) % rows)
  tokens_BP = np.full((len(prompts), P), pad_id, np.int32)
  starts_B = np.array([P - len(p) for p in prompts], np.int32)
  for b, p in enumerate(prompts):
    tokens_BP[b, starts_B[b]:] = p
  return tokens_BP, starts_B


def filter_logits(logits_BV, *, temperature, top_k, top_p):
  """Logits / temperature with all but the top_k (0 = all) and the smallest set whose
  probability reaches top_p (1 = all) set to -inf. The most likely token always survives."""
  logits_BV = logits_BV.astype(jnp.float32) / jnp.where(temperature > 0, temperature, 1.0)
  V = logits_BV.shape[-1]
  sorted_BV = -jnp.sort(-logits_BV, axis=-1)  # descending
  kth_B1 = jnp.take(sorted_BV, jnp.clip(top_k - 1, 0, V - 1), axis=-1)[:, None]
  keep_k_BV = (top_k <= 0) | (logits_BV >= kth_B1)
  sorted_BV = jnp.where((top_k <= 0) | (sorted_BV >= kth_B1), sorted_BV, -jnp.inf)
  # A sorted token is kept if the tokens before it hold less than top_p of the probability.
  probs_BV = jax.nn.softmax(sorted_BV, axis=-1)
  before_BV = jnp.cumsum(probs_BV, axis=-1) - probs_BV
  cutoff_B1 = jnp.min(jnp.where(before_BV < top_p, sorted_BV, jnp.inf), axis=-1, keepdims=True)
  return jnp.where(keep_k_BV & (logits_BV >= cutoff_B1), logits_BV, -jnp.inf)


def sample_token(logits_BV, key, *, temperature, top_k, top_p):
  """Next token [B] int32: argmax when temperature <= 0, else a draw from filter_logits."""
  greedy_B = jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
  filtered_BV = filter_logits(logits_BV, temperature=temperature, top_k=top_k, top_p=top_p)
  drawn_B = jax.random.categorical(key, filtered_BV, axis=-1).astype(jnp.int32)
  return jnp.where(temperature > 0, drawn_B, greedy_B)


def _cache(cfg: model_lib.ModelConfig, batch: int, length: int) -> dict:
  cache = model_lib.init_cache(cfg, batch, length)
  return jax.tree.map(lambda c: sharding.constrain(c, model_lib.CACHE_NAMES), cache)


def prefill(model: model_lib.Llama, tokens_BP, starts_B, *, cache_len: int):
  """The whole padded prompt in one pass: (logits [B, P, V], cache of `cache_len` slots)."""
  cache = _cache(model.cfg, tokens_BP.shape[0], cache_len)
  return model.decode(tokens_BP, cache, index=0, starts_B=starts_B)


def step(model: model_lib.Llama, cache, token_B, index, starts_B):
  """One token per row at cache slot `index`: (logits [B, V], cache)."""
  logits_B1V, cache = model.decode(token_B[:, None], cache, index=index, starts_B=starts_B)
  return logits_B1V[:, 0], cache


@functools.partial(jax.jit, static_argnames=('graphdef', 'max_new_tokens'))
def generate(graphdef, params, tokens_BP, starts_B, key, *, max_new_tokens: int,
             temperature=0.0, top_k=0, top_p=1.0, eos_id=-1):
  """Left-padded prompts (left_pad) -> {'tokens': [B, max_new_tokens] int32, 'lengths': [B]}.

  `eos_id`: the id, or a sequence of ids (a chat template's end of turn and EOS), that ends a
  row. Tokens after a row's first stop id are the first of `eos_id`; `lengths` counts the tokens
  before it (the stop excluded). temperature 0 is greedy; top_k 0 and top_p 1 switch those
  filters off; eos_id -1 never stops.
  """
  stop_S = jnp.atleast_1d(jnp.asarray(eos_id, jnp.int32))
  is_stop = lambda tokens: jnp.any(tokens[..., None] == stop_S.reshape((1,) * tokens.ndim + (-1,)),
                                    axis=-1)
  eos_id = stop_S[0]
  model = nnx.merge(graphdef, params)
  B, P = tokens_BP.shape
  N = max_new_tokens
  sampling = dict(temperature=temperature, top_k=top_k, top_p=top_p)
  logits_BPV, cache = prefill(model, tokens_BP, starts_B, cache_len=P + N - 1)
  key, now = jax.random.split(key)
  first_B = sample_token(logits_BPV[:, -1], now, **sampling)
  out_BN = jnp.full((B, N), eos_id, jnp.int32).at[:, 0].set(first_B)

  def cond(carry):
    i, _, _, done_B, _ = carry
    return (i < N) & ~jnp.all(done_B)

  def body(carry):
    i, out_BN, cache, done_B, key = carry
    previous_B = jax.lax.dynamic_index_in_dim(out_BN, i - 1, axis=1, keepdims=False)
    # Merged again inside the loop: NNX refuses modules captured from an outer trace level.
    logits_BV, cache = step(nnx.merge(graphdef, params), cache, previous_B, P + i - 1, starts_B)
    key, now = jax.random.split(key)
    token_B = jnp.where(done_B, eos_id, sample_token(logits_BV, now, **sampling))
    out_BN = jax.lax.dynamic_update_index_in_dim(out_BN, token_B, i, axis=1)
    return i + 1, out_BN, cache, done_B | is_stop(token_B), key

  carry = (jnp.int32(1), out_BN, cache, is_stop(first_B), key)
  _, out_BN, _, _, _ = jax.lax.while_loop(cond, body, carry)
  is_eos_BN = is_stop(out_BN)
  lengths_B = jnp.where(is_eos_BN.any(axis=1), jnp.argmax(is_eos_BN, axis=1), N)
  # Replicated, so every process can read the result.
  return {'tokens': sharding.constrain(out_BN, (None, None)),
          'lengths': sharding.constrain(lengths_B.astype(jnp.int32), (None,))}


def sample_texts(graphdef, params, tokenizer: tokenizer_lib.Tokenizer, prompts: Sequence[str], *,
                 mesh, rules, max_new_tokens: int, temperature: float = 0.0, top_k: int = 0,
                 top_p: float = 1.0, seed: int = 0) -> list[str]:
  """Each prompt and its continuation (up to EOS or max_new_tokens), decoded; generated with
  the KV cache on `mesh`. Prompts start with BOS, as every training document does."""
  bos = [] if tokenizer.bos_id is None else [tokenizer.bos_id]
  ids = [[*bos, *tokenizer.encode(p)] for p in prompts]
  new = generate_ids(graphdef, params, ids, mesh=mesh, rules=rules, stop_ids=[tokenizer.eos_id],
                     max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                     top_p=top_p, seed=seed)
  return [tokenizer.decode(ids[b][len(bos):] + new[b]) for b in range(len(prompts))]


def generate_ids(graphdef, params, prompts: Sequence[Sequence[int]], *, mesh, rules,
                 stop_ids: Sequence[int], max_new_tokens: int, temperature: float = 0.0,
                 top_k: int = 0, top_p: float = 1.0, seed: int = 0) -> list[list[int]]:
  """The ids generated after each prompt (of ids), up to a stop id (excluded) or max_new_tokens."""
  tokens_BP, starts_B = left_pad(prompts, rows=sharding.batch_ways(mesh, rules))
  with sharding.activate(mesh, rules):
    out = generate(graphdef, params, tokens_BP, starts_B, jax.random.key(seed),
                   max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                   top_p=top_p, eos_id=tuple(int(i) for i in stop_ids))
  out = jax.device_get(out)
  return [out['tokens'][b, :out['lengths'][b]].tolist() for b in range(len(prompts))]

