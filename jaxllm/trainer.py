"""The compiled step: the train state, its shardings from abstract shapes, the jitted train and
eval steps, and held-out evaluation. The loop and everything around it (data, checkpoints,
metrics) is `jaxllm/train.py`; this is the half of the wiring that model transforms (adapters,
quantized weights, a teacher) extend.

The train state is a plain dict `{'step', 'params', 'opt_state'}` of jax.Arrays; `params` is the
pure-dict form of the NNX model state (`nnx.merge(graphdef, params)` rebuilds the module inside the
step). A distillation adds `'teacher'`: the frozen teacher's parameters, which the step hands back
as they came (donated in, aliased out: no copy) and the checkpointer never saves; in the state
rather than beside it, the loop stays as it is and the AOT planner counts the teacher's bytes. Shardings come from abstract shapes, so no device ever holds the full model.
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
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxllm import loss as loss_lib
from jaxllm import metrics as metrics_lib
from jaxllm import model as model_lib
from jaxllm import optim
from jaxllm import ptq
from jaxllm import rundir
from jaxllm import runtime
from jaxllm import sharding


# What the data pipeline yields per step: int32 [batch, seq_len] arrays.
BATCH_KEYS = ('inputs', 'targets', 'segment_ids', 'positions')


@dataclasses.dataclass(frozen=True)
class Teacher:
  """The frozen model of distillation (config `distill`): its parameters, in `model_cfg`'s
  dtype on the student's mesh, ride in the train state as `state['teacher']` (handed through
  each step unchanged, never saved, no optimizer state)."""

  graphdef: nnx.GraphDef
  model_cfg: model_lib.ModelConfig
  workdir: str  # distill.teacher: a run directory
  step: int  # distill.teacher_step; -1 = the latest
  alpha: float
  temperature: float


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
  teacher: Teacher | None = None  # distillation: state['teacher'] holds its parameters

  def init_state(self) -> dict:
    """Random init, each device computing only its own shards."""
    def init():
      params = nnx.to_pure_dict(nnx.state(
          model_lib.Llama(self.model_cfg, rngs=nnx.Rngs(self.seed))))
      return {'step': jnp.zeros((), jnp.int32), 'params': params,
              'opt_state': self.tx.init(params)}
    trained = {k: s for k, s in self.state_shardings.items() if k != 'teacher'}
    with sharding.activate(self.mesh, self.rules):
      return jax.jit(init, out_shardings=trained, compiler_options=self.compiler_options)()

  def with_teacher(self, state: dict) -> dict:
    """`state` with the teacher's parameters read from distill.teacher (when distilling),
    cast to its dtype and laid out on this mesh as the student's are."""
    if self.teacher is None:
      return state
    run = rundir.RunDir(self.teacher.workdir)
    params, _ = run.restore_params(run.load_config(), self.abstract_state['teacher'],
                                   self.teacher.step)
    return {**state, 'teacher': params}

  @functools.cached_property
  def train_step(self):
    """(state, batch) -> (state, metrics); compiled once, state donated."""
    return jax.jit(functools.partial(_train_step, self), donate_argnums=(0,),
                   in_shardings=(self.state_shardings, self.batch_sharding),
                   out_shardings=(self.state_shardings, NamedSharding(self.mesh, P())),
                   compiler_options=self.compiler_options)

  @functools.cached_property
  def eval_step(self):
    """(params, batch) -> {'loss_sum', 'tokens'}."""
    return jax.jit(functools.partial(_eval_step, self),
                   in_shardings=(self.state_shardings['params'], self.batch_sharding),
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
    with sharding.activate(self.mesh, self.rules):
      lowered = self.train_step.lower(self.abstract_state,
                                      self.abstract_batch(batch_size, seq_len, keys))
    return lowered.compile()


def make_trainer(config: ml_collections.ConfigDict, mesh: Mesh) -> Trainer:
  """Abstract model and optimizer state, and their shardings on `mesh`."""
  model_cfg = model_lib.ModelConfig.from_section(config.model)
  rules = tuple(tuple(r) for r in config.sharding.rules)
  def build():  # with ptq.format set, the model of a quantized run (evaluation and sampling)
    model = model_lib.Llama(model_cfg, rngs=nnx.Rngs(0))
    if config.ptq.format:
      ptq.quantize_model(model, fmt=config.ptq.format, group_size=config.ptq.group_size)
    return model

  graphdef, abs_params = nnx.split(nnx.eval_shape(build))
  param_specs = nnx.to_pure_dict(nnx.get_partition_spec(abs_params))
  abs_params = nnx.to_pure_dict(abs_params)
  o = config.optim
  schedule = optim.learning_rate_schedule(
      peak_lr=o.peak_lr, warmup_steps=o.warmup_steps,
      decay_steps=(o.decay_steps or config.train.num_steps - o.warmup_steps),
      final_lr_fraction=o.final_lr_fraction)
  tx = optim.make_optimizer(schedule=schedule, b1=o.b1, b2=o.b2, eps=o.eps,
                            weight_decay=o.weight_decay, clip_norm=o.clip_norm,
                            decay_mask=optim.weight_decay_mask(param_specs))
  abs_opt = jax.eval_shape(tx.init, abs_params)
  opt_specs = optax.tree_map_params(tx, lambda _, s: s, abs_opt, param_specs,
                                    transform_non_params=lambda _: P(),
                                    is_leaf=lambda x: isinstance(x, P))
  specs = {'step': P(), 'params': param_specs, 'opt_state': opt_specs}
  abstract = {'step': jax.ShapeDtypeStruct((), jnp.int32), 'params': abs_params,
              'opt_state': abs_opt}
  teacher, d = None, config.distill
  if teacher_cfg := teacher_model(config, model_cfg):
    teacher_graphdef, teacher_abs = nnx.split(
        nnx.eval_shape(lambda: model_lib.Llama(teacher_cfg, rngs=nnx.Rngs(0))))
    specs['teacher'] = nnx.to_pure_dict(nnx.get_partition_spec(teacher_abs))
    abstract['teacher'] = nnx.to_pure_dict(teacher_abs)
    teacher = Teacher(graphdef=teacher_graphdef, model_cfg=teacher_cfg, workdir=d.teacher,
                      step=d.teacher_step, alpha=d.alpha, temperature=d.temperature)
  shardings = sharding.named_shardings(specs, mesh, rules)
  abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          abstract, shardings)
  return Trainer(mesh=mesh, rules=rules, model_cfg=model_cfg, graphdef=graphdef, tx=tx,
                 schedule=schedule, abstract_state=abstract, state_shardings=shardings,
                 batch_sharding=sharding.batch_sharding(mesh, rules),
                 microbatches=config.train.microbatches, seed=config.seed,
                 loss_chunk=config.train.loss_chunk,
                 skip_nonfinite=config.optim.skip_nonfinite > 0, teacher=teacher,
                 compiler_options=runtime.cpu_compiler_options(
                     fusion_emitters=config.train.cpu_fusion_emitters,
                     platform=mesh.devices.flat[0].platform))


