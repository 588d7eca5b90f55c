"""LoRA adapters in Hugging Face PEFT's format, and a LoRA run merged into a plain HF model.

PEFT's folder: adapter_config.json (`peft_type` LORA, `r`, `lora_alpha`, `target_modules`, ...)
and adapter_model.safetensors with, per layer i and projection P of the HF key table,
`base_model.model.model.layers.{i}.{self_attn|mlp}.{P}.lora_A.weight` [r, in] and `lora_B.weight`
[out, r] (torch Linear layout: y = x A^T B^T, scaled by lora_alpha / r). jaxllm's stacked A
[layers, *in, r] and B [layers, r, *out] flatten their in/out dims in the order the HF key table
flattens the base weight's (heads major), so one transpose per tensor converts them.

`export_adapter` writes a LoRA run's adapters in that format (`peft.PeftModel.from_pretrained(base,
folder)` on the HF export of the base); `merged_reader` gives export.py each base weight plus
its adapter's scale x A @ B, for a plain HF model; `read_adapter` reads a PEFT folder back (to
continue training: `lora.adapter`); `import_adapter` writes a run directory of a PEFT adapter on a
jaxllm base, which `jaxllm.sample` and `jaxllm.evaluate` reopen like a trained run.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import jax
import numpy as np

from jaxllm import checkpoint as checkpoint_lib
from jaxllm import lora as lora_lib
from jaxllm import rundir
from jaxllm.convert import UnsupportedError, check_out, hf, replacing, safetensors_io

ADAPTER_CONFIG = 'adapter_config.json'
ADAPTER_WEIGHTS = 'adapter_model.safetensors'
_NAME = 'base_model.model.model.layers.{i}.{sub}.{proj}.lora_{ab}.weight'


def adapter_config(lcfg: lora_lib.LoraConfig, *, base_model: str = '') -> dict[str, Any]:
  return {'peft_type': 'LORA', 'task_type': 'CAUSAL_LM', 'base_model_name_or_path': base_model,
          'r': lcfg.rank, 'lora_alpha': lcfg.alpha, 'lora_dropout': lcfg.dropout,
          'target_modules': sorted(lora_lib.TARGETS[t][1] for t in lcfg.targets),
          'bias': 'none', 'fan_in_fan_out': False, 'use_rslora': False, 'use_dora': False,
          'inference_mode': True, 'modules_to_save': None, 'layers_to_transform': None}


def _names(lcfg: lora_lib.LoraConfig, n_layers: int) -> Iterator[tuple[str, str, int, str]]:
  """(PEFT tensor name, target, layer, 'a' | 'b') in the order they are written."""
  for i in range(n_layers):
    for target in lcfg.targets:
      sub, proj, _ = lora_lib.TARGETS[target]
      for ab in 'ab':
        yield _NAME.format(i=i, sub=sub, proj=proj, ab=ab.upper()), target, i, ab


def _to_peft(x: np.ndarray, ab: str) -> np.ndarray:
  """One layer's A [*in, r] -> [r, in]; B [r, *out] -> [out, r]."""
  return (x.reshape(-1, x.shape[-1]) if ab == 'a' else x.reshape(x.shape[0], -1)).T


def write_adapter(get: Callable[[str], Mapping], lcfg: lora_lib.LoraConfig, n_layers: int,
                  out: str, *, dtype: str = 'float32', base_model: str = '') -> None:
  """`get(target)` -> that target's stacked {'a', 'b'} (numpy); writes the PEFT folder `out`.
  Adapters are small (rank x width per layer), so all are read before the file is written."""
  os.makedirs(out, exist_ok=True)
  stacked = {t: {ab: np.asarray(x, np.float32) for ab, x in get(t).items()} for t in lcfg.targets}
  tensors = [(name, np.ascontiguousarray(_to_peft(stacked[t][ab][i], ab)))
             for name, t, i, ab in _names(lcfg, n_layers)]
  safetensors_io.write_file(os.path.join(out, ADAPTER_WEIGHTS), iter(tensors),
                            [(name, x.shape) for name, x in tensors], hf.DTYPES[dtype])
  with replacing(os.path.join(out, ADAPTER_CONFIG)) as f:
    json.dump(adapter_config(lcfg, base_model=base_model), f, indent=2)
    f.write('\n')


