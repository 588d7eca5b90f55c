"""A Hugging Face model folder (safetensors only) as a jaxllm run directory to fine-tune from.

Writes, through `rundir.RunDir(out)`: the checkpoint at step 0 (parameters and config, the layout
`checkpoint.init_from` reads), config.json (the jaxllm `model` section, so the export and the
evaluation CLIs reopen it as a run) and config.py (base config + that model section +
checkpoint.init_from, and data.tokenizer: the HF folder's sentencepiece tokenizer.model copied
into the run, or UNSET_TOKENIZER, which stops training until the user names the model's
tokenizer). Pickled `.bin` weights are refused: unpickling runs code.

Imports six jaxllm modules: it is the conversion's wiring (the key table and the safetensors
reader on one side; the checkpointer and the run directory on the other).
"""

from __future__ import annotations

import json
import os
import pprint
import shutil
from typing import Any

from absl import logging

from jaxllm import checkpoint as checkpoint_lib
from jaxllm import model as model_lib
from jaxllm import rundir
from jaxllm.convert import check_out, hf, hf_tokenizer, replacing, safetensors_io

# data.tokenizer in the config.py of a model imported without a sentencepiece tokenizer.model
# (Llama 3 and Qwen ship tokenizer.json). Empty, it would train a new tokenizer whose ids mean
# nothing to the weights; a configured path that does not exist stops training instead (in the
# data pipeline), and this one reads as the fix in that error.
UNSET_TOKENIZER = "UNSET (set data.tokenizer to the model's sentencepiece .model)"


def load_hf(hf_dir: str, *, dtype: str = 'float32') -> tuple[dict, dict[str, Any]]:
  """(params pure dict of numpy arrays, jaxllm `model` section) from an HF model folder."""
  path = os.path.join(hf_dir, hf.CONFIG_FILE)
  if not os.path.isfile(path):
    raise FileNotFoundError(f'{hf_dir} has no {hf.CONFIG_FILE}: pass a Hugging Face model folder '
                            '(config.json and *.safetensors)')
  with open(path, encoding='utf-8') as f:
    try:
      hf_config = json.load(f)
    except json.JSONDecodeError as e:
      raise ValueError(f'{path} is not valid JSON ({e}): download it again') from None
  model = hf.model_config_from_hf(hf_config)
  model['param_dtype'] = dtype
  names, read = safetensors_io.open_weights(hf_dir)
  params = hf.from_hf(names, read, model_lib.ModelConfig.from_section(model))
  return params, model


def write_checkpoint(params: dict, model: dict[str, Any], directory: str) -> str:
  """Step 0 in the checkpoint directory `directory`: the `params` item that `restore_params`
  reads and a `meta` item with the config {'model': model}; returns the directory."""
  import jax
  # Orbax copies numpy leaves before writing them but reads a CPU jax.Array in place: move the
  # leaves over in place, so each numpy array is freed as its copy is made (2 GiB less peak host
  # memory for the 1B model, docs/benchmarks.md).
  cpu = jax.local_devices(backend='cpu')[0]  # host memory, also on a GPU/TPU machine

  def to_device(tree):
    for key, value in tree.items():
      tree[key] = to_device(value) if isinstance(value, dict) else jax.device_put(value, cpu)
    return tree
  to_device(params)
  ckpt = checkpoint_lib.Checkpointer(directory, async_save=False)
  try:
    ckpt.save_params(0, params, {'model': model})
  finally:
    ckpt.close()
  return ckpt.directory


_CONFIG_PY = '''"""Fine-tune {source} (imported by tools/convert_from_hf.py).

    python -m jaxllm.main --config={path} --workdir=DIR{set_tokenizer}
"""

from jaxllm import config as config_lib

MODEL = {model}


def get_config():
  c = config_lib.base_config()
  c.name = {name!r}
  c.model.update(MODEL)
  c.checkpoint.init_from = {init_from!r}
{tokenizer}  return c
'''


_NO_TOKENIZER = (
    '  # No sentencepiece tokenizer.model in the HF folder (the only kind jaxllm reads yet), and\n'
    '  # an empty data.tokenizer would train an unrelated one: training stops until this is set\n'
    '  # here, or by --config.data.tokenizer=PATH, to the tokenizer the model was trained with.\n'
    f'  c.data.tokenizer = {UNSET_TOKENIZER!r}\n')


def write_config_py(run: rundir.RunDir, model: dict[str, Any], *, source: str, checkpoints: str,
                    tokenizer: str | None) -> None:
  """config.py: the config to fine-tune with (`jaxllm.main --config=`)."""
  # Paths go into the docstring escaped (a folder name with quotes must not end it) and into
  # code as repr.
  escape = lambda text: json.dumps(text)[1:-1]
  body = _CONFIG_PY.format(
      source=escape(source), path=escape(run.config_py),
      model=pprint.pformat(model, indent=4, sort_dicts=False),
      name=os.path.basename(run.workdir.rstrip('/')), init_from=checkpoints,
      set_tokenizer='' if tokenizer else ' --config.data.tokenizer=PATH.model',
      tokenizer=(f'  c.data.tokenizer = {tokenizer!r}\n' if tokenizer else _NO_TOKENIZER))
  with replacing(run.config_py) as f:
    f.write(body)


def write_run(params: dict, model: dict[str, Any], out: str, *, source: str,
              tokenizer_model: str | None = None, overwrite: bool = False) -> rundir.RunDir:
  """The run directory `out`: checkpoint, config.json, config.py and (given the path of a
  sentencepiece `tokenizer_model`) a copy of the tokenizer. `params` leaves are moved to device
  arrays as they are written (see write_checkpoint). `overwrite` replaces an earlier import's
  checkpoint there; without it a non-empty `out` is refused."""
  check_out(out, source=source, overwrite=overwrite)
  run = rundir.RunDir(out)
  os.makedirs(out, exist_ok=True)
  if overwrite and os.path.isdir(run.checkpoints()):
    shutil.rmtree(run.checkpoints())  # asked for: the old step 0 would otherwise be kept
  checkpoints = write_checkpoint(params, model, run.checkpoints())
  tokenizer = None
  if tokenizer_model:
    tokenizer = os.path.abspath(run.tokenizer_path())
    with open(tokenizer_model, 'rb') as src, replacing(tokenizer, 'wb') as dst:
      shutil.copyfileobj(src, dst)
  run.write_config({'model': model})
  write_config_py(run, model, source=source, checkpoints=checkpoints, tokenizer=tokenizer)
  return run


def convert(hf_dir: str, out: str, *, dtype: str = 'float32',
            overwrite: bool = False) -> dict[str, Any]:
  """`load_hf` then `write_run`; returns the jaxllm `model` section."""
  check_out(out, source=hf_dir, overwrite=overwrite)  # before the (long) read
  params, model = load_hf(hf_dir, dtype=dtype)
  tokenizer = os.path.join(hf_dir, hf_tokenizer.TOKENIZER_MODEL)
  if os.path.exists(tokenizer):
    with open(tokenizer, 'rb') as f:
      if not hf_tokenizer.is_sentencepiece(f.read()):
        logging.warning('%s is not a sentencepiece model: data.tokenizer is left to set', tokenizer)
        tokenizer = None
  else:
    tokenizer = None
  write_run(params, model, out, source=hf_dir, tokenizer_model=tokenizer, overwrite=overwrite)
  return model
