"""The cost of per-layer statistics (train.layer_stats_every, jaxllm/layerstats.py): the train step
compiled without and with them, timed in alternating blocks in one process so that the drifting
load of a shared machine falls on both alike, and the host's cost of one write to TensorBoard.

    python tools/benchmark_layerstats.py --config=configs/tiny.py --rounds=30 --block=10

Each round times --block steps of one variant, then --block of the other (which goes first
alternates by round); each step is waited for, as in tools/benchmark.py. Synthetic tokens, one
document per row. Prints one JSON line: per variant the median and 10th-percentile step time and
the tokens/s of the median, the gap between them in percent, XLA's cost analysis of each compiled step (FLOPs and bytes
accessed: a count that no load can blur), and the milliseconds of one write (reading a step's
statistics back, layerstats.scalars, SummaryWriter.write_scalars), median of 20.
"""

import json
import statistics
import tempfile
import time

import jax
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from jaxllm import layerstats, metrics, sharding, train

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file.', lock_config=True)
_ROUNDS = flags.DEFINE_integer('rounds', 30, 'Rounds of one block of each variant.')
_BLOCK = flags.DEFINE_integer('block', 10, 'Timed steps per variant per round.')
flags.mark_flags_as_required(['config'])


def _variant(config, every: int):
  config = config.copy_and_resolve_references()
  config.train.layer_stats_every = every
  trainer = train.setup(config)
  batch, seq = config.train.global_batch_size, config.data.seq_len
  step = trainer.compile_train_step(batch, seq, keys=('inputs', 'targets'))
  tokens = np.random.default_rng(0).integers(0, config.model.vocab_size, (batch, seq + 1),
                                             dtype=np.int32)
  host = {'inputs': tokens[:, :-1], 'targets': tokens[:, 1:]}
  state = trainer.place_frozen(trainer.init_state(), step)
  return trainer, step, [state, None], sharding.global_batch(host, trainer.batch_sharding)


def main(argv):
  del argv
  config = _CONFIG.value
  variants = {'off': _variant(config, 0), 'on': _variant(config, 1)}
  times = {name: [] for name in variants}
  for r in range(_ROUNDS.value + 1):  # round 0 warms both up, untimed
    for name in (('off', 'on') if r % 2 else ('on', 'off')):
      trainer, step, holder, batch = variants[name]
      for _ in range(_BLOCK.value):
        start = time.perf_counter()
        holder[0], holder[1] = step(holder[0], batch)
        float(holder[1]['loss'])  # waits for the step
        if r:
          times[name].append(time.perf_counter() - start)
  tokens = config.train.global_batch_size * config.data.seq_len
  out = {'config': config.name, 'devices': jax.device_count(), 'jax': jax.__version__,
         'rounds': _ROUNDS.value, 'block': _BLOCK.value}
  for name, t in times.items():
    median = statistics.median(t)
    out[name] = {'step_ms_median': round(1e3 * median, 3),
                 'step_ms_p10': round(1e3 * float(np.percentile(t, 10)), 3),
                 'tokens_per_s': round(tokens / median)}
  out['gap_percent_median'] = round(
      100 * (out['on']['step_ms_median'] / out['off']['step_ms_median'] - 1), 2)
  out['gap_percent_p10'] = round(100 * (out['on']['step_ms_p10'] / out['off']['step_ms_p10'] - 1), 2)
  for name, (_, step, _, _) in variants.items():  # XLA's own count: no timing noise
    cost = step.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    out[name].update(xla_flops=cost.get('flops'), xla_bytes_accessed=cost.get('bytes accessed'))
  _, step, holder, batch = variants['on']
  writes = []
  with tempfile.TemporaryDirectory() as logdir, metrics.SummaryWriter(logdir) as writer:
    for i in range(20):  # each the statistics of a new step (a read caches its host copy)
      holder[0], holder[1] = step(holder[0], batch)
      float(holder[1]['loss'])
      start = time.perf_counter()
      scalars = layerstats.scalars(jax.device_get(holder[1]['layer_stats']))
      writer.write_scalars(i, scalars)
      writes.append(time.perf_counter() - start)
  out['write'] = {'tags': len(scalars), 'ms_median': round(1e3 * statistics.median(writes), 3)}
  print(json.dumps(out))


if __name__ == '__main__':
  app.run(main)
