"""Live monitoring of a training run: goodput accounting and a Prometheus `/metrics` endpoint.

The train loop hands `Monitor` what it already has on the host (step results it reads anyway,
the console scalars, eval results) and marks where its time goes (jaxllm/goodput.py). Nothing
here adds a device sync: the loop's own read of step N's results is the one `fetch` times.

The endpoint (`monitor.prometheus_port`; off by default) is served by prometheus_client's HTTP
server thread. Every series is built at scrape time from plain floats the loop last stored, so a
step costs a few dict writes whether or not anyone scrapes. Each JAX process serves its own
series on port + process index with a `process` label; process 0 also serves the job-level ones
(`JOB_LEVEL`: loss, throughput, checkpoints, evaluation, goodput), which are the same on every
process and would otherwise be counted once per process by a sum().
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
import contextlib
import os
import time
from typing import Any

from absl import logging
import jax
from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from jaxllm import goodput as goodput_lib
from jaxllm import metrics as metrics_lib

PREFIX = 'jaxllm_'
# name (without PREFIX) -> (kind, help, extra label). Counters are exposed with a `_total` suffix.
SERIES: dict[str, tuple[str, str, str | None]] = {
    'step': ('gauge', 'Newest train step whose results were read.', None),
    'step_seconds': ('gauge', 'Wall seconds per train step between the last two reads of step '
                     'results.', None),
    'data_wait_seconds': ('counter', 'Seconds this process waited for batches, hidden behind a '
                          'running step or not.', None),
    'device_memory_bytes': ('gauge', 'Bytes in use on each local device (absent on CPUs).',
                            'device'),
    'device_memory_peak_bytes': ('gauge', 'Peak bytes in use on each local device since start '
                                 '(absent on CPUs).', 'device'),
    'host_rss_bytes': ('gauge', 'Resident memory of this process.', None),
    'host_rss_peak_bytes': ('gauge', 'Peak resident memory of this process.', None),
    # Job level: process 0 only.
    'loss': ('gauge', 'Train loss of the newest step, nats per token.', None),
    'learning_rate': ('gauge', 'Learning rate of the newest step.', None),
    'grad_norm': ('gauge', 'Global gradient norm of the newest step, before clipping.', None),
    'tokens_per_second': ('gauge', 'Train tokens per second over all devices, between the last '
                          'two console lines.', None),
    'mfu_ratio': ('gauge', 'Model FLOPs utilisation per device, a fraction (absent where the '
                  'peak is unknown, e.g. CPUs).', None),
    'tokens_trained': ('gauge', 'Tokens trained so far: step x tokens per step.', None),
    'skipped_steps': ('counter', 'Steps whose update was skipped for a non-finite loss or '
                      'gradient in this session (optim.skip_nonfinite).', None),
    'eval_loss': ('gauge', 'Held-out loss of the newest evaluation, nats per token.', None),
    'eval_bits_per_byte': ('gauge', 'Held-out bits per UTF-8 byte of the newest evaluation.',
                           None),
    'checkpoint_blocked_seconds': ('gauge', 'Seconds the loop blocked on the newest checkpoint '
                                   'save (its host copy).', None),
    'checkpoint_wait_seconds': ('counter', 'Seconds the loop blocked on checkpoints in this '
                                'session, saves and commit waits.', None),
    'checkpoint_save_seconds': ('gauge', 'Seconds from starting the newest committed checkpoint '
                                'to seeing it committed.', None),
    'checkpoint_last_step': ('gauge', 'Step of the newest committed checkpoint.', None),
    'checkpoint_last_timestamp_seconds': ('gauge', 'Unix time the newest checkpoint was seen '
                                          'committed.', None),
    'restarts': ('counter', 'Restarts of this run before this session (from goodput.json).',
                 None),
    'goodput_ratio': ('gauge', 'Share of the run\'s wall time spent in productive train steps.',
                      None),
    'goodput_seconds': ('gauge', 'Wall seconds of the run by cause (train is the productive '
                        'part), over all its sessions.', 'cause'),
    'lost_steps': ('counter', 'Steps trained after the last checkpoint of a session that died, '
                   'done again by a restart.', None),
}
PER_PROCESS = frozenset({'step', 'step_seconds', 'data_wait_seconds', 'device_memory_bytes',
                         'device_memory_peak_bytes', 'host_rss_bytes', 'host_rss_peak_bytes'})
JOB_LEVEL = frozenset(SERIES) - PER_PROCESS
# Step-result and console keys -> series.
_FROM_METRICS = {'loss': 'loss', 'lr': 'learning_rate', 'grad_norm': 'grad_norm',
                 'tokens_per_s': 'tokens_per_second', 'mfu': 'mfu_ratio',
                 'skipped_steps': 'skipped_steps', 'eval_loss': 'eval_loss',
                 'eval_bits_per_byte': 'eval_bits_per_byte'}


def host_rss_bytes() -> int | None:
  """Current resident memory (Linux /proc); None elsewhere."""
  try:
    with open('/proc/self/statm') as f:
      return int(f.read().split()[1]) * os.sysconf('SC_PAGE_SIZE')
  except (OSError, ValueError, IndexError):
    return None


class _Collector:
  """Builds every family from the monitor's stored floats at scrape time."""

  def __init__(self, monitor: Monitor):
    self._monitor = monitor

  def collect(self):
    m = self._monitor
    values = dict(m.values)  # a snapshot: the loop keeps writing
    values.update(_live_values(m))
    for name, (kind, doc, extra) in SERIES.items():
      if name in JOB_LEVEL and not m.is_lead:
        continue
      family = (CounterMetricFamily if kind == 'counter' else GaugeMetricFamily)(
          PREFIX + name, doc, labels=['process'] + ([extra] if extra else []))
      value = values.get(name)
      if isinstance(value, Mapping):
        for label, v in value.items():
          family.add_metric([m.process, str(label)], v)
      elif value is not None:
        family.add_metric([m.process], value)
      yield family


