"""Wiring: config -> mesh -> data -> model -> train step -> checkpoint / metrics: the loop, and
what it is handed (the pipeline, the checkpointer, the trainer of `jaxllm/trainer.py`, the
compiled step). With trainer.py, the only modules that import many others.
"""

from __future__ import annotations

import functools
import json
import math
import time
from collections.abc import Callable, Iterator, Mapping

import jax
import ml_collections
import numpy as np
from absl import logging

from jaxllm import aot
from jaxllm import chat
from jaxllm import checkpoint as checkpoint_lib
from jaxllm import config as config_lib
from jaxllm import data as data_lib
from jaxllm import distill
from jaxllm import layerstats
from jaxllm import lora as lora_lib
from jaxllm import metrics as metrics_lib
from jaxllm import model as model_lib
from jaxllm import monitor as monitor_lib
from jaxllm import rundir
from jaxllm import runtime
from jaxllm import sample as sample_lib
from jaxllm import sharding
from jaxllm import trainer as trainer_lib
from jaxllm.convert import peft


class NonFiniteGuard:
  """Stops the run at a non-finite loss or gradient or, with optim.skip_nonfinite = K > 0, lets
  up to K skipped steps in a row pass (the step itself kept the old state) and counts them."""

  def __init__(self, max_in_a_row: int = 0):
    self.max_in_a_row, self.in_a_row, self.skipped = max_in_a_row, 0, 0

  def check(self, step: int, metrics: Mapping[str, float],
            resume_hint: Callable[[], str] = str) -> None:
    """`resume_hint()` is said when the run stops (see resume_hint below)."""
    finite = (np.isfinite(metrics['loss']) and np.isfinite(metrics['grad_norm'])
              and metrics.get('params_finite', 1.0) == 1.0)
    if finite:
      self.in_a_row = 0
      return
    what = (f'non-finite loss or gradient at step {step} (loss={metrics["loss"]}, grad_norm='
            f'{metrics["grad_norm"]}, parameters finite after the update: '
            f'{bool(metrics.get("params_finite", 1.0))})')
    self.in_a_row, self.skipped = self.in_a_row + 1, self.skipped + 1
    if self.in_a_row > self.max_in_a_row:
      limit = (f'{self.in_a_row} in a row, more than optim.skip_nonfinite={self.max_in_a_row}; '
               if self.max_in_a_row else '')
      raise FloatingPointError(f'{what}; {limit}lower optim.peak_lr or raise optim.warmup_steps, '
                               f'or set optim.skip_nonfinite=K to skip such steps{resume_hint()}')
    logging.warning('%s: update skipped (%d in a row, %d in this process so far)', what,
                    self.in_a_row, self.skipped)


def resume_hint(ckpt: checkpoint_lib.Checkpointer, bad_step: int) -> str:
  """How to continue after a non-finite step: which checkpoint a rerun resumes from, and that
  the one just before the bad step holds the parameters that produced it."""
  latest = ckpt.latest_step()
  if latest is None:
    return '; no checkpoint was saved, so a rerun starts afresh'
  hint = f'; a rerun resumes from step {latest} ({ckpt.step_dir(latest)})'
  if latest == bad_step - 1:
    older = [s for s in ckpt.all_steps() if s < latest]
    hint += (', whose parameters gave this step: with the same settings it may fail again; move '
             f'that directory out of {ckpt.directory} to resume from '
             f'{f"step {older[-1]}" if older else "scratch"} instead')
  return hint


def make_pipeline(config: ml_collections.ConfigDict, workdir: str, batch_size: int):
  config_lib.check_minimums(config)  # the data tools build no trainer: errors name keys here too
  d, run = config.data, rundir.RunDir(workdir)
  return data_lib.make_pipeline(
      source_dir=d.source_dir or None, cache_dir=run.data_cache(config),
      tokenizer_path=run.tokenizer_path(config), train_missing_tokenizer=not d.tokenizer,
      vocab_size=config.model.vocab_size, seq_len=d.seq_len, batch_size=batch_size,
      eval_files=d.eval_files, seed=d.seed, process_index=jax.process_index(),
      process_count=jax.process_count(), sources=d.sources, eval_source=d.eval_source,
      text_field=d.text_field, tfds_data_dir=d.tfds_data_dir or None,
      skip_bad_records=d.skip_bad_records, pretokenize=d.pretokenize, worker_count=d.worker_count,
      chat_template=d.chat_template, loss_on=d.loss_on, chat_overflow=d.chat_overflow,
      encode_chat=chat.encode_chat, eval_fraction=d.eval_fraction, progress=metrics_lib.progress)


