"""Import a Hugging Face model directory (safetensors only) as a jaxllm checkpoint to fine-tune.

    python tools/convert_from_hf.py --hf=/models/Llama-3.2-1B --out=/ckpt/llama1b
    python -m jaxllm.main --config=/ckpt/llama1b/config.py --workdir=/runs/ft

Writes OUT/checkpoints/0/ (the parameters, in the layout `checkpoint.init_from` reads),
OUT/config.json (the jaxllm `model` section) and OUT/config.py (base config + that model section
+ checkpoint.init_from, and data.tokenizer when the HF directory has a sentencepiece
tokenizer.model). Pickled `.bin` weights are refused: unpickling runs code. The mapping is
jaxllm/convert/hf.py; this file only reads and writes.
"""

from __future__ import annotations

import json
import os
import pprint
import shutil
from typing import Any

from jaxllm import model as model_lib
from jaxllm.convert import hf


def load_hf(hf_dir: str, *, dtype: str = 'float32') -> tuple[dict, dict[str, Any]]:
  """(params pure dict of numpy arrays, jaxllm `model` section) from an HF model directory."""
  from safetensors import safe_open
  with open(os.path.join(hf_dir, 'config.json')) as f:
    model = hf.model_config_from_hf(json.load(f))
  model['param_dtype'] = dtype
  files = hf.check_weight_files(os.listdir(hf_dir))
  handles = [safe_open(os.path.join(hf_dir, f), framework='numpy') for f in files]
  where = {name: h for h in handles for name in h.keys()}
  params = hf.from_hf(where, lambda name: where[name].get_tensor(name), model_lib.ModelConfig.from_section(model))
  return params, model


def write_checkpoint(params: dict, model: dict[str, Any], out: str) -> str:
  """OUT/checkpoints/0 with the `params` item that jaxllm.checkpoint's restore_params reads, and
  a `meta` item with the config; returns the checkpoints directory."""
  import jax
  from jaxllm import checkpoint
  # Orbax copies numpy leaves before writing them but reads a CPU jax.Array in place: move the
  # leaves over in place, so each numpy array is freed as its copy is made (2 GiB less peak host
  # memory for the 1B model, docs/benchmarks.md).
  def to_device(tree):
    for key, value in tree.items():
      tree[key] = to_device(value) if isinstance(value, dict) else jax.device_put(value)
    return tree
  to_device(params)
  ckpt = checkpoint.Checkpointer(os.path.join(out, 'checkpoints'), async_save=False)
  try:
    ckpt.save_params(0, params, {'model': model})
  finally:
    ckpt.close()
  return ckpt.directory


_CONFIG_PY = '''"""Fine-tune {source} (imported by tools/convert_from_hf.py).

    python -m jaxllm.main --config={path} --workdir=DIR
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


def write_config(model: dict[str, Any], out: str, *, source: str, checkpoints: str,
                 tokenizer: str | None) -> None:
  with open(os.path.join(out, 'config.json'), 'w') as f:
    json.dump({'model': model}, f, indent=2)
  path = os.path.join(out, 'config.py')
  body = _CONFIG_PY.format(
      source=source, path=path, model=pprint.pformat(model, indent=4, sort_dicts=False),
      name=os.path.basename(out.rstrip('/')),
      init_from=checkpoints,
      tokenizer=(f'  c.data.tokenizer = {tokenizer!r}\n' if tokenizer else
                 '  # This model has no sentencepiece tokenizer.model: set data.tokenizer.\n'))
  with open(path, 'w') as f:
    f.write(body)


def convert(hf_dir: str, out: str, *, dtype: str = 'float32') -> dict[str, Any]:
  """Everything above; returns the jaxllm `model` section."""
  params, model = load_hf(hf_dir, dtype=dtype)
  os.makedirs(out, exist_ok=True)
  checkpoints = write_checkpoint(params, model, out)
  tokenizer = None
  if os.path.exists(os.path.join(hf_dir, 'tokenizer.model')):
    tokenizer = os.path.abspath(os.path.join(out, 'tokenizer.model'))
    shutil.copyfile(os.path.join(hf_dir, 'tokenizer.model'), tokenizer)
  write_config(model, out, source=hf_dir, checkpoints=checkpoints, tokenizer=tokenizer)
  return model


def main(argv) -> None:
  del argv
  model = convert(FLAGS.hf, FLAGS.out, dtype=FLAGS.dtype)
  print(f'wrote {FLAGS.out}: {model["n_layers"]} layers, width {model["d_model"]}; fine-tune with '
        f'python -m jaxllm.main --config={os.path.join(FLAGS.out, "config.py")} --workdir=DIR')


if __name__ == '__main__':
  from absl import app, flags
  flags.DEFINE_string('hf', None, 'HF model directory: config.json and *.safetensors')
  flags.DEFINE_string('out', None, 'output directory for the jaxllm checkpoint and config')
  flags.DEFINE_enum('dtype', 'float32', sorted(hf.DTYPES), 'parameter dtype of the checkpoint')
  flags.mark_flags_as_required(['hf', 'out'])
  FLAGS = flags.FLAGS
  app.run(main)
