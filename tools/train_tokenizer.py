"""Trains a sentencepiece model on a run's data sources; reports its compression on held-out text.

    python tools/train_tokenizer.py --config=configs/7b.py --workdir=runs/7b \
        --config.data.sources='/data/web/*.jsonl' --config.data.eval_source=/data/heldout \
        --config.data.tokenizer=/data/spm.model --model_type=unigram

The data keys come from the config as training reads them: `data.sources` (or `data.source_dir`,
or the embedded corpus), `data.text_field`, `data.tfds_data_dir`, the held-out text
(`data.eval_source`, or `data.eval_files` whole files of the first source, never seen by the
trainer), `model.vocab_size` pieces. The model is written where the run will look for it,
`data.tokenizer` (default WORKDIR/tokenizer.model), and never over an existing one; the datasets
are built under `data.cache_dir` (default WORKDIR/data), where training finds them. Defaults:
identity normalization (lossless), byte fallback, digits split, unk=0, bos=1, eos=2, no pad.
Prints one JSON line with the held-out bytes per token.
"""

import json
import os

from absl import app, flags
from ml_collections import config_flags

from jaxllm import cli, data, documents, rundir, sources

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file of the run.',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'The run directory that training will use.')
_MODEL_TYPE = flags.DEFINE_enum('model_type', 'bpe', ['bpe', 'unigram'], 'sentencepiece type.')
_BYTE_FALLBACK = flags.DEFINE_bool('byte_fallback', True, 'Unknown characters as byte pieces.')
_SPECIAL_TOKENS = flags.DEFINE_list('special_tokens', [], 'Pieces kept whole, e.g. <tool>,</tool>.')
_NORMALIZATION = flags.DEFINE_string('normalization', 'identity',
                                     "sentencepiece rule, e.g. 'nmt_nfkc' (lossy).")
_MAX_DOCS = flags.DEFINE_integer('max_docs', data.TOKENIZER_DOCS, 'Train documents sampled.')
_EVAL_DOCS = flags.DEFINE_integer('eval_docs', 2000, 'Held-out documents for bytes per token.')
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  config, run = _CONFIG.value, rundir.RunDir(_WORKDIR.value)
  d, out = config.data, run.tokenizer_path(config)
  if os.path.exists(out):
    # The run's checkpoints and token caches belong to the tokenizer already there.
    raise FileExistsError(f'{out} exists: delete it, or set --config.data.tokenizer to a new path')
  # As data.make_pipeline resolves them: sources, else source_dir, else the embedded corpus.
  specs = sources.resolve_specs(d.sources, d.source_dir or None)
  found = documents.open_sources(specs, cache_dir=run.data_cache(config), eval_files=d.eval_files,
                               eval_source=d.eval_source, text_field=d.text_field,
                               tfds_data_dir=d.tfds_data_dir or None,
                               skip_bad_records=d.skip_bad_records, eval_fraction=d.eval_fraction)
  data.train_tokenizer(out, data.tokenizer_sample(found, _MAX_DOCS.value), config.model.vocab_size,
                       model_type=_MODEL_TYPE.value, byte_fallback=_BYTE_FALLBACK.value,
                       normalization=_NORMALIZATION.value,
                       user_defined_symbols=_SPECIAL_TOKENS.value)
  ev = found.eval
  held_out = [ev.text(i) for i in range(0, len(ev), max(1, len(ev) // _EVAL_DOCS.value))]
  tok = run.tokenizer(config)  # the model just written, as the run will open it
  print(json.dumps({
      'out': os.path.abspath(out), 'model_type': _MODEL_TYPE.value, 'vocab_size': tok.vocab_size,
      'held_out_docs': len(held_out),
      'bytes_per_token': round(data.bytes_per_token(tok, held_out), 3),
      'round_trips': all(tok.decode(tok.encode(t)) == t for t in held_out[:200])}))


if __name__ == '__main__':
  cli.run(main)
