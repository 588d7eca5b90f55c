"""Quantize a trained run's weights (int8 per output channel, int4 per group) into a new run.

    python tools/quantize.py --workdir=runs/tiny --out=runs/tiny-int4 --format=int4 --group_size=64

OUT is a run directory whose config sets ptq.format: `python -m jaxllm.evaluate --workdir=OUT`
and `python -m jaxllm.sample --workdir=OUT` use the quantized weights (dequantized per layer
where they are used). Prints one JSON line: parameters, bytes in device memory and on disk,
held-out loss and bits per byte, eval tokens/s, of the float run and of the quantized one. The
work is jaxllm/compress.py's `quantize_run` and `measure`.
"""

import json

from absl import flags

from jaxllm import cli
from jaxllm import compress
from jaxllm.convert import check_out

_WORKDIR = flags.DEFINE_string('workdir', None, 'the trained run directory')
_OUT = flags.DEFINE_string('out', None, 'the run directory to write')
_FORMAT = flags.DEFINE_enum('format', 'int8', ['int8', 'int4'], 'the quantized format')
_GROUP = flags.DEFINE_integer('group_size', 64, 'int4: input rows per scale')
_STEP = flags.DEFINE_integer('step', -1, 'checkpoint step to quantize; -1 = the latest')
_EVAL_BATCHES = flags.DEFINE_integer('eval_batches', 0, 'held-out batches; 0 = the whole split')
flags.mark_flags_as_required(['workdir', 'out'])


def main(argv) -> None:
  del argv
  check_out(_OUT.value, source=_WORKDIR.value, overwrite=False)
  compress.quantize_run(_WORKDIR.value, _OUT.value, fmt=_FORMAT.value, group_size=_GROUP.value,
                        step=_STEP.value)
  print(json.dumps({name: compress.measure(path, eval_batches=_EVAL_BATCHES.value, step=step)
                    for name, path, step in (('float', _WORKDIR.value, _STEP.value),
                                             (_FORMAT.value, _OUT.value, -1))}))


if __name__ == '__main__':
  cli.run(main)