def _lora_run(workdir: str, step: int):
  """(config, LoraConfig, read-only checkpointer, step, the base reference) of a LoRA run."""
  run = rundir.RunDir(workdir)
  config = run.load_config()
  if not config.lora.rank:
    raise ValueError(f'--workdir={workdir} is not a LoRA run (lora.rank=0): export it whole, '
                     'without --lora')
  ckpt, step = run.open_checkpoint(config, step)
  ref = ckpt.saved_meta(step).get('base')
  if not ref:
    ckpt.close()
    raise checkpoint_lib.CheckpointError(f'{ckpt.step_dir(step)} names no base checkpoint')
  return config, lora_lib.LoraConfig.from_section(config.lora), ckpt, step, ref


def _adapter_reader(ckpt: checkpoint_lib.Checkpointer, step: int, model: Mapping,
                    lcfg: lora_lib.LoraConfig) -> Callable[[str], dict]:
  like = lora_lib.abstract_adapters(model, lcfg)

  def get(target: str) -> dict:
    path = lora_lib.target_path(target)
    return {ab: ckpt.read_param(step, (*path, ab), hf.at_path(like, (*path, ab)))
            for ab in 'ab'}
  return get


def export_adapter(workdir: str, out: str, *, step: int = -1, dtype: str = 'float32',
                   base_model: str = '', overwrite: bool = False) -> int:
  """A LoRA run's adapters at `step` (-1: latest) as a PEFT folder; returns the step."""
  check_out(out, source=workdir, overwrite=overwrite)
  config, lcfg, ckpt, step, _ = _lora_run(workdir, step)
  try:
    model = ckpt.saved_config(step)['model']
    write_adapter(_adapter_reader(ckpt, step, model, lcfg), lcfg, model['n_layers'], out,
                  dtype=dtype, base_model=base_model)
  finally:
    ckpt.close()
  return step


def merged_reader(ckpt: checkpoint_lib.Checkpointer, step: int, model: Mapping, like: Mapping,
                  ref: Mapping, lora: Mapping):
  """(read(path) of the merged weights, the base's Checkpointer to close): each base parameter
  from the base checkpoint `ref` names (refused if it changed since), plus scale x A @ B per
  layer where an adapter applies. `like`: the whole model's abstract params (hf.abstract_params);
  `lora`: the run's lora config section."""
  lcfg = lora_lib.LoraConfig.from_section(lora)
  base, base_step = checkpoint_lib.open_read_only(ref['path'], ref['step'], what='the base',
                                                  step_flag='its step')
  if base.params_fingerprint(base_step) != ref.get('fingerprint'):
    base.close()
    raise checkpoint_lib.CheckpointError(
        f'the base {ref["path"]} step {ref["step"]} has changed since the adapters were trained on '
        'it: restore it, or export the adapters alone (--lora=adapter)')
  adapters = _adapter_reader(ckpt, step, model, lcfg)
  by_weight = {(*lora_lib.target_path(t)[:2], lora_lib.TARGETS[t][1]): t for t in lcfg.targets}

  def read(path: tuple[str, ...]) -> np.ndarray:
    w = base.read_param(base_step, path, hf.at_path(like, path)).astype(np.float32)
    if tuple(path) in by_weight:
      ab = adapters(by_weight[tuple(path)])
      w = w + np.stack([lora_lib.delta(ab['a'][i], ab['b'][i], scale=lcfg.scale)
                        for i in range(w.shape[0])])
    return w
  return read, base


def read_adapter(folder: str, abstract: Mapping | None = None, *, lcfg: lora_lib.LoraConfig,
                 n_layers: int | None = None, what: str = '--adapter') -> dict:
  """A PEFT LoRA folder -> jaxllm adapters: on the shardings of `abstract` (the adapters'
  ShapeDtypeStructs, e.g. a trainer's abstract_state['params']), or numpy when it is None
  (`n_layers` then given). Its rank, alpha and targets must be lcfg's."""
  path = os.path.join(folder, ADAPTER_CONFIG)
  if not os.path.isfile(path):
    raise FileNotFoundError(f'{what}={folder} has no {ADAPTER_CONFIG}: pass a folder written by '
                            'peft (save_pretrained) or tools/convert_to_hf.py --lora=adapter')
  with open(path, encoding='utf-8') as f:
    saved = json.load(f)
  check_adapter_config(saved, lcfg, what=f'{what}={folder}')
  header = safetensors_io.read_header(os.path.join(folder, ADAPTER_WEIGHTS))
  get = lambda name: safetensors_io.read_tensor(os.path.join(folder, ADAPTER_WEIGHTS), header[name])
  n_layers = n_layers if abstract is None else next(iter(jax.tree.leaves(abstract))).shape[0]
  out: dict = {}
  for target in lcfg.targets:
    parts = {}
    for ab in 'ab':
      layers = []
      for name, t, i, x in _names(lcfg, n_layers):
        if t == target and x == ab:
          if name not in header:
            raise UnsupportedError(f'{what}={folder}: {ADAPTER_WEIGHTS} lacks {name}')
          layers.append(np.asarray(get(name), np.float32).T)
      parts[ab] = np.stack(layers)  # [layers, in, r] or [layers, r, out]: reshaped below
    node = out
    for key in lora_lib.target_path(target):
      node = node.setdefault(key, {})
    node.update(parts)
  if abstract is None:
    return out
  return jax.tree.map(lambda x, a: jax.device_put(x.reshape(a.shape).astype(a.dtype), a.sharding),
                      out, dict(abstract))


