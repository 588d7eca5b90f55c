"""KV-cache decoding: cached logits == full forward, greedy == argmax, filters, ragged batches."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxllm import model as model_lib
from jaxllm import sample
from jaxllm import sharding
from jaxllm import trainer as trainer_lib
from test_model import CFG
from test_train import small_config

N = 8  # new tokens per generate call


@pytest.fixture(scope='module')
def llama():
  graphdef, state = nnx.split(model_lib.Llama(CFG, rngs=nnx.Rngs(0)))
  params = nnx.to_pure_dict(state)
  forward = jax.jit(lambda params, tokens: nnx.merge(graphdef, params)(tokens))
  return graphdef, params, forward


def prompts(*lengths, seed=0):
  rng = np.random.default_rng(seed)
  return [list(rng.integers(3, CFG.vocab_size, n)) for n in lengths]


def greedy(llama, batch, **kw):
  graphdef, params, _ = llama
  tokens, starts = sample.left_pad(batch)
  out = jax.device_get(sample.generate(graphdef, params, tokens, starts, jax.random.key(0),
                                       max_new_tokens=N, **kw))
  chex.assert_shape([out['tokens'], out['lengths']], [(len(batch), N), (len(batch),)])
  return out


def test_cached_logits_equal_the_full_forward_at_every_position(llama):
  graphdef, params, forward = llama
  tokens = jnp.asarray(prompts(12, 12, seed=1), jnp.int32)
  full = np.asarray(forward(params, tokens))
  starts = jnp.zeros(2, jnp.int32)
  prefill = jax.jit(lambda p, t, s: sample.prefill(nnx.merge(graphdef, p), t, s, cache_len=12))
  step = jax.jit(lambda p, c, t, i, s: sample.step(nnx.merge(graphdef, p), c, t, i, s))
  logits, cache = prefill(params, tokens[:, :5], starts)
  chex.assert_trees_all_close(logits, full[:, :5], atol=1e-5, rtol=1e-5)
  for t in range(5, 12):  # teacher-forced: one token a step through the cache
    logits, cache = step(params, cache, tokens[:, t], t, starts)
    chex.assert_trees_all_close(logits, full[:, t], atol=1e-5, rtol=1e-5)


def test_greedy_is_deterministic_and_the_argmax_of_the_full_forward(llama):
  _, params, forward = llama
  batch = prompts(5)
  out = greedy(llama, batch)
  np.testing.assert_array_equal(out['tokens'], greedy(llama, batch)['tokens'])
  seq = np.concatenate([batch[0], out['tokens'][0]])[None]
  # logits at position p predict token p + 1: every generated token is that argmax.
  argmax = np.asarray(forward(params, jnp.asarray(seq, jnp.int32))).argmax(-1)[0]
  np.testing.assert_array_equal(out['tokens'][0], argmax[len(batch[0]) - 1:-1])
  assert out['lengths'][0] == N


def test_top_k_1_and_a_tiny_top_p_equal_greedy(llama):
  """Hot draws (temperature > 0, so the sampling path) from a filter that keeps only the most
  likely token: top_k=1, or a nucleus of probability 1e-6 (the top token alone reaches it)."""
  batch = prompts(4, 9)
  ref = greedy(llama, batch)['tokens']  # temperature 0
  np.testing.assert_array_equal(greedy(llama, batch, temperature=1.5, top_k=1)['tokens'], ref)
  np.testing.assert_array_equal(greedy(llama, batch, temperature=5.0, top_p=1e-6)['tokens'], ref)
  drawn = greedy(llama, batch, temperature=5.0)['tokens']
  assert not np.array_equal(drawn, ref)  # unfiltered, a hot sample differs: the draw is random
  nucleus = greedy(llama, batch, temperature=5.0, top_p=0.5)['tokens']
  assert not np.array_equal(nucleus, ref)  # a wide nucleus still draws


def test_prompts_of_different_lengths_in_one_batch_equal_each_alone(llama):
  batch = prompts(3, 7, 12, seed=2)
  together = greedy(llama, batch)['tokens']
  for b, prompt in enumerate(batch):
    np.testing.assert_array_equal(greedy(llama, [prompt])['tokens'][0], together[b])


def test_stops_at_eos(llama):
  ref = greedy(llama, prompts(6))['tokens'][0]
  eos = int(ref[3])
  first = list(ref).index(eos)
  out = greedy(llama, prompts(6), eos_id=eos)
  assert out['lengths'][0] == first
  assert np.all(out['tokens'][0, first:] == eos)
  np.testing.assert_array_equal(out['tokens'][0, :first], ref[:first])


def test_filter_logits_keeps_top_k_and_the_top_p_nucleus():
  logits = jnp.log(jnp.array([[0.05, 0.5, 0.15, 0.3]]))
  kept = lambda **kw: np.isfinite(np.asarray(sample.filter_logits(logits, **kw)))[0].tolist()
  assert kept(temperature=1.0, top_k=0, top_p=1.0) == [True] * 4
  assert kept(temperature=1.0, top_k=3, top_p=1.0) == [False, True, True, True]
  assert kept(temperature=1.0, top_k=0, top_p=0.7) == [False, True, False, True]
  assert kept(temperature=1.0, top_k=0, top_p=0.1) == [False, True, False, False]
  assert kept(temperature=1.0, top_k=2, top_p=0.95) == [False, True, False, True]


def test_left_pad_buckets_and_pads_rows():
  tokens, starts = sample.left_pad([[5, 6, 7], [8]], rows=4)
  assert tokens.shape == (4, 16) and starts.tolist() == [13, 15, 15, 15]
  assert tokens[0, 13:].tolist() == [5, 6, 7] and tokens[1, 15] == 8
  assert sample.bucket_length(17) == 32 and sample.bucket_length(3) == 16


def test_sharded_generation_equals_unsharded():
  """Parameters and cache sharded over a (2, 2, 2) mesh give the tokens of one device."""
  mesh = sharding.make_mesh({'data': 2, 'fsdp': 2, 'tensor': 2})
  trainer = trainer_lib.make_trainer(small_config(), mesh)
  params = trainer.init_state()['params']
  tokens, starts = sample.left_pad(prompts(4, 11), rows=4)
  kw = dict(max_new_tokens=N, temperature=0.0)
  with sharding.activate(trainer.mesh, trainer.rules):
    sharded = sample.generate(trainer.graphdef, params, tokens, starts, jax.random.key(0), **kw)
  plain = sample.generate(trainer.graphdef, jax.device_get(params), tokens, starts,
                          jax.random.key(0), **kw)
  np.testing.assert_array_equal(jax.device_get(sharded['tokens']), plain['tokens'])
