"""Trains a sentencepiece model on any data source and reports its compression on held-out text.

    python tools/train_tokenizer.py --sources='/data/web/*.jsonl' --text_field=text \
        --eval_source=/data/heldout --vocab_size=32000 --model_type=bpe --out=/data/spm.model

Sources are read as in training (`SPEC[@WEIGHT], ...`: directories, globs, files, tfds:NAME:SPLIT);
the held-out text is `--eval_files` whole files of the first source or `--eval_source`, never seen
by the trainer. Defaults: identity normalization (lossless), byte fallback, digits split, unk=0,
bos=1, eos=2, no pad. Prints one JSON line with the held-out bytes per token.
"""

import argparse
import json
import os
import tempfile

from jaxllm import data, sources
from jaxllm import tokenizer as tokenizer_lib


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--out', required=True, help='path of the .model file to write')
  p.add_argument('--sources', default='', help="'SPEC[@WEIGHT], ...'; empty = the embedded corpus")
  p.add_argument('--eval_source', default='')
  p.add_argument('--eval_files', type=int, default=2)
  p.add_argument('--text_field', default='text')
  p.add_argument('--tfds_data_dir', default=None)
  p.add_argument('--cache_dir', default='', help='where file sources are built; empty = a temp dir')
  p.add_argument('--vocab_size', type=int, default=2048)
  p.add_argument('--model_type', choices=('bpe', 'unigram'), default='bpe')
  p.add_argument('--no_byte_fallback', action='store_true')
  p.add_argument('--special_tokens', default='', help='comma-separated pieces kept whole, e.g. <tool>,</tool>')
  p.add_argument('--normalization', default='identity', help="sentencepiece rule, e.g. 'nmt_nfkc' (lossy)")
  p.add_argument('--max_docs', type=int, default=data._TOKENIZER_DOCS, help='train documents sampled')
  p.add_argument('--eval_docs', type=int, default=2000, help='held-out documents for the compression figure')
  a = p.parse_args()
  specs = sources.parse_sources(a.sources) if a.sources else [(sources.default_source_dir(), 1.0)]
  with tempfile.TemporaryDirectory() as tmp:
    found = sources.open_sources(specs, cache_dir=a.cache_dir or tmp, eval_files=a.eval_files,
                                 eval_source=a.eval_source, text_field=a.text_field, tfds_data_dir=a.tfds_data_dir)
    data.train_tokenizer(a.out, data.tokenizer_sample(found, a.max_docs), a.vocab_size, model_type=a.model_type,
                         byte_fallback=not a.no_byte_fallback, normalization=a.normalization,
                         user_defined_symbols=[s for s in a.special_tokens.split(',') if s])
    ev = found.eval
    held_out = [ev.text(i) for i in range(0, len(ev), max(1, len(ev) // a.eval_docs))]
    tok = tokenizer_lib.open_tokenizer(a.out)
    print(json.dumps({'out': os.path.abspath(a.out), 'model_type': a.model_type, 'vocab_size': tok.vocab_size,
                      'held_out_docs': len(held_out), 'bytes_per_token': round(data.bytes_per_token(tok, held_out), 3),
                      'round_trips': all(tok.decode(tok.encode(t)) == t for t in held_out[:200])}))


if __name__ == '__main__':
  main()
