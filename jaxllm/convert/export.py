"""A jaxllm run, or parameters in memory, as a Hugging Face transformers model folder.

Writes config.json (loads in transformers 4.4x and 5.x), generation_config.json,
model.safetensors (or model-0000x-of-0000y.safetensors plus model.safetensors.index.json above
`max_shard_bytes`) and the run's tokenizer: an HF tokenizer folder (an imported model's own,
data.tokenizer) is copied, with its generation_config.json, so the model goes back with its own
tokenizer, special tokens and chat template; a sentencepiece model trained here becomes
tokenizer.json and its companions (`hf_tokenizer`) with jaxllm's default chat template. A chat
template configured for the run (data.chat_template) replaces the tokenizer's own in
tokenizer_config.json, since that is the one it was fine-tuned on. A run's checkpoint is read one stored parameter at a time and each
tensor converted and written as it comes, so the export never holds the whole model
(docs/benchmarks.md).

Imports six jaxllm modules: it is the conversion's wiring (the run directory and its checkpoint
on one side; the key table, the safetensors writer and the tokenizer files on the other).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Mapping
from typing import Any

import ml_collections

from jaxllm import checkpoint as checkpoint_lib
from jaxllm import model as model_lib
from jaxllm import rundir
from jaxllm.convert import UnsupportedError, check_out, hf, hf_tokenizer, peft, replacing, safetensors_io

# An earlier export's weight files, and the temp files of one interrupted (of any shard count).
_EARLIER_WEIGHTS = re.compile(r'model.*\.safetensors(\.index\.json)?(\.tmp\d*)?')


def write_weights(params: Mapping | Callable, cfg: model_lib.ModelConfig, out: str, *,
                  dtype: str, max_shard_bytes: int = safetensors_io.MAX_SHARD_BYTES) -> list[str]:
  """The safetensors file(s) and, when sharded, the index; returns the weight file names."""
  layout = [(s.hf_name, s.hf_shape) for s in hf.export_order(cfg)]  # the order to_hf yields
  return safetensors_io.write_folder(out, hf.to_hf(params, cfg, dtype=dtype), layout,
                                     hf.DTYPES[dtype], max_shard_bytes=max_shard_bytes)


def tokenizer_proto(tokenizer) -> bytes:
  """The serialized sentencepiece model of a jaxllm tokenizer (the only kind that exports)."""
  if not hasattr(tokenizer, 'model_proto'):
    raise UnsupportedError(f'tokenizer {tokenizer.path}: only a sentencepiece model exports to '
                           'tokenizer.json')
  return tokenizer.model_proto()


def write_tokenizer(model_proto: bytes, out: str, *, model_max_length: int,
                    chat_template: str | None = None) -> None:
  """tokenizer.json (encodes exactly as the sentencepiece model does), its configs (with
  `chat_template`, jaxllm's default if None) and the sentencepiece model itself into `out`."""
  contents = hf_tokenizer.files(model_proto, model_max_length=model_max_length,
                                chat_template=chat_template)
  _remove_tokenizer_files(out, keep=contents)
  for name, value in contents.items():
    if isinstance(value, bytes):
      with replacing(os.path.join(out, name), 'wb') as f:
        f.write(value)
    else:
      _write_json(os.path.join(out, name), value)


def copy_tokenizer(folder: str, out: str, *, chat_template: str | None = None) -> None:
  """An HF tokenizer `folder`'s files (hf_tokenizer.TOKENIZER_FILES present, and
  generation_config.json) into `out`; `chat_template`, if given, replaces the folder's own
  template (tokenizer_config.json's, and chat_template.jinja, which transformers would prefer)."""
  names = [n for n in (*hf_tokenizer.TOKENIZER_FILES, hf.GENERATION_CONFIG_FILE)
           if os.path.isfile(os.path.join(folder, n))]
  if chat_template is not None:
    names = [n for n in names if n not in (hf_tokenizer.CHAT_TEMPLATE_FILE,
                                           hf_tokenizer.TOKENIZER_CONFIG)]
  _remove_tokenizer_files(out, keep=names)
  for name in names:
    with open(os.path.join(folder, name), 'rb') as src, \
        replacing(os.path.join(out, name), 'wb') as dst:
      dst.write(src.read())
  if chat_template is not None:
    config = hf_tokenizer.read_json(os.path.join(folder, hf_tokenizer.TOKENIZER_CONFIG))
    _write_json(os.path.join(out, hf_tokenizer.TOKENIZER_CONFIG),
                hf_tokenizer.with_chat_template(config, chat_template))


def _remove_tokenizer_files(out: str, *, keep) -> None:
  """An earlier export's tokenizer files that this one does not write (a stale
  chat_template.jinja would override the template in tokenizer_config.json)."""
  for name in (*hf_tokenizer.TOKENIZER_FILES, hf.GENERATION_CONFIG_FILE):
    if name not in keep and os.path.isfile(os.path.join(out, name)):
      os.remove(os.path.join(out, name))


def export(params: Mapping | Callable, model: Mapping[str, Any], out: str, *,
           dtype: str = 'float32', family: str | None = None, tokenizer=None,
           tokenizer_folder: str | None = None, chat_template: str | None = None,
           max_position_embeddings: int | None = None, bos_token_id: int | None = 1,
           eos_token_id: int | list[int] | None = 2,
           max_shard_bytes: int = safetensors_io.MAX_SHARD_BYTES) -> None:
  """An HF model folder from a jaxllm `model` config section and its parameters: the params pure
  dict, or a function that reads one parameter by path (hf.to_hf). The tokenizer: `tokenizer`,
  a jaxllm sentencepiece tokenizer to convert, or `tokenizer_folder`, an HF tokenizer to copy
  (its BOS/EOS ids, and generation_config.json's if it has one, replace `bos_token_id` and
  `eos_token_id`), or neither; `chat_template` replaces its template."""
  if dtype not in hf.DTYPES:
    raise ValueError(f'--dtype={dtype!r}: choose one of {sorted(hf.DTYPES)}')
  generation = hf.generation_config(bos_token_id=bos_token_id, eos_token_id=eos_token_id)
  if tokenizer_folder is not None:
    saved = hf_tokenizer.read_json(os.path.join(tokenizer_folder, hf.GENERATION_CONFIG_FILE))
    generation = hf_tokenizer.special_token_ids(tokenizer_folder) | (saved or {})
  # Everything that can be refused is refused before any file is written.
  config = hf.model_config_to_hf(model, family=family, dtype=dtype,
                                 max_position_embeddings=max_position_embeddings,
                                 bos_token_id=generation.get('bos_token_id'),
                                 eos_token_id=generation.get('eos_token_id'))
  proto = tokenizer_proto(tokenizer) if tokenizer is not None else None
  os.makedirs(out, exist_ok=True)
  for name in os.listdir(out):  # an earlier export's weights would shadow or mix with these
    if _EARLIER_WEIGHTS.fullmatch(name):
      os.remove(os.path.join(out, name))
  if proto is not None:  # first: a tokenizer that cannot convert fails before the weights
    write_tokenizer(proto, out, model_max_length=config['max_position_embeddings'],
                    chat_template=chat_template)
  elif tokenizer_folder is not None:
    copy_tokenizer(tokenizer_folder, out, chat_template=chat_template)
  write_weights(params, model_lib.ModelConfig.from_section(model), out, dtype=dtype,
                max_shard_bytes=max_shard_bytes)
  _write_json(os.path.join(out, hf.CONFIG_FILE), config)
  if tokenizer_folder is None or hf.GENERATION_CONFIG_FILE not in os.listdir(tokenizer_folder):
    _write_json(os.path.join(out, hf.GENERATION_CONFIG_FILE),
                hf.generation_config(bos_token_id=config['bos_token_id'],
                                     eos_token_id=config['eos_token_id']))


def export_run(workdir: str, out: str, *, step: int = -1, dtype: str = 'float32',
               family: str | None = None, max_position_embeddings: int | None = None,
               max_shard_bytes: int = safetensors_io.MAX_SHARD_BYTES,
               overwrite: bool = False) -> int:
  """`export` of a run's checkpoint at `step` (-1: the latest) and its tokenizer, if the run has
  one (an HF tokenizer folder or a sentencepiece model, data.tokenizer), with data.chat_template
  if set; returns the step. The model section is the one the checkpoint was saved with;
  max_position_embeddings defaults to `context_length`."""
  check_out(out, source=workdir, overwrite=overwrite)
  run = rundir.RunDir(workdir)
  config = run.load_config()
  # Before the read: a missing template file is refused first.
  template = hf_tokenizer.read_chat_template(config.data.chat_template)
  ckpt, step = run.open_checkpoint(config, step)
  closing = [ckpt]
  try:
    saved = ckpt.saved_config(step)  # the config the parameters were written with
    cfg = model_lib.ModelConfig.from_section(saved['model'])
    like = hf.abstract_params(cfg)
    if config.lora.rank:  # a LoRA run: its base with the adapters merged in
      ref = ckpt.saved_meta(step).get('base') or {}
      read, base = peft.merged_reader(ckpt, step, saved['model'], like, ref, config.lora)
      closing.append(base)
    else:
      checkpoint_lib.check_shapes(ckpt.params_metadata(step), like, where=ckpt.step_dir(step))
      read = lambda path: ckpt.read_param(step, path, hf.at_path(like, path))
    path = run.tokenizer_path(config)
    folder = path if os.path.isfile(os.path.join(path, hf_tokenizer.TOKENIZER_JSON)) else None
    sentencepiece = (run.tokenizer(config) if folder is None and run.has_tokenizer(config)
                     else None)
    export(read, saved['model'], out, dtype=dtype, family=family, tokenizer=sentencepiece,
           tokenizer_folder=folder, chat_template=template,
           max_position_embeddings=max_position_embeddings or context_length(config, saved),
           **({} if sentencepiece is None else dict(bos_token_id=sentencepiece.bos_id,
                                                    eos_token_id=sentencepiece.eos_id)),
           max_shard_bytes=max_shard_bytes)
  finally:
    for c in closing:
      c.close()
  return step


def context_length(config: ml_collections.ConfigDict, saved: Mapping[str, Any]) -> int | None:
  """The model's context length, as jaxllm keeps it: data.seq_len of the config the parameters
  were saved with, or of checkpoint.init_from's (an import saves the HF model's
  max_position_embeddings there; a fine-tune trains shorter rows), whichever is larger."""
  lengths = [saved.get('data', {}).get('seq_len')]
  if config.checkpoint.init_from:
    try:
      source, step = checkpoint_lib.open_for_init(config.checkpoint.init_from,
                                                  config.checkpoint.init_from_step)
    except checkpoint_lib.CheckpointError:
      pass  # moved or deleted since: the run's own seq_len
    else:
      try:
        lengths.append(source.saved_config(step).get('data', {}).get('seq_len'))
      finally:
        source.close()
  return max((n for n in lengths if n), default=None)


def _write_json(path: str, obj) -> None:
  with replacing(path) as f:
    json.dump(obj, f, indent=2, ensure_ascii=False)
    f.write('\n')
