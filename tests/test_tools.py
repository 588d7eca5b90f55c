"""The benchmark tools run on the tiny config and print one JSON line with every field.

Benchmarks are not tests: nothing here asserts a speed, only that the figures exist and are
consistent with each other (e.g. a save is not blocked longer than it takes).
"""

import json
import os
import pathlib
import re
import subprocess
import sys
import time

import numpy as np
import pytest

REPO = pathlib.Path(__file__).parent.parent
# PYTHONPATH: the tools import jaxllm from this checkout, not from wherever it is installed.
ENV = {**{k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}, 'JAX_PLATFORMS': 'cpu',
       'PYTHONPATH': str(REPO)}


def run_tool(*args) -> tuple[dict, str]:
  proc = subprocess.run([sys.executable, *args], cwd=REPO, env=ENV, capture_output=True,
                        text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  line = [l for l in proc.stdout.splitlines() if l.startswith('{')][-1]
  return json.loads(line), proc.stdout


def test_benchmark_prints_every_field_and_the_peer_line():
  start = time.perf_counter()
  out, stdout = run_tool('tools/benchmark.py', '--config=configs/tiny.py', '--steps=3',
                         '--warmup=1', '--peer_line')
  wall_s = time.perf_counter() - start
  fields = {'config', 'params', 'n_layers', 'seq_len', 'global_batch', 'dtype', 'remat',
            'loss_chunk', 'attention', 'mesh', 'devices', 'device_kind', 'jax', 'tokens_per_s',
            'tokens_per_s_per_device', 'step_s', 'compile_s', 'steps_timed', 'final_loss',
            'flops_per_token', 'peak_flops_per_device', 'mfu', 'mfu_formula',
            'peak_memory_bytes', 'cpu_reuse_memory', 'compiler_options',
            'host_page_faults_per_step', 'host_peak_rss_bytes', 'mode', 'packing',
            'real_tokens_per_s'}
  assert fields <= set(out), fields - set(out)
  assert out['mode'] == 'one document per row' and out['packing'] is None
  assert out['real_tokens_per_s'] == out['tokens_per_s']
  assert out['cpu_reuse_memory'] is sys.platform.startswith('linux')  # JAX_PLATFORMS=cpu
  assert out['compiler_options'] == {'xla_cpu_use_fusion_emitters': False}
  assert out['host_page_faults_per_step'] >= 0 and out['host_peak_rss_bytes'] > 2**27
  assert out['devices'] == 1 and out['steps_timed'] == 3
  # The tiny config by hand: 1.38M parameters (README), of which the matmuls are 4 layers x
  # (4 attention projections 128 x 128 + 3 MLP 128 x 384) + the head 128 x 2048.
  assert out['params'] == 1_377_408
  matmul_params = 4 * (4 * 128 * 128 + 3 * 128 * 384) + 128 * 2048  # 1,114,112
  attention = 6 * 4 * 4 * 32 * 128  # layers x heads x head_dim x seq_len, causal: 12x halved
  assert out['flops_per_token'] == 6 * matmul_params + attention == 7_077_888
  # Tokens per step are the config's (16 rows x 128 tokens, all on the one device); the step
  # times it reports fit inside the wall time of the whole process, compile included.
  step = out['step_s']
  assert 0 < step['min'] <= step['median'] <= step['max']
  assert out['tokens_per_s'] * step['median'] == pytest.approx(16 * 128)
  assert out['tokens_per_s_per_device'] == out['tokens_per_s']
  assert out['compile_s'] + (1 + 3) * step['min'] < wall_s  # 1 warm-up + 3 timed steps
  # Uniform random tokens hold nothing to learn: 4 steps in, the loss is still about ln(vocab).
  assert abs(out['final_loss'] - np.log(2048)) < 0.5
  assert 'causal attention counted as half' in out['mfu_formula']
  assert out['mfu'] is None  # no known peak FLOP/s for a CPU
  peer = re.search(r'^tokens_per_s=([\d.]+) step_ms=([\d.]+) compile_s=([\d.]+)$', stdout, re.M)
  assert peer and abs(float(peer.group(1)) - out['tokens_per_s']) < 0.1 + 1e-3 * out['tokens_per_s']
  assert float(peer.group(2)) == pytest.approx(1e3 * step['median'], abs=0.051)  # printed to 0.1 ms


def test_benchmark_packed_mode_feeds_corpus_length_documents():
  """--packed: rows of several documents (seq_len 512 holds about one Shakespeare document of
  ~560 tokens at 4 bytes/token, so most rows hold parts of two), segment ids and positions."""
  out, _ = run_tool('tools/benchmark.py', '--config=configs/tiny.py', '--steps=1', '--warmup=0',
                    '--packed', '--config.data.seq_len=512', '--config.train.global_batch_size=4')
  assert out['mode'] == 'packed' and out['attention'] == 'xla'
  p = out['packing']
  assert p['corpus_docs'] > 2000 and p['bytes_per_token'] == 4.0
  assert 400 < p['doc_tokens_median'] < 700  # ~2,200-byte documents / 4
  assert 1.2 < p['docs_per_row_mean'] <= p['segments_per_row_max'] <= p['attention_max_segments']
  assert 0 <= p['padding_fraction'] < 0.2
  assert out['real_tokens_per_s'] == out['tokens_per_s'] * (1 - p['padding_fraction'])
  assert out['final_loss'] > 0


def test_benchmark_checkpoint_reports_blocked_and_total(tmp_path):
  out, _ = run_tool('tools/benchmark_checkpoint.py', '--config=configs/tiny.py',
                    f'--dir={tmp_path / "ckpt"}', '--saves=2')
  assert out['params'] == 1377408 and out['state_bytes'] > 12 * out['params'] * 0.99
  for save in (out['first_save'], {'blocked_s': out['later_saves']['blocked_s_median'],
                                   'total_s': out['later_saves']['total_s_median']}):
    assert 0 < save['blocked_s'] <= save['total_s']
  # The noise given to the AdamW moments makes the checkpoint about the state's size on disk.
  assert out['checkpoint_bytes_on_disk'] > 0.8 * out['state_bytes']
  assert not (tmp_path / 'ckpt').exists()


def test_benchmark_convert_measures_both_directions(tmp_path):
  out, _ = run_tool('tools/benchmark_convert.py', '--config=configs/tiny.py',
                    f'--dir={tmp_path / "conv"}')
  assert out['params'] == 1377408
  assert out['safetensors_gib'] * 2**30 >= 2 * out['params']  # bfloat16, plus headers
  for side in ('export', 'import'):
    assert out[side]['wall_s'] > 0 and out[side]['peak_rss_gib'] > 0.05
