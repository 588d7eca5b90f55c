"""TensorBoard events, console progress, tokens/s, MFU and device memory.

It never touches device arrays, so it cannot block the asynchronous train loop; callers hand it
floats already on the host. Its one jaxllm import is the `files` leaf.

TensorBoard events are written with the `tensorboard` package's own EventFileWriter and protos:
`clu.metric_writers` would pull in TensorFlow (1.4 GiB) for the same files. An events file grows by
appends, which a bucket does not have (gcsfs turns an append into an overwrite, losing every
earlier event), so for a `gs://` logdir the events go to a local staging file that is uploaded
whole over the remote one on `flush`, `close`, and at most every `upload_every_s` of writes.
"""

from collections.abc import Callable, Iterable, Iterator, Mapping
import os
import resource
import shutil
import sys
import tempfile
import time
import types
from typing import Any, TextIO, TypeVar

from absl import logging
import jax
from tensorboard.compat.proto import event_pb2, summary_pb2, tensor_pb2, tensor_shape_pb2, types_pb2
from tensorboard.plugins.hparams import summary_v2 as hparams_summary
from tensorboard.plugins.text import metadata as text_metadata
from tensorboard.summary.writer.event_file_writer import EventFileWriter

from jaxllm import files


def flatten_config(config: Any, prefix: str = "") -> dict[str, Any]:
  """{'optim': {'lr': 1e-3}} -> {'optim.lr': 1e-3}, for dicts and ml_collections ConfigDicts."""
  if hasattr(config, "to_dict"):  # ConfigDict and FrozenConfigDict
    config = config.to_dict()
  flat = {}
  for key, value in config.items():
    if isinstance(value, Mapping) or hasattr(value, "to_dict"):
      flat.update(flatten_config(value, f"{prefix}{key}."))
    else:
      flat[f"{prefix}{key}"] = value
  return flat


def format_config(config: Any) -> str:
  """One sorted `key = value` line per leaf of the (nested) config."""
  return "\n".join(f"{k} = {v!r}" for k, v in sorted(flatten_config(config).items()))


