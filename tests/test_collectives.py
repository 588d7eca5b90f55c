"""Collective bytes read from compiled HLO (jaxllm/collectives.py) against hand counts, and the
options that change them (train.microbatch_gather, optim.shard_over_data)."""

import math

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxllm import aot
from jaxllm import checkpoint as checkpoint_lib
from jaxllm import collectives
from jaxllm import config as config_lib
from jaxllm import sharding
from jaxllm import train

MESH = {'data': 2, 'fsdp': 2, 'tensor': 2}


def test_hand_counted_program_inside_a_loop():
  """A scan of 3 steps, each gathering a [4, 16] float32 shard over fsdp into [8, 16] (512 bytes)
  and summing that over data (512 bytes), then one float32 [4, 16] sum over tensor (256 bytes):
  3 x 512 all-gather on fsdp, 3 x 512 all-reduce on data, 256 on tensor. (float32: XLA:CPU
  reduces a bfloat16 psum in float32, so bf16 savings show only on GPU/TPU HLO.)"""
  mesh = sharding.make_mesh(MESH)

  def local(x):  # x: this device's [4, 16] rows
    def body(c, _):
      g = jax.lax.all_gather(x + c, 'fsdp', tiled=True)  # depends on c: not hoisted
      return c + jax.lax.psum(g, 'data').sum(), None
    c, _ = jax.lax.scan(body, jnp.float32(0), None, length=3)
    return jax.lax.psum(jnp.full((4, 16), c, jnp.float32), 'tensor').sum()

  f = jax.jit(jax.shard_map(local, mesh=mesh, in_specs=P('fsdp', None), out_specs=P(),
                            check_vma=False))
  x = jax.device_put(np.ones((8, 16), np.float32), NamedSharding(mesh, P('fsdp', None)))
  counted = collectives.count(f.lower(x).compile().as_text(), MESH)
  assert counted['bytes'] == {'all-gather': {'fsdp': 3 * 512},
                              'all-reduce': {'data': 3 * 512, 'tensor': 256}}
  assert counted['ops'] == {'all-gather': 3, 'all-reduce': 4} and not counted['unknown']


def test_replica_group_formats_and_axes():
  # iota [4,2]<=[4,2]T(1,0): rows of arange(8).reshape(4,2).T.reshape(4,2) = {0,2},{4,6},...
  line = 'x = f32[8] all-gather(y), replica_groups=[4,2]<=[4,2]T(1,0), dimensions={0}'
  groups = collectives.replica_groups(line)
  assert groups == [[0, 2], [4, 6], [1, 3], [5, 7]]
  assert collectives.axes_of(groups, MESH) == 'fsdp'  # ids 0 and 2 differ in fsdp only
  assert collectives.replica_groups('all-reduce(y), replica_groups={{0,4},{1,5}}') == [[0, 4], [1, 5]]
  assert collectives.axes_of([[0, 4], [1, 5]], MESH) == 'data'
  assert collectives.axes_of(None, MESH) == 'data+fsdp+tensor'
  assert collectives._bytes('(f32[64,32]{1,0}, bf16[8]{0})') == 64 * 32 * 4 + 16
  # XLA:CPU's named groups on a data=2 x fsdp=4 mesh: its own axes (4, 1, 2) over the device
  # order arange(8).reshape(2, 4).T, so varying axis_0 walks fsdp ({0..3}, {4..7}), not ids
  # 0, 2, 4, 6 (which would span data and fsdp).
  line = ("x = f32[128,128]{1,0} all-gather(y), replica_groups=mesh['axis_0'=4,'axis_1'=1,"
          "'axis_2'=2], device_ids=([2,4]T(1,0)) {'axis_0'}, dimensions={0}")
  groups = collectives.replica_groups(line)
  assert groups == [[0, 1, 2, 3], [4, 5, 6, 7]]
  assert collectives.axes_of(groups, {'data': 2, 'fsdp': 4, 'tensor': 1}) == 'fsdp'