def setup(config: ml_collections.ConfigDict, devices=None, *,
          saved: Mapping | None = None) -> trainer_lib.Trainer:
  """Resolves the config's 'auto' settings (aot.resolve_auto: `saved`'s, the config of the run
  being resumed, else the planner's), validates it against `devices` (default: the devices
  present) and builds the trainer."""
  devices = jax.devices() if devices is None else list(devices)
  aot.resolve_auto(config, devices, saved=saved)
  return aot.build_trainer(config, devices)


def make_checkpointer(config: ml_collections.ConfigDict,
                      workdir: str) -> checkpoint_lib.Checkpointer:
  k = config.checkpoint
  return checkpoint_lib.Checkpointer(rundir.RunDir(workdir).checkpoints(config),
                                     keep_latest=k.keep_latest, keep_every=k.keep_every,
                                     async_save=k.async_save)


def initial_state(trainer: trainer_lib.Trainer, ckpt: checkpoint_lib.Checkpointer,
                  config: ml_collections.ConfigDict, pipeline) -> tuple[dict, Iterator]:
  """(state, train iterator): the latest checkpoint of this run with its data position (or, with
  checkpoint.restore_data=False, a data order restarted from its step), else
  `checkpoint.init_from`'s parameters with a fresh optimizer, else a random init; with the frozen
  teacher of a distillation beside them (trainer.with_teacher)."""
  state, train_iter = _trained_state(trainer, ckpt, config, pipeline)
  return trainer.with_teacher(state), train_iter


def _trained_state(trainer: trainer_lib.Trainer, ckpt: checkpoint_lib.Checkpointer,
                   config: ml_collections.ConfigDict, pipeline) -> tuple[dict, Iterator]:
  ckpt.data_fingerprint = pipeline.sources.fingerprint()  # saved with each step, compared here
  latest = ckpt.latest_step()
  if latest is None:
    if trainer.lora:
      return _initial_lora_state(trainer, ckpt, config), pipeline.train_iter()
    state = trainer.init_state()
    if config.checkpoint.init_from:
      source, step = checkpoint_lib.open_for_init(config.checkpoint.init_from,
                                                  config.checkpoint.init_from_step)
      state['params'] = source.restore_params(step, trainer.abstract_state['params'])
      source.close()
    return state, pipeline.train_iter()
  logging.info('resuming from %s', ckpt.step_dir(latest))
  restore_data = config.checkpoint.restore_data
  # The saved position is one in the order of the last restart (if any): rebuild that order.
  restart = ckpt.saved_meta(latest).get('data_restart_step', 0) if restore_data else latest
  ckpt.data_restart_step = restart  # later saves are positions in this order too
  train_iter = pipeline.train_iter(restart_step=restart)
  try:
    _check_same_adapters(ckpt.saved_config(latest).get('lora', {}), config, ckpt.step_dir(latest))
    # Abstract targets carry this run's shardings: Orbax reshards onto whatever mesh we have now.
    state = ckpt.restore(latest, trainer.abstract_state, train_iter if restore_data else None)
  except BaseException:
    if hasattr(train_iter, 'close'):
      train_iter.close()  # stops grain's worker processes, if any
    raise
  if trainer.lora:  # the base this checkpoint's adapters were trained on, unchanged
    saved = ckpt.saved_meta(latest).get('base') or {}
    state['base'], ckpt.base = trainer.load_base(
        config.checkpoint.init_from or saved.get('path', ''), saved.get('step', -1), expect=saved)
  if not restore_data:
    logging.warning('checkpoint.restore_data=False: the data position of step %d is not restored; '
                    'the data order restarts there with a fresh shuffle (seed %d, from data.seed and '
                    'the step), so batches differ from an uninterrupted run', latest,
                    pipeline.restart_seed(latest))
  _log_config_changes(ckpt.saved_config(latest), config)
  return state, train_iter


