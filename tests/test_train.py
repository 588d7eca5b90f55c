"""The train step: same losses on every mesh shape, micro-batching, NaN guard."""

import jax
import numpy as np
import pytest

from jaxllm import config as config_lib
from jaxllm import sharding
from jaxllm import train
from test_config import load

SEQ, BATCH, STEPS = 32, 8, 3


def small_config(microbatches=1):
  c = load('configs/tiny.py')
  with c.unlocked():
    c.model.update(vocab_size=256, d_model=64, n_layers=2, n_heads=8, n_kv_heads=4, head_dim=8,
                   mlp_dim=128)
    c.data.seq_len = SEQ
    c.train.global_batch_size = BATCH
    c.train.microbatches = microbatches
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


def run_steps(mesh_shape, microbatches=1, devices=None):
  config = small_config(microbatches)
  config_lib.validate(config, mesh_shape)
  trainer = train.make_trainer(config, sharding.make_mesh(mesh_shape, devices))
  state = trainer.init_state()
  losses = []
  with sharding.activate(trainer.mesh, trainer.rules):
    for batch in synthetic_batches():
      state, metrics = trainer.train_step(state, sharding.global_batch(batch, trainer.batch_sharding))
      losses.append(float(metrics['loss']))
  return np.array(losses), jax.device_get(state['params'])


@pytest.fixture(scope='module')
def single_device():
  return run_steps({'data': 1, 'fsdp': 1, 'tensor': 1}, devices=jax.devices()[:1])


@pytest.mark.parametrize('shape,microbatches', [
    ((8, 1, 1), 1), ((1, 8, 1), 1), ((2, 2, 2), 1), ((1, 2, 4), 1), ((2, 2, 2), 2)],
    ids=lambda v: str(v))
def test_same_losses_on_every_mesh(single_device, shape, microbatches):
  ref_losses, ref_params = single_device
  assert ref_losses[-1] < ref_losses[0] - 0.01  # it learns (step 0 has lr 0)
  losses, params = run_steps(dict(zip(sharding.MESH_AXES, shape)), microbatches)
  np.testing.assert_allclose(losses, ref_losses, rtol=2e-5)
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(ref_params)):
    # Adam divides by sqrt(second moment), which turns float32 noise in near-zero gradients into
    # visible element-wise differences; compare each tensor as a whole.
    assert np.linalg.norm(a - b) <= 1e-4 * np.linalg.norm(b)


def test_non_finite_loss_names_the_step():
  with pytest.raises(FloatingPointError, match='step 7.*optim.peak_lr'):
    train._check_finite(7, {'loss': float('nan'), 'grad_norm': 1.0})
  train._check_finite(7, {'loss': 1.0, 'grad_norm': 1.0})
