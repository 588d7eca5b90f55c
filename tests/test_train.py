"""The train step: same losses on every mesh shape, micro-batching, NaN guard."""

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm import config as config_lib
from jaxllm import layerstats
from jaxllm import loss as loss_lib
from jaxllm import runtime
from jaxllm import sharding
from jaxllm import train
from jaxllm import trainer as trainer_lib
from test_config import load

SEQ, BATCH, STEPS = 32, 8, 3


def small_config(microbatches=1, loss_chunk=0):
  c = load('configs/tiny.py')
  with c.unlocked():
    c.model.update(vocab_size=256, d_model=64, n_layers=2, n_heads=8, n_kv_heads=4, head_dim=8,
                   mlp_dim=128)
    c.data.seq_len = SEQ
    c.train.global_batch_size = BATCH
    c.train.microbatches = microbatches
    c.train.loss_chunk = loss_chunk
    c.train.num_steps = 10
    c.optim.warmup_steps = 1
    c.optim.peak_lr = 1e-2
  return c


def synthetic_batches():
  """Rows of two packed documents each, then a different amount of padding per row, so
  micro-batches hold different numbers of real tokens: a mean of per-micro-batch means would
  differ from the token mean. The same batch every step, so the loss must fall (memorisation)."""
  rng = np.random.default_rng(0)
  tokens = rng.integers(3, 256, (BATCH, SEQ + 1), dtype=np.int32)
  cut = rng.integers(5, SEQ - 12, BATCH)
  seg = np.where(np.arange(SEQ)[None] < cut[:, None], 1, 2).astype(np.int32)
  for row in range(BATCH):
    seg[row, SEQ - 1 - 3 * (row % 4):] = 0
  pos = np.where(seg == 1, np.arange(SEQ)[None], np.arange(SEQ)[None] - cut[:, None])
  pos = np.where(seg == 0, 0, pos).astype(np.int32)
  batch = {'inputs': tokens[:, :-1], 'targets': tokens[:, 1:], 'segment_ids': seg,
           'positions': pos}
  return [batch] * STEPS


def run_steps(mesh_shape, microbatches=1, devices=None, loss_chunk=0, *, with_trainer=False,
              **model):
  """The steps of synthetic_batches() on `mesh_shape`: (losses, params), or with `with_trainer`
  (losses, trainer, final state). `model` overrides model.* keys (dtype, fp8)."""
  config = small_config(microbatches, loss_chunk)
  with config.unlocked():
    config.model.update(model)
  config_lib.validate(config, mesh_shape)
  trainer = trainer_lib.make_trainer(config, sharding.make_mesh(mesh_shape, devices))
  state = trainer.init_state()
  losses = []
  with sharding.activate(trainer.mesh, trainer.rules):
    for batch in synthetic_batches():
      state, metrics = trainer.train_step(state, sharding.global_batch(batch, trainer.batch_sharding))
      losses.append(float(metrics['loss']))
  if with_trainer:
    return np.array(losses), trainer, state
  return np.array(losses), jax.device_get(state['params'])