class SummaryWriter:
  """TensorBoard event writer without TensorFlow. `enabled=False` makes every call a no-op, so the
  caller can construct one on every JAX process and enable it on process 0 only. A URL `logdir`
  is written through a local staging file (see the module doc)."""

  def __init__(self, logdir: str, *, enabled: bool = True, upload_every_s: float = 60.0):
    self._writer = None
    self._remote, self._upload_every_s, self._uploaded = None, upload_every_s, time.monotonic()
    if enabled:
      # EventFileWriter opens files through tensorboard's lazy `tf.io.gfile`, which imports a
      # real TensorFlow whenever one is installed (seconds, GBs, CUDA libraries beside JAX's)
      # and falls back to tensorboard's own stub otherwise. A module named
      # `tensorboard.compat.notf` is tensorboard's switch (its bazel `no_tensorflow` target)
      # to always take the stub; the pip package lacks it, so register an empty one.
      notf = "tensorboard.compat.notf"
      sys.modules.setdefault(notf, types.ModuleType(notf))
      if files.is_url(logdir):
        self._remote, logdir = logdir, tempfile.mkdtemp(prefix='jaxllm-events-')
      self._writer = EventFileWriter(logdir)

  def _write(self, step: int, summary: summary_pb2.Summary) -> None:
    event = event_pb2.Event(wall_time=time.time(), step=int(step), summary=summary)
    self._writer.add_event(event)
    if self._remote and time.monotonic() - self._uploaded >= self._upload_every_s:
      self.flush()

  def _upload(self) -> None:
    """The staging events file, whole, over its namesake in the remote logdir."""
    staging = self._writer.get_logdir()
    for name in os.listdir(staging):  # the one events file
      with open(os.path.join(staging, name), 'rb') as src, files.replacing(
          f'{self._remote}/{name}', 'wb') as dst:
        shutil.copyfileobj(src, dst)
    self._uploaded = time.monotonic()

  def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
    if self._writer is None:
      return
    values = [summary_pb2.Summary.Value(tag=k, simple_value=float(v)) for k, v in scalars.items()]
    self._write(step, summary_pb2.Summary(value=values))

  def write_texts(self, step: int, texts: Mapping[str, str]) -> None:
    if self._writer is None:
      return
    # The text plugin only shows string tensors tagged with its plugin metadata (markdown).
    meta = text_metadata.create_summary_metadata(display_name=None, description=None)
    values = [
        summary_pb2.Summary.Value(
            tag=k,
            metadata=meta,
            tensor=tensor_pb2.TensorProto(
                dtype=types_pb2.DT_STRING,
                tensor_shape=tensor_shape_pb2.TensorShapeProto(),  # a scalar string
                string_val=[str(v).encode("utf-8")],
            ),
        )
        for k, v in texts.items()
    ]
    self._write(step, summary_pb2.Summary(value=values))

  def write_hparams(self, config: Any) -> None:
    """The flattened config as a text summary (`config`) and as an hparams-plugin session."""
    if self._writer is None:
      return
    flat = flatten_config(config)
    # Fenced as code: markdown would otherwise run the lines together into one paragraph.
    self.write_texts(0, {"config": "```\n" + format_config(flat) + "\n```"})
    # The hparams plugin takes only bool, int, float or str; tuples, None etc. become reprs.
    hp = {k: v if isinstance(v, (bool, int, float, str)) else repr(v) for k, v in flat.items()}
    self._write(0, hparams_summary.hparams_pb(hp))

  def flush(self) -> None:
    if self._writer is not None:
      self._writer.flush()
      if self._remote:
        self._upload()

  def close(self) -> None:
    if self._writer is not None:
      self._writer.close()
      if self._remote:
        self._upload()
        shutil.rmtree(self._writer.get_logdir(), ignore_errors=True)
      self._writer = None

  def __enter__(self) -> "SummaryWriter":
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def read_scalars(logdir: str) -> dict[str, tuple[list[int], list[float]]]:
  """Every scalar series of the TensorBoard events under `logdir`: tag -> (steps, values), in
  step order. A step written twice (a run resumed before its last logged step) keeps the value
  written last, as TensorBoard shows it."""
  from tensorboard.backend.event_processing import event_accumulator  # readers only need it

  acc = event_accumulator.EventAccumulator(logdir, size_guidance={event_accumulator.SCALARS: 0})
  acc.Reload()
  out = {}
  for tag in acc.Tags()['scalars']:
    by_step = {}
    for event in sorted(acc.Scalars(tag), key=lambda e: e.wall_time):
      by_step[event.step] = event.value
    steps = sorted(by_step)
    out[tag] = (steps, [by_step[s] for s in steps])
  return out


# Dense (no structured sparsity) bf16 peak FLOP/s per device, keyed by a lowercase substring of
# `jax.devices()[0].device_kind`; longer keys are tried first, so 'h100 pcie' wins over 'h100'.
# NVIDIA datasheets print sparse figures ("with sparsity"), twice the dense ones used here.
PEAK_FLOPS: dict[str, float] = {
    # NVIDIA H100 Tensor Core GPU datasheet: SXM 989.4, PCIe 756, NVL 835 TFLOPS.
    "h100 pcie": 756e12,
    "h100 nvl": 835e12,
    "h100": 989e12,  # 'NVIDIA H100 80GB HBM3' (SXM)
    # NVIDIA H200 Tensor Core GPU datasheet: SXM 989, NVL 835 TFLOPS.
    "h200 nvl": 835e12,
    "h200": 989e12,  # 'NVIDIA H200'; also 'NVIDIA GH200 ...', whose GPU has the same peak
    "a100": 312e12,  # NVIDIA A100 datasheet, SXM and PCIe alike
    # Google Cloud TPU system-architecture pages (bf16 per chip). JAX names v5e 'TPU v5 lite',
    # v5p 'TPU v5' and v6e (Trillium) 'TPU v6 lite'; the marketing names are accepted too.
    "tpu v4": 275e12,
    "tpu v5 lite": 197e12,
    "tpu v5e": 197e12,
    "tpu v5p": 459e12,
    "tpu v5": 459e12,
    "tpu v6 lite": 918e12,
    "tpu v6e": 918e12,
}
# float32 matmuls on NVIDIA GPUs run as TF32 under JAX's default precision, so their ceiling is the
# dense TF32 figure from the same datasheets (half the bf16 one).
TF32_PEAK_FLOPS: dict[str, float] = {k: v / 2 for k, v in PEAK_FLOPS.items() if "tpu" not in k}


