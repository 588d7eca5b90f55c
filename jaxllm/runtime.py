"""The process around the steps: set-up that only takes effect before JAX starts its backends (XLA
flags for GPU, host memory reuse for the CPU backend), the compile options jaxllm's jitted steps
pass to XLA:CPU, and the signals and preemption notices that stop a run at a step boundary
(`PreemptionWatch`). A leaf: imports jax (and absl logging) only.
"""

import ctypes
import functools
import importlib.metadata
import importlib.util
import os
import signal
import sys
import threading

import jax
import jax.numpy as jnp
from absl import logging
from jax.experimental import multihost_utils

# Overlap of compute with communication on GPU: the latency-hiding scheduler orders collectives
# early, and FSDP's per-layer all-gathers / reduce-scatters inside the layer scan are pipelined
# (double-buffered) so layer i+1's weights arrive while layer i computes. The combine thresholds
# merge small collectives into fewer large ones. All are XLA DebugOptions, parsed (and ignored)
# on CPU and TPU too. A flag the user already set in XLA_FLAGS is left as they set it.
GPU_XLA_FLAGS = (
    '--xla_gpu_enable_latency_hiding_scheduler=true',
    '--xla_gpu_enable_while_loop_double_buffering=true',
    '--xla_gpu_enable_pipelined_all_gather=true',
    '--xla_gpu_enable_pipelined_reduce_scatter=true',
    '--xla_gpu_enable_pipelined_all_reduce=true',
    '--xla_gpu_all_gather_combine_threshold_bytes=134217728',
    '--xla_gpu_reduce_scatter_combine_threshold_bytes=134217728',
    '--xla_gpu_all_reduce_combine_threshold_bytes=134217728',
)

# XLA:CPU's MLIR fusion emitters (XLA's default) spend about 1 s more than its LLVM IR emitters
# compiling the peer-shape step, more still when host memory reuse puts XLA's compile threads on
# one malloc arena, for steps no faster (docs/benchmarks.md). A per-compile option, not an
# XLA_FLAGS entry: an XLA that no longer knows it rejects the compile, not the whole process.
CPU_NO_FUSION_EMITTERS = {'xla_cpu_use_fusion_emitters': False}

# glibc mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8
_NEVER = -1  # as M_TRIM_THRESHOLD: never give the heap's free top back to the system (mallopt(3))


def set_xla_flags(enabled: bool) -> str:
  """Adds GPU_XLA_FLAGS to $XLA_FLAGS; takes effect only before JAX starts its backends."""
  current = os.environ.get('XLA_FLAGS', '')
  if enabled:
    present = {f.split('=')[0] for f in current.split()}
    extra = [f for f in GPU_XLA_FLAGS if f.split('=')[0] not in present]
    os.environ['XLA_FLAGS'] = ' '.join([current, *extra]).strip()
  return os.environ.get('XLA_FLAGS', '')


def backend_will_be_cpu() -> bool:
  """Whether JAX will run on its CPU backend, decided without starting it: the first of
  JAX_PLATFORMS (or jax_platforms) when set, else whether no GPU/TPU plugin or libtpu is there."""
  platforms = jax.config.jax_platforms
  if platforms:
    return platforms.split(',')[0].strip() == 'cpu'
  if os.environ.get('TPU_LIBRARY_PATH') or os.environ.get('JAX_FORCE_TPU_INIT'):
    return False
  return (importlib.util.find_spec('jax_plugins') is None
          and importlib.util.find_spec('libtpu') is None
          and not importlib.metadata.entry_points(group='jax_plugins'))


def _backends_started() -> bool:
  try:
    from jax._src import xla_bridge  # pylint: disable=g-import-not-at-top
    return xla_bridge.backends_are_initialized()
  except (ImportError, AttributeError):  # a private API: assume not started
    return False


