"""Entry point: a hyperparameter study over ordinary jaxllm runs (jaxllm/study.py).

    python -m jaxllm.tune --config=configs/tiny.py --space=configs/spaces/lr_warmup.py \
        --trials=16 --workdir=runs/tune [--config.a.b=v ...]

Each trial trains in DIR/trial_N (resumable by hand: DIR/trial_N/config.py says the command);
the journal DIR/study.journal keeps the study, so the same command after a crash or a kill goes
on where it stopped, and more workers may run the same command on the same directory (other
hosts too, on a shared filesystem). After each trial the report is rewritten: DIR/trials.md,
DIR/trials.csv, DIR/best_config.py and DIR/plots/*.png (jaxllm/study_report.py).
"""

import logging as py_logging
import signal

from absl import app, flags
from ml_collections import config_flags
from tensorboard.util import tb_logging

try:
  import optuna  # noqa: F401  (jaxllm/study.py is built on it; an optional dependency)
except ImportError:
  raise SystemExit("error: jaxllm.tune needs Optuna: pip install -e '.[tune]' (or pip install "
                   "optuna)") from None

from jaxllm import cli, study as study_lib, study_report  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Base config file (configs/*.py).',
                                          lock_config=True)
_SPACE = flags.DEFINE_string('space', None, 'Search-space file: SPACE (config key -> optuna '
                             'distribution) or GRID (config key -> values).')
_TRIALS = flags.DEFINE_integer('trials', None, 'Trials in the study, over all workers and restarts.')
_WORKDIR = flags.DEFINE_string('workdir', None, 'Study directory (journal, trials, report).')
_PRUNER = flags.DEFINE_enum('pruner', 'asha', study_lib.PRUNERS,
                            'asha: successive halving; hyperband; none.')
_MIN_RESOURCE = flags.DEFINE_integer('min_resource', 0, 'Steps before a trial may first be '
                                     'pruned; 0 = train.eval_every (its first evaluation).')
_REDUCTION = flags.DEFINE_integer('reduction_factor', 4, 'One trial in this many goes on at '
                                  'each pruning rung.')
_STARTUP = flags.DEFINE_integer('startup_trials', 8, 'Random trials before TPE takes over.')
_SEED = flags.DEFINE_integer('seed', 0, 'Sampler seed.')
_STALE_S = flags.DEFINE_float('stale_s', 600, 'Seconds without a heartbeat after which another '
                              "worker's running trial is taken as lost and run again.")
flags.mark_flags_as_required(['config', 'space', 'trials', 'workdir'])


def _interrupt(signum, frame):
  raise KeyboardInterrupt(f'{signal.Signals(signum).name}')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  if _TRIALS.value < 1:
    raise ValueError(f'--trials={_TRIALS.value}: give at least 1')
  study_lib.prepare_process()
  tb_logging.get_logger().setLevel(py_logging.WARNING)  # its event reader's chatter
  signal.signal(signal.SIGTERM, _interrupt)  # the running trial is stopped and enqueued again
  config = _CONFIG.value
  space = study_lib.load_space(_SPACE.value, config)
  options = study_lib.Options(
      trials=_TRIALS.value, pruner=_PRUNER.value, min_resource=_MIN_RESOURCE.value,
      reduction_factor=_REDUCTION.value, startup_trials=_STARTUP.value, seed=_SEED.value,
      stale_s=_STALE_S.value)
  # The report after every trial, so that it is current while workers run.
  study = study_lib.run(config, space=space, workdir=_WORKDIR.value, options=options,
                        on_trial=lambda s: study_report.write(s, _WORKDIR.value))
  print(study_report.write(study, _WORKDIR.value), end='')


if __name__ == '__main__':
  cli.run(main)
