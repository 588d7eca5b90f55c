"""The compression recipe: prune a trained run, distill the pruned model from it, evaluate every
stage, export the result to Hugging Face (and, optionally, quantize it). `tools/compress.py` is
its CLI; the pieces are `prune.prune` (the cut), `trainer` (distillation: config `distill`) and
`convert.export`.

    OUT/pruned/      a run directory: config.json (the smaller model section) + step 0 (params)
    OUT/distilled/   a jaxllm.main run from OUT/pruned's parameters, distilled from the teacher
    OUT/hf/          the distilled model as a transformers folder
    OUT/int8/, OUT/int4/  with Recipe.quantize: the final model quantized (ptq.py), run directories
    OUT/report.json  parameters, bytes, held-out loss / bits per byte and eval tokens/s per stage

Every run here is an ordinary run directory: `jaxllm.evaluate`, `jaxllm.sample` and
`tools/convert_to_hf.py` read them, and a pruned run trains further with
`--config.checkpoint.init_from=OUT/pruned/checkpoints`. Wiring: imports the loop, the pruner and
the converters.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import math
import os
import shutil
import time
from typing import Any

import jax
import ml_collections

from jaxllm import prune as prune_lib
from jaxllm import ptq
from jaxllm import rundir
from jaxllm import sharding
from jaxllm import train
from jaxllm.convert import check_out, export, import_, replacing


@dataclasses.dataclass(frozen=True)
class Recipe:
  """What `compress` does; a size left 0 is kept as the teacher has it."""

  n_layers: int = 0
  n_kv_heads: int = 0
  mlp_dim: int = 0
  calibration_batches: int = 8  # train batches the importance scores are averaged over
  steps: int = 200  # distillation steps; 0 = prune and evaluate only
  peak_lr: float = 0.0  # distillation peak learning rate; 0 = the teacher run's optim.peak_lr
  warmup_steps: int = -1  # -1 = the teacher run's optim.warmup_steps, at most steps / 10
  alpha: float = 0.5  # distill.alpha
  temperature: float = 1.0  # distill.temperature
  teacher_dtype: str = 'bfloat16'  # distill.teacher_dtype
  eval_batches: int = 0  # held-out batches per evaluation; 0 = the whole eval split
  export_dtype: str = 'float32'
  quantize: tuple[str, ...] = ()  # also quantize the final model: 'int8', 'int4' (ptq.py)
  group_size: int = 64  # int4 group size


def prune_run(teacher: str, out: str, recipe: Recipe, *, step: int = -1) -> dict[str, Any]:
  """OUT = `out`: the teacher run's checkpoint `step` pruned (prune.prune over its first
  `recipe.calibration_batches` train batches) as a run directory with step 0; returns its config."""
  config, trainer, params, step = rundir.RunDir(teacher).reopen(train.setup, step=step)
  pipeline = train.make_pipeline(config, teacher, trainer.process_batch_size(
      config.train.global_batch_size, config.data.seq_len))
  batches = pipeline.train_iter()
  try:
    section, pruned, scores = prune_lib.prune(
        config.model.to_dict(), params, itertools.islice(batches, recipe.calibration_batches),
        n_layers=recipe.n_layers or None, n_kv_heads=recipe.n_kv_heads or None,
        mlp_dim=recipe.mlp_dim or None)
  finally:
    if hasattr(batches, 'close'):
      batches.close()
  smaller = config.copy_and_resolve_references()
  with smaller.unlocked():
    smaller.model.update(section)
  new = _derived_run(teacher, smaller, out, f'{config.name}-pruned', pruned)
  with replacing(os.path.join(out, 'importance.json')) as f:
    json.dump({'from_step': step, 'tokens': scores.tokens, 'layers': scores.layers.tolist(),
               'heads': scores.heads.tolist()}, f, indent=1)
  return json.loads(new.to_json_best_effort())


def _derived_run(source: str, config: ml_collections.ConfigDict, out: str, name: str,
                 params: dict) -> ml_collections.ConfigDict:
  """`out` as a run directory: `config` (named `name`, the source's tokenizer copied in, its
  dataset cache shared) and `params` as checkpoint step 0; returns the config written."""
  src, run = rundir.RunDir(source), rundir.RunDir(out)
  os.makedirs(out, exist_ok=True)
  new = config.copy_and_resolve_references()
  with new.unlocked():
    new.name = name
    new.data.tokenizer = import_.copy_tokenizer(src.tokenizer_path(config), run)
    new.data.cache_dir = os.path.abspath(src.data_cache(config))
    new.checkpoint.init_from = ''
  import_.write_checkpoint(params, json.loads(new.to_json_best_effort()), run.checkpoints())
  run.write_config(new)
  return new


def _whole_model(config: ml_collections.ConfigDict, where: str, done: str) -> None:
  """Refuses a LoRA run: its checkpoints hold adapters, its base lies elsewhere."""
  if config.lora.rank:
    raise ValueError(f'{where} is a LoRA run (lora.rank={config.lora.rank}), which cannot be {done} '
                     'as it is: merge it first (tools/convert_to_hf.py --workdir=RUN --out=HF, then '
                     'tools/convert_from_hf.py --hf=HF --out=MERGED) and pass MERGED')


def quantize_run(workdir: str, out: str, *, fmt: str, group_size: int = 64,
                 step: int = -1) -> ml_collections.ConfigDict:
  """OUT = `out`: the run's checkpoint `step` with its matrices quantized (ptq.py), as a run
  directory with `ptq.format` set, which jaxllm.evaluate and jaxllm.sample read as they read any
  run; returns its config."""
  _whole_model(rundir.RunDir(workdir).load_config(), f'--workdir={workdir}', 'quantized')
  config, trainer, params, _ = rundir.RunDir(workdir).reopen(train.setup, step=step)
  qconfig = config.copy_and_resolve_references()
  with qconfig.unlocked():
    qconfig.ptq.update(format=fmt, group_size=group_size)
  qtrainer = train.setup(qconfig)
  quantize = jax.jit(functools.partial(ptq.quantize_params, trainer.graphdef, fmt=fmt,
                                       group_size=group_size),
                     out_shardings=qtrainer.state_shardings['params'])
  with sharding.activate(trainer.mesh, trainer.rules):
    qparams = quantize(params)
  return _derived_run(workdir, qconfig, out, f'{config.name}-{fmt}', qparams)


def distill_config(pruned: str, teacher: str, recipe: Recipe) -> ml_collections.ConfigDict:
  """The config of the distillation run: the pruned run's, starting from its parameters, with
  `distill.teacher` = `teacher` and the recipe's steps, learning rate, alpha and temperature."""
  config = rundir.RunDir(pruned).load_config()
  t = config.train
  warmup = (recipe.warmup_steps if recipe.warmup_steps >= 0
            else min(config.optim.warmup_steps, recipe.steps // 10))
  with config.unlocked():
    config.name = config.name.replace('-pruned', '-distilled')
    config.checkpoint.init_from = os.path.abspath(rundir.RunDir(pruned).checkpoints(config))
    config.distill.update(teacher=os.path.abspath(teacher), alpha=recipe.alpha,
                          temperature=recipe.temperature, teacher_dtype=recipe.teacher_dtype)
    t.num_steps = recipe.steps
    t.eval_every = 0
    t.sample_tokens = 0
    config.checkpoint.every = 0  # the end of the run only
    config.optim.warmup_steps = warmup
    config.optim.decay_steps = 0
    if recipe.peak_lr:
      config.optim.peak_lr = recipe.peak_lr
  return config


def measure(workdir: str, *, eval_batches: int = 0, step: int = -1) -> dict[str, Any]:
  """Parameters, their bytes (on device, and on disk in the checkpoint), held-out loss and bits
  per byte, and eval tokens per second (a second pass, after one batch compiled the step)."""
  run = rundir.RunDir(workdir)
  config, trainer, params, step = run.reopen(train.setup, step=step)
  pipeline = train.make_pipeline(config, workdir, trainer.process_batch_size(
      config.train.global_batch_size, config.data.seq_len))
  train.evaluate_split(trainer, params, pipeline, 1)  # compiles
  start = time.perf_counter()
  out = train.evaluate_split(trainer, params, pipeline, eval_batches or None)
  seconds = time.perf_counter() - start
  leaves = jax.tree.leaves(params)
  return {'workdir': workdir, 'step': step, 'params': sum(math.prod(a.shape) for a in leaves),
          'device_bytes': sum(a.nbytes for a in leaves),
          'disk_bytes': _disk_bytes(os.path.join(run.checkpoints(config), str(step), 'params')),
          'eval_loss': out['eval_loss'], 'eval_bits_per_byte': out['eval_bits_per_byte'],
          'eval_tokens': out['eval_tokens'], 'eval_tokens_per_s': out['eval_tokens'] / seconds}


def _disk_bytes(path: str) -> int:
  return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


def compress(teacher: str, out: str, recipe: Recipe, *, overwrite: bool = False) -> dict:
  """The recipe end to end (see the module docstring); returns the report it writes."""
  check_out(out, source=teacher, overwrite=overwrite)
  # A missing teacher, or a LoRA one, is named before anything is written.
  _whole_model(rundir.RunDir(teacher).load_config(), f'--teacher={teacher}', 'pruned')
  paths = {name: os.path.join(out, name) for name in ('pruned', 'distilled', 'hf')}
  for name in ('pruned', 'distilled'):  # an earlier recipe's runs (overwrite): start afresh
    if os.path.isdir(paths[name]):
      shutil.rmtree(paths[name])
  prune_run(teacher, paths['pruned'], recipe)
  stages = {'teacher': teacher, 'pruned': paths['pruned']}
  if recipe.steps:
    train.train_and_evaluate(distill_config(paths['pruned'], teacher, recipe), paths['distilled'])
    stages['distilled'] = paths['distilled']
  final = stages.get('distilled', paths['pruned'])
  for fmt in recipe.quantize:
    stages[fmt] = os.path.join(out, fmt)
    if os.path.isdir(stages[fmt]):
      shutil.rmtree(stages[fmt])
    quantize_run(final, stages[fmt], fmt=fmt, group_size=recipe.group_size)
  report = {'recipe': {**dataclasses.asdict(recipe), 'quantize': list(recipe.quantize)},
            'stages': {name: measure(path, eval_batches=recipe.eval_batches)
                       for name, path in stages.items()}}
  export.export_run(final, paths['hf'], dtype=recipe.export_dtype, overwrite=overwrite)
  report['hf'] = paths['hf']
  s = report['stages']
  if 'distilled' in s:  # the share of the loss that pruning lost which distillation won back
    lost = s['pruned']['eval_loss'] - s['teacher']['eval_loss']
    won = s['pruned']['eval_loss'] - s['distilled']['eval_loss']
    report['recovered'] = won / lost if lost > 0 else None
  with replacing(os.path.join(out, 'report.json')) as f:
    json.dump(report, f, indent=2)
  return report