def _lookup(table: Mapping[str, float], device_kind: str) -> float | None:
  kind = device_kind.lower()
  for key in sorted(table, key=len, reverse=True):
    if key in kind:
      return table[key]
  return None


def peak_flops_per_device(device_kind: str, dtype: str) -> float | None:
  """Dense peak FLOP/s for matmuls in `dtype`; None for CPUs, unknown devices and unknown dtypes.

  bfloat16/float16: the bf16 figure. float32: the TF32 figure on GPUs; on TPUs the bf16 figure,
  since default-precision float32 matmuls run as single bf16 passes on the MXU.
  """
  dtype = str(dtype).lower()
  if dtype in ("bfloat16", "float16"):
    return _lookup(PEAK_FLOPS, device_kind)
  if dtype == "float32":
    if "tpu" in device_kind.lower():
      return _lookup(PEAK_FLOPS, device_kind)
    return _lookup(TF32_PEAK_FLOPS, device_kind)
  return None


def mfu(tokens_per_s_per_device: float, flops_per_token: float, peak: float | None) -> float | None:
  """Model FLOPs utilisation, a fraction; `flops_per_token` counts forward and backward."""
  if not peak:
    return None
  return tokens_per_s_per_device * flops_per_token / peak


def peak_memory_bytes(device: Any) -> int | None:
  """Peak bytes in use on `device` since start; None where the backend keeps no stats (CPU)."""
  try:
    stats = device.memory_stats()
  except Exception:  # some backends raise instead of returning None
    return None
  if not stats or "peak_bytes_in_use" not in stats:
    return None
  return int(stats["peak_bytes_in_use"])


def peak_host_rss_bytes() -> int:
  """Peak resident memory of this process so far (getrusage's maxrss: KiB on Linux, bytes on
  macOS)."""
  maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  return maxrss * (1 if sys.platform == 'darwin' else 1024)


def parameter_table(params: Any) -> str:
  """Names, shapes, dtypes, sizes and the total, for any pytree of (abstract) arrays, NNX State
  included. No statistics: computing means would block on, and gather, sharded parameters."""
  from clu import parameter_overview  # imports flax; needed once, at start-up

  # Stop at anything with a shape and dtype, so an nnx.Variable reads 'kernel', not
  # 'kernel/value'; clu wants a dict of arrays, so hand it names and abstract shapes only.
  leaves, _ = jax.tree_util.tree_flatten_with_path(
      params, is_leaf=lambda x: hasattr(x, "shape") and hasattr(x, "dtype")
  )
  name = lambda path: jax.tree_util.keystr(path, simple=True, separator="/")
  flat = {name(path): jax.ShapeDtypeStruct(x.shape, x.dtype) for path, x in leaves}
  return parameter_overview.get_parameter_overview(flat, include_stats=False)


def format_duration(seconds: float) -> str:
  """185 -> '3m05s', 3725 -> '1h02m05s', 7 -> '7s'."""
  s = int(round(seconds))
  h, m, s = s // 3600, s // 60 % 60, s % 60
  return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s" if m else f"{s}s"


T = TypeVar('T')


