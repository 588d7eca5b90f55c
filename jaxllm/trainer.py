"""The compiled step: the train state, its shardings from abstract shapes, the jitted train and
eval steps, and held-out evaluation. The loop and everything around it (data, checkpoints,
metrics) is `jaxllm/train.py`; this is the half of the wiring that model transforms (adapters,
quantized weights, a teacher) extend.

The train state is a plain dict `{'step', 'params', 'opt_state'}` of jax.Arrays; `params` is the
pure-dict form of the NNX model state (`nnx.merge(graphdef, params)` rebuilds the module inside the
step). Shardings come from abstract shapes, so no device ever holds the full model.

With LoRA (`lora.rank > 0`, jaxllm/lora.py) `params` holds the adapters only, and the state gains
`base`: the frozen base, passed through the step untouched (its buffers are donated and come back
as they went), with no gradient and no optimizer state. `model_params(state)` joins the two for
evaluation and sampling. A checkpoint saves `params` and `opt_state` (the adapters) and names the
base checkpoint (`base_reference`), which `load_base` reads back, refusing one that changed (a
quantized base is read and quantized one stack at a time, never whole in float). The loop runs
the step compiled by `compile_step_for`, which leaves the frozen base's and teacher's memory
layout to the TPU (and CPU) compiler; `place_frozen` moves them there once.

A distillation (jaxllm/distill.py) adds `teacher`: the frozen teacher's parameters, handed back
by the step as they came (donated in, aliased out: no copy) and never saved. With `ptq.format`
set (jaxllm/ptq.py) the model is built quantized: a run for evaluation and sampling.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Iterator, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx, traverse_util
from jax.experimental import multihost_utils
from jax.experimental.layout import Format, Layout
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxllm import checkpoint as checkpoint_lib
from jaxllm import distill
from jaxllm import layerstats
from jaxllm import lora as lora_lib
from jaxllm import loss as loss_lib
from jaxllm import metrics as metrics_lib
from jaxllm import model as model_lib
from jaxllm import optim
from jaxllm import ptq
from jaxllm import runtime
from jaxllm import sharding


# What the data pipeline yields per step: int32 [batch, seq_len] arrays.
BATCH_KEYS = ('inputs', 'targets', 'segment_ids', 'positions')
# The parts of a train state the step reads and hands back unchanged.
FROZEN = frozenset({'base', 'teacher'})


@dataclasses.dataclass(frozen=True)
class Trainer:
  """Everything the loop needs, built from abstract shapes (nothing allocated)."""

  mesh: Mesh
  rules: tuple
  model_cfg: model_lib.ModelConfig
  graphdef: nnx.GraphDef
  tx: optax.GradientTransformation
  schedule: optax.Schedule
  abstract_state: dict  # ShapeDtypeStructs carrying their shardings
  state_shardings: dict
  batch_sharding: NamedSharding
  microbatches: int
  seed: int
  loss_chunk: int = 0  # see loss.head_nll_sum; 0 = logits then nll_sum
  skip_nonfinite: bool = False  # keep the old params and optimizer state when a step is not finite
  compiler_options: dict | None = None  # XLA options for init, train and eval steps (runtime.py)
  lora: lora_lib.LoraConfig | None = None  # adapters on a frozen base; None: every parameter trains
  teacher: distill.Teacher | None = None  # distillation: state['teacher'] holds its parameters
  layer_stats: bool = False  # metrics['layer_stats']: per-layer norms (jaxllm/layerstats.py)
  # train.microbatch_gather='once' (with micro-batches): what the parameters are gathered to before
  # the micro-batch scan (shape, dtype, sharding per leaf); None: gathered inside it, per use.
  gathered_params: dict | None = None
  # optim.shard_over_data (ZeRO-1): the optimizer state's layout of each parameter-shaped leaf,
  # which gradients and updates take too; None: the parameters' own.
  update_shardings: dict | None = None

  def build_model(self, seed: int) -> model_lib.Llama:
    if self.lora:
      return lora_lib.build(self.model_cfg, self.lora, seed=seed)
    return model_lib.Llama(self.model_cfg, rngs=nnx.Rngs(seed))

  def init_state(self, *, with_base: bool = True) -> dict:
    """Random init, each device computing only its own shards. A LoRA state `with_base=False`
    lacks `base`: the caller adds one (load_base) without a random one having been made."""
    shardings = {k: s for k, s in self.state_shardings.items() if k != 'teacher'}
    if not with_base:
      shardings.pop('base', None)

    def init():
      params = nnx.to_pure_dict(nnx.state(self.build_model(self.seed)))
      state = {'step': jnp.zeros((), jnp.int32)}
      if self.lora:
        params, base = lora_lib.split(params)
        if with_base:
          state['base'] = base
      return {**state, 'params': params, 'opt_state': self.tx.init(params)}
    with sharding.activate(self.mesh, self.rules):
      return jax.jit(init, out_shardings=shardings, compiler_options=self.compiler_options)()

  def with_teacher(self, state: dict) -> dict:
    """`state` with the teacher's parameters read from distill.teacher (when distilling),
    cast to its dtype and laid out on this mesh as the student's are."""
    if self.teacher is None:
      return state
    return {**state, 'teacher': distill.load_teacher(self.teacher, self.abstract_state['teacher'])}

  def model_params(self, state: Mapping) -> dict:
    """The whole model's params (base and adapters joined) of a train state."""
    return lora_lib.join(state['base'], state['params']) if self.lora else state['params']

  @property
  def model_shardings(self):
    return self.model_params(self.state_shardings)

  @functools.cached_property
  def _abstract_float_base(self) -> dict:
    """The base as a checkpoint stores it (unquantized), in lora.base_dtype, on this mesh."""
    cfg = self.lora.base_model_config(self.model_cfg)
    state = nnx.state(nnx.eval_shape(lambda: model_lib.Llama(cfg, rngs=nnx.Rngs(0))))
    shardings = sharding.named_shardings(nnx.to_pure_dict(nnx.get_partition_spec(state)),
                                         self.mesh, self.rules)
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        nnx.to_pure_dict(state), shardings)

  def load_base(self, path: str, step: int = -1, *, expect: Mapping | None = None,
                what: str = 'checkpoint.init_from') -> tuple[dict, dict]:
    """(the frozen base of a LoRA state, its base_reference) from the parameters of checkpoint
    `path` at `step` (-1: latest), cast to lora.base_dtype and quantized as configured. `expect`:
    the reference a LoRA checkpoint saved; a base that differs from it is a CheckpointError."""
    source, step = checkpoint_lib.open_read_only(
        path, step, what=f'{what}={path!r}', **(dict(
            step_flag="the adapters' base step", fix=': restore it, or start the adapters afresh '
            'in a new workdir') if expect else dict(step_flag='checkpoint.init_from_step')))
    try:
      ref = base_reference(source, step)
      if expect is not None and expect.get('fingerprint') != ref['fingerprint']:
        raise checkpoint_lib.CheckpointError(
            f'the adapters were trained on base {expect.get("path")} step {expect.get("step")}, '
            f'but {what}={path!r} step {step} holds other parameters (written since, or another '
            'model): restore that base, or start the adapters afresh in a new workdir')
      base = (source.restore_params(step, self._abstract_float_base)
              if self.lora.quantize == 'none' else self._read_quantized(source, step))
    finally:
      source.close()
    return base, ref

  def _read_quantized(self, source: checkpoint_lib.Checkpointer, step: int) -> dict:
    """A quantized base, read and quantized one projection stack at a time, never whole in float
    (8B: the 5.6 GiB quantized base and one 3.5 GiB bf16 MLP stack, not 15 GiB of bf16)."""
    floats = traverse_util.flatten_dict(self._abstract_float_base)
    checkpoint_lib.check_shapes(source.params_metadata(step), self._abstract_float_base,
                                where=source.step_dir(step))  # the whole base, before any part
    stacks = {lora_lib.weight_path(target): target for target in lora_lib.TARGETS}
    read = lambda part: traverse_util.flatten_dict(source.restore_params(
        step, traverse_util.unflatten_dict(part), partial=True))
    base = read({k: a for k, a in floats.items() if k not in stacks})
    for path, target in stacks.items():
      out = functools.reduce(dict.get, path, self.state_shardings['base'])
      quantize = jax.jit(lora_lib.weight_quantizer(target, self.model_cfg, self.lora),
                         out_shardings=out)
      w = read({path: floats[path]})[path]
      with sharding.activate(self.mesh, self.rules):
        base[path] = jax.block_until_ready(quantize(w))
      del w  # freed before the next stack is read
    return traverse_util.unflatten_dict(base)

  def restore_params(self, ckpt: checkpoint_lib.Checkpointer, step: int) -> dict:
    """The whole model's params at `step` of this run's checkpoints (a LoRA run's adapters
    joined with the base its checkpoint names): what evaluation, sampling and export reopen."""
    params = ckpt.restore_params(step, self.abstract_state['params'])
    if not self.lora:
      return params
    ref = ckpt.saved_meta(step).get('base')
    if not ref:
      raise checkpoint_lib.CheckpointError(f'{ckpt.step_dir(step)} holds adapters but names no '
                                           'base checkpoint: it was not written by a LoRA run')
    base, _ = self.load_base(ref['path'], ref['step'], expect=ref, what='the base')
    return lora_lib.join(base, params)

  @functools.cached_property
  def train_step(self):
    """(state, batch) -> (state, metrics); compiled once, state donated; any layouts (the loop
    runs compile_step_for's step instead)."""
    return self._jit_step(self.state_shardings)

  def _jit_step(self, state_shardings):
    return jax.jit(functools.partial(_train_step, self), donate_argnums=(0,),
                   in_shardings=(state_shardings, self.batch_sharding),
                   out_shardings=(state_shardings, NamedSharding(self.mesh, P())),
                   compiler_options=self.compiler_options)

  @functools.cached_property
  def eval_step(self):
    """(params, batch) -> {'loss_sum', 'tokens'}."""
    return jax.jit(functools.partial(_eval_step, self),
                   in_shardings=(self.model_shardings, self.batch_sharding),
                   out_shardings=NamedSharding(self.mesh, P()),
                   compiler_options=self.compiler_options)

  def process_batch_size(self, global_batch: int, seq_len: int) -> int:
    """Rows of each global batch that this process feeds (sharding.process_batch_size)."""
    return sharding.process_batch_size(self.batch_sharding, global_batch, seq_len)

  def abstract_batch(self, batch_size: int, seq_len: int, keys=BATCH_KEYS) -> dict:
    sds = jax.ShapeDtypeStruct((batch_size, seq_len), jnp.int32, sharding=self.batch_sharding)
    return {k: sds for k in keys}

  def compile_train_step(self, batch_size: int, seq_len: int, keys=BATCH_KEYS):
    """Ahead-of-time lower + compile from abstract shapes (no weights allocated)."""
    return self.compile_step_for(self.abstract_batch(batch_size, seq_len, keys))

  def lower_step_for(self, batch: Mapping, frozen_formats: Mapping | None = None):
    """The train step lowered from abstract state for batches like `batch`; the frozen parts'
    memory layouts `frozen_formats`'s ({key: tree of Format}) or, on TPU (and CPU), XLA's choice
    (from the default a TPU copies the stacked q/k/v head-major: 1.5 GiB at 8B in bf16)."""
    shardings = dict(self.state_shardings)
    for key in sorted(FROZEN & shardings.keys()):
      if frozen_formats:
        shardings[key] = frozen_formats[key]
      elif self.mesh.devices.flat[0].platform in ('cpu', 'tpu'):
        shardings[key] = jax.tree.map(lambda s: Format(Layout.AUTO, s), shardings[key])
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding),
                            dict(batch))
    with sharding.activate(self.mesh, self.rules):
      return self._jit_step(shardings).lower(self.abstract_state, abstract)

  def compile_step_for(self, batch: Mapping):
    """lower_step_for(batch), compiled; `place_frozen` moves a state's frozen parts into the
    layouts it takes. XLA picks the output's apart: should they differ, the step is compiled
    again with what it takes pinned on both sides (so the base it hands back can go in again)."""
    compiled = self.lower_step_for(batch).compile()
    ins, outs = compiled.input_formats[0][0], compiled.output_formats[0]
    frozen = sorted(FROZEN & ins.keys())
    if any(i.layout != o.layout for k in frozen
           for i, o in zip(jax.tree.leaves(ins[k]), jax.tree.leaves(outs[k]))):
      compiled = self.lower_step_for(batch, {k: ins[k] for k in frozen}).compile()
    return compiled

  @staticmethod
  def place_frozen(state: dict, compiled) -> dict:
    """`state` with its base and teacher in the layouts `compiled` takes, moved one array at a
    time, each old buffer donated (the base is never held twice); the rest is not copied."""
    formats = compiled.input_formats[0][0]
    placed = dict(state)
    for key in sorted(FROZEN & state.keys()):
      placed[key] = jax.tree.map(lambda a, f: a if a.format.layout == f.layout else
                                 jax.device_put(a, f, donate=True).block_until_ready(),
                                 state[key], formats[key])
    return placed


