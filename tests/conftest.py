"""Test setup: 8 fake CPU devices, set before jax is imported anywhere.

With JAXLLM_TEST_ACCELERATOR=1 the real devices are used instead, for the tests marked
`accelerator` (run `pytest -m accelerator` on a GPU or TPU host); elsewhere they are skipped.
"""

import os

import pytest

ON_ACCELERATOR = os.environ.get('JAXLLM_TEST_ACCELERATOR') == '1'
if not ON_ACCELERATOR:
  os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                             ' --xla_force_host_platform_device_count=8').strip()
  os.environ['JAX_PLATFORMS'] = 'cpu'


def pytest_collection_modifyitems(config, items):
  import jax  # after the environment above is set
  if jax.default_backend() in ('gpu', 'tpu'):
    return
  skip = pytest.mark.skip(reason=f'needs a GPU or TPU; this run has {jax.default_backend()} '
                                 '(set JAXLLM_TEST_ACCELERATOR=1 on an accelerator host)')
  for item in items:
    if 'accelerator' in item.keywords:
      item.add_marker(skip)