def _initial_lora_state(trainer: trainer_lib.Trainer, ckpt: checkpoint_lib.Checkpointer,
                        config: ml_collections.ConfigDict) -> dict:
  """Fresh adapters (or lora.adapter's, a PEFT folder) on checkpoint.init_from's base."""
  k = config.checkpoint
  if not k.init_from:
    raise ValueError(f'lora.rank={config.lora.rank} trains adapters on a base model: set '
                     'checkpoint.init_from to its checkpoint directory (tools/convert_from_hf.py '
                     'writes one, and a config.py that sets it)')
  state = trainer.init_state(with_base=False)
  if config.lora.adapter:  # read (and checked) before the base, which may take minutes to load
    state['params'] = peft.read_adapter(config.lora.adapter, trainer.abstract_state['params'],
                                        lcfg=trainer.lora, what='lora.adapter')
  state['base'], ckpt.base = trainer.load_base(k.init_from, k.init_from_step)
  return state


def _log_config_changes(saved: Mapping, config: ml_collections.ConfigDict) -> None:
  """Resuming with other settings (say a longer train.num_steps) is allowed; say which."""
  before = metrics_lib.flatten_config(saved)
  now = metrics_lib.flatten_config(json.loads(config.to_json_best_effort()))
  changed = [f'{k}: {before.get(k)!r} -> {v!r}' for k, v in sorted(now.items())
             if before.get(k) != v]
  if changed:
    logging.warning('config differs from the checkpoint in: %s', '; '.join(changed))


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains `config` in `workdir`, resuming from its latest checkpoint; returns the last train
  and eval metrics, the final state, and `preempted_at` (a step) if a signal stopped it. The
  state's frozen base or teacher is in the memory layout the compiled step took (jit adapts to
  it; an ahead-of-time compiled function wants `Trainer.place_frozen` first)."""
  started = time.monotonic()  # goodput's start-up is timed from here
  if runtime.prepare(xla_gpu_flags=config.train.xla_gpu_flags,  # before JAX starts its backends
                     cpu_reuse_memory=config.train.cpu_reuse_memory):
    logging.info('CPU backend: freed host memory is kept for reuse (train.cpu_reuse_memory)')
  d = config.distributed
  sharding.initialize_distributed(initialize=d.initialize, coordinator_address=d.coordinator_address,
                                  num_processes=d.num_processes, process_id=d.process_id)
  # A resume takes its 'auto' values as the run started with them (its config.json).
  saved = rundir.RunDir(workdir).saved_config() if config_lib.auto_keys(config) else None
  trainer = setup(config, saved=saved)  # validates the config: a bad one leaves no workdir behind
  if config.ptq.format:
    raise ValueError(f'ptq.format={config.ptq.format!r} marks a quantized run for evaluation and '
                     'sampling; train the float model (ptq.format=\'\') and quantize it after')
  rundir.RunDir(workdir).create()  # storage jaxllm cannot write is refused first
  t = config.train
  pipeline = make_pipeline(config, workdir,
                           trainer.process_batch_size(t.global_batch_size, config.data.seq_len))
  distill.check_teacher_tokenizer(config, pipeline.tokenizer)
  check_base_tokenizer(config, pipeline.tokenizer)
  ckpt = make_checkpointer(config, workdir)
  train_iter = None
  monitor = monitor_lib.Monitor(goodput_path=rundir.RunDir(workdir).goodput, started=started,
                                tokens_per_step=t.global_batch_size * config.data.seq_len,
                                **config.monitor)
  try:
    # Before anything is written: a checkpoint that does not fit must leave the workdir as it was.
    state, train_iter = initial_state(trainer, ckpt, config, pipeline)
    writer = _start_logging(config, workdir, trainer)
    logging.info('parameters:\n%s', metrics_lib.parameter_table(state['params']))
    last = _train_loop(config, trainer, state, train_iter, pipeline, ckpt, writer, monitor)
    monitor.finish(writer, wait_for_saves=ckpt.wait)
    writer.close()
  finally:
    monitor.close()
    ckpt.close()  # waits for a save in flight to commit, on errors too
    if hasattr(train_iter, 'close'):
      train_iter.close()  # stops grain's worker processes, if any
  return last


def _check_same_adapters(saved: Mapping, config: ml_collections.ConfigDict, where: str) -> None:
  """A resume must build the adapters its checkpoint holds (or none, as it does)."""
  names = lambda t: ','.join(sorted(lora_lib.parse_targets(t)))
  said = lambda rank, t: f'lora.rank={rank}' + (f' on {names(t)}' if rank else '')
  was, now = said(saved.get('rank', 0), saved.get('targets', ())), said(config.lora.rank,
                                                                        config.lora.targets)
  if was != now:
    fix = f'--config.lora.rank={saved.get("rank", 0)}' + (
        f' --config.lora.targets={names(saved["targets"])}' if saved.get('rank') else '')
    raise ValueError(f'{where} was written with {was}, not {now}: resume with {fix}, or start '
                     'afresh in a new workdir')


def check_base_tokenizer(config: ml_collections.ConfigDict, tokenizer) -> None:
  """Refuses to fine-tune a base (checkpoint.init_from, in a run directory) that is a LoRA run,
  or on data tokenized otherwise than its run's (its embeddings would be read with other ids)."""
  base = config.checkpoint.init_from
  run = rundir.RunDir.of_checkpoints(base) if base else None
  saved = run and run.saved_config()
  if saved is not None and saved.lora.rank:
    raise ValueError(f'checkpoint.init_from={base!r} is a LoRA run (adapters on its own base): '
                     'export it merged (tools/convert_to_hf.py), import that '
                     '(tools/convert_from_hf.py) and start from the import')
  if saved is None or not run.has_tokenizer(saved):
    return  # not a run directory's checkpoints: nothing to compare with
  saved.data.chat_template = config.data.chat_template  # a chat fine-tune may add one
  theirs = run.tokenizer(saved)
  if theirs.fingerprint() != tokenizer.fingerprint():
    raise ValueError(f'checkpoint.init_from={base!r} was trained with the tokenizer {theirs.path}, '
                     f"which differs from this run's {tokenizer.path}: set "
                     f'--config.data.tokenizer={theirs.path}')