def make_trainer(config: ml_collections.ConfigDict, mesh: Mesh) -> Trainer:
  """Abstract model and optimizer state, and their shardings on `mesh`."""
  model_cfg = model_lib.ModelConfig.from_section(config.model)
  rules = tuple(tuple(r) for r in config.sharding.rules)
  lcfg = lora_lib.LoraConfig.from_section(config.lora) if config.lora.rank else None

  def build():  # with ptq.format set, the model of a quantized run (evaluation and sampling)
    model = (lora_lib.build(model_cfg, lcfg, seed=0) if lcfg
             else model_lib.Llama(model_cfg, rngs=nnx.Rngs(0)))
    if config.ptq.format:
      ptq.quantize_model(model, fmt=config.ptq.format, group_size=config.ptq.group_size)
    return model

  graphdef, abs_params = nnx.split(nnx.eval_shape(build))
  param_specs = nnx.to_pure_dict(nnx.get_partition_spec(abs_params))
  abs_params = nnx.to_pure_dict(abs_params)
  frozen = {}
  if lcfg:  # only the adapters train: the optimizer never sees the base
    (param_specs, frozen['base']), (abs_params, abs_base) = (lora_lib.split(param_specs),
                                                             lora_lib.split(abs_params))
  o = config.optim
  schedule = optim.learning_rate_schedule(
      peak_lr=o.peak_lr, warmup_steps=o.warmup_steps,
      decay_steps=(o.decay_steps or config.train.num_steps - o.warmup_steps),
      final_lr_fraction=o.final_lr_fraction)
  tx = optim.make_optimizer(schedule=schedule, b1=o.b1, b2=o.b2, eps=o.eps,
                            weight_decay=o.weight_decay, clip_norm=o.clip_norm,
                            decay_mask=(jax.tree.map(lambda _: True, param_specs,
                                                     is_leaf=lambda x: isinstance(x, P))
                                        if lcfg else optim.weight_decay_mask(param_specs)))
  abs_opt = jax.eval_shape(tx.init, abs_params)
  opt_specs = optax.tree_map_params(tx, lambda _, s: s, abs_opt, param_specs,
                                    transform_non_params=lambda _: P(),
                                    is_leaf=lambda x: isinstance(x, P))
  abstract = {'step': jax.ShapeDtypeStruct((), jnp.int32), 'params': abs_params,
              'opt_state': abs_opt, **({'base': abs_base} if lcfg else {})}
  teacher = None
  if found := distill.make_teacher(config, model_cfg):
    teacher, frozen['teacher'], abstract['teacher'] = found
  specs = {'step': P(), 'params': param_specs, 'opt_state': opt_specs, **frozen}
  shardings = sharding.named_shardings(specs, mesh, rules)
  update_shardings = None
  if config.optim.shard_over_data:  # ZeRO-1: split further over `data`, where a dim divides
    update_shardings = _over_data(shardings['params'], abs_params, mesh)
    shardings['opt_state'] = _over_data(shardings['opt_state'], abs_opt, mesh)
  abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          abstract, shardings)
  return Trainer(mesh=mesh, rules=rules, model_cfg=model_cfg, graphdef=graphdef, tx=tx,
                 schedule=schedule, abstract_state=abstract, state_shardings=shardings,
                 batch_sharding=sharding.batch_sharding(mesh, rules),
                 microbatches=config.train.microbatches, seed=config.seed,
                 loss_chunk=config.train.loss_chunk,
                 skip_nonfinite=config.optim.skip_nonfinite > 0,
                 compiler_options=runtime.cpu_compiler_options(
                     fusion_emitters=config.train.cpu_fusion_emitters,
                     platform=mesh.devices.flat[0].platform),
                 lora=lcfg, teacher=teacher, update_shardings=update_shardings,
                 layer_stats=config.train.layer_stats_every > 0,
                 gathered_params=(_gathered_params(config, shardings['params'], abs_params,
                                                   param_specs, mesh)
                                  if config.train.microbatch_gather == 'once' else None))