def teacher_model(config: ml_collections.ConfigDict,
                  student: model_lib.ModelConfig) -> model_lib.ModelConfig | None:
  """The teacher's model (None unless distill.teacher is set): the shape its run was saved
  with, parameters and compute in distill.teacher_dtype, the student's attention kernel and
  layer scan, no remat (it is never differentiated)."""
  d = config.distill
  if not d.teacher:
    return None
  try:
    saved = rundir.RunDir(d.teacher).load_config()
  except FileNotFoundError:
    raise FileNotFoundError(f'distill.teacher={d.teacher!r} has no config.json: pass the --workdir '
                            'of a jaxllm.main run or the --out of tools/convert_from_hf.py') from None
  cfg = dataclasses.replace(
      model_lib.ModelConfig.from_section(saved.model), param_dtype=d.teacher_dtype,
      dtype=d.teacher_dtype, remat='none', attention=student.attention,
      attention_max_segments=student.attention_max_segments, scan_layers=student.scan_layers,
      fp8=False, gather_in_compute_dtype=False)
  if cfg.vocab_size != student.vocab_size:
    raise ValueError(f'distill.teacher={d.teacher!r} has model.vocab_size={cfg.vocab_size} but the '
                     f'student has {student.vocab_size}: a teacher must share the tokenizer (set '
                     'model.vocab_size and data.tokenizer as the teacher run has them)')
  return cfg


def check_teacher_tokenizer(config: ml_collections.ConfigDict, tokenizer) -> None:
  """Refuses a teacher whose run tokenizes otherwise than the student's `tokenizer`: its logits
  would be over other ids."""
  if not config.distill.teacher:
    return
  run = rundir.RunDir(config.distill.teacher)
  theirs = run.tokenizer(run.load_config())
  if theirs.fingerprint() != tokenizer.fingerprint():
    raise ValueError(f'distill.teacher={config.distill.teacher!r} was trained with the tokenizer '
                     f'{theirs.path}, which differs from this run\'s {tokenizer.path}: set '
                     f'--config.data.tokenizer={theirs.path}')