def _start_logging(config, workdir: str, trainer: trainer_lib.Trainer):
  is_lead = jax.process_index() == 0
  run = rundir.RunDir(workdir)
  writer = metrics_lib.SummaryWriter(run.tensorboard, enabled=is_lead)
  writer.write_hparams(config.to_dict())
  if is_lead:
    run.write_config(config)
  logging.info('mesh %s on %d devices (%s)', dict(trainer.mesh.shape), jax.device_count(),
               jax.devices()[0].device_kind)
  logging.info('config:\n%s', metrics_lib.format_config(config))
  return writer


def _train_loop(config, trainer: trainer_lib.Trainer, state, train_iter, pipeline, ckpt, writer,
                monitor: monitor_lib.Monitor) -> dict:
  t, every = config.train, config.checkpoint.every
  config_dict = json.loads(config.to_json_best_effort())
  reporter = metrics_lib.Reporter(
      total_steps=t.num_steps, tokens_per_step=t.global_batch_size * config.data.seq_len,
      flops_per_token=model_lib.flops_per_token(trainer.model_cfg, config.data.seq_len),
      num_devices=jax.device_count(),
      peak_flops=metrics_lib.peak_flops_per_device(jax.devices()[0].device_kind,
                                                   config.model.dtype),
      writer=writer)
  guard = NonFiniteGuard(config.optim.skip_nonfinite)
  last, pending, step, train_step = {}, None, int(state['step']), None
  monitor.begin(step)
  with runtime.PreemptionWatch() as watch, sharding.activate(trainer.mesh, trainer.rules):
    for step in range(step + 1, t.num_steps + 1):
      with monitor.data_wait():
        batch = sharding.global_batch(next(train_iter), trainer.batch_sharding)
      if train_step is None:  # compiled for this batch's shapes; the base moves to its layout
        train_step = trainer.compile_step_for(batch)
        state = trainer.place_frozen(state, train_step)
      state, step_metrics = train_step(state, batch)
      # Read step N-1's metrics only now that step N is queued: the device never waits on us.
      if pending is not None:
        last.update(_finish_step(*pending, reporter, guard, t, ckpt, monitor))
      pending = (step, step_metrics)
      stop = watch.should_stop(step)
      if stop or (every and step % every == 0) or step == t.num_steps:
        # Check this step's loss first so a non-finite state is never saved. The iterator has
        # given exactly `step` batches here: its state is the position to resume from.
        last.update(_finish_step(*pending, reporter, guard, t, ckpt, monitor))
        pending = None
        with monitor.checkpoint(step, functools.partial(ckpt.is_committed, step)):
          ckpt.save(step, state, train_iter, config_dict)
      if stop:
        with monitor.timed('checkpoint'):
          ckpt.wait()
        logging.warning('stopped by %s after step %d; checkpoint saved in %s; run the same command '
                        'to resume', watch.signal or 'preemption', step, ckpt.step_dir(step))
        return {**last, 'state': state, 'preempted_at': step}
      if t.eval_every and step % t.eval_every == 0 and step < t.num_steps:
        with monitor.timed('eval'):
          last.update(monitor.observe(_run_eval(config, trainer, state, pipeline, step, writer)))
    if pending is not None:
      last.update(_finish_step(*pending, reporter, guard, t, ckpt, monitor))
  with monitor.timed('eval'):
    last.update(monitor.observe(_run_eval(config, trainer, state, pipeline, step, writer)))
  last['state'] = state
  return last