def _over_data(shardings, abstract, mesh: Mesh):
  """ZeRO-1: each of `shardings` (of the leaves of `abstract`) also split over mesh axis `data`
  (sharding.with_axis); scalars (step counts) stay as they are."""
  return jax.tree.map(lambda s, a: NamedSharding(mesh, sharding.with_axis(
      s.spec, a.shape, 'data', dict(mesh.shape))), shardings, abstract)


def _gathered_params(config: ml_collections.ConfigDict, shardings, abstract, logical_specs,
                     mesh: Mesh) -> dict:
  """The parameters as train.microbatch_gather='once' holds them through the micro-batch scan:
  whole over the batch axes (data, fsdp), still split over `tensor`; weight matrices in the
  compute dtype when model.gather_in_compute_dtype (as model._weight casts them; norm scales and
  biases keep their dtype, as the model reads them; so does a tied embedding). LoRA adapters
  keep theirs."""
  axes = sharding.batch_axes(config.sharding.rules)
  matrices = (optim.weight_decay_mask(logical_specs)
              if config.model.gather_in_compute_dtype and not config.lora.rank
              else jax.tree.map(lambda _: False, abstract))
  if config.model.tie_embeddings and 'embed_tokens' in matrices:
    # Two uses (lookup and head) whose gradients per_micro adds in float32: one bf16 copy would
    # add them in bf16 (other values), so the tied table is gathered in its own dtype.
    matrices['embed_tokens'] = jax.tree.map(lambda _: False, matrices['embed_tokens'])
  return jax.tree.map(
      lambda s, a, matrix: jax.ShapeDtypeStruct(
          a.shape, jnp.dtype(config.model.dtype) if matrix else a.dtype,
          sharding=NamedSharding(mesh, sharding.without_axes(s.spec, axes))),
      shardings, abstract, matrices)


