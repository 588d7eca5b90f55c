"""Process set-up before JAX starts: the GPU XLA flags and host memory reuse on CPU."""

import os
import subprocess
import sys
import types

import pytest

from jaxllm import runtime

# Runs a jitted function whose temporaries (4096 x 4096 float32, 64 MiB each) are far above
# glibc's mmap threshold, and prints the median minor page faults per call (the median: with
# reuse, a call still faults now and then while the heap grows to its high-water mark).
_PAGE_FAULTS = r'''
import resource, statistics, sys
from jaxllm import runtime, train  # as jaxllm.main does: every jaxllm import first
print(runtime.reuse_host_memory(sys.argv[1] == 'on'))
import jax, jax.numpy as jnp
f = jax.jit(lambda x: jnp.tanh(x.T @ jnp.exp(x @ x.T)).sum() + jnp.exp(x @ x.T).max(1).sum())
x = jnp.ones((4096, 256), jnp.float32) / 256
faults = []
for _ in range(20):
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  f(x).block_until_ready()
  faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(int(statistics.median(faults[2:])))
'''


# The child's malloc must be glibc's defaults, whatever this shell sets.
_ENV = {**{k: v for k, v in os.environ.items()
           if k != 'GLIBC_TUNABLES' and not k.startswith('MALLOC_')},
        'JAX_PLATFORMS': 'cpu', 'XLA_FLAGS': ''}


def _faults_per_call(mode: str) -> tuple[str, int]:
  out = subprocess.run([sys.executable, '-c', _PAGE_FAULTS, mode], env=_ENV, check=True,
                       capture_output=True, text=True, timeout=120).stdout.split()
  return out[0], int(out[1])


def _thp_always() -> bool:
  try:
    with open('/sys/kernel/mm/transparent_hugepage/enabled') as f:
      return '[always]' in f.read()
  except OSError:
    return False


@pytest.mark.skipif(not sys.platform.startswith('linux'), reason='glibc malloc tuning is Linux-only')
@pytest.mark.skipif(_thp_always(), reason='transparent huge pages are always on here: large '
                    'mmaps fault 2 MiB at a time, too few faults to compare')
def test_reuse_host_memory_stops_the_per_call_page_faults():
  applied, faults_on = _faults_per_call('on')
  if applied != 'True':
    pytest.skip('reuse_host_memory did not apply here (not glibc)')
  not_applied, faults_off = _faults_per_call('off')
  assert not_applied == 'False'
  # Without reuse each call faults its temporaries in afresh (16k pages of 4 KiB per 64 MiB).
  assert faults_off > 8_000, faults_off
  assert faults_on < 1_000, faults_on


# Counts glibc malloc arenas (malloc_info's <heap> entries) after importing every jaxllm module.
_ARENAS_AFTER_IMPORT = r'''
import ctypes, os, tempfile
import jaxllm.main, jaxllm.convert.hf  # main imports train, which imports the rest
libc = ctypes.CDLL('libc.so.6')
libc.fdopen.restype = ctypes.c_void_p
fd, path = tempfile.mkstemp()
stream = ctypes.c_void_p(libc.fdopen(os.dup(fd), b'w'))
libc.malloc_info(0, stream)
libc.fclose(stream)
os.close(fd)
print(open(path).read().count('<heap nr='))
os.unlink(path)
'''


@pytest.mark.skipif(not sys.platform.startswith('linux'), reason='glibc malloc tuning is Linux-only')
def test_importing_jaxllm_starts_no_thread_with_a_malloc_arena():
  # Such an arena, created before reuse_host_memory runs, would be shared by XLA's threads, whose
  # large blocks then bypass the reuse (pyarrow's import did this).
  out = subprocess.run([sys.executable, '-c', _ARENAS_AFTER_IMPORT], check=True, text=True,
                       env=_ENV, capture_output=True,
                       timeout=120).stdout
  assert int(out) == 1, f'{out} malloc arenas after importing jaxllm; want only the main one'


