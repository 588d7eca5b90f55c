"""Model math: causality, scan == unrolled, remat == plain, GQA == reference, packing isolation."""

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxllm import model as model_lib

CFG = model_lib.ModelConfig(vocab_size=256, d_model=64, n_layers=2, n_heads=8, n_kv_heads=4,
                            head_dim=8, mlp_dim=128)
L = 16


def make(cfg=CFG, seed=0):
  return model_lib.Llama(cfg, rngs=nnx.Rngs(seed))


def split(cfg=CFG, seed=0):
  """(graphdef, params as a pure dict of arrays), as the train step holds them."""
  graphdef, state = nnx.split(make(cfg, seed))
  return graphdef, nnx.to_pure_dict(state)


def logits_fn(cfg=CFG, seed=0):
  """A jitted (params, tokens, segment_ids, positions) -> logits for one config."""
  graphdef, state = split(cfg, seed)

  @jax.jit
  def fwd(state, tokens, segment_ids=None, positions=None):
    return nnx.merge(graphdef, state)(tokens, segment_ids_BL=segment_ids, positions_BL=positions)
  return fwd, state


@pytest.fixture(scope='module')
def tokens():
  return jnp.asarray(np.random.default_rng(0).integers(0, CFG.vocab_size, (2, L)), jnp.int32)


@pytest.fixture(scope='module')
def base(tokens):
  fwd, state = logits_fn()
  logits = fwd(state, tokens)
  chex.assert_shape(logits, (*tokens.shape, CFG.vocab_size))
  chex.assert_type(logits, jnp.float32)
  return fwd, state, logits


def test_param_count_matches_formula():
  state = nnx.state(nnx.eval_shape(lambda: make()))
  assert sum(x.size for x in jax.tree.leaves(state)) == CFG.num_params()
  tied = dataclasses.replace(CFG, tie_embeddings=True)
  state = nnx.state(nnx.eval_shape(lambda: make(tied)))
  assert sum(x.size for x in jax.tree.leaves(state)) == tied.num_params()
  assert tied.num_params() == CFG.num_params() - CFG.d_model * CFG.vocab_size


def test_causal_by_gradient():
  """d logits[t] / d embedding[s] is zero for every s > t and non-zero for s <= t: with every
  position holding a different token (and an untied head), the gradient of logits[t] with respect
  to token s's embedding row is the gradient with respect to position s's input."""
  graphdef, state = split()
  t = 7
  tokens = jnp.arange(3, 3 + L, dtype=jnp.int32)[None]  # L distinct ids

  def out_at_t(embed_VD):
    return jnp.sum(nnx.merge(graphdef, {**state, 'embed_tokens': embed_VD})(tokens)[0, t])

  g = jax.grad(out_at_t)(state['embed_tokens'])
  per_position = np.abs(np.asarray(g[tokens[0]])).sum(-1)
  assert np.all(per_position[t + 1:] == 0)
  assert np.all(per_position[:t + 1] > 0)


def test_future_tokens_do_not_change_past_logits(base, tokens):
  fwd, state, ref = base
  changed = tokens.at[:, 10:].set((tokens[:, 10:] + 1) % CFG.vocab_size)
  out = fwd(state, changed)
  np.testing.assert_array_equal(np.asarray(out[:, :10]), np.asarray(ref[:, :10]))
  assert not np.allclose(out[:, 10:], ref[:, 10:])