def _live_values(m: Monitor) -> dict[str, Any]:
  """What is read at scrape time rather than per step: memory and goodput."""
  rss = host_rss_bytes()
  # The kernel updates getrusage's high-water mark lazily, so the resident size read now can be a
  # few pages above it: the peak so far is at least the current size.
  out: dict[str, Any] = {'host_rss_bytes': rss,
                         'host_rss_peak_bytes': max(metrics_lib.peak_host_rss_bytes(), rss or 0)}
  in_use, peak = {}, {}
  for device in jax.local_devices():
    try:
      stats = device.memory_stats()
    except Exception:  # some backends raise instead of returning None
      stats = None
    if stats:
      in_use[device.id] = stats.get('bytes_in_use', 0)
      peak[device.id] = stats.get('peak_bytes_in_use', 0)
  out.update(device_memory_bytes=in_use, device_memory_peak_bytes=peak)
  totals = m.goodput.totals()
  out.update(goodput_ratio=totals['goodput'],
             goodput_seconds={c: totals[c] for c in goodput_lib.CAUSES},
             lost_steps=m.goodput.lost_steps, restarts=m.goodput.sessions - 1)
  return out


class Monitor:
  """Goodput and the Prometheus endpoint of one training session; see the module docstring.

  `prometheus_port=0` serves nothing (goodput is still kept); `prometheus_host` is the interface
  to bind ('127.0.0.1' by default; '0.0.0.0' for a Prometheus on another machine).
  """

  def __init__(self, *, goodput_path: str | None, tokens_per_step: int,
               prometheus_port: int = 0, prometheus_host: str = '127.0.0.1',
               goodput_flush_seconds: float = 10.0, started: float | None = None):
    self._began = False
    self.process, self.is_lead = str(jax.process_index()), jax.process_index() == 0
    self.tokens_per_step = tokens_per_step
    # Only process 0 keeps the run's goodput file; the others count for their own endpoint.
    self.goodput = goodput_lib.Goodput(goodput_path if self.is_lead else None, started=started,
                                       flush_every_s=goodput_flush_seconds)
    self.values: dict[str, Any] = {'data_wait_seconds': 0.0, 'skipped_steps': 0.0,
                                   'checkpoint_wait_seconds': 0.0}
    self._last_fetch: tuple[int, float] | None = None
    self._committing: tuple[int, str, float] | None = None  # (step, directory, started)
    self._server = None
    self.port = None
    if prometheus_port:
      self.port = prometheus_port + jax.process_index()
      registry = CollectorRegistry(auto_describe=False)
      registry.register(_Collector(self))
      try:
        self._server, _ = start_http_server(self.port, addr=prometheus_host, registry=registry)
      except OSError as e:
        raise OSError(f'cannot serve Prometheus metrics on {prometheus_host}:{self.port} ({e}): '
                      'set --config.monitor.prometheus_port to a free port (process i uses '
                      'port + i)') from e
      logging.info('Prometheus metrics on http://%s:%d/metrics', prometheus_host, self.port)

  # --- Hooks of the train loop -----------------------------------------------------------------

  def begin(self, step: int) -> None:
    """The loop starts after the restored `step`."""
    self._began = True
    self.goodput.begin(step)
    self.values.update(step=step, tokens_trained=step * self.tokens_per_step)

  @contextlib.contextmanager
  def data_wait(self) -> Iterator[None]:
    start = time.perf_counter()
    with self.goodput.data_wait():
      yield
    self.values['data_wait_seconds'] += time.perf_counter() - start

  def fetch(self, step: int, device_metrics: Mapping[str, Any]) -> dict[str, float]:
    """Step `step`'s results as floats; the loop's one wait on the device per step."""
    start = time.perf_counter()
    host = {k: float(v) for k, v in jax.device_get(device_metrics).items()}
    now = time.perf_counter()
    self.goodput.fetched(step, now - start)
    if self._last_fetch is not None and step > self._last_fetch[0]:
      self.values['step_seconds'] = (now - self._last_fetch[1]) / (step - self._last_fetch[0])
    self._last_fetch = (step, now)
    self.values.update(step=step, tokens_trained=step * self.tokens_per_step)
    self.observe(host)
    if self._committing and self._committing[1]():
      self._committed(time.time())
    return host

  def observe(self, scalars: Mapping[str, float]) -> Mapping[str, float]:
    """Stores the known keys of console scalars or eval results; returns `scalars`."""
    for key, value in scalars.items():
      if key in _FROM_METRICS:
        self.values[_FROM_METRICS[key]] = float(value)
    return scalars

  def timed(self, cause: str):
    """`with monitor.timed('eval'):` books the block to a goodput cause."""
    if cause != 'checkpoint':
      return self.goodput.timed(cause)
    return self._checkpoint_wait()

  @contextlib.contextmanager
  def _checkpoint_wait(self) -> Iterator[None]:
    start = time.perf_counter()
    with self.goodput.timed('checkpoint'):
      yield
    self.values['checkpoint_wait_seconds'] += time.perf_counter() - start
    if self._committing and self._committing[1]():  # a wait for the commit
      self._committed(time.time())

  @contextlib.contextmanager
  def checkpoint(self, step: int, committed: Callable[[], bool]) -> Iterator[None]:
    """Around starting the save of `step`; `committed()` says whether it is committed yet
    (Checkpointer.is_committed: a local step directory appears by rename, a bucket's gets a
    commit marker)."""
    if self._committing and self._committing[1]():
      self._committed(time.time())
    start, wall = time.perf_counter(), time.time()
    with self._checkpoint_wait():
      yield
    self.values['checkpoint_blocked_seconds'] = time.perf_counter() - start
    self.goodput.saved(step)
    self._committing = (step, committed, wall)
    if committed():  # saved synchronously
      self._committed(time.time())

  def _committed(self, now: float) -> None:
    step, _, started = self._committing
    self.values.update(checkpoint_last_step=step, checkpoint_last_timestamp_seconds=now,
                       checkpoint_save_seconds=now - started)
    self._committing = None

  def finish(self, writer=None, wait_for_saves: Callable[[], None] | None = None
             ) -> dict[str, float]:
    """End of the run: waits for checkpoint commits (`wait_for_saves`, booked as checkpoint
    time), logs the goodput summary, writes it to goodput.json and TensorBoard
    (`goodput/<cause>_seconds`, `goodput/ratio` at the last step); returns the totals."""
    if wait_for_saves is not None:
      with self.timed('checkpoint'):
        wait_for_saves()
    if self._committing and self._committing[1]():
      self._committed(time.time())
    totals = self.goodput.totals()
    self.goodput.flush()
    logging.info('%s', self.goodput.summary())
    if writer is not None:
      scalars = {f'goodput/{c}_seconds': totals[c] for c in goodput_lib.CAUSES}
      scalars.update({'goodput/ratio': totals['goodput'],
                      'goodput/lost_steps': self.goodput.lost_steps})
      writer.write_scalars(self.goodput.step, scalars)
    return totals

  def close(self) -> None:
    """Writes goodput.json and stops the endpoint (on errors too: what the session did counts,
    and the port is free again for a rerun). A session that failed before its loop began (a
    config or checkpoint that does not fit) leaves goodput.json as it was."""
    if self._server is not None:
      self._server.shutdown()  # up to 0.5 s: the serving thread polls for it
      self._server.server_close()
      self._server = None
    if self._began:
      self.goodput.flush()
