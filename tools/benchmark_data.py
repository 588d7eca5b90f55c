"""Tokens/s per host of the full input pipeline (read, tokenize, pack, batch); one JSON line.

    python tools/benchmark_data.py --workdir=/tmp/bench_data            # from text, on the fly
    python tools/benchmark_data.py --workdir=/tmp/bench_data --pretokenize  # from the token cache

The first run builds the dataset, trains the tokenizer (and, with --pretokenize, writes the token
cache) under --workdir; those are not timed. `tokens_per_s` counts every position of every batch
(what the train step consumes); `real_tokens_per_s` leaves out padding.
"""

import argparse
import json
import os
import time

from jaxllm import data


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--workdir', required=True, help='dataset, tokenizer and token cache go here')
  p.add_argument('--sources', default='', help="'SPEC[@WEIGHT], ...'; empty = the embedded corpus")
  p.add_argument('--eval_source', default='')
  p.add_argument('--text_field', default='text')
  p.add_argument('--vocab_size', type=int, default=2048)
  p.add_argument('--seq_len', type=int, default=2048)
  p.add_argument('--batch_size', type=int, default=8)
  p.add_argument('--worker_count', type=int, default=0)
  p.add_argument('--pretokenize', action='store_true')
  p.add_argument('--seconds', type=float, default=10.0, help='timed window after 2 warm-up batches')
  a = p.parse_args()
  pipe = data.make_pipeline(
      sources=a.sources, eval_source=a.eval_source, text_field=a.text_field,
      cache_dir=os.path.join(a.workdir, 'data'), tokenizer_path=os.path.join(a.workdir, 'tokenizer.model'),
      vocab_size=a.vocab_size, seq_len=a.seq_len, batch_size=a.batch_size, eval_files=2, seed=0,
      pretokenize=a.pretokenize, worker_count=a.worker_count)
  it = pipe.train_iter()
  for _ in range(2):
    next(it)
  batches = real = 0
  start = time.perf_counter()
  while time.perf_counter() - start < a.seconds:
    real += int((next(it)['segment_ids'] > 0).sum())
    batches += 1
  dt = time.perf_counter() - start
  print(json.dumps({
      'route': 'token cache' if a.pretokenize else 'text, on the fly', 'sources': a.sources or 'embedded',
      'seq_len': a.seq_len, 'batch_size': a.batch_size, 'worker_count': a.worker_count,
      'vocab_size': a.vocab_size, 'batches': batches, 'seconds': round(dt, 2),
      'tokens_per_s': round(batches * a.batch_size * a.seq_len / dt),
      'real_tokens_per_s': round(real / dt), 'load_average_1m': os.getloadavg()[0],
      'cpus': os.cpu_count()}))


if __name__ == '__main__':
  main()
