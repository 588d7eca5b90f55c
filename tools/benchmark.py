"""Times the real train step on the devices present, with synthetic tokens (no input pipeline).

    python tools/benchmark.py --config=configs/1b.py --config.train.global_batch_size=4
    python tools/benchmark.py --config=configs/1b.py --packed
    python tools/benchmark.py --config=configs/peer_cpu.py --steps=25 --peer_line

By default each row is one document (no segment ids). `--packed` measures what training on real
text runs: rows of several documents whose lengths follow the embedded Shakespeare corpus (its
files cut into documents as jaxllm/sources.py cuts them, ~2,200 bytes each, at an assumed
`--bytes_per_token`; no tokenizer is run), packed by jaxllm/data.py's packer, so the step gets the
segment ids and positions that `jaxllm.main` gives it. The JSON line's `mode` says which.

Compile and warm-up steps are not timed. Prints one JSON line: tokens/s (total and per device),
step time median/min/max, compile time, MFU with the formula and the peak FLOP/s it assumed, and
peak device memory where the backend reports it, and the host's page faults per step and peak
resident memory. `--peer_line` also prints
`tokens_per_s=... step_ms=... compile_s=...`, the line ../shared/bench/ prints for MaxText and HF.
"""

import json
import resource
import statistics
import time

import jax
import numpy as np
from absl import flags
from ml_collections import config_flags

from jaxllm import attention, cli, data, metrics, model, runtime, sharding, sources, train
from jaxllm import trainer as trainer_lib

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file.', lock_config=True)
_STEPS = flags.DEFINE_integer('steps', 20, 'Timed steps.')
_WARMUP = flags.DEFINE_integer('warmup', 3, 'Untimed steps after compile.')
_PEER_LINE = flags.DEFINE_bool('peer_line', False, 'Also print the peer-benchmark line.')
_PACKED = flags.DEFINE_bool('packed', False, 'Rows of several documents with the embedded '
                            "corpus's lengths, with segment ids and positions (as training).")
_BYTES_PER_TOKEN = flags.DEFINE_float(
    'bytes_per_token', 4.0, '--packed: UTF-8 bytes per token that turn the corpus documents into '
    'token counts (4 is typical of Llama-family BPE vocabularies on English; not measured here).')
flags.mark_flags_as_required(['config'])

MFU_FORMULA = ('MFU = tokens/s/device x flops_per_token / peak; flops_per_token = 6 x (attention '
               'and MLP projection params + output head) + 6 x n_layers x n_heads x head_dim x '
               'seq_len (causal attention counted as half of 12x); embedding lookup not counted; '
               'remat recompute not counted; packed rows count attention over the whole row, as '
               'unpacked ones, so tokens/s and MFU compare across modes')


def synthetic_batches(trainer, n: int, batch: int, seq: int, vocab: int) -> list[dict]:
  """`n` distinct batches already on device: one document per row, no padding."""
  rng = np.random.default_rng(0)
  out = []
  for _ in range(n):
    tokens = rng.integers(0, vocab, (batch, seq + 1), dtype=np.int32)
    host = {'inputs': tokens[:, :-1], 'targets': tokens[:, 1:]}
    out.append(sharding.global_batch(host, trainer.batch_sharding))
  return out


def corpus_document_tokens(bytes_per_token: float) -> np.ndarray:
  """Tokens (ids, without bos/eos) of each document of the embedded corpus, at a fixed rate."""
  lengths = [len(doc.encode('utf-8'))
             for path in sources.list_source_files(sources.default_source_dir())
             for doc in sources.split_documents(sources.read_text(path))]
  return np.maximum(1, np.round(np.array(lengths) / bytes_per_token)).astype(np.int64)


def packed_batches(trainer, n: int, batch: int, seq: int, vocab: int, bytes_per_token: float,
                   max_segments: int = 0) -> tuple[list[dict], dict]:
  """`n` batches of corpus-length documents (random ids) packed as training packs them, and
  statistics of the rows: documents per row, padding, segments per row."""
  rng = np.random.default_rng(0)
  lengths = corpus_document_tokens(bytes_per_token)
  docs, total = [], 0
  while total < 2 * n * batch * seq:  # twice what n batches hold: packing never runs dry
    ids = rng.integers(3, vocab, rng.choice(lengths), dtype=np.int32)
    docs.append(np.concatenate([[1], ids, [2]]).astype(np.int32))  # bos, ids, eos as data.py
    total += len(docs[-1]) - 1
  it = data.pack_documents(docs, seq_len=seq, batch_size=batch)
  host = [next(it) for _ in range(n)]
  seg = np.stack([b['segment_ids'] for b in host])
  runs = (np.diff(seg, axis=-1) != 0).sum(-1) + 1  # segments per row, a padding run included
  stats = {'bytes_per_token': bytes_per_token, 'corpus_docs': len(lengths),
           'doc_tokens_mean': float(lengths.mean() + 1), 'doc_tokens_median': float(np.median(lengths) + 1),
           'docs_per_row_mean': float(seg.max(-1).mean()),
           'segments_per_row_max': int(runs.max()),
           'attention_max_segments': attention.max_segments(seq, max_segments),
           'padding_fraction': float((seg == 0).mean())}
  return [sharding.global_batch(b, trainer.batch_sharding) for b in host], stats


