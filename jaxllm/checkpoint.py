"""Orbax checkpoints of the train state, the data iterator and the config; restore onto any mesh.

A checkpoint is `<directory>/<step>/` with four items: `params` and `opt_state` (sharded arrays,
OCDBT), `meta` (JSON: step, resolved config, the data sources' fingerprint) and `data` (one grain
iterator state per process, `process_<i>-of-<n>.json`). Parameters and optimizer state restore onto
any mesh and process count; the data position only onto as many processes as wrote it, and only
while the sources are unchanged (else the saved position would replay another order): either
mismatch is an error that names it, unless the caller restores without the data position.
A LoRA run's checkpoint holds only the adapters (`params`) and their optimizer state, and its
`meta` names the base checkpoint they apply to (`base`: path, step, `params_fingerprint`), which
the trainer reads back and compares (jaxllm/trainer.py).
Orbax writes each step into a temporary directory and renames it when complete, so a process
killed mid-save leaves the previous step as the latest; leftover temporary directories are never
listed as steps (on a gs:// bucket, which has no rename, Orbax marks a step complete with a
commit file instead). `directory` may be a gs:// URL: Orbax writes it through epath and
TensorStore's GCS driver. This module never decides when to save: the train loop does.
"""

from __future__ import annotations

import hashlib
import logging as py_logging
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils
from absl import logging

from jaxllm import files

_policies = ocp.checkpoint_managers


class _QuietOrbax(py_logging.Filter):
  """Orbax logs some 50 INFO lines per save through absl; keep its warnings and errors only."""

  def filter(self, record: py_logging.LogRecord) -> bool:
    return record.levelno >= py_logging.WARNING or f'{os.sep}orbax{os.sep}' not in record.pathname


logging.get_absl_logger().addFilter(_QuietOrbax())


_COMMIT_MARKER = 'commit_success.txt'  # Orbax's CommitFileTemporaryPath, used on gs://


class CheckpointError(RuntimeError):
  """A checkpoint that cannot be used: missing, unreadable, or of another model shape."""