def test_scan_equals_unrolled(base, tokens):
  _, params, ref = base
  fwd, state = logits_fn(dataclasses.replace(CFG, scan_layers=False))
  np.testing.assert_allclose(fwd(state, tokens), ref, rtol=1e-5, atol=1e-5)

  # And equals a plain Python loop over per-layer slices of the stacked parameters, through
  # separately built single layers: catches a wrong stacking axis or layer order in the scan.
  layer_def, _ = nnx.split(model_lib.DecoderLayer(CFG, rngs=nnx.Rngs(0)))
  pos = jnp.broadcast_to(jnp.arange(L), tokens.shape)
  x = jnp.take(params['embed_tokens'], tokens, axis=0)
  for i in range(CFG.n_layers):
    layer_params = jax.tree.map(lambda a: a[i], params['layers'])
    x = nnx.merge(layer_def, layer_params)(x, pos, None)
  norm = nnx.merge(nnx.split(model_lib.RMSNorm(CFG, rngs=nnx.Rngs(0)))[0], params['norm'])
  logits = norm(x) @ params['lm_head']
  np.testing.assert_allclose(logits, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize('policy', ['full', 'save_dots'])
def test_remat_equals_plain(policy, tokens):
  cfg = dataclasses.replace(CFG, remat=policy)

  def grads(cfg):
    graphdef, state = split(cfg)
    loss = lambda s: jnp.mean(nnx.merge(graphdef, s)(tokens) ** 2)
    return jax.jit(jax.value_and_grad(loss))(state)

  (l0, g0), (l1, g1) = grads(CFG), grads(cfg)
  np.testing.assert_allclose(l0, l1, rtol=1e-6)
  chex.assert_trees_all_close(g0, g1, rtol=1e-5, atol=1e-7)  # the same tree, leaf by leaf


def reference_attention(q, k, v):
  """Plain multi-head causal attention written out; kv heads repeated to the query heads."""
  groups = q.shape[2] // k.shape[2]
  k, v = jnp.repeat(k, groups, axis=2), jnp.repeat(v, groups, axis=2)
  scores = jnp.einsum('bqhd,bkhd->bhqk', q, k) / np.sqrt(q.shape[-1])
  causal = jnp.tril(jnp.ones((q.shape[1], k.shape[1]), bool))
  probs = jax.nn.softmax(jnp.where(causal, scores, -jnp.inf), axis=-1)
  return jnp.einsum('bhqk,bkhd->bqhd', probs, v)


@pytest.mark.parametrize('kv_heads', [8, 4, 1])
def test_attention_matches_reference(kv_heads, tokens):
  """kv_heads == heads is plain multi-head attention; fewer is GQA (1 is multi-query)."""
  cfg = dataclasses.replace(CFG, n_kv_heads=kv_heads)
  attn = model_lib.Attention(cfg, rngs=nnx.Rngs(1))
  x = jax.random.normal(jax.random.key(0), (2, L, cfg.d_model))
  pos = jnp.broadcast_to(jnp.arange(L), (2, L))
  q = model_lib.rope(jnp.einsum('bld,dhk->blhk', x, attn.q_proj[...]), pos, cfg.rope_theta)
  k = model_lib.rope(jnp.einsum('bld,dhk->blhk', x, attn.k_proj[...]), pos, cfg.rope_theta)
  v = jnp.einsum('bld,dhk->blhk', x, attn.v_proj[...])
  expected = jnp.einsum('blhk,hkd->bld', reference_attention(q, k, v), attn.o_proj[...])
  np.testing.assert_allclose(attn(x, pos, None), expected, rtol=1e-5, atol=1e-5)


def test_rope_is_half_split_rotation():
  """Position p rotates pair (i, i + Dh/2) by p * theta^(-i / (Dh/2)), as HF's rotate_half."""
  x = jax.random.normal(jax.random.key(0), (1, 3, 1, 8))
  pos = jnp.array([[0, 1, 5]])
  out = np.asarray(model_lib.rope(x, pos, 10_000.0))
  np.testing.assert_allclose(out[0, 0], x[0, 0], rtol=1e-6)  # position 0: identity
  i = 1
  angle = 5 * 10_000.0 ** (-i / 4)
  a, b = x[0, 2, 0, i], x[0, 2, 0, i + 4]
  np.testing.assert_allclose(out[0, 2, 0, i], a * np.cos(angle) - b * np.sin(angle), rtol=1e-5)
  np.testing.assert_allclose(out[0, 2, 0, i + 4], b * np.cos(angle) + a * np.sin(angle), rtol=1e-5)


def test_packed_documents_do_not_attend_to_each_other(base, tokens):
  """Two documents packed in one row give the logits each gives alone; padding changes nothing."""
  fwd, state, _ = base
  a, b = tokens[0, :6], tokens[1, :7]
  pad = jnp.zeros(L - 13, jnp.int32)
  packed = jnp.concatenate([a, b, pad])[None]
  segs = jnp.concatenate([jnp.full(6, 1), jnp.full(7, 2), jnp.zeros(L - 13)]).astype(jnp.int32)[None]
  pos = jnp.concatenate([jnp.arange(6), jnp.arange(7), jnp.zeros(L - 13)]).astype(jnp.int32)[None]
  out = fwd(state, packed, segs, pos)
  alone_a = fwd(state, a[None])
  alone_b = fwd(state, b[None])
  np.testing.assert_allclose(out[0, :6], alone_a[0], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(out[0, 6:13], alone_b[0], rtol=1e-5, atol=1e-5)
  # Without segment ids the second document would see the first: the check above has teeth.
  leaky = fwd(state, packed, None, pos)
  assert not np.allclose(leaky[0, 6:13], alone_b[0], atol=1e-3)


def test_flops_per_token_by_hand():
  cfg = model_lib.ModelConfig(vocab_size=100, d_model=8, n_layers=2, n_heads=2, n_kv_heads=1,
                              head_dim=4, mlp_dim=16)
  # per layer: q 8*8, k 8*4, v 8*4, o 8*8 = 192; mlp 3*8*16 = 384; head 8*100 = 800
  matmul = 2 * (192 + 384) + 800
  attn = 12 * 2 * 2 * 4 * 10
  assert model_lib.flops_per_token(cfg, 10) == 6 * matmul + attn / 2
  assert model_lib.flops_per_token(cfg, 10, causal_half=False) == 6 * matmul + attn


def test_bad_model_config_names_the_key():
  with pytest.raises(ValueError, match='model.remat'):
    dataclasses.replace(CFG, remat='sometimes')
  with pytest.raises(ValueError, match='n_kv_heads'):
    dataclasses.replace(CFG, n_kv_heads=3)
