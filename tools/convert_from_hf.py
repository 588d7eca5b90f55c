"""Import a Hugging Face model directory (safetensors only) as a jaxllm checkpoint to fine-tune.

    python tools/convert_from_hf.py --hf=/models/Llama-3.2-1B --out=/ckpt/llama1b
    python -m jaxllm.main --config=/ckpt/llama1b/config.py --workdir=/runs/ft \
        --config.data.sources=chats.jsonl

Writes OUT/checkpoints/0/ (the parameters, in the layout `checkpoint.init_from` reads),
OUT/config.json (the jaxllm `model` section), the model's tokenizer (OUT/tokenizer/: the HF
folder's tokenizer.json and its companions; or its sentencepiece tokenizer.model, copied to
OUT/tokenizer.model; or --tokenizer's) and OUT/config.py, a fine-tuning config (learning rate
2e-5, short warmup, the model's context length up to 2048 as data.seq_len, that tokenizer,
checkpoint.init_from) that needs --config.data.sources. A folder with no tokenizer and no
--tokenizer is refused. Pickled `.bin` weights are refused: unpickling runs code. The work is
jaxllm/convert/import_.py's `convert`.
"""

from absl import flags

from jaxllm import cli, rundir
from jaxllm.convert import hf, import_

_HF = flags.DEFINE_string('hf', None, 'HF model directory: config.json and *.safetensors')
_OUT = flags.DEFINE_string('out', None, 'output directory for the jaxllm checkpoint and config')
_DTYPE = flags.DEFINE_enum('dtype', 'float32', sorted(hf.DTYPES),
                           'parameter dtype of the checkpoint')
_OVERWRITE = flags.DEFINE_bool('overwrite', False, 'replace what an earlier conversion wrote into a non-empty --out')
_TOKENIZER = flags.DEFINE_string(
    'tokenizer', None, "the model's tokenizer when the HF folder lacks one: a folder with "
    'tokenizer.json (and its tokenizer_config.json), or a sentencepiece .model')
flags.mark_flags_as_required(['hf', 'out'])


def main(argv) -> None:
  del argv
  model = import_.convert(_HF.value, _OUT.value, dtype=_DTYPE.value, tokenizer=_TOKENIZER.value,
                          overwrite=_OVERWRITE.value)
  print(f'wrote {_OUT.value}: {model["n_layers"]} layers, width {model["d_model"]}; fine-tune '
        f'with python -m jaxllm.main --config={rundir.RunDir(_OUT.value).config_py} '
        '--workdir=DIR --config.data.sources=DATA.jsonl')


if __name__ == '__main__':
  cli.run(main)