def progress(items: Iterable[T], *, desc: str, total: int | None = None, unit: str = 'it',
             every_s: float = 30.0, stream: TextIO | None = None,
             clock: Callable[[], float] = time.monotonic,
             log: Callable[[str], None] = logging.info) -> Iterator[T]:
  """Yields `items` and shows how far along they are: a tqdm bar with rate and ETA when `stream`
  (stderr) is a terminal; otherwise, for log files, a line every `every_s` seconds and one at the
  end of work that took that long ('eval: 120/400 batch, 3.10 batch/s, ETA 1m30s')."""
  stream = stream or sys.stderr
  if stream.isatty():
    from tqdm import tqdm  # only for terminals

    yield from tqdm(items, desc=desc, total=total, unit=unit, leave=False, file=stream)
    return
  start = last = clock()
  done = 0
  for item in items:
    yield item
    done, now = done + 1, clock()
    if now - last >= every_s:
      last = now
      log(_progress_line(desc, done, total, unit, now - start))
  if clock() - start >= every_s:
    log(_progress_line(desc, done, total, unit, clock() - start))


def _progress_line(desc: str, done: int, total: int | None, unit: str, seconds: float) -> str:
  rate = done / seconds if seconds > 0 else 0.0
  line = f'{desc}: {done}{f"/{total}" if total else ""} {unit}, {rate:.2f} {unit}/s'
  if total and rate and done < total:
    line += f', ETA {format_duration((total - done) / rate)}'
  return line


# How known metric names are shown on the console; others print as `name {value:.4g}`.
_CONSOLE = {
    "loss": ("loss", ".3f"),
    "lr": ("lr", ".1e"),
    "learning_rate": ("lr", ".1e"),
    "grad_norm": ("gnorm", ".2f"),
    "gnorm": ("gnorm", ".2f"),
}


class Reporter:
  """One console line and one set of TensorBoard scalars per call of `report`.

  Throughput is measured between consecutive reports, so the first report (whose interval would
  include compilation) shows none. `tokens_per_step` counts all processes and `num_devices` all
  devices, so tokens/s is global and MFU per device.
  """

  def __init__(
      self,
      *,
      total_steps: int,
      tokens_per_step: int,
      flops_per_token: float,
      num_devices: int,
      peak_flops: float | None,
      writer: SummaryWriter | None = None,
      prefix: str = "train/",
      clock: Callable[[], float] = time.monotonic,
      log: Callable[[str], None] = logging.info,
  ):
    """`prefix` starts every TensorBoard tag; `clock` and `log` are injectable for tests."""
    self.total_steps, self.tokens_per_step = total_steps, tokens_per_step
    self.flops_per_token, self.num_devices = flops_per_token, num_devices
    self.peak_flops, self.writer, self.prefix = peak_flops, writer, prefix
    self._clock, self._log = clock, log
    self._last: tuple[int, float] | None = None  # (step, time) of the previous report

  def report(self, step: int, metrics: Mapping[str, float]) -> dict[str, float]:
    """Logs the line, writes the scalars and returns them (metrics + throughput)."""
    now = self._clock()
    scalars = {k: float(v) for k, v in metrics.items()}
    parts = [f"step {step}/{self.total_steps}"]
    for k, v in scalars.items():
      name, fmt = _CONSOLE.get(k, (k, ".4g"))
      parts.append(f"{name} {v:{fmt}}")
    if self._last is not None and step > self._last[0] and now > self._last[1]:
      steps_per_s = (step - self._last[0]) / (now - self._last[1])
      tok_s = steps_per_s * self.tokens_per_step
      scalars["tokens_per_s"] = tok_s
      scalars["tokens_per_s_per_device"] = tok_s / self.num_devices
      parts.append(f"{tok_s:,.0f} tok/s")
      util = mfu(tok_s / self.num_devices, self.flops_per_token, self.peak_flops)
      if util is not None:
        scalars["mfu"] = util
        parts.append(f"MFU {100 * util:.1f}%")
      parts.append(f"ETA {format_duration(max(self.total_steps - step, 0) / steps_per_s)}")
    self._last = (step, now)
    self._log(" | ".join(parts))
    if self.writer is not None:
      self.writer.write_scalars(step, {self.prefix + k: v for k, v in scalars.items()})
    return scalars