@pytest.mark.parametrize('shape,microbatches,loss_chunk', [
    ((8, 1, 1), 1, 0), ((1, 8, 1), 1, 0), ((2, 2, 2), 1, 0), ((1, 2, 4), 1, 0), ((2, 2, 2), 2, 0),
    ((1, 2, 4), 2, SEQ // 4)], ids=lambda v: str(v))
def test_same_losses_on_every_mesh(single_device, shape, microbatches, loss_chunk):
  """Also the fused chunked head + loss (train.loss_chunk), with the vocab split over `tensor`.
  `single_device` (conftest.py): run_steps on one device, shared with test_accelerator."""
  ref_losses, ref_params = single_device
  assert ref_losses[-1] < ref_losses[0] - 0.01  # it learns (step 0 has lr 0)
  losses, params = run_steps(dict(zip(sharding.MESH_AXES, shape)), microbatches,
                             loss_chunk=loss_chunk)
  np.testing.assert_allclose(losses, ref_losses, rtol=2e-5)
  chex.assert_trees_all_equal_shapes_and_dtypes(params, ref_params)  # then zip pairs them right
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(ref_params)):
    # Adam divides by sqrt(second moment), which turns float32 noise in near-zero gradients into
    # visible element-wise differences; compare each tensor as a whole.
    assert np.linalg.norm(a - b) <= 1e-4 * np.linalg.norm(b)


NAN, GOOD = {'loss': float('nan'), 'grad_norm': 1.0}, {'loss': 1.0, 'grad_norm': 1.0}


def test_non_finite_loss_names_the_step():
  guard = train.NonFiniteGuard()
  guard.check(6, GOOD)
  with pytest.raises(FloatingPointError, match='step 7.*optim.peak_lr'):
    guard.check(7, NAN)


def test_non_finite_parameters_stop_the_run_though_loss_and_gradient_are_finite():
  guard = train.NonFiniteGuard()
  with pytest.raises(FloatingPointError, match='step 3.*parameters finite after the update: False'):
    guard.check(3, {**GOOD, 'params_finite': 0.0}, resume_hint=lambda: '; HINT')
  guard.check(4, {**GOOD, 'params_finite': 1.0})


def test_skip_nonfinite_allows_k_in_a_row_and_counts_them():
  guard = train.NonFiniteGuard(2)
  for step, m in enumerate([NAN, NAN, GOOD, NAN, {'loss': 1.0, 'grad_norm': float('inf')}]):
    guard.check(step, m)
  assert (guard.skipped, guard.in_a_row) == (4, 2)
  with pytest.raises(FloatingPointError, match='step 9.*3 in a row.*optim.skip_nonfinite=2'):
    guard.check(9, NAN)


def test_skipped_step_keeps_the_state_and_a_good_step_updates_it():
  config = small_config()
  with config.unlocked():
    config.optim.skip_nonfinite = 1
    config.optim.warmup_steps = 0  # step 0 then has a learning rate above 0
  mesh_shape = {'data': 1, 'fsdp': 1, 'tensor': 1}
  trainer = trainer_lib.make_trainer(config, sharding.make_mesh(mesh_shape, jax.devices()[:1]))
  state = jax.device_get(trainer.init_state())
  first = jax.tree_util.tree_flatten_with_path(state['params'])[0][0][0]
  poisoned = {**state, 'params': jax.tree_util.tree_map_with_path(
      lambda path, x: np.full_like(x, np.nan) if path == first else x, state['params'])}
  batch = synthetic_batches()[0]
  with sharding.activate(trainer.mesh, trainer.rules):
    def step(s):
      out, metrics = trainer.train_step(jax.device_put(s, trainer.state_shardings),
                                        sharding.global_batch(batch, trainer.batch_sharding))
      return jax.device_get(out), jax.device_get(metrics)
    skipped, metrics = step(poisoned)
    updated, good = step(state)
  assert not np.isfinite(metrics['loss']) and np.isfinite(good['loss'])
  assert (metrics['params_finite'], good['params_finite']) == (0.0, 1.0)  # checked in the step
  assert skipped['step'] == updated['step'] == 1
  # Bit for bit as it was (NaN == NaN here), parameters and AdamW state alike.
  chex.assert_trees_all_equal(skipped['params'], poisoned['params'])
  chex.assert_trees_all_equal(skipped['opt_state'], poisoned['opt_state'])
  changed = [not np.array_equal(a, b) for a, b in
             zip(jax.tree.leaves(updated['params']), jax.tree.leaves(state['params']))]
  assert all(changed)


@pytest.mark.parametrize('chunk', [16, 4])
def test_fused_head_loss_matches_logits_then_loss(chunk):
  """loss.head_nll_sum == nll_sum(x @ head) in value and in both gradients, whole or in chunks;
  padding (weight 0) contributes nothing."""
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((3, 16, 24)), jnp.float32)
  head = jnp.asarray(rng.standard_normal((24, 50)) * 0.3, jnp.float32)
  targets = jnp.asarray(rng.integers(0, 50, (3, 16)), jnp.int32)
  weights = jnp.asarray(rng.random((3, 16)) > 0.25, jnp.float32)
  plain = lambda x, w: loss_lib.nll_sum(jnp.einsum('bld,dv->blv', x, w), targets, weights)
  fused = lambda x, w: loss_lib.head_nll_sum(x, w, targets, weights, chunk)
  # Scaled by 3 so that a backward pass that ignored its cotangent would fail.
  want, want_grads = jax.value_and_grad(lambda *a: 3 * plain(*a), argnums=(0, 1))(x, head)
  got, got_grads = jax.value_and_grad(lambda *a: 3 * fused(*a), argnums=(0, 1))(x, head)
  np.testing.assert_allclose(got, want, rtol=1e-6)
  np.testing.assert_allclose(3 * jax.jit(fused)(x, head), want, rtol=1e-6)  # no-gradient path
  chex.assert_trees_all_close(got_grads, want_grads, atol=3e-5)
  assert not np.any(got_grads[0][np.asarray(weights) == 0])  # padded positions get no gradient
  # bfloat16 compute (x and head in bf16, logits in float32): close to the float32 gradients.
  bf16 = jax.grad(fused, argnums=(0, 1))(x.astype(jnp.bfloat16), head.astype(jnp.bfloat16))
  for g, w in zip(bf16, want_grads):
    assert g.dtype == jnp.bfloat16
    assert np.linalg.norm(np.float32(g) - w / 3) <= 2e-2 * np.linalg.norm(w / 3)


def test_train_and_eval_steps_pass_the_trainers_compiler_options_to_xla():
  config = small_config()
  trainer = trainer_lib.make_trainer(config, sharding.make_mesh({'data': 1, 'fsdp': 1, 'tensor': 1},
                                                        jax.devices()[:1]))
  # XLA:CPU's LLVM IR emitters where this XLA still has them (jax 0.10; 0.12 dropped the option).
  emitters = (jax.devices()[0].platform == 'cpu'
              and runtime._xla_cpu_accepts(**runtime.CPU_NO_FUSION_EMITTERS))
  assert trainer.compiler_options == (runtime.CPU_NO_FUSION_EMITTERS if emitters else None)
  bogus = dataclasses.replace(trainer, compiler_options={'xla_cpu_no_such_option_here': False})
  batch = bogus.abstract_batch(BATCH, SEQ)
  with sharding.activate(bogus.mesh, bogus.rules):
    for lower in (lambda: bogus.train_step.lower(bogus.abstract_state, batch),
                  lambda: bogus.eval_step.lower(bogus.abstract_state['params'], batch),
                  lambda: bogus.lower_step_for(batch)):  # the step the train loop runs
      with pytest.raises(jax.errors.JaxRuntimeError, match='xla_cpu_no_such_option_here'):
        lower().compile()


def test_weights_select_the_targets_that_carry_loss():
  """A batch's `weights` (conversations: assistant targets only) split the loss and the token
  count: the weighted half and the other half add up to the unweighted batch, and neither
  equals the whole."""
  trainer = trainer_lib.make_trainer(small_config(), sharding.make_mesh(
      {'data': 1, 'fsdp': 1, 'tensor': 1}, jax.devices()[:1]))
  params = trainer.init_state()['params']
  batch = synthetic_batches()[0]
  half = (np.random.default_rng(1).random(batch['targets'].shape) < 0.5).astype(np.int32)
  with sharding.activate(trainer.mesh, trainer.rules):
    run = lambda b: jax.device_get(trainer.eval_step(params, sharding.global_batch(
        b, trainer.batch_sharding)))
    whole = run(batch)
    a, b = run({**batch, 'weights': half}), run({**batch, 'weights': 1 - half})
  real = batch['segment_ids'] > 0
  assert (a['tokens'], b['tokens']) == ((half * real).sum(), ((1 - half) * real).sum())
  np.testing.assert_allclose(a['loss_sum'] + b['loss_sum'], whole['loss_sum'], rtol=1e-5)
  assert 0 < a['loss_sum'] < 0.8 * whole['loss_sum']


def test_layer_stats_match_a_direct_computation():
  """train.layer_stats_every > 0: the step's norms per layer (stacked leaves) or per leaf equal
  numpy's in float64 from the state before and after the step, with the parameters sharded over
  fsdp and tensor (mesh 2x2x2) and the reference gradient taken on one device."""
  config = small_config()
  with config.unlocked():
    config.train.layer_stats_every = 5
  mesh = sharding.make_mesh({'data': 2, 'fsdp': 2, 'tensor': 2})
  trainer = trainer_lib.make_trainer(config, mesh)
  first, batch = synthetic_batches()[:2]
  with sharding.activate(trainer.mesh, trainer.rules):
    put = lambda b: sharding.global_batch(b, trainer.batch_sharding)
    state, _ = trainer.train_step(trainer.init_state(), put(first))  # step 0's lr is 0: no update
    before = jax.device_get(state['params'])
    state, metrics = trainer.train_step(state, put(batch))
    after, metrics = jax.device_get((state['params'], metrics))
  # Outside `activate` the model constrains nothing: the reference runs on one device.
  grads = jax.jit(jax.grad(lambda p: trainer_lib._loss_sums(trainer, p, batch)[0]))(before)
  grads = jax.tree.map(lambda g: np.float64(g) / metrics['tokens'], jax.device_get(grads))
  stats = metrics['layer_stats']
  flat = lambda tree: {jax.tree_util.keystr(path, simple=True, separator='/'): np.float64(x)
                       for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]}
  before, after, grads = flat(before), flat(after), flat(grads)

  def norm(x, stacked):
    return np.sqrt(np.sum(x ** 2, axis=tuple(range(1, x.ndim)) if stacked else None))

  # float32 sums of squares in another order (8 shards; the reference gradient on one device)
  # were seen within 2e-7 of float64: rtol 1e-5 leaves 50x.
  for name, p in before.items():
    stacked, step = name.startswith('layers/'), after[name] - p
    assert stats[f'{name}/param_norm'].shape == ((config.model.n_layers,) if stacked else ())
    np.testing.assert_allclose(stats[f'{name}/param_norm'], norm(p, stacked), rtol=1e-5)
    np.testing.assert_allclose(stats[f'{name}/grad_norm'], norm(grads[name], stacked), rtol=1e-5)
    # new = p + update rounds each element by at most half an ulp of new (2^-24 relative), so
    # the norm of new - p also differs from the update's by up to 2^-24 |new|.
    bound = 1e-5 * norm(step, stacked) + 2.0 ** -24 * norm(after[name], stacked)
    np.testing.assert_array_less(np.abs(stats[f'{name}/update_norm'] - norm(step, stacked)), bound)
  assert sorted(stats) == sorted(f'{n}/{k}' for n in before for k in layerstats.KINDS)
  assert min(np.min(stats[f'{n}/update_norm']) for n in before) > 0  # a real update
  # Together the grad norms make the step's global gradient norm.
  total = np.sqrt(sum(np.sum(np.float64(stats[f'{n}/grad_norm']) ** 2) for n in before))
  np.testing.assert_allclose(total, metrics['grad_norm'], rtol=1e-5)
