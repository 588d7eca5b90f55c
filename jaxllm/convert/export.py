"""A jaxllm run, or parameters in memory, as a Hugging Face transformers model folder.

Writes config.json (loads in transformers 4.4x and 5.x), generation_config.json,
model.safetensors (or model-0000x-of-0000y.safetensors plus model.safetensors.index.json above
`max_shard_bytes`) and, given the run's sentencepiece tokenizer, tokenizer.json and its
companions (`hf_tokenizer`). A run's checkpoint is read one stored parameter at a time and each
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

from jaxllm import checkpoint as checkpoint_lib
from jaxllm import model as model_lib
from jaxllm import rundir
from jaxllm.convert import UnsupportedError, check_out, hf, hf_tokenizer, replacing, safetensors_io

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


def write_tokenizer(model_proto: bytes, out: str, *, model_max_length: int) -> None:
  """tokenizer.json (encodes exactly as the sentencepiece model does), its configs and the
  sentencepiece model itself into the folder `out`."""
  for name, contents in hf_tokenizer.files(model_proto, model_max_length=model_max_length).items():
    if isinstance(contents, bytes):
      with replacing(os.path.join(out, name), 'wb') as f:
        f.write(contents)
    else:
      _write_json(os.path.join(out, name), contents)


def export(params: Mapping | Callable, model: Mapping[str, Any], out: str, *,
           dtype: str = 'float32', family: str | None = None, tokenizer=None,
           max_position_embeddings: int | None = None, bos_token_id: int | None = 1,
           eos_token_id: int | None = 2,
           max_shard_bytes: int = safetensors_io.MAX_SHARD_BYTES) -> None:
  """An HF model folder from a jaxllm `model` config section and its parameters: the params pure
  dict, or a function that reads one parameter by path (hf.to_hf). `tokenizer`: a jaxllm
  sentencepiece tokenizer to export beside the weights, or None."""
  if dtype not in hf.DTYPES:
    raise ValueError(f'--dtype={dtype!r}: choose one of {sorted(hf.DTYPES)}')
  # Everything that can be refused is refused before any file is written.
  config = hf.model_config_to_hf(model, family=family, dtype=dtype,
                                 max_position_embeddings=max_position_embeddings,
                                 bos_token_id=bos_token_id, eos_token_id=eos_token_id)
  proto = tokenizer_proto(tokenizer) if tokenizer is not None else None
  os.makedirs(out, exist_ok=True)
  for name in os.listdir(out):  # an earlier export's weights would shadow or mix with these
    if _EARLIER_WEIGHTS.fullmatch(name):
      os.remove(os.path.join(out, name))
  if proto is not None:  # first: a tokenizer that cannot convert fails before the weights
    write_tokenizer(proto, out, model_max_length=config['max_position_embeddings'])
  write_weights(params, model_lib.ModelConfig.from_section(model), out, dtype=dtype,
                max_shard_bytes=max_shard_bytes)
  _write_json(os.path.join(out, hf.CONFIG_FILE), config)
  _write_json(os.path.join(out, hf.GENERATION_CONFIG_FILE),
              hf.generation_config(bos_token_id=bos_token_id, eos_token_id=eos_token_id))


def export_run(workdir: str, out: str, *, step: int = -1, dtype: str = 'float32',
               family: str | None = None, max_position_embeddings: int | None = None,
               max_shard_bytes: int = safetensors_io.MAX_SHARD_BYTES,
               overwrite: bool = False) -> int:
  """`export` of a run's checkpoint at `step` (-1: the latest) and its tokenizer, if the run has
  one; returns the step. The model section is the one the checkpoint was saved with;
  max_position_embeddings defaults to that config's data.seq_len."""
  check_out(out, source=workdir, overwrite=overwrite)
  run = rundir.RunDir(workdir)
  config = run.load_config()
  ckpt, step = run.open_checkpoint(config, step)
  try:
    saved = ckpt.saved_config(step)  # the config the parameters were written with
    cfg = model_lib.ModelConfig.from_section(saved['model'])
    like = hf.abstract_params(cfg)
    checkpoint_lib.check_shapes(ckpt.params_metadata(step), like, where=ckpt.step_dir(step))
    read = lambda path: ckpt.read_param(step, path, hf.at_path(like, path))
    has_tokenizer = run.has_tokenizer(config)
    export(read, saved['model'], out, dtype=dtype, family=family,
           tokenizer=run.tokenizer(config) if has_tokenizer else None,
           max_position_embeddings=(max_position_embeddings
                                    or saved.get('data', {}).get('seq_len')),
           max_shard_bytes=max_shard_bytes)
  finally:
    ckpt.close()
  return step


def _write_json(path: str, obj) -> None:
  with replacing(path) as f:
    json.dump(obj, f, indent=2, ensure_ascii=False)
    f.write('\n')
