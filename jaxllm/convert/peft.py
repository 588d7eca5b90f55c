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
from jaxllm import files
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


def load_adapter_config(folder: str, *, what: str) -> dict[str, Any]:
  """adapter_config.json of the PEFT folder `folder` (`what`: the flag or key that named it), with
  errors that say which file is missing or damaged."""
  where = f'{what}={folder}'
  if not os.path.isdir(folder):
    raise FileNotFoundError(f'{where} is not a folder: pass a PEFT adapter folder '
                            f'({ADAPTER_CONFIG} + {ADAPTER_WEIGHTS})')
  path = os.path.join(folder, ADAPTER_CONFIG)
  if not os.path.isfile(path):
    raise FileNotFoundError(f'{where} has no {ADAPTER_CONFIG}: pass a folder written by peft '
                            '(save_pretrained) or tools/convert_to_hf.py --lora=adapter')
  if not os.path.isfile(os.path.join(folder, ADAPTER_WEIGHTS)):
    pickled = os.path.isfile(os.path.join(folder, 'adapter_model.bin'))
    raise FileNotFoundError(f'{where} has no {ADAPTER_WEIGHTS}' + (
        ', only a pickled adapter_model.bin (unpickling runs code): save it again with peft\'s '
        'save_pretrained(safe_serialization=True)' if pickled else ': copy the whole folder'))
  try:
    with open(path, encoding='utf-8') as f:
      saved = json.load(f)
  except ValueError as e:
    raise ValueError(f'{path} is not JSON ({e}): copy the adapter folder again') from None
  if not isinstance(saved, dict) or not {'r', 'lora_alpha', 'target_modules'} <= set(saved):
    raise ValueError(f'{path} is not a PEFT LoRA config (it needs r, lora_alpha and '
                     'target_modules)')
  return saved


def read_adapter(folder: str, abstract: Mapping, *, lcfg: lora_lib.LoraConfig,
                 what: str = '--adapter') -> dict:
  """A PEFT LoRA folder -> jaxllm adapters shaped as `abstract` (the adapters' ShapeDtypeStructs:
  a trainer's abstract_state['params'], placed on its shardings; or lora.abstract_adapters',
  numpy then). Its rank, alpha and targets must be lcfg's, its shapes the model's."""
  saved = load_adapter_config(folder, what=what)
  check_adapter_config(saved, lcfg, what=f'{what}={folder}')
  weights = os.path.join(folder, ADAPTER_WEIGHTS)
  header = safetensors_io.read_header(weights)
  n_layers = next(iter(jax.tree.leaves(abstract))).shape[0]
  layers = {int(n.split('.')[4]) for n in header if n.startswith('base_model.model.model.layers.')}
  if layers and layers != set(range(n_layers)):
    raise ValueError(f'{what}={folder} adapts {max(layers) + 1} layers but this model has '
                     f'{n_layers}: it was trained on another base (set checkpoint.init_from to it)')
  used = {name for name, *_ in _names(lcfg, n_layers)}
  if unread := sorted(n for n in header if n != '__metadata__' and n not in used):
    raise UnsupportedError(f'{what}={folder}: {ADAPTER_WEIGHTS} holds {unread[0]}, which plain '
                           'LoRA adapters do not have (DoRA, biases or embedding adapters): only '
                           'plain LoRA adapters convert')
  out: dict = {}
  for target in lcfg.targets:
    like = hf.at_path(abstract, lora_lib.target_path(target))
    parts = {}
    for ab in 'ab':
      layers = []
      for name, t, _, x in _names(lcfg, n_layers):
        if t == target and x == ab:
          if name not in header:
            raise UnsupportedError(f'{what}={folder}: {ADAPTER_WEIGHTS} lacks {name}')
          layer = np.asarray(safetensors_io.read_tensor(weights, header[name]), np.float32).T
          if layer.size != np.prod(like[ab].shape[1:]):
            raise ValueError(f'{what}={folder}: {name} has shape {tuple(layer.T.shape)}, this '
                             f'model needs {_peft_shape(like[ab].shape[1:], ab)}: it was trained '
                             'on another base (set checkpoint.init_from to it)')
          layers.append(layer)
      stacked = np.stack(layers).reshape(like[ab].shape).astype(like[ab].dtype)
      sharding = getattr(like[ab], 'sharding', None)
      parts[ab] = stacked if sharding is None else jax.device_put(stacked, sharding)
    node = out
    for key in lora_lib.target_path(target):
      node = node.setdefault(key, {})
    node.update(parts)
  return out