def _loss_sums(trainer: Trainer, params, batch, teacher_params=None):
  """Summed next-token NLL over real (non-padding) targets, and their count; a batch with
  `weights` (conversations) counts only the targets weighted 1. With `teacher_params` (the train
  step of a distillation) the sum is of the distillation objective instead (loss.kd_sum).

  A batch without `segment_ids` and `positions` holds one document per row and no padding
  (benchmarks): attention then needs no mask, which lets cuDNN run its fastest causal kernel.
  """
  model = nnx.merge(trainer.graphdef, params)
  segment_ids_BL = batch.get('segment_ids')
  mask_BL = (jnp.ones(batch['targets'].shape, bool) if segment_ids_BL is None
             else segment_ids_BL > 0)
  if 'weights' in batch:
    mask_BL = mask_BL & (batch['weights'] > 0)
  weights_BL = mask_BL.astype(jnp.float32)
  kwargs = dict(positions_BL=batch.get('positions'), segment_ids_BL=segment_ids_BL)
  if teacher_params is not None:
    t, teacher = trainer.teacher, nnx.merge(trainer.teacher.graphdef, teacher_params)
    teacher_x_BLD = jax.lax.stop_gradient(teacher.hidden(batch['inputs'], **kwargs))
    kd = dict(alpha=t.alpha, temperature=t.temperature)
    if trainer.loss_chunk:
      loss_sum = loss_lib.head_kd_sum(
          model.hidden(batch['inputs'], **kwargs), model.head_DV(), teacher_x_BLD,
          teacher.head_DV(), batch['targets'], weights_BL, trainer.loss_chunk, **kd)[0]
    else:
      loss_sum = loss_lib.kd_sum(model(batch['inputs'], **kwargs), teacher.logits(teacher_x_BLD),
                                 batch['targets'], weights_BL, **kd)[0]
  elif trainer.loss_chunk:
    loss_sum = loss_lib.head_nll_sum(model.hidden(batch['inputs'], **kwargs), model.head_DV(),
                                     batch['targets'], weights_BL, trainer.loss_chunk)
  else:
    loss_sum = loss_lib.nll_sum(model(batch['inputs'], **kwargs), batch['targets'], weights_BL)
  return loss_sum, jnp.sum(mask_BL)


def _train_step(trainer: Trainer, state, batch):
  grad_fn = jax.value_and_grad(functools.partial(_loss_sums, trainer,
                                                teacher_params=state.get('teacher')), has_aux=True)
  params, m = state['params'], trainer.microbatches
  if m == 1:
    (loss_sum, tokens), grads = grad_fn(params, batch)
  else:
    # Micro-batch i takes rows i, i+m, i+2m, ... so every device holds a slice of each one.
    split = jax.tree.map(lambda x: x.reshape(x.shape[0] // m, m, *x.shape[1:]).swapaxes(0, 1),
                         batch)

    def accumulate(carry, micro):
      (loss_sum, tokens), grads = grad_fn(params, micro)
      return jax.tree.map(jnp.add, carry, (loss_sum, tokens, grads)), None

    zeros = (jnp.zeros((), jnp.float32), jnp.zeros((), jnp.int32),
             jax.tree.map(jnp.zeros_like, params))
    (loss_sum, tokens, grads), _ = jax.lax.scan(accumulate, zeros, split)
  # Mean over every real target token of the step, whatever the micro-batching.
  grads = jax.tree.map(lambda g: g / tokens, grads)
  updates, opt_state = trainer.tx.update(grads, state['opt_state'], params)
  new_params = optax.apply_updates(params, updates)
  # The new parameters are checked too: a finite loss and gradient can still give an update that
  # overflows, and a saved state must never be one that cannot be trained on.
  params_finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(p)) for p in jax.tree.leaves(new_params)]))
  metrics = {'loss': loss_sum / tokens, 'grad_norm': optax.tree.norm(grads),
             'params_finite': params_finite.astype(jnp.float32),
             'lr': trainer.schedule(state['step']), 'tokens': tokens}
  if trainer.skip_nonfinite:
    # A bad step leaves params and optimizer state as they were; its batch is still consumed.
    finite = jnp.isfinite(metrics['loss']) & jnp.isfinite(metrics['grad_norm']) & params_finite
    new_params, opt_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old),
                                         (new_params, opt_state), (params, state['opt_state']))
  frozen = {'teacher': state['teacher']} if 'teacher' in state else {}  # returned as it came
  return {'step': state['step'] + 1, 'params': new_params, 'opt_state': opt_state, **frozen}, metrics


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