def test_fsdp_train_step_gathers_every_sharded_parameter_on_the_fsdp_axis():
  """A 2-layer model on 8 devices, pure FSDP: every collective runs over fsdp, and the step
  gathers at least every parameter shard the rules split over fsdp (each is needed whole by a
  matmul once per step)."""
  config = config_lib.base_config()
  config.model.update(n_layers=2, vocab_size=256, d_model=64, n_heads=4, n_kv_heads=4,
                      head_dim=16, mlp_dim=128)
  config.train.global_batch_size, config.data.seq_len = 8, 32
  config.mesh.update(data=1, fsdp=8, tensor=1)
  trainer = train.setup(config)
  counted = collectives.count(trainer.compile_train_step(8, 32).as_text(),
                              dict(trainer.mesh.shape))
  assert {axes for per_axis in counted['bytes'].values() for axes in per_axis} == {'fsdp'}
  sharded = sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(trainer.abstract_state['params'])
                if 'fsdp' in jax.tree.leaves(tuple(a.sharding.spec)))
  assert sharded > 0 and counted['bytes']['all-gather']['fsdp'] >= sharded


def test_gathering_in_the_compute_dtype_keeps_every_loss_bit():
  """model.gather_in_compute_dtype casts each weight on its shard before FSDP gathers it: a cast
  commutes with a gather, so three bf16 steps give the same losses to the bit. (XLA:CPU widens
  bf16 collectives to f32, so the halved bytes show in TPU/GPU HLO: docs/benchmarks.md.)"""
  losses = {}
  for gather in (False, True):
    config = config_lib.base_config()
    config.model.update(n_layers=2, vocab_size=256, d_model=64, n_heads=4, n_kv_heads=4,
                        head_dim=16, mlp_dim=128, dtype='bfloat16', gather_in_compute_dtype=gather)
    config.train.global_batch_size, config.data.seq_len = 8, 32
    config.mesh.update(data=1, fsdp=8, tensor=1)
    trainer = train.setup(config)
    state = trainer.init_state()
    rng = np.random.default_rng(0)
    batch = {k: rng.integers(0, 256, (8, 32)).astype(np.int32) for k in ('inputs', 'targets')}
    with sharding.activate(trainer.mesh, trainer.rules):
      losses[gather] = []
      for _ in range(3):
        state, metrics = trainer.train_step(state, sharding.global_batch(batch,
                                                                         trainer.batch_sharding))
        losses[gather].append(float(metrics['loss']))
  assert losses[True] == losses[False] and losses[True][2] != losses[True][0]


def test_partitioned_hlo_gathers_bf16_weights_in_half_the_bytes():
  """aot.partitioned_collectives reads the HLO right after SPMD partitioning, before XLA:CPU
  widens bf16 collectives: with bf16 compute the layers' weights are gathered in bf16, so the
  step's all-gathers fall to about half of float32 compute's (not exactly: the head's matmul
  returns float32 logits and the norm scales stay float32), while the CPU's optimized HLO
  counts more than the partitioned one (its bf16 gathers widened)."""
  parted, optimized = {}, {}
  for dtype in ('float32', 'bfloat16'):
    config = _small(**{'model.dtype': dtype, 'mesh.data': 1, 'mesh.fsdp': 8, 'mesh.tensor': 1})
    parted[dtype] = sum(aot.partitioned_collectives(config)['all-gather'].values())
    optimized[dtype] = sum(collectives.count(train.setup(config).compile_train_step(32, 32)
                                             .as_text(), MESH_FSDP)['bytes']['all-gather'].values())
  assert parted['float32'] == optimized['float32']  # nothing to widen: the two HLOs agree
  assert 0.45 * parted['float32'] <= parted['bfloat16'] <= 0.7 * parted['float32']
  assert optimized['bfloat16'] > parted['bfloat16']


TPU_STYLE_HLO = """
%cond (p: (s32[], f32[4])) -> pred[] {
  %c = s32[]{:T(128)} constant(5)
  %p = (s32[], f32[4]) parameter(0)
  %i = s32[]{:T(128)} get-tuple-element(%p), index=0
  ROOT %lt = pred[]{:T(512)} compare(%i, %c), direction=LT
}

%body (p: (s32[], f32[4])) -> (s32[], f32[4]) {
  %p = (s32[], f32[4]) parameter(0)
  %ag = bf16[8,16]{1,0:T(8,128)(2,1)} all-gather(%x), channel_id=1, replica_groups=mesh['axis_0'=2,'axis_1'=4] {'axis_1'}, dimensions={0}
  ROOT %t = (s32[], f32[4]) tuple(%i, %y)
}

ENTRY %main (a: f32[4]) -> f32[4] {
  %w = (s32[], f32[4]) while(%t0), condition=%cond, body=%body
}
"""


