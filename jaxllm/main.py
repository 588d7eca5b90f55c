"""Entry point: `python -m jaxllm.main --config=configs/tiny.py [--workdir=DIR] [--config.a.b=v]`.

Intentionally thin: everything real is in `jaxllm.train.train_and_evaluate`, importable from a
notebook.
"""

import os

from absl import app, flags, logging
from ml_collections import config_flags

from jaxllm import cli, train

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Path to a config file in configs/.',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Run directory; default runs/<config.name>.')
flags.mark_flags_as_required(['config'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  config = _CONFIG.value
  workdir = _WORKDIR.value or os.path.join('runs', config.name)
  logging.info('workdir: %s', os.path.abspath(workdir))
  train.train_and_evaluate(config, workdir)


if __name__ == '__main__':
  cli.run(main)