def base_reference(source: checkpoint_lib.Checkpointer, step: int) -> dict:
  """What a LoRA checkpoint saves to name its base: path, step and a fingerprint of the stored
  parameters (checkpoint.params_fingerprint)."""
  return {'path': source.directory, 'step': step, 'fingerprint': source.params_fingerprint(step)}


def _loss_sums(trainer: Trainer, params, batch, *, base=None, dropout_key=None,
               teacher_params=None):
  """Summed next-token NLL over real (non-padding) targets, and their count; a batch with
  `weights` (conversations) counts only the targets weighted 1. `base`: a LoRA run's frozen base
  (`params` are then its adapters); `dropout_key`: adapter dropout on (training);
  `teacher_params` (the train step of a distillation): the sum is of the distillation objective
  instead (distill.loss_sum).

  A batch without `segment_ids` and `positions` holds one document per row and no padding
  (benchmarks): attention then needs no mask, which lets cuDNN run its fastest causal kernel.
  """
  model = nnx.merge(trainer.graphdef, params if base is None else lora_lib.join(base, params))
  if dropout_key is not None:
    lora_lib.set_dropout(model, dropout_key)
  segment_ids_BL = batch.get('segment_ids')
  mask_BL = (jnp.ones(batch['targets'].shape, bool) if segment_ids_BL is None
             else segment_ids_BL > 0)
  if 'weights' in batch:
    mask_BL = mask_BL & (batch['weights'] > 0)
  weights_BL = mask_BL.astype(jnp.float32)
  kwargs = dict(positions_BL=batch.get('positions'), segment_ids_BL=segment_ids_BL)
  if teacher_params is not None:
    loss_sum = distill.loss_sum(trainer.teacher, teacher_params, model, batch['inputs'],
                                batch['targets'], weights_BL, loss_chunk=trainer.loss_chunk,
                                **kwargs)
  elif trainer.loss_chunk:
    loss_sum = loss_lib.head_nll_sum(model.hidden(batch['inputs'], **kwargs), model.head_DV(),
                                     batch['targets'], weights_BL, trainer.loss_chunk)
  else:
    loss_sum = loss_lib.nll_sum(model(batch['inputs'], **kwargs), batch['targets'], weights_BL)
  return loss_sum, jnp.sum(mask_BL)


