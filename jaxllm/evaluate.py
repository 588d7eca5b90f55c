"""Held-out loss, perplexity and bits per byte of a run's checkpoint, as one JSON line.

    python -m jaxllm.evaluate --workdir=runs/tiny [--step=N] [--eval_batches=N] [--mesh=1,-1,1]

Reads the run's config, checkpoint, tokenizer and the eval split it used (`evaluate_run`); bits
per byte is total nats / ln 2 / UTF-8 bytes of the eval text, comparable across tokenizers.
`--mesh` replaces the saved mesh (a run trained on several hosts, evaluated on one).
"""

import json

from absl import flags

from jaxllm import cli
from jaxllm import rundir
from jaxllm import train


def evaluate_run(workdir: str, *, step: int = -1, max_batches: int | None = None,
                 mesh: str = '') -> dict:
  """Held-out loss, perplexity and bits per byte of a run's checkpoint (`step` -1: the latest)
  on its eval split (`max_batches` None: all of it); `mesh` as rundir.parse_mesh ('': saved)."""
  config, trainer, params, step = rundir.RunDir(workdir).reopen(train.setup, step=step, mesh=mesh)
  pipeline = train.make_pipeline(config, workdir, trainer.process_batch_size(
      config.train.global_batch_size, config.data.seq_len))
  return {'step': step, **train.evaluate_split(trainer, params, pipeline, max_batches)}


def main(argv):
  del argv
  f = flags.FLAGS
  out = evaluate_run(f.workdir, step=f.step, max_batches=f.eval_batches or None, mesh=f.mesh)
  print(json.dumps(out))


if __name__ == '__main__':
  flags.DEFINE_string('workdir', None, 'the --workdir of a jaxllm.main run', required=True)
  flags.DEFINE_integer('step', -1, 'checkpoint step to evaluate; -1 = the latest')
  flags.DEFINE_integer('eval_batches', 0, 'eval batches to read; 0 = the whole split')
  flags.DEFINE_string('mesh', '', rundir.MESH_FLAG_HELP)
  cli.run(main)