def _flat(tree) -> dict[str, Any]:
  """'layers.q_proj.kernel' -> leaf, for error messages that name a parameter."""
  def name(path):
    return '.'.join(str(getattr(k, 'key', getattr(k, 'idx', getattr(k, 'name', k)))) for k in path)
  return {name(p): leaf for p, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def check_shapes(saved, target, *, where: str, exact: bool = True) -> None:
  """Raises CheckpointError naming the first parameter whose saved shape differs from `target`
  or that `target` lacks (`exact`) or has and the checkpoint has not."""
  saved_flat, target_flat = _flat(saved), _flat(target)
  for key, want in target_flat.items():
    if key not in saved_flat:
      raise CheckpointError(f'{where} has no parameter {key!r} (it has {sorted(saved_flat)[:8]}): '
                            'it was written by a different model config')
    got = tuple(saved_flat[key].shape)
    if got != tuple(want.shape):
      raise CheckpointError(f'{where}: parameter {key!r} has shape {got} in the checkpoint but '
                            f'{tuple(want.shape)} in this config; restore with the model.* keys '
                            'the checkpoint was written with, or use a fresh workdir')
  extra = sorted(set(saved_flat) - set(target_flat)) if exact else []
  if extra:
    raise CheckpointError(f'{where} has parameter {extra[0]!r} that this config does not: it was '
                          'written by a different model config')


def _handlers() -> ocp.handlers.DefaultCheckpointHandlerRegistry:
  """Which handler reads each item: needed to read metadata before anything was saved."""
  registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
  items = {'params': (ocp.args.StandardSave, ocp.args.StandardRestore,
                      ocp.handlers.StandardCheckpointHandler),
           'opt_state': (ocp.args.StandardSave, ocp.args.StandardRestore,
                         ocp.handlers.StandardCheckpointHandler),
           'meta': (ocp.args.JsonSave, ocp.args.JsonRestore, ocp.handlers.JsonCheckpointHandler),
           'data': (grain.checkpoint.CheckpointSave, grain.checkpoint.CheckpointRestore,
                    grain.checkpoint.CheckpointHandler)}
  for item, (save, restore, handler_type) in items.items():
    handler = handler_type()
    registry.add(item, save, handler)
    registry.add(item, restore, handler)
  return registry


class Checkpointer:
  """Async saves into `directory`; keeps the latest `keep_latest` and every `keep_every`-th step.
  `data_fingerprint` (JSON-able, e.g. Sources.fingerprint()) is saved with each step and compared
  when a step's data position is restored; `data_restart_step` (the step whose resume restarted the
  data order, 0: none) is saved too, since the saved position is a position in that order."""

  def __init__(self, directory: str, *, keep_latest: int = 3, keep_every: int = 0,
               async_save: bool = True, read_only: bool = False,
               data_fingerprint: Mapping[str, Any] | None = None):
    self.directory = directory if files.is_url(directory) else os.path.abspath(directory)
    self.data_fingerprint, self.data_restart_step = data_fingerprint, 0
    self.base: Mapping[str, Any] | None = None  # a LoRA run's base reference, saved in meta
    keep = [_policies.LatestN(keep_latest)]
    if keep_every:
      keep.append(_policies.EveryNSteps(keep_every))
    self._manager = ocp.CheckpointManager(self.directory, options=ocp.CheckpointManagerOptions(
        enable_async_checkpointing=async_save, read_only=read_only, create=not read_only,
        preservation_policy=_policies.AnyPreservationPolicy(keep)), handler_registry=_handlers())

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def is_committed(self, step: int) -> bool:
    """Whether the save of `step` has finished, from storage (the manager's own list is left
    alone): a local step directory appears by rename; a bucket has no rename, so Orbax writes
    its step in place and a commit marker last."""
    path = self.step_dir(step)
    if files.is_url(path):
      return files.exists(os.path.join(path, _COMMIT_MARKER))
    return os.path.isdir(path)

  def step_dir(self, step: int) -> str:
    return os.path.join(self.directory, str(step))

  def save(self, step: int, state: Mapping[str, Any], data_iter: grain.DatasetIterator,
           config: Mapping[str, Any]) -> bool:
    """Starts saving; returns once the arrays are copied to host memory (the state may then be
    donated). The iterator's state is read now, so call it before taking the next batch.
    False if `step` is not newer than the latest checkpoint."""
    args = ocp.args.Composite(
        params=ocp.args.StandardSave(state['params']),
        opt_state=ocp.args.StandardSave(state['opt_state']),
        meta=ocp.args.JsonSave({'step': step, 'config': dict(config),
                                'data_fingerprint': self.data_fingerprint,
                                'data_restart_step': self.data_restart_step,
                                **({'base': dict(self.base)} if self.base else {})}),
        data=grain.checkpoint.CheckpointSave(data_iter))
    started = self._manager.save(step, args=args)
    if started:
      logging.info('saving checkpoint %s', self.step_dir(step))
    return started

  def save_params(self, step: int, params: Mapping[str, Any], config: Mapping[str, Any]) -> None:
    """Parameters and config only (an imported model to fine-tune from: `checkpoint.init_from`
    reads it with restore_params); waits until committed."""
    saved = self._manager.save(step, args=ocp.args.Composite(
        params=ocp.args.StandardSave(params),
        meta=ocp.args.JsonSave({'step': step, 'config': dict(config),
                                **({'base': dict(self.base)} if self.base else {})})))
    self.wait()
    if not saved:  # Orbax declines to overwrite a step: the old parameters would stay
      raise CheckpointError(f'{self.step_dir(step)} already exists and was not overwritten')

  def params_fingerprint(self, step: int) -> str:
    """A hash of the names and sizes of every file of `step`'s parameters: Orbax names its data
    files afresh on each write, so a base rewritten since (even in place) hashes differently,
    while a copy or move keeps it; nothing is read but the directory listing."""
    root = os.path.join(self.step_dir(step), 'params')
    if not files.isdir(root):
      raise CheckpointError(f'{self.step_dir(step)} has no parameters')
    h = hashlib.sha256()
    for path, size in files.file_sizes(root).items():
      h.update(f'{path}:{size}\n'.encode())
    return h.hexdigest()[:16]

  def params_metadata(self, step: int):
    """Saved parameter shapes, read from metadata only."""
    try:
      return self._manager.item_metadata(step)['params'].tree
    except Exception as e:  # Orbax raises many types for a missing or damaged directory
      raise self._unreadable(step, e) from e

  def restore(self, step: int, abstract_state: Mapping[str, Any],
              data_iter: grain.DatasetIterator | None) -> dict:
    """The full state at `step` on the shardings of `abstract_state` (any mesh); `data_iter` is
    moved to the position saved with it (None: the data position is not read)."""
    check_shapes(self.params_metadata(step), abstract_state['params'], where=self.step_dir(step))
    items = dict(params=ocp.args.StandardRestore(abstract_state['params']),
                 opt_state=ocp.args.StandardRestore(abstract_state['opt_state']),
                 meta=ocp.args.JsonRestore())
    if data_iter is not None:
      self.check_data_position(step)
      items['data'] = grain.checkpoint.CheckpointRestore(data_iter)
    try:
      out = self._manager.restore(step, args=ocp.args.Composite(**items))
    except Exception as e:
      raise self._unreadable(step, e) from e
    step_sharding = abstract_state['step'].sharding
    return {'step': jax.device_put(np.int32(out['meta']['step']), step_sharding),
            'params': out['params'], 'opt_state': out['opt_state']}

  def restore_params(self, step: int, abstract_params: Mapping[str, Any], *,
                     partial: bool = False) -> dict:
    """Only the parameters at `step` (fine-tuning from another run). `partial`: only those that
    `abstract_params` names, the rest left on disk (a quantized base is read a stack at a time)."""
    check_shapes(self.params_metadata(step), abstract_params, where=self.step_dir(step),
                 exact=not partial)
    if partial:
      return self._read_some(step, abstract_params, jax.tree.map(
          lambda a: ocp.ArrayRestoreArgs(sharding=a.sharding, dtype=a.dtype,
                                         global_shape=a.shape), abstract_params))
    try:
      out = self._manager.restore(step, args=ocp.args.Composite(
          params=ocp.args.StandardRestore(abstract_params)))
    except Exception as e:
      raise self._unreadable(step, e) from e
    return out['params']

  def _read_some(self, step: int, item, restore_args):
    reader = ocp.PyTreeCheckpointer()
    try:
      return reader.restore(os.path.join(self.step_dir(step), 'params'),
                            args=ocp.args.PyTreeRestore(item=item, restore_args=restore_args,
                                                        partial_restore=True))
    except Exception as e:
      raise self._unreadable(step, e) from e
    finally:
      reader.close()

  def read_param(self, step: int, path: Sequence[str], like: jax.ShapeDtypeStruct) -> np.ndarray:
    """One parameter (`path` into the params dict) as a host array, the rest left on disk: a
    converter can stream a checkpoint larger than host memory."""
    item, args = like, ocp.RestoreArgs(restore_type=np.ndarray, dtype=like.dtype)
    for key in reversed(path):
      item, args = {key: item}, {key: args}
    out = self._read_some(step, item, args)
    for key in path:
      out = out[key]
    if not isinstance(out, np.ndarray):  # a partial restore leaves a missing leaf as it was
      raise CheckpointError(f'{self.step_dir(step)} has no parameter {".".join(path)!r}: it was '
                            'written by a different model config')
    return out

  def saved_meta(self, step: int) -> dict:
    try:
      return self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))['meta']
    except Exception as e:
      raise self._unreadable(step, e) from e

  def saved_config(self, step: int) -> dict:
    return self.saved_meta(step)['config']

  def saved_process_count(self, step: int) -> int | None:
    """How many processes wrote the data position of `step` (from grain's file names), or None."""
    data_dir = os.path.join(self.step_dir(step), 'data')
    names = files.listdir(data_dir)
    counts = {int(m.group(1)) for m in map(re.compile(r'process_\d+-of-(\d+)\.json$').match, names) if m}
    return counts.pop() if len(counts) == 1 else None

  def data_position_mismatch(self, step: int) -> str:
    """Why the data position of `step` cannot be restored here ('' if it can): another process
    count, or sources that changed (by data_fingerprint) since it was saved."""
    fix = ('set checkpoint.restore_data=False to resume the parameters and optimizer state with the '
           f'data order restarted from step {step}')
    saved = self.saved_process_count(step)
    if saved is not None and saved != jax.process_count():
      return (f'checkpoint {self.step_dir(step)} holds the data position of {saved} processes but '
              f'this run has {jax.process_count()}; resume on {saved} processes, or {fix}')
    before, now = self.saved_meta(step).get('data_fingerprint'), self.data_fingerprint
    if before is None or now is None:  # written before fingerprints, or not asked to compare
      return ''
    changed = fingerprint_changes(before, now)
    if changed:
      return (f'{changed} since checkpoint {self.step_dir(step)} was saved (its documents differ), '
              'so the saved data position would replay another order; restore the sources as they '
              f'were, or {fix}')
    return ''

  def check_data_position(self, step: int) -> None:
    """Raises on every process if the data position of `step` cannot be restored on any of them
    (one refusing alone would leave the others waiting in the collective restore)."""
    problem = self.data_position_mismatch(step)
    if jax.process_count() > 1:
      refused = np.asarray(multihost_utils.process_allgather(np.int32(bool(problem)))).reshape(-1)
      if refused.any() and not problem:
        problem = (f'processes {np.flatnonzero(refused).tolist()} cannot restore the data position '
                   f'of {self.step_dir(step)} (their logs say why)')
    if problem:
      raise CheckpointError(problem)

  def _unreadable(self, step: int, e: Exception) -> CheckpointError:
    older = [s for s in self.all_steps() if s < step]
    hint = (f'move it out of {self.directory} to resume from step {older[-1]}' if older else
            f'move it out of {self.directory} to start afresh')
    return CheckpointError(f'checkpoint {self.step_dir(step)} is incomplete or corrupt '
                           f'({type(e).__name__}: {str(e)[:300]}); {hint}')

  def wait(self) -> None:
    """Blocks until every started save is committed (renamed from its temporary directory)."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.close()


def fingerprint_changes(before: Mapping[str, Any], now: Mapping[str, Any]) -> str:
  """'' if two data fingerprints ({role: {source: fingerprint}}) agree, else which source differs
  and how ('train source data/a changed')."""
  for role in sorted(set(before) | set(now), reverse=True):  # 'train' first
    a, b = before.get(role) or {}, now.get(role) or {}
    for name in sorted(set(a) | set(b)):
      if a.get(name) != b.get(name):
        how = 'was added' if name not in a else 'was removed' if name not in b else 'changed'
        return f'{role} source {name} {how}'
  return ''


def open_read_only(path: str, step: int = -1, *, what: str, step_flag: str, fix: str = '',
                   ) -> tuple[Checkpointer, int]:
  """A read-only Checkpointer on a checkpoint directory and the step to read (-1: the latest).
  Errors name `what` (the flag or key that gave `path`) and `step_flag` (the one that gave `step`);
  `fix` ends the error of a step that is not there."""
  if not files.isdir(path):
    raise CheckpointError(f'{what}: checkpoint directory {path} does not exist (no checkpoint was '
                          'saved there yet)')
  ckpt = Checkpointer(path, read_only=True, async_save=False)
  steps = ckpt.all_steps()
  if not steps:
    ckpt.close()
    raise CheckpointError(f'{what}: {path} holds no complete checkpoint (expected numbered step '
                          'directories, as jaxllm writes under <workdir>/checkpoints)')
  if step < 0:
    step = steps[-1]
  elif step not in steps:
    ckpt.close()
    raise CheckpointError(f'{step_flag}={step} is not a checkpoint of {what}: it has steps '
                          f'{steps}{fix}')
  return ckpt, step


def open_for_init(path: str, step: int = -1) -> tuple[Checkpointer, int]:
  """`checkpoint.init_from`'s checkpoint and step."""
  ckpt, step = open_read_only(path, step, what=f'checkpoint.init_from={path!r}',
                              step_flag='checkpoint.init_from_step')
  logging.info('initialising parameters from %s', ckpt.step_dir(step))
  return ckpt, step