def _train_step(trainer: Trainer, state, batch):
  key = None
  if trainer.lora and trainer.lora.dropout:
    key = jax.random.fold_in(jax.random.key(trainer.seed), state['step'])

  def grad_fn(params, batch, micro=0):
    loss = functools.partial(_loss_sums, trainer, base=state.get('base'),
                             dropout_key=None if key is None else jax.random.fold_in(key, micro),
                             teacher_params=state.get('teacher'))
    return jax.value_and_grad(loss, has_aux=True)(params, batch)

  params, m = state['params'], trainer.microbatches
  if m == 1:
    (loss_sum, tokens), grads = grad_fn(params, batch)
  else:
    loss_sum, tokens, grads = _accumulate(trainer, grad_fn, params, batch)
  # Mean over every real target token of the step, whatever the micro-batching.
  grads = _as_update(trainer, jax.tree.map(lambda g: g / tokens, grads))
  updates, opt_state = trainer.tx.update(grads, state['opt_state'], params)
  updates = _as_update(trainer, updates)
  new_params = optax.apply_updates(params, updates)
  # The new parameters are checked too: a finite loss and gradient can still give an update that
  # overflows, and a saved state must never be one that cannot be trained on.
  params_finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(p)) for p in jax.tree.leaves(new_params)]))
  metrics = {'loss': loss_sum / tokens, 'grad_norm': optax.tree.norm(grads),
             'params_finite': params_finite.astype(jnp.float32),
             'lr': trainer.schedule(state['step']), 'tokens': tokens}
  if trainer.layer_stats:
    metrics['layer_stats'] = layerstats.norms(params=params, grads=grads, updates=updates)
  if trainer.skip_nonfinite:
    # A bad step leaves params and optimizer state as they were; its batch is still consumed.
    finite = jnp.isfinite(metrics['loss']) & jnp.isfinite(metrics['grad_norm']) & params_finite
    new_params, opt_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old),
                                         (new_params, opt_state), (params, state['opt_state']))
  frozen = {k: state[k] for k in FROZEN & state.keys()}  # passed through, never copied
  return {'step': state['step'] + 1, 'params': new_params, 'opt_state': opt_state,
          **frozen}, metrics


