"""The Prometheus exporter's cost: tokens/s of real runs with monitor.prometheus_port off and on
(scraped every --scrape_every seconds, as a Prometheus would), and the cost of its parts.

    python tools/benchmark_monitor.py --config=configs/tiny.py --steps=200 --repeats=3
    python tools/benchmark_monitor.py --config=configs/tiny.py --steps=600 --interleave=10

Runs alternate off, on, off, on, ... (`--repeats` pairs) in one process, each a fresh
`train_and_evaluate` in a new workdir under --workdir sharing one dataset and tokenizer, with
evaluation, samples and checkpoints only at the end. tokens/s is the median of the console
lines' tokens/s (every --log_every steps; the first, which includes compilation, has none).
On a shared machine whose load drifts between runs, `--interleave=W` is steadier: one run with
the endpoint on, scraped only in every other window of W seconds; each tokens/s measurement whose
interval lies inside one window counts for that window's side.
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
from tensorboard.backend.event_processing import event_accumulator

from jaxllm import metrics, monitor, rundir, train

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file.', lock_config=True)
_STEPS = flags.DEFINE_integer('steps', 200, 'Train steps per run.')
_REPEATS = flags.DEFINE_integer('repeats', 2, 'Pairs of runs (off, on).')
_LOG_EVERY = flags.DEFINE_integer('log_every', 10, 'Steps between tokens/s measurements.')
_SCRAPE_EVERY = flags.DEFINE_float('scrape_every', 1.0, 'Seconds between scrapes when on.')
_PORT = flags.DEFINE_integer('port', 9464, 'Port of the endpoint when on.')
_INTERLEAVE = flags.DEFINE_float('interleave', 0, 'Seconds per window of one interleaved run; '
                                 '0 = separate runs.')
_WORKDIR = flags.DEFINE_string('workdir', '', "Runs go here; '' = a temporary directory.")
flags.mark_flags_as_required(['config'])


def _scraping(start: float, now: float) -> bool:
  """Whether `now` (time.time()) lies in a scraped window of an interleaved run."""
  return not _INTERLEAVE.value or int((now - start) / _INTERLEAVE.value) % 2 == 1


def _scraper(port: int, every: float, stop: threading.Event, count: list, start: float) -> None:
  while not stop.wait(every):
    if not _scraping(start, time.time()):
      continue
    try:
      with urllib.request.urlopen(f'http://127.0.0.1:{port}/metrics', timeout=5) as r:
        r.read()
      count[0] += 1
    except OSError:  # not serving yet (start-up) or already closed
      pass


def run(config, workdir: str, on: bool) -> dict:
  config = config.copy_and_resolve_references()
  config.monitor.prometheus_port = _PORT.value if on else 0
  stop, scrapes, start = threading.Event(), [0], time.time()
  scraper = threading.Thread(target=_scraper, args=(_PORT.value, _SCRAPE_EVERY.value, stop,
                                                    scrapes, start), daemon=True)
  if on:
    scraper.start()
  try:
    train.train_and_evaluate(config, workdir)
  finally:
    stop.set()
  run_dir = rundir.RunDir(workdir)
  with open(run_dir.goodput) as f:
    goodput = json.load(f)
  out = {'exporter': 'on' if on else 'off', 'scrapes': scrapes[0],
         'train_seconds': round(goodput['seconds']['train'], 2)}
  if _INTERLEAVE.value:
    return {**out, **_by_window(run_dir.tensorboard, start)}
  speeds = metrics.read_scalars(run_dir.tensorboard)['train/tokens_per_s'][1]
  return {**out, 'tokens_per_s': round(statistics.median(speeds)), 'measurements': len(speeds)}


def _by_window(logdir: str, start: float) -> dict:
  """Median tokens/s of the measurements inside unscraped and inside scraped windows."""
  acc = event_accumulator.EventAccumulator(logdir, size_guidance={event_accumulator.SCALARS: 0})
  acc.Reload()
  events = {e.step: e for e in acc.Scalars('train/loss')}  # every console line
  sides = {False: [], True: []}
  for e in acc.Scalars('train/tokens_per_s'):
    before = max((s for s in events if s < e.step), default=None)
    if before is None:
      continue
    side = _scraping(start, e.wall_time)
    if _scraping(start, events[before].wall_time) == side:
      sides[side].append(e.value)
  return {'tokens_per_s_off': round(statistics.median(sides[False])),
          'tokens_per_s_on': round(statistics.median(sides[True])),
          'measurements_off': len(sides[False]), 'measurements_on': len(sides[True])}


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
  if _INTERLEAVE.value:
    row = run(base, os.path.join(root, 'interleaved'), on=True)
    off, on = row['tokens_per_s_off'], row['tokens_per_s_on']
    print(json.dumps(row), flush=True)
    _summary(off, on)
    return
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
  _summary(off, on)


def _summary(off: float, on: float) -> None:
  print(json.dumps({'interleave_s': _INTERLEAVE.value, 'config': _CONFIG.value.name,
                    'steps': _STEPS.value, 'repeats': _REPEATS.value,
                    'scrape_every_s': _SCRAPE_EVERY.value, 'tokens_per_s_off': round(off),
                    'tokens_per_s_on': round(on),
                    'overhead_percent': round(100 * (off - on) / off, 2),
                    **hook_costs(), 'load_average_1m': os.getloadavg()[0],
                    'cpus': os.cpu_count()}))


if __name__ == '__main__':
  app.run(main)