def test_backend_will_be_cpu_reads_jax_platforms(monkeypatch):
  fake_jax = lambda platforms: types.SimpleNamespace(config=types.SimpleNamespace(
      jax_platforms=platforms))
  monkeypatch.setattr(runtime, 'jax', fake_jax('cpu'))
  assert runtime.backend_will_be_cpu()
  monkeypatch.setattr(runtime, 'jax', fake_jax('cuda,cpu'))
  assert not runtime.backend_will_be_cpu()
  assert not runtime.reuse_host_memory(True)  # never on a GPU run


def test_backend_will_be_cpu_without_jax_platforms(monkeypatch):
  monkeypatch.setattr(runtime, 'jax', types.SimpleNamespace(
      config=types.SimpleNamespace(jax_platforms=None)))
  for var in ('TPU_LIBRARY_PATH', 'JAX_FORCE_TPU_INIT'):
    monkeypatch.delenv(var, raising=False)
  installed, entry_points = set(), []
  monkeypatch.setattr(runtime.importlib.util, 'find_spec',
                      lambda name: object() if name in installed else None)
  monkeypatch.setattr(runtime.importlib.metadata, 'entry_points', lambda group: entry_points)
  assert runtime.backend_will_be_cpu()  # a plain CPU machine
  entry_points.append('xla_cuda12')  # jax[cuda12] registers its plugin as an entry point
  assert not runtime.backend_will_be_cpu()
  entry_points.clear()
  for name in ('jax_plugins', 'libtpu'):  # a namespace plugin package; a TPU VM
    installed.add(name)
    assert not runtime.backend_will_be_cpu(), name
    installed.clear()
  monkeypatch.setenv('TPU_LIBRARY_PATH', '/lib/libtpu.so')  # libtpu found through the environment
  assert not runtime.backend_will_be_cpu()


def test_reuse_host_memory_does_nothing_once_jax_has_started():
  import jax  # pylint: disable=g-import-not-at-top
  jax.devices()  # conftest set JAX_PLATFORMS=cpu: the CPU backend, now started
  assert runtime.backend_will_be_cpu()
  assert not runtime.reuse_host_memory(True)


def test_set_xla_flags_keeps_what_the_user_set(monkeypatch):
  monkeypatch.setenv('XLA_FLAGS', '--xla_gpu_enable_latency_hiding_scheduler=false --foo=1')
  flags = runtime.set_xla_flags(True).split()
  assert '--xla_gpu_enable_latency_hiding_scheduler=false' in flags
  assert '--xla_gpu_enable_latency_hiding_scheduler=true' not in flags
  assert set(runtime.GPU_XLA_FLAGS[1:]) <= set(flags) and '--foo=1' in flags
  monkeypatch.setenv('XLA_FLAGS', '--foo=1')
  assert runtime.set_xla_flags(False) == '--foo=1'


def test_cpu_compiler_options_turn_the_fusion_emitters_off_only_when_asked():
  options = runtime.cpu_compiler_options(fusion_emitters=False, platform='cpu')
  assert options == runtime.CPU_NO_FUSION_EMITTERS == {'xla_cpu_use_fusion_emitters': False}
  options['xla_cpu_use_fusion_emitters'] = True  # each caller gets its own dict
  assert runtime.CPU_NO_FUSION_EMITTERS == {'xla_cpu_use_fusion_emitters': False}
  assert runtime.cpu_compiler_options(fusion_emitters=True, platform='cpu') is None
  assert runtime.cpu_compiler_options(fusion_emitters=False, platform='gpu') is None


def test_cpu_compiler_options_fall_back_when_xla_lacks_the_option(monkeypatch, caplog):
  monkeypatch.setattr(runtime, 'CPU_NO_FUSION_EMITTERS', {'xla_cpu_no_such_option_here': False})
  with caplog.at_level('WARNING'):
    assert runtime.cpu_compiler_options(fusion_emitters=False, platform='cpu') is None
  assert 'xla_cpu_no_such_option_here' in caplog.text
