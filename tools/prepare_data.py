"""Builds the datasets, the tokenizer and the token-id cache once, so training does no text work.

    python tools/prepare_data.py --config=configs/7b.py --workdir=runs/7b \
        --config.data.sources='/data/web/*.jsonl@0.8,/data/books@0.2' \
        --config.data.eval_source=/data/heldout --config.data.tokenizer=/data/spm.model

Every data key comes from the config (and its `--config.data.X=` overrides), read as the training
run reads it: the same datasets under `data.cache_dir` (default WORKDIR/data), the same tokenizer
(`data.tokenizer`, default WORKDIR/tokenizer.model, trained on first use with `model.vocab_size`
pieces). Then train with the same config, workdir and `--config.data.pretokenize=true`: the
pipeline finds the cache (keyed by the source's content and the tokenizer's bytes) and reads only
token ids. Prints one JSON line per cache: its path, documents, tokens and UTF-8 bytes.
"""

import json

from absl import app, flags
from ml_collections import config_flags

from jaxllm import cli, train

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file of the run to prepare.',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'The run directory that training will use.')
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  config = _CONFIG.value
  config.data.pretokenize = True  # building the token caches is what this tool is for
  # seq_len and the batch size do not enter the cache: any will do.
  pipe = train.make_pipeline(config, _WORKDIR.value, batch_size=1)
  for split, cache in [('train', c) for c in pipe.caches] + [('eval', pipe.eval_cache)]:
    print(json.dumps({'split': split, 'path': str(cache.path), **cache.meta}))
  if pipe.skipped:
    print(json.dumps({'skipped': pipe.skipped}))


if __name__ == '__main__':
  cli.run(main)