def test_tpu_style_loops_and_named_replica_groups():
  """TPU HLO gives no known_trip_count (the bound comes from the condition's `i < 5`) and names
  replica groups by mesh axes: 5 x a bf16 [8, 16] gather (256 bytes) over ids {0..3}, {4..7},
  which vary in fsdp and tensor of a (2, 2, 2) mesh."""
  counted = collectives.count(TPU_STYLE_HLO, MESH)
  assert counted == {'bytes': {'all-gather': {'fsdp+tensor': 5 * 256}}, 'ops': {'all-gather': 5},
                     'unknown': []}


def test_combined_async_collectives_count_every_tensor():
  """GPU HLO combines collectives (runtime.GPU_XLA_FLAGS set 128 MiB thresholds): a combined
  all-gather-start gives ((operands), (results), ...), an all-reduce-start its results."""
  hlo = '\n'.join([
      'ENTRY %main (a: f32[4]) -> f32[4] {',
      '  %ag = ((bf16[2,64]{1,0}, bf16[4,64]{1,0}), (bf16[8,64]{1,0}, bf16[16,64]{1,0})) '
      'all-gather-start(%x, %y), replica_groups={{0,2},{1,3},{4,6},{5,7}}, dimensions={0}',
      '  %agd = (bf16[8,64]{1,0}, bf16[16,64]{1,0}) all-gather-done(%ag)',
      '  %ar = (f32[1024]{0}, f32[2048]{0}) all-reduce-start(%p, %q), replica_groups={{0,4},{1,5}}',
      '  %ard = (f32[1024]{0}, f32[2048]{0}) all-reduce-done(%ar)',
      '}'])
  counted = collectives.count(hlo, MESH)
  assert counted['bytes'] == {'all-gather': {'fsdp': (8 + 16) * 64 * 2},
                              'all-reduce': {'data': (1024 + 2048) * 4}}


# --- Leaner collectives: options that change what a step moves (issue 22) -----------------------

def _small(**updates):
  """The 2-layer model above, batch 32 x 32, with `section.key=value` updates (mesh included)."""
  config = config_lib.base_config()
  config.model.update(n_layers=2, vocab_size=256, d_model=64, n_heads=4, n_kv_heads=4,
                      head_dim=16, mlp_dim=128)
  config.train.global_batch_size, config.data.seq_len = 32, 32
  config.optim.update(warmup_steps=1, peak_lr=1e-2)  # warmup starts at lr 0: step 0 would not move
  for key, value in updates.items():
    section, name = key.split('.')
    config[section][name] = value
  return config


def _run(config, steps: int = 3):
  """(trainer, compiled step, losses of `steps` steps on one random batch, final state)."""
  trainer = train.setup(config)
  compiled = trainer.compile_train_step(32, 32)
  rng = np.random.default_rng(0)
  batch = {k: rng.integers(0, 256, (32, 32)).astype(np.int32) for k in ('inputs', 'targets')}
  batch.update(segment_ids=np.ones((32, 32), np.int32),
               positions=np.broadcast_to(np.arange(32, dtype=np.int32), (32, 32)))
  state, losses = trainer.init_state(), []
  with sharding.activate(trainer.mesh, trainer.rules):
    batch = sharding.global_batch(batch, trainer.batch_sharding)
    for _ in range(steps):
      state, metrics = compiled(state, batch)
      losses.append(float(metrics['loss']))
  return trainer, compiled, losses, state


@pytest.fixture(scope='module')
def gather_runs():
  """bf16 compute with weights gathered in bf16, fsdp=8: one micro-batch; four gathered per
  micro-batch; four gathered once a step."""
  runs = {}
  for m, gather in ((1, 'per_micro'), (4, 'per_micro'), (4, 'once')):
    trainer, compiled, losses, _ = _run(_small(**{
        'model.dtype': 'bfloat16', 'model.gather_in_compute_dtype': True,
        'mesh.data': 1, 'mesh.fsdp': 8, 'mesh.tensor': 1,
        'train.microbatches': m, 'train.microbatch_gather': gather}))
    runs[m, gather] = dict(losses=losses,
                           bytes=collectives.count(compiled.as_text(), MESH_FSDP)['bytes'],
                           temp=compiled.memory_analysis().temp_size_in_bytes)
  return runs


MESH_FSDP = {'data': 1, 'fsdp': 8, 'tensor': 1}


