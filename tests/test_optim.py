"""The learning-rate schedule and the weight-decay mask."""

import jax
import jax.numpy as jnp
import pytest

from jaxllm import optim, sharding
from jaxllm import trainer as trainer_lib
from test_train import small_config


def test_schedule_warmup_then_cosine_to_final_fraction():
  lr = optim.learning_rate_schedule(peak_lr=1e-3, warmup_steps=10, decay_steps=90,
                                    final_lr_fraction=0.1)
  assert float(lr(0)) == 0.0  # the first update is zero by design (linear warmup from 0)
  assert float(lr(5)) == pytest.approx(5e-4)
  assert float(lr(10)) == pytest.approx(1e-3)
  assert float(lr(55)) == pytest.approx(1e-4 + 0.5 * 9e-4, rel=1e-5)  # cosine midpoint
  assert float(lr(100)) == pytest.approx(1e-4)
  assert float(lr(1000)) == pytest.approx(1e-4)
  no_warmup = optim.learning_rate_schedule(peak_lr=1e-3, warmup_steps=0, decay_steps=10,
                                           final_lr_fraction=0.0)
  assert float(no_warmup(0)) == pytest.approx(1e-3) and float(no_warmup(10)) == 0.0


def test_weight_decay_only_on_matrices():
  """Norm scales (1-D per layer, 2-D once stacked) get no decay; every matrix does."""
  trainer = trainer_lib.make_trainer(small_config(), sharding.make_mesh(
      {'data': 1, 'fsdp': 8, 'tensor': 1}))
  # AdamW steps with zero gradients move only decayed parameters (by lr x wd x p).
  params = jax.tree.map(lambda a: jnp.ones(a.shape, a.dtype), trainer.abstract_state['params'])
  state = trainer.tx.init(params)
  grads = jax.tree.map(jnp.zeros_like, params)
  for _ in range(3):  # step 0 has lr 0 (warmup from 0)
    updates, state = trainer.tx.update(grads, state, params)
  moved = jax.tree.map(lambda u: bool(jnp.any(u != 0)), updates)
  assert moved['norm']['weight'] is False
  assert moved['layers']['input_layernorm']['weight'] is False
  assert moved['layers']['post_attention_layernorm']['weight'] is False
  assert moved['embed_tokens'] and moved['lm_head']
  assert moved['layers']['self_attn']['q_proj'] and moved['layers']['mlp']['down_proj']

