"""Make a trained model smaller: prune -> distill -> evaluate -> export to Hugging Face.

    python tools/compress.py --teacher=runs/tiny --out=runs/tiny-small \\
        --n_layers=3 --mlp_dim=288 --steps=200

Prunes the teacher run's latest checkpoint (depth by block importance, MLP channels and kv groups
by activation importance, on --calibration_batches train batches), distills the pruned model from
the teacher for --steps steps, evaluates teacher, pruned and distilled models on the held-out
split, exports the distilled one to OUT/hf and, with --quantize=int8,int4, quantizes it. Prints OUT/report.json. The work is
jaxllm/compress.py's `compress`.
"""

import json

from absl import flags

from jaxllm import cli
from jaxllm import compress

_D = compress.Recipe()
_TEACHER = flags.DEFINE_string('teacher', None, 'the trained run directory to compress')
_OUT = flags.DEFINE_string('out', None, 'the folder to write (pruned/, distilled/, hf/, report.json)')
_N_LAYERS = flags.DEFINE_integer('n_layers', 0, 'layers to keep; 0 = all')
_N_KV_HEADS = flags.DEFINE_integer('n_kv_heads', 0, 'kv groups to keep per layer; 0 = all')
_MLP_DIM = flags.DEFINE_integer('mlp_dim', 0, 'MLP channels to keep per layer; 0 = all')
_CALIBRATION = flags.DEFINE_integer('calibration_batches', _D.calibration_batches,
                                    'train batches the importance scores average over')
_STEPS = flags.DEFINE_integer('steps', _D.steps, 'distillation steps; 0 = prune only')
_LR = flags.DEFINE_float('peak_lr', 0.0, "distillation peak learning rate; 0 = the teacher's")
_WARMUP = flags.DEFINE_integer('warmup_steps', -1, "-1 = the teacher's, at most steps / 10")
_ALPHA = flags.DEFINE_float('alpha', _D.alpha, 'weight of the KL term (distill.alpha)')
_TEMPERATURE = flags.DEFINE_float('temperature', _D.temperature, 'distill.temperature')
_TEACHER_DTYPE = flags.DEFINE_enum('teacher_dtype', _D.teacher_dtype, ['bfloat16', 'float32'],
                                   'distill.teacher_dtype')
_EVAL_BATCHES = flags.DEFINE_integer('eval_batches', 0, 'held-out batches; 0 = the whole split')
_DTYPE = flags.DEFINE_enum('dtype', _D.export_dtype, ['float32', 'bfloat16'],
                           'dtype of the exported tensors')
_QUANTIZE = flags.DEFINE_list('quantize', [], 'also quantize the final model: int8, int4')
_GROUP = flags.DEFINE_integer('group_size', _D.group_size, 'int4: input rows per scale')
_OVERWRITE = flags.DEFINE_bool('overwrite', False, 'replace what an earlier run wrote into --out')
flags.mark_flags_as_required(['teacher', 'out'])


def main(argv) -> None:
  del argv
  recipe = compress.Recipe(
      n_layers=_N_LAYERS.value, n_kv_heads=_N_KV_HEADS.value, mlp_dim=_MLP_DIM.value,
      calibration_batches=_CALIBRATION.value, steps=_STEPS.value, peak_lr=_LR.value,
      warmup_steps=_WARMUP.value, alpha=_ALPHA.value, temperature=_TEMPERATURE.value,
      teacher_dtype=_TEACHER_DTYPE.value, eval_batches=_EVAL_BATCHES.value,
      export_dtype=_DTYPE.value, quantize=tuple(_QUANTIZE.value), group_size=_GROUP.value)
  report = compress.compress(_TEACHER.value, _OUT.value, recipe, overwrite=_OVERWRITE.value)
  print(json.dumps(report, indent=2))


if __name__ == '__main__':
  cli.run(main)
