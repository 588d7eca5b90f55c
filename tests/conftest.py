"""Test setup: 8 fake CPU devices, set before jax is imported anywhere.

With JAXLLM_TEST_ACCELERATOR=1 the real devices are used instead, for the tests marked
`accelerator` (run `pytest -m accelerator` on a GPU or TPU host); elsewhere they are skipped,
except those also marked `also_on_cpu`.

Implicit rank promotion is an error (`jax_numpy_rank_promotion='raise'`): a [B] array meeting a
[B, L] one by accident broadcasts silently and gives wrong numbers that still look plausible. Set
through the environment, so the subprocesses the tests start (the CLIs) run under it too.
"""

import os

import pytest

ON_ACCELERATOR = os.environ.get('JAXLLM_TEST_ACCELERATOR') == '1'
os.environ['JAX_NUMPY_RANK_PROMOTION'] = 'raise'
if not ON_ACCELERATOR:
  os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                             ' --xla_force_host_platform_device_count=8').strip()
  os.environ['JAX_PLATFORMS'] = 'cpu'


def pytest_configure(config):
  config.addinivalue_line('markers', 'also_on_cpu: an `accelerator` test that runs on the CPU too')


def pytest_collection_modifyitems(config, items):
  import jax  # after the environment above is set
  # In case a plugin imported jax before this file set the environment.
  jax.config.update('jax_numpy_rank_promotion', 'raise')
  if jax.default_backend() in ('gpu', 'tpu'):
    return
  skip = pytest.mark.skip(reason=f'needs a GPU or TPU; this run has {jax.default_backend()} '
                                 '(set JAXLLM_TEST_ACCELERATOR=1 on an accelerator host)')
  for item in items:
    if 'accelerator' in item.keywords and 'also_on_cpu' not in item.keywords:
      item.add_marker(skip)


@pytest.fixture(scope='session')
def single_device():
  """test_train.run_steps on one device, float32: (losses, params). The reference of the mesh
  tests and of the bf16 test (test_accelerator), computed once per session."""
  import jax
  from test_train import run_steps
  return run_steps({'data': 1, 'fsdp': 1, 'tensor': 1}, devices=jax.devices()[:1])
