"""The Prometheus exporter's cost: tokens/s of real runs with monitor.prometheus_port off and on
(scraped every --scrape_every seconds, as a Prometheus would), and the cost of its parts.

    python tools/benchmark_monitor.py --config=configs/tiny.py --steps=200 --repeats=3

Runs alternate off, on, off, on, ... (`--repeats` pairs) in one process, each a fresh
`train_and_evaluate` in a new workdir under --workdir sharing one dataset and tokenizer, with
evaluation, samples and checkpoints only at the end. tokens/s is the median of the console
lines' tokens/s (every --log_every steps; the first, which includes compilation, has none).
Prints one JSON line per run, then a summary line: median tokens/s off and on, the overhead in
percent, the loop hooks' cost per step (microseconds) and one scrape's cost (milliseconds).
"""

import json
import os
import statistics
import tempfile
import threading
import time
import urllib.request

import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

from jaxllm import metrics, monitor, rundir, train

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file.', lock_config=True)
_STEPS = flags.DEFINE_integer('steps', 200, 'Train steps per run.')
_REPEATS = flags.DEFINE_integer('repeats', 2, 'Pairs of runs (off, on).')
_LOG_EVERY = flags.DEFINE_integer('log_every', 10, 'Steps between tokens/s measurements.')
_SCRAPE_EVERY = flags.DEFINE_float('scrape_every', 1.0, 'Seconds between scrapes when on.')
_PORT = flags.DEFINE_integer('port', 9464, 'Port of the endpoint when on.')
_WORKDIR = flags.DEFINE_string('workdir', '', "Runs go here; '' = a temporary directory.")
flags.mark_flags_as_required(['config'])


def _scraper(port: int, every: float, stop: threading.Event, count: list) -> None:
  while not stop.wait(every):
    try:
      with urllib.request.urlopen(f'http://127.0.0.1:{port}/metrics', timeout=5) as r:
        r.read()
      count[0] += 1
    except OSError:  # not serving yet (start-up) or already closed
      pass


def run(config, workdir: str, on: bool) -> dict:
  config = config.copy_and_resolve_references()
  config.monitor.prometheus_port = _PORT.value if on else 0
  stop, scrapes = threading.Event(), [0]
  scraper = threading.Thread(target=_scraper, args=(_PORT.value, _SCRAPE_EVERY.value, stop,
                                                    scrapes), daemon=True)
  if on:
    scraper.start()
  try:
    train.train_and_evaluate(config, workdir)
  finally:
    stop.set()
  speeds = metrics.read_scalars(rundir.RunDir(workdir).tensorboard)['train/tokens_per_s'][1]
  with open(rundir.RunDir(workdir).goodput) as f:
    goodput = json.load(f)
  return {'exporter': 'on' if on else 'off', 'tokens_per_s': round(statistics.median(speeds)),
          'measurements': len(speeds), 'scrapes': scrapes[0],
          'train_seconds': round(goodput['seconds']['train'], 2)}


def hook_costs() -> dict:
  """Microseconds per step of the loop's hooks (host floats: no device wait counted) and
  milliseconds per scrape, with the endpoint on."""
  m = monitor.Monitor(goodput_path=None, tokens_per_step=1, prometheus_port=_PORT.value + 1)
  host = {k: np.float32(1.0) for k in ('loss', 'lr', 'grad_norm', 'params_finite')}
  n = 20_000
  start = time.perf_counter()
  for step in range(1, n + 1):
    with m.data_wait():
      pass
    m.fetch(step, host)
    m.observe({'skipped_steps': 0})
  per_step_us = (time.perf_counter() - start) / n * 1e6
  start = time.perf_counter()
  for _ in range(50):
    with urllib.request.urlopen(f'http://127.0.0.1:{m.port}/metrics', timeout=5) as r:
      r.read()
  per_scrape_ms = (time.perf_counter() - start) / 50 * 1e3
  m.close()
  return {'hooks_us_per_step': round(per_step_us, 1), 'scrape_ms': round(per_scrape_ms, 2)}


def main(_) -> None:
  logging.set_verbosity(logging.WARNING)
  base = _CONFIG.value.copy_and_resolve_references()
  base.train.update(num_steps=_STEPS.value, log_every=_LOG_EVERY.value, eval_every=0,
                    eval_batches=1, sample_tokens=0)
  base.checkpoint.every = 0
  root = _WORKDIR.value or tempfile.mkdtemp(prefix='benchmark_monitor_')
  rows = []
  for i in range(_REPEATS.value):
    for on in (False, True):
      workdir = os.path.join(root, f'{i}-{"on" if on else "off"}')
      rows.append(run(base, workdir, on))
      print(json.dumps(rows[-1]), flush=True)
      if not (base.data.tokenizer and base.data.cache_dir):  # later runs reuse the first's data
        first = rundir.RunDir(workdir)
        base.data.update(tokenizer=first.tokenizer_path(), cache_dir=first.data_cache())
  off = statistics.median(r['tokens_per_s'] for r in rows if r['exporter'] == 'off')
  on = statistics.median(r['tokens_per_s'] for r in rows if r['exporter'] == 'on')
  print(json.dumps({'config': _CONFIG.value.name, 'steps': _STEPS.value, 'repeats': _REPEATS.value,
                    'scrape_every_s': _SCRAPE_EVERY.value, 'tokens_per_s_off': round(off),
                    'tokens_per_s_on': round(on), 'overhead_percent': round(100 * (off - on) / off, 2),
                    **hook_costs(), 'load_average_1m': os.getloadavg()[0],
                    'cpus': os.cpu_count()}))


if __name__ == '__main__':
  app.run(main)