def check_adapter_config(saved: Mapping[str, Any], lcfg: lora_lib.LoraConfig, *, what: str) -> None:
  """Raises ValueError naming the lora.* key to set when a PEFT config differs from lcfg."""
  if saved.get('peft_type', 'LORA') != 'LORA' or saved.get('use_dora') or saved.get('use_rslora'):
    raise UnsupportedError(f'{what}: only plain LoRA adapters convert (no DoRA, no rsLoRA)')
  want = {'rank': saved.get('r'), 'alpha': saved.get('lora_alpha'),
          'targets': sorted(_target_of(m, what) for m in saved.get('target_modules') or [])}
  have = {'rank': lcfg.rank, 'alpha': lcfg.alpha, 'targets': sorted(lcfg.targets)}
  for key in ('rank', 'alpha', 'targets'):
    if want[key] != have[key] and not (key == 'alpha' and float(want[key]) == float(have[key])):
      raise ValueError(f'{what} has {key} {want[key]!r} but lora.{key}={have[key]!r}: set '
                       f'--config.lora.{key} to match the adapter')


def _target_of(module: str, what: str) -> str:
  for target, (_, proj, _) in lora_lib.TARGETS.items():
    if module.split('.')[-1] == proj:
      return target
  raise UnsupportedError(f'{what}: target module {module!r} is not one of jaxllm\'s projections '
                         f'({", ".join(p for _, p, _ in lora_lib.TARGETS.values())})')


def lora_section(saved: Mapping[str, Any], *, what: str) -> dict[str, Any]:
  """The config's lora.* values of a PEFT adapter_config.json."""
  return {'rank': int(saved['r']), 'alpha': float(saved['lora_alpha']),
          'dropout': float(saved.get('lora_dropout') or 0.0),
          'targets': tuple(sorted({_target_of(m, what) for m in saved['target_modules']},
                                  key=list(lora_lib.TARGETS).index))}


def import_adapter(folder: str, base_workdir: str, out: str, *, overwrite: bool = False) -> str:
  """A run directory `out` of PEFT adapter `folder` on the jaxllm run (or import) `base_workdir`:
  config.json (the base's, with the adapter's lora.* keys and checkpoint.init_from = the base's
  checkpoints), checkpoints/0 with the adapters naming that base. `jaxllm.sample` and
  `jaxllm.evaluate` reopen it; returns its config.json path."""
  check_out(out, source=folder, overwrite=overwrite)
  base_run = rundir.RunDir(base_workdir)
  config = base_run.load_config()
  with open(os.path.join(folder, ADAPTER_CONFIG), encoding='utf-8') as f:
    config.lora.update(lora_section(json.load(f), what=f'--adapter={folder}'))
  lcfg = lora_lib.LoraConfig.from_section(config.lora)
  source, step = base_run.open_checkpoint(config)
  try:
    ref = {'path': source.directory, 'step': step, 'fingerprint': source.params_fingerprint(step)}
  finally:
    source.close()
  adapters = read_adapter(folder, lcfg=lcfg, n_layers=config.model.n_layers,
                          what='--adapter')
  like = lora_lib.abstract_adapters(config.model, lcfg)
  adapters = jax.tree.map(lambda x, a: x.reshape(a.shape).astype(a.dtype), adapters, like)
  config.checkpoint.update(init_from=ref['path'], init_from_step=step, dir='')
  config.data.tokenizer = os.path.abspath(base_run.tokenizer_path(config))
  if config.data.cache_dir == '':
    config.data.cache_dir = os.path.abspath(base_run.data_cache())
  run = rundir.RunDir(out)
  run.write_config(config)
  ckpt = checkpoint_lib.Checkpointer(run.checkpoints(config), async_save=False)
  try:
    ckpt.base = ref
    ckpt.save_params(0, adapters, json.loads(config.to_json_best_effort()))
  finally:
    ckpt.close()
  return run.config_json