def _peft_shape(shape: tuple[int, ...], ab: str) -> tuple[int, int]:
  """One layer's jaxllm A [*in, r] or B [r, *out] as PEFT stores it: [r, in] or [out, r]."""
  n = int(np.prod(shape))
  return (shape[-1], n // shape[-1]) if ab == 'a' else (n // shape[0], shape[0])


# PEFT options that change what the adapter computes; jaxllm implements none of them.
_UNSUPPORTED = {'use_dora': 'DoRA', 'use_rslora': 'rsLoRA (alpha / sqrt(r))',
                'rank_pattern': 'per-module ranks', 'alpha_pattern': 'per-module alphas',
                'layers_to_transform': 'adapters on some layers only',
                'modules_to_save': 'fully trained extra modules',
                'lora_bias': 'a bias on lora_B', 'layer_replication': 'replicated layers'}


def check_adapter_config(saved: Mapping[str, Any], lcfg: lora_lib.LoraConfig, *, what: str) -> None:
  """Raises ValueError naming the lora.* key to set when a PEFT config differs from lcfg."""
  if saved.get('peft_type', 'LORA') != 'LORA':
    raise UnsupportedError(f'{what}: peft_type {saved.get("peft_type")!r}: only LoRA adapters '
                           'convert')
  for key, name in _UNSUPPORTED.items():
    if saved.get(key):
      raise UnsupportedError(f'{what}: {key}={saved[key]!r} ({name}) is not supported: only '
                             'plain LoRA adapters convert')
  if saved.get('bias', 'none') != 'none':
    raise UnsupportedError(f'{what}: bias={saved["bias"]!r}: Llama projections have no bias; '
                           "only bias='none' converts")
  want = {'rank': saved.get('r'), 'alpha': saved.get('lora_alpha'),
          'targets': _targets_of(saved.get('target_modules'), what)}
  have = {'rank': lcfg.rank, 'alpha': lcfg.alpha, 'targets': lcfg.targets}
  differs = {'rank': float(want['rank']) != have['rank'],
             'alpha': float(want['alpha']) != float(have['alpha']),
             'targets': set(want['targets']) != set(have['targets'])}
  for key in ('rank', 'alpha', 'targets'):
    if differs[key]:
      value = ','.join(want[key]) if key == 'targets' else want[key]
      raise ValueError(f'{what} has {key} {value} but lora.{key}={have[key]!r}: set '
                       f'--config.lora.{key}={value} to match the adapter')


def _targets_of(modules, what: str) -> tuple[str, ...]:
  """PEFT's target_modules (a list of module names, or 'all-linear') -> jaxllm target names."""
  if modules == 'all-linear':  # every linear layer but the head: the seven projections
    return tuple(lora_lib.TARGETS)
  if isinstance(modules, str) or not modules:
    raise UnsupportedError(f'{what}: target_modules={modules!r}: jaxllm reads a list of '
                           f'projection names ({", ".join(p for _, p, _ in lora_lib.TARGETS.values())}) '
                           "or 'all-linear', not a pattern")
  found = {_target_of(m, what) for m in modules}
  return tuple(t for t in lora_lib.TARGETS if t in found)


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
          'targets': _targets_of(saved['target_modules'], what)}


def import_adapter(folder: str, base_workdir: str, out: str, *, overwrite: bool = False) -> str:
  """A run directory `out` of PEFT adapter `folder` on the jaxllm run (or import) `base_workdir`:
  config.json (the base's, with the adapter's lora.* keys and checkpoint.init_from = the base's
  checkpoints), checkpoints/0 with the adapters naming that base. `jaxllm.sample` and
  `jaxllm.evaluate` reopen it; returns its config.json path."""
  check_out(out, source=folder, overwrite=overwrite)
  if files.listdir(rundir.RunDir(out).checkpoints()):
    raise FileExistsError(f'--out={out} holds the checkpoints of a run, which an imported adapter '
                          'would not replace (--overwrite or not): pick a new --out')
  saved = load_adapter_config(folder, what='--adapter')
  base_run = rundir.RunDir(base_workdir)
  try:
    config = base_run.load_config()
  except FileNotFoundError:
    raise FileNotFoundError(f'--base={base_workdir} is not a jaxllm run: pass the run directory '
                            '(or tools/convert_from_hf.py --out) of the base model the adapter '
                            'was trained on') from None
  if config.lora.rank:
    base_of_base = rundir.RunDir.of_checkpoints(config.checkpoint.init_from).workdir
    raise ValueError(f'--base={base_workdir} is a LoRA run (lora.rank={config.lora.rank}): pass '
                     f'the run (or HF import) its adapters apply to: --base={base_of_base}')
  config.lora.update(lora_section(saved, what=f'--adapter={folder}'))
  lcfg = lora_lib.LoraConfig.from_section(config.lora)
  source, step = base_run.open_checkpoint(config)
  try:
    ref = {'path': source.directory, 'step': step, 'fingerprint': source.params_fingerprint(step)}
  finally:
    source.close()
  adapters = read_adapter(folder, lora_lib.abstract_adapters(config.model, lcfg), lcfg=lcfg,
                          what='--adapter')
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