def _accumulate(trainer: Trainer, grad_fn, params, batch):
  """(loss sum, tokens, gradient sum) over trainer.microbatches micro-batches of `batch`, a scan.
  Micro-batch i takes rows i, i+m, i+2m, ... so every device holds a slice of each one.

  With trainer.gathered_params (train.microbatch_gather='once') the parameters are gathered once,
  before the scan, and every micro-batch differentiates that copy; its gradient is brought back
  to the parameters' layout and dtype each time (on GPU/TPU a reduce-scatter, in the dtype XLA
  computes it in), so the float32 sum carried through the scan stays split as the parameters
  are. The same values as gathering per micro-batch; the whole parameters are held meanwhile."""
  m = trainer.microbatches
  split = jax.tree.map(lambda x: x.reshape(x.shape[0] // m, m, *x.shape[1:]).swapaxes(0, 1),
                       batch)
  shardings = trainer.state_shardings['params']
  used = params
  if trainer.gathered_params is not None:
    # A cast is pinned to the parameter's own layout first (as model._weight does), or XLA
    # gathers the float32 shards and casts after.
    used = jax.tree.map(lambda p, s, g: jax.lax.with_sharding_constraint(
        p if p.dtype == g.dtype else jax.lax.with_sharding_constraint(p.astype(g.dtype), s),
        g.sharding), params, shardings, trainer.gathered_params)

  def accumulate(carry, micro):
    (loss_sum, tokens), grads = grad_fn(used, *micro)
    if trainer.gathered_params is not None:
      grads = jax.tree.map(lambda g, p, s: jax.lax.with_sharding_constraint(g, s).astype(p.dtype),
                           grads, params, shardings)
    return jax.tree.map(jnp.add, carry, (loss_sum, tokens, grads)), None

  zeros = (jnp.zeros((), jnp.float32), jnp.zeros((), jnp.int32),
           jax.tree.map(jnp.zeros_like, params))
  return jax.lax.scan(accumulate, zeros, (split, jnp.arange(m)))[0]


def _as_update(trainer: Trainer, tree):
  """`tree` (gradients or updates, shaped as the parameters) in the optimizer state's layout:
  with optim.shard_over_data (ZeRO-1) each device then updates only its slice of the data axis
  and the new parameters are gathered back over it; otherwise `tree` as it is."""
  if trainer.update_shardings is None:
    return tree
  return jax.tree.map(jax.lax.with_sharding_constraint, tree, trainer.update_shardings)


def _eval_step(trainer: Trainer, params, batch):
  loss_sum, tokens = _loss_sums(trainer, params, batch)
  return {'loss_sum': loss_sum, 'tokens': tokens}


def evaluate(trainer: Trainer, params, batches: Iterator[Mapping[str, np.ndarray]], *,
             count_bytes: Callable[[Mapping[str, np.ndarray]], int] | None = None) -> dict:
  """Mean held-out loss (nats per token) and perplexity over `batches`; with `count_bytes`
  (text_bytes_counter) also bits per byte: total nats / ln 2 / total UTF-8 bytes of the text the
  targets spell, which compares runs whatever their tokenizers."""
  loss_sum, tokens, text_bytes = 0.0, 0, 0
  with sharding.activate(trainer.mesh, trainer.rules):
    for batch in metrics_lib.progress(batches, desc='eval', unit='batch'):
      out = jax.device_get(trainer.eval_step(params, sharding.global_batch(batch,
                                                                           trainer.batch_sharding)))
      loss_sum, tokens = loss_sum + float(out['loss_sum']), tokens + int(out['tokens'])
      text_bytes += count_bytes(batch) if count_bytes else 0
  if jax.process_count() > 1 and count_bytes:  # each process counted only its own rows
    text_bytes = int(np.sum(multihost_utils.process_allgather(np.int64(text_bytes))))
  loss = loss_sum / max(tokens, 1)
  out = {'eval_loss': loss, 'eval_perplexity': math.exp(min(loss, 700.0)), 'eval_tokens': tokens}
  if count_bytes:
    out.update(eval_bytes=text_bytes,
               eval_bits_per_byte=loss_sum / math.log(2) / max(text_bytes, 1))
  return out
