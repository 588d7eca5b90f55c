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

A PEFT LoRA adapter (adapter_config.json + adapter_model.safetensors) on a base that jaxllm
already holds (a jaxllm.main run, or an --out of this tool) becomes a run directory that
jaxllm.sample and jaxllm.evaluate reopen, and that --config.lora.adapter continues training from:

    python tools/convert_from_hf.py --adapter=/models/my-lora --base=/ckpt/llama1b --out=/runs/my-lora

(jaxllm/convert/peft.py's `import_adapter`: the adapter's r, lora_alpha and target_modules become
lora.rank, lora.alpha and lora.targets; the checkpoint names the base, which must not change).
"""

from absl import flags

from jaxllm import cli, rundir
from jaxllm.convert import hf, import_, peft

_HF = flags.DEFINE_string('hf', None, 'HF model directory: config.json and *.safetensors')
_OUT = flags.DEFINE_string('out', None, 'output directory for the jaxllm checkpoint and config')
_DTYPE = flags.DEFINE_enum('dtype', 'float32', sorted(hf.DTYPES),
                           'parameter dtype of the checkpoint')
_OVERWRITE = flags.DEFINE_bool('overwrite', False, 'replace what an earlier conversion wrote into a non-empty --out')
_TOKENIZER = flags.DEFINE_string(
    'tokenizer', None, "the model's tokenizer when the HF folder lacks one: a folder with "
    'tokenizer.json (and its tokenizer_config.json), or a sentencepiece .model')
_ADAPTER = flags.DEFINE_string('adapter', None, 'a PEFT LoRA folder to import (with --base) '
                               'instead of an HF model')
_BASE = flags.DEFINE_string('base', None, '--adapter: the jaxllm run (or import) it applies to')
flags.mark_flags_as_required(['out'])


def main(argv) -> None:
  del argv
  if _ADAPTER.value or _BASE.value:
    if not (_ADAPTER.value and _BASE.value) or _HF.value:
      raise ValueError('--adapter and --base go together, without --hf: --adapter=PEFT_FOLDER '
                       '--base=RUN_OF_ITS_BASE_MODEL --out=NEW_RUN')
    peft.import_adapter(_ADAPTER.value, _BASE.value, _OUT.value, overwrite=_OVERWRITE.value)
    lo, init = (c := rundir.RunDir(_OUT.value).load_config()).lora, c.checkpoint.init_from
    print(f'wrote {_OUT.value}: sample it with python -m jaxllm.sample --workdir={_OUT.value}; '
          f'train it further in a new run with --config.checkpoint.init_from={init} '
          f'--config.lora.rank={lo.rank} --config.lora.alpha={lo.alpha} '
          f'--config.lora.targets={",".join(lo.targets)} --config.lora.adapter={_ADAPTER.value}')
    return
  if not _HF.value:
    raise ValueError('--hf is required: the HF model folder to import (or --adapter with --base)')
  model = import_.convert(_HF.value, _OUT.value, dtype=_DTYPE.value, tokenizer=_TOKENIZER.value,
                          overwrite=_OVERWRITE.value)
  print(f'wrote {_OUT.value}: {model["n_layers"]} layers, width {model["d_model"]}; fine-tune '
        f'with python -m jaxllm.main --config={rundir.RunDir(_OUT.value).config_py} '
        '--workdir=DIR --config.data.sources=DATA.jsonl')


if __name__ == '__main__':
  cli.run(main)
