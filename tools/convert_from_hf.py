"""Import a Hugging Face model directory (safetensors only) as a jaxllm checkpoint to fine-tune.

    python tools/convert_from_hf.py --hf=/models/Llama-3.2-1B --out=/ckpt/llama1b
    python -m jaxllm.main --config=/ckpt/llama1b/config.py --workdir=/runs/ft

Writes OUT/checkpoints/0/ (the parameters, in the layout `checkpoint.init_from` reads),
OUT/config.json (the jaxllm `model` section) and OUT/config.py (base config + that model section
+ checkpoint.init_from, and data.tokenizer: the HF directory's sentencepiece tokenizer.model,
copied, or a placeholder that stops training until --config.data.tokenizer names the one the
model was trained with). Pickled `.bin` weights are refused: unpickling runs code. The work is
jaxllm/convert/import_.py's `convert`.
"""

import os

from absl import flags

from jaxllm import cli, rundir
from jaxllm.convert import hf, import_

_HF = flags.DEFINE_string('hf', None, 'HF model directory: config.json and *.safetensors')
_OUT = flags.DEFINE_string('out', None, 'output directory for the jaxllm checkpoint and config')
_DTYPE = flags.DEFINE_enum('dtype', 'float32', sorted(hf.DTYPES),
                           'parameter dtype of the checkpoint')
_OVERWRITE = flags.DEFINE_bool('overwrite', False, 'replace what an earlier conversion wrote into a non-empty --out')
flags.mark_flags_as_required(['hf', 'out'])


def main(argv) -> None:
  del argv
  model = import_.convert(_HF.value, _OUT.value, dtype=_DTYPE.value,
                         overwrite=_OVERWRITE.value)
  run = rundir.RunDir(_OUT.value)
  command = f'python -m jaxllm.main --config={run.config_py} --workdir=DIR'
  if not os.path.exists(run.tokenizer_path()):
    command += (' --config.data.tokenizer=PATH.model (the HF folder has no sentencepiece '
                'tokenizer.model: PATH.model is the one this model was trained with)')
  print(f'wrote {_OUT.value}: {model["n_layers"]} layers, width {model["d_model"]}; fine-tune '
        f'with {command}')


if __name__ == '__main__':
  cli.run(main)