def run(config, steps: int, warmup: int, *, packed: bool = False,
        bytes_per_token: float = 4.0) -> dict:
  if steps < 1 or warmup < 0:
    raise ValueError(f'--steps={steps} --warmup={warmup}: time at least one step (--steps>=1)')
  reuse = runtime.prepare(xla_gpu_flags=config.train.xla_gpu_flags,
                          cpu_reuse_memory=config.train.cpu_reuse_memory)
  trainer = train.setup(config)
  batch, seq = config.train.global_batch_size, config.data.seq_len
  start = time.perf_counter()
  keys = trainer_lib.BATCH_KEYS if packed else ('inputs', 'targets')
  compiled = trainer.compile_train_step(batch, seq, keys=keys)
  compile_s = time.perf_counter() - start
  state = trainer.place_frozen(trainer.init_state(), compiled)
  if packed:
    batches, packing = packed_batches(trainer, 4, batch, seq, config.model.vocab_size,
                                      bytes_per_token, config.model.attention_max_segments)
  else:
    batches, packing = synthetic_batches(trainer, 4, batch, seq, config.model.vocab_size), None
  times = []
  for i in range(warmup + steps):
    if i == warmup:
      faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    start = time.perf_counter()
    state, step_metrics = compiled(state, batches[i % len(batches)])
    loss = float(step_metrics['loss'])  # waits for the step: each step is timed alone
    if i >= warmup:
      times.append(time.perf_counter() - start)
  faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
  if not np.isfinite(loss):
    raise FloatingPointError(f'benchmark loss is {loss}')
  n_dev = jax.device_count()
  median = statistics.median(times)
  tokens_per_s = batch * seq / median
  flops = model.flops_per_token(trainer.model_cfg, seq)
  kind = jax.devices()[0].device_kind
  peak = metrics.peak_flops_per_device(kind, config.model.dtype)
  return {
      'config': config.name, 'params': trainer.model_cfg.num_params(),
      'n_layers': config.model.n_layers, 'seq_len': seq, 'global_batch': batch,
      'dtype': config.model.dtype, 'fp8': config.model.fp8, 'remat': config.model.remat,
      'loss_chunk': config.train.loss_chunk, 'cpu_reuse_memory': reuse,
      'compiler_options': trainer.compiler_options,
      'mode': 'packed' if packed else 'one document per row', 'packing': packing,
      'attention': attention.kernel(config.model.attention, dtype=config.model.dtype,
                                    head_dim=config.model.head_dim, seq_len=seq, packed=packed,
                                    sliding_window=config.model.sliding_window),
      'mesh': dict(trainer.mesh.shape), 'devices': n_dev, 'device_kind': kind,
      'jax': jax.__version__,
      'tokens_per_s': tokens_per_s, 'tokens_per_s_per_device': tokens_per_s / n_dev,
      # Without padding (packed mode pads the ends of rows; MFU counts every position).
      'real_tokens_per_s': tokens_per_s * (1 - (packing['padding_fraction'] if packed else 0)),
      'step_s': {'median': median, 'min': min(times), 'max': max(times)},
      'compile_s': compile_s, 'steps_timed': steps, 'final_loss': loss,
      'flops_per_token': flops, 'peak_flops_per_device': peak,
      'mfu': metrics.mfu(tokens_per_s / n_dev, flops, peak), 'mfu_formula': MFU_FORMULA,
      'peak_memory_bytes': metrics.peak_memory_bytes(jax.devices()[0]),
      # The host process: minor page faults per timed step, and its peak resident memory.
      'host_page_faults_per_step': faults / steps,
      'host_peak_rss_bytes': metrics.peak_host_rss_bytes(),
  }


def main(argv):
  del argv
  result = run(_CONFIG.value, _STEPS.value, _WARMUP.value, packed=_PACKED.value,
               bytes_per_token=_BYTES_PER_TOKEN.value)
  print(json.dumps(result), flush=True)
  if _PEER_LINE.value:
    print(f"tokens_per_s={result['tokens_per_s']:.1f} step_ms={result['step_s']['median'] * 1e3:.1f}"
          f" compile_s={result['compile_s']:.2f}", flush=True)


if __name__ == '__main__':
  cli.run(main)