def reuse_host_memory(enabled: bool) -> bool:
  """On the CPU backend with glibc, keeps freed memory in the process for reuse; returns whether
  it did.

  XLA:CPU allocates each step's temporaries as one buffer (986 MB at the peer shape) on its worker
  threads, where glibc serves any large block with a fresh mmap and unmaps it on free: every step
  then page-faults the whole buffer in again (270k faults, 0.7 s of kernel time per 1.7 s step).
  One arena, no mmap and no trimming make later steps reuse the same memory. The price is host
  memory: the heap settles at its high-water mark, two to four temporary buffers once
  fragmentation is counted (2.7-3.7 GiB resident at the peer shape against a 1.8 GiB peak
  without). A thread that has allocated already keeps its own arena, which XLA's threads may then
  share: this does nothing (and returns False) once JAX has started its backends, and must run
  before any library starts a thread (importing jaxllm starts none; tests/test_runtime.py checks).
  Not used on GPU/TPU, whose temporaries live on the device and whose host allocations
  (checkpoint copies) are better returned to the system.
  """
  if not (enabled and sys.platform.startswith('linux') and backend_will_be_cpu()
          and not _backends_started()):
    return False
  try:
    libc = ctypes.CDLL('libc.so.6')
  except OSError:
    return False
  if not hasattr(libc, 'gnu_get_libc_version'):  # not glibc (musl has no such arenas)
    return False
  done = [libc.mallopt(param, value) == 1 for param, value in (
      (_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, _NEVER))]
  return all(done)


def cpu_compiler_options(*, fusion_emitters: bool, platform: str) -> dict | None:
  """`compiler_options` for jaxllm's jitted steps on devices of `platform`: None (XLA's defaults)
  unless that is the CPU and `fusion_emitters` is False, then CPU_NO_FUSION_EMITTERS if this XLA
  accepts it (checked once with a trivial compile; if not, a warning and XLA's defaults)."""
  if fusion_emitters or platform != 'cpu':
    return None
  return dict(CPU_NO_FUSION_EMITTERS) if _xla_cpu_accepts(**CPU_NO_FUSION_EMITTERS) else None


@functools.cache
def _xla_cpu_accepts(**options) -> bool:
  cpu = jax.sharding.SingleDeviceSharding(jax.devices('cpu')[0])
  try:
    jax.jit(lambda x: x + 1, compiler_options=options).lower(
        jax.ShapeDtypeStruct((), jnp.float32, sharding=cpu)).compile()
  except jax.errors.JaxRuntimeError as e:
    if 'compile option' not in str(e):
      raise
    logging.warning('XLA rejected %s (%s): XLA:CPU keeps its defaults', options, e)
    return False
  return True


def prepare(*, xla_gpu_flags: bool, cpu_reuse_memory: bool) -> bool:
  """Call first, before anything starts JAX's backends. Returns whether host memory is reused."""
  set_xla_flags(xla_gpu_flags)
  return reuse_host_memory(cpu_reuse_memory)


class PreemptionWatch:
  """Asks, at each step boundary, whether to save and stop.

  One process: SIGTERM or SIGINT sets a flag (a second signal acts as usual). Several processes:
  JAX's preemption sync point, which picks the same step on all of them (JAX's own notifier owns
  SIGTERM there, so no Python handler is installed).
  """

  def __init__(self):
    self.signal = None
    self._multi = jax.process_count() > 1
    self._previous = {}

  def __enter__(self):
    if not self._multi and threading.current_thread() is threading.main_thread():
      for sig in (signal.SIGTERM, signal.SIGINT):
        self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def _handle(self, signum, frame):
    self.signal = signal.Signals(signum).name
    signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))
    logging.warning('%s received: saving a checkpoint at the next step boundary', self.signal)

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)

  def should_stop(self, step: int) -> bool:
    if self._multi:
      try:
        return multihost_utils.reached_preemption_sync_point(step)
      except RuntimeError:  # jax_enable_preemption_service is off: no preemption notices
        return False
    return self.signal is not None
