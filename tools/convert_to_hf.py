"""Export a jaxllm checkpoint as a Hugging Face transformers model directory.

    python tools/convert_to_hf.py --workdir=runs/tiny --out=/tmp/hf [--step=N] [--dtype=bfloat16]

Writes config.json (loads in transformers 4.4x and 5.x), generation_config.json, model.safetensors
(or model-0000x-of-0000y.safetensors plus model.safetensors.index.json above --max_shard_gb) and
the tokenizer: an imported model's own tokenizer files (data.tokenizer, a folder with
tokenizer.json) as they came, with its generation_config.json; or, for a sentencepiece
tokenizer.model trained here, tokenizer.json and tokenizer_config.json that encode exactly as it
does (it is copied beside them) with jaxllm's default chat template. A chat template the run set
(data.chat_template) replaces the tokenizer's own. Tensors are converted and written one at a
time. The work is jaxllm/convert/export.py's `export_run`.

A LoRA run (lora.rank > 0) exports merged by default: its base with every adapter's update added,
a plain HF model. `--lora=adapter` writes the adapters alone in PEFT's format instead
(adapter_config.json, adapter_model.safetensors; jaxllm/convert/peft.py), which
`peft.PeftModel.from_pretrained(base, OUT)` loads onto the HF export of the base.
"""

from absl import flags

from jaxllm import cli
from jaxllm.convert import export, hf, peft

_WORKDIR = flags.DEFINE_string('workdir', None,
                               'the jaxllm run directory (its checkpoints and config.json)')
_STEP = flags.DEFINE_integer('step', -1, 'checkpoint step to export; -1 = the latest')
_OUT = flags.DEFINE_string('out', None, 'the HF model directory to write')
_DTYPE = flags.DEFINE_enum('dtype', 'float32', sorted(hf.DTYPES), 'dtype of the exported tensors')
_FAMILY = flags.DEFINE_string('family', '', f'HF family to write, one of {sorted(hf.FAMILIES)}; '
                              "'' = the plainest one that expresses the model")
_MAX_POS = flags.DEFINE_integer('max_position_embeddings', 0,
                                "config.json's value; 0 = data.seq_len")
_SHARD_GB = flags.DEFINE_float('max_shard_gb', 5.0,
                               'safetensors shard size limit, GB (10^9 bytes)')
_OVERWRITE = flags.DEFINE_bool('overwrite', False, 'replace what an earlier conversion wrote into a non-empty --out')
_LORA = flags.DEFINE_enum('lora', 'merged', ['merged', 'adapter'],
                          'a LoRA run: merged = a plain HF model with the adapters added in; '
                          'adapter = the adapters alone, in PEFT format')
_BASE_MODEL = flags.DEFINE_string('base_model', '', "--lora=adapter: adapter_config.json's "
                                  'base_model_name_or_path (the HF id or folder of the base)')
flags.mark_flags_as_required(['workdir', 'out'])


def main(argv) -> None:
  del argv
  if _LORA.value == 'adapter':
    step = peft.export_adapter(_WORKDIR.value, _OUT.value, step=_STEP.value, dtype=_DTYPE.value,
                               base_model=_BASE_MODEL.value, overwrite=_OVERWRITE.value)
    print(f'wrote the adapters of step {step} of {_WORKDIR.value} to {_OUT.value} (PEFT)')
    return
  step = export.export_run(_WORKDIR.value, _OUT.value, step=_STEP.value, dtype=_DTYPE.value,
                           family=_FAMILY.value or None,
                           max_position_embeddings=_MAX_POS.value or None,
                           max_shard_bytes=int(_SHARD_GB.value * 10**9),
                           overwrite=_OVERWRITE.value)
  print(f'wrote {_OUT.value} from step {step} of {_WORKDIR.value} ({_DTYPE.value})')


if __name__ == '__main__':
  cli.run(main)
