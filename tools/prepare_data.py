"""Builds the datasets, the tokenizer and the token-id cache once, so training does no text work.

    python tools/prepare_data.py --workdir=runs/7b --sources='/data/web/*.jsonl@0.8,/data/books@0.2' \
        --eval_source=/data/heldout --vocab_size=32000 --tokenizer=/data/spm.model

Then train with the same cache_dir and tokenizer and `data.pretokenize=True`: the pipeline finds the
cache (keyed by the source's content and the tokenizer's bytes) and reads only token ids. Prints one
JSON line per cache: its path, documents, tokens and UTF-8 bytes.
"""

import argparse
import json
import os

from jaxllm import data


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--workdir', required=True, help='cache_dir defaults to WORKDIR/data, as in training')
  p.add_argument('--cache_dir', default='')
  p.add_argument('--tokenizer', default='', help='sentencepiece model; empty = WORKDIR/tokenizer.model '
                 '(trained on first use)')
  p.add_argument('--sources', default='', help="'SPEC[@WEIGHT], ...'; empty = the embedded corpus")
  p.add_argument('--eval_source', default='')
  p.add_argument('--eval_files', type=int, default=2)
  p.add_argument('--text_field', default='text')
  p.add_argument('--tfds_data_dir', default=None)
  p.add_argument('--skip_bad_records', action='store_true')
  p.add_argument('--vocab_size', type=int, default=2048)
  a = p.parse_args()
  pipe = data.make_pipeline(
      sources=a.sources, eval_source=a.eval_source, eval_files=a.eval_files, text_field=a.text_field,
      tfds_data_dir=a.tfds_data_dir, skip_bad_records=a.skip_bad_records,
      cache_dir=a.cache_dir or os.path.join(a.workdir, 'data'),
      tokenizer_path=a.tokenizer or os.path.join(a.workdir, 'tokenizer.model'), vocab_size=a.vocab_size,
      seq_len=2, batch_size=1, seed=0, pretokenize=True)  # seq_len and batch do not enter the cache
  for split, cache in [('train', c) for c in pipe.caches] + [('eval', pipe.eval_cache)]:
    print(json.dumps({'split': split, 'path': str(cache.path), **cache.meta}))
  if pipe.skipped:
    print(json.dumps({'skipped': pipe.skipped}))


if __name__ == '__main__':
  main()
