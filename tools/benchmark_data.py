"""Tokens/s of one host's full input pipeline (read, tokenize, pack, batch); one JSON line.

    python tools/benchmark_data.py --config=configs/tiny.py --workdir=/tmp/bench_data \
        --config.data.seq_len=2048 --config.train.global_batch_size=8      # from text, on the fly
    python tools/benchmark_data.py --config=configs/tiny.py --workdir=/tmp/bench_data \
        --config.data.seq_len=2048 --config.train.global_batch_size=8 \
        --config.data.pretokenize=true                                       # from the token cache

The pipeline is the training run's (`jaxllm.train.make_pipeline`): every data key, `data.seq_len`,
`data.worker_count`, `data.pretokenize` and `model.vocab_size` come from the config, and the
batch is `train.global_batch_size` rows (all of it, as if this were the only host). The first run
builds the dataset, trains the tokenizer (and, with pretokenize, writes the token cache) under
--workdir as training would; those are not timed. `tokens_per_s` counts every position of every
batch (what the train step consumes); `real_tokens_per_s` leaves out padding.
"""

import json
import os
import time

from absl import app, flags
from ml_collections import config_flags

from jaxllm import cli, train

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file.', lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Dataset, tokenizer and token cache go here.')
_SECONDS = flags.DEFINE_float('seconds', 10.0, 'Timed window, after 2 warm-up batches.')
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  config = _CONFIG.value
  d, batch_size = config.data, config.train.global_batch_size
  pipe = train.make_pipeline(config, _WORKDIR.value, batch_size)
  it = pipe.train_iter()
  for _ in range(2):
    next(it)
  batches = real = 0
  start = time.perf_counter()
  while time.perf_counter() - start < _SECONDS.value:
    real += int((next(it)['segment_ids'] > 0).sum())
    batches += 1
  dt = time.perf_counter() - start
  if hasattr(it, 'close'):
    it.close()  # stops grain's worker processes, if any
  print(json.dumps({
      'config': config.name, 'route': 'token cache' if d.pretokenize else 'text, on the fly',
      'sources': d.sources or d.source_dir or 'embedded', 'seq_len': d.seq_len,
      'batch_size': batch_size, 'worker_count': d.worker_count,
      'vocab_size': config.model.vocab_size, 'batches': batches, 'seconds': round(dt, 2),
      'tokens_per_s': round(batches * batch_size * d.seq_len / dt),
      'real_tokens_per_s': round(real / dt), 'real_tokens': real,
      'load_average_1m': os.getloadavg()[0], 'cpus': os.cpu_count()}))


if __name__ == '__main__':
  cli.run(main)
