"""Held-out loss, perplexity and bits per byte of a run's checkpoint, as one JSON line.

    python -m jaxllm.evaluate --workdir=runs/tiny [--step=N] [--eval_batches=N]

Reads <workdir>/config.json, the checkpoint and the eval split the run used (train.evaluate_run);
bits per byte is total nats / ln 2 / UTF-8 bytes of the eval text, comparable across tokenizers.
"""

import json

from absl import app
from absl import flags

from jaxllm import train

_WORKDIR = flags.DEFINE_string('workdir', None, 'the --workdir of a jaxllm.main run', required=True)
_STEP = flags.DEFINE_integer('step', -1, 'checkpoint step to evaluate; -1 = the latest')
_EVAL_BATCHES = flags.DEFINE_integer('eval_batches', 0, 'eval batches to read; 0 = the whole split')


def main(argv):
  del argv
  out = train.evaluate_run(_WORKDIR.value, step=_STEP.value,
                           max_batches=_EVAL_BATCHES.value or None)
  print(json.dumps(out))


if __name__ == '__main__':
  app.run(main)