def _finish_step(step: int, device_metrics, reporter, guard: NonFiniteGuard, t, ckpt,
                 monitor: monitor_lib.Monitor) -> dict:
  device_metrics = dict(device_metrics)
  layer_stats = device_metrics.pop('layer_stats', None)  # train.layer_stats_every > 0
  host = monitor.fetch(step, device_metrics)  # the loop's one wait on the device per step
  finite = all(math.isfinite(host[k]) for k in ('loss', 'grad_norm'))
  if (layer_stats is not None and (step % t.layer_stats_every == 0 or not finite)
      and jax.process_index() == 0):
    # The step is done (fetch waited for it): this copies its results and waits on nothing. A
    # step that is not finite is written whatever N is (before the guard may stop the run): its
    # norms say which layer blew up.
    reporter.writer.write_scalars(step, layerstats.scalars(jax.device_get(layer_stats)))
    if not finite:
      reporter.writer.flush()
  guard.check(step, host, resume_hint=lambda: resume_hint(ckpt, step))
  if step % t.log_every == 0 or step == t.num_steps:
    scalars = {k: host[k] for k in ('loss', 'lr', 'grad_norm')}
    if guard.max_in_a_row:
      scalars['skipped_steps'] = guard.skipped
    monitor.observe(reporter.report(step, scalars))
  return host


def evaluate_split(trainer: trainer_lib.Trainer, params, pipeline: data_lib.Pipeline,
                   max_batches: int | None = None) -> dict:
  """trainer.evaluate over the pipeline's eval split (`max_batches` None: all of it), with bits
  per byte from its tokenizer."""
  return trainer_lib.evaluate(trainer, params, pipeline.eval_batches(max_batches=max_batches),
                              count_bytes=pipeline.tokenizer.text_bytes_counter())


def _run_eval(config, trainer, state, pipeline, step, writer) -> dict:
  """Held-out loss, perplexity and bits per byte, and samples from train.sample_prompts."""
  t, start = config.train, time.perf_counter()
  out = evaluate_split(trainer, trainer.model_params(state), pipeline, t.eval_batches or None)
  writer.write_scalars(step, {'eval/loss': out['eval_loss'],
                              'eval/perplexity': out['eval_perplexity'],
                              'eval/bits_per_byte': out['eval_bits_per_byte']})
  logging.info('eval at step %d: loss %.4f, perplexity %.1f, %.3f bits/byte over %d tokens '
               '(%.1f s)', step, out['eval_loss'], out['eval_perplexity'],
               out['eval_bits_per_byte'], out['eval_tokens'], time.perf_counter() - start)
  if t.sample_tokens and t.sample_prompts:
    texts = sample_lib.sample_texts(
        trainer.graphdef, trainer.model_params(state), pipeline.tokenizer, t.sample_prompts,
        mesh=trainer.mesh, rules=trainer.rules, max_new_tokens=t.sample_tokens,
        temperature=t.sample_temperature, seed=config.seed)
    # Fenced as code: markdown would fold the play's line breaks into one paragraph.
    writer.write_texts(step, {f'samples/{i}': f'```\n{text}\n```' for i, text in enumerate(texts)})
    logging.info('sample at step %d: %r', step, texts[0])
  writer.flush()
  return out