def test_gathering_once_per_step_keeps_the_loss_and_gathers_at_most_one_batch_worth(gather_runs):
  """train.microbatch_gather='once' gathers the parameters before the micro-batch scan: with
  4 micro-batches the step all-gathers no more than one micro-batch's step does (which gathers
  in the forward and again in the backward), where gathering per micro-batch moves about 4x.
  The same bf16 weights meet the same rows, so the losses agree to float reassociation of the
  float32 gradient sum (the token-weighted mean is the same either way)."""
  per, once = gather_runs[4, 'per_micro'], gather_runs[4, 'once']
  gathered = {k: sum(r['bytes']['all-gather'].values()) for k, r in gather_runs.items()}
  assert gathered[4, 'per_micro'] > 3 * gathered[1, 'per_micro']
  assert gathered[4, 'once'] <= 1.1 * gathered[1, 'per_micro']
  np.testing.assert_allclose(once['losses'], per['losses'], rtol=1e-6)
  assert per['losses'][2] < per['losses'][0]
  # The cost: the whole (bf16) parameters are held through the scan.
  assert once['temp'] > per['temp']


def test_gathering_once_keeps_a_tied_embedding_in_its_own_dtype():
  """A tied table is used twice (lookup and head); per micro-batch each use casts it and their
  gradients add in float32. Gathered once it stays float32 (not one bf16 copy, whose two
  gradients would add in bf16), so the values are those of gathering per micro-batch."""
  runs = {gather: _run(_small(**{
      'model.dtype': 'bfloat16', 'model.gather_in_compute_dtype': True,
      'model.tie_embeddings': True, 'mesh.data': 1, 'mesh.fsdp': 8, 'mesh.tensor': 1,
      'train.microbatches': 4, 'train.microbatch_gather': gather})) for gather in ('per_micro', 'once')}
  (trainer, _, once, once_state), (_, _, per, per_state) = runs['once'], runs['per_micro']
  assert jax.tree.leaves(trainer.gathered_params['embed_tokens'])[0].dtype == jnp.float32
  np.testing.assert_allclose(once, per, rtol=1e-6)
  np.testing.assert_allclose(*(np.asarray(jax.tree.leaves(s['params']['embed_tokens'])[0])
                               for s in (once_state, per_state)), rtol=1e-5, atol=1e-7)


def _device_bytes(tree) -> int:
  return sum(math.prod(a.sharding.shard_shape(a.shape)) * a.dtype.itemsize
             for a in jax.tree.leaves(tree))


def test_zero1_halves_optimizer_bytes_keeps_the_loss_and_checkpoints_reshard(tmp_path):
  """optim.shard_over_data on mesh data=2 x fsdp=4: every moment is also split over `data`, so the optimizer state per device halves (scalar counts aside); the step then gathers
  the updated parameters over `data`. Adam is elementwise, so the losses agree to float
  reassociation (the clip's global norm sums the shards in another order). A checkpoint written
  with ZeRO-1 restores onto a plain fsdp=8 run with every value kept."""
  mesh = {'mesh.data': 2, 'mesh.fsdp': 4, 'mesh.tensor': 1}
  plain, _, plain_losses, _ = _run(_small(**mesh))
  zero1, compiled, losses, state = _run(_small(**mesh, **{'optim.shard_over_data': True}))
  np.testing.assert_allclose(losses, plain_losses, rtol=1e-6)
  moments = [a for a in jax.tree.leaves(zero1.abstract_state['opt_state']) if a.ndim]
  assert moments and all('data' in jax.tree.leaves(tuple(a.sharding.spec)) for a in moments)
  scalars = sum(a.dtype.itemsize for a in jax.tree.leaves(plain.abstract_state['opt_state'])
                if not a.ndim)  # every other dim of this model is even: all split in two
  assert (_device_bytes(zero1.abstract_state['opt_state']) - scalars
          == (_device_bytes(plain.abstract_state['opt_state']) - scalars) // 2)
  counted = collectives.count(compiled.as_text(), dict(zero1.mesh.shape))['bytes']
  assert counted['all-gather'].get('data', 0) >= _device_bytes(zero1.abstract_state['params']) / 2

  ckpt = checkpoint_lib.Checkpointer(str(tmp_path / 'ckpt'), async_save=False)
  ckpt.save(3, state, iter(grain.MapDataset.range(4).to_iter_dataset()), {})
  ckpt.wait()
  other = train.setup(_small(**{'mesh.data': 1, 'mesh.fsdp': 8, 'mesh.tensor': 1}))
  restored = ckpt.restore(3, other.abstract_state, None)
  for saved, back, like in zip(*(jax.tree.leaves(t) for t in (state, restored,
                                                              other.abstract_state))):
    assert back.sharding == like.sharding
    np.testing.assert_array_equal(np.asarray(back), np.asarray(saved))
  ckpt.close()
