"""Export a jaxllm checkpoint as a Hugging Face transformers model directory.

    python tools/convert_to_hf.py --workdir=runs/tiny --out=/tmp/hf [--step=N] [--dtype=bfloat16]

Writes config.json (loads in transformers 4.4x and 5.x), generation_config.json, model.safetensors
(or model-0000x-of-0000y.safetensors plus model.safetensors.index.json above --max_shard_gb) and
the tokenizer: tokenizer.json and tokenizer_config.json for AutoTokenizer, which encode exactly as
the run's sentencepiece tokenizer.model (copied beside them) does. Tensors are converted and
written one at a time. The mapping is jaxllm/convert/hf.py; this file only reads and writes.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np

from jaxllm import model as model_lib
from jaxllm.convert import hf

_SAFETENSORS_DTYPES = {'float32': 'F32', 'bfloat16': 'BF16'}


def write_safetensors(path: str, tensors: Iterator[tuple[str, np.ndarray]],
                      layout: list[tuple[str, tuple[int, ...]]], dtype: str) -> None:
  """Streams `tensors` (in `layout` order) into one safetensors file: the header is written from
  the shapes first, then each tensor's bytes as it arrives, so only one is held at a time."""
  itemsize = hf.DTYPES[dtype].itemsize
  header: dict[str, Any] = {'__metadata__': {'format': 'pt'}}
  offset = 0
  for name, shape in layout:
    nbytes = int(np.prod(shape)) * itemsize
    header[name] = {'dtype': _SAFETENSORS_DTYPES[dtype], 'shape': list(shape),
                    'data_offsets': [offset, offset + nbytes]}
    offset += nbytes
  blob = json.dumps(header, separators=(',', ':')).encode()
  blob += b' ' * (-len(blob) % 8)  # the data starts 8-byte aligned, as safetensors writes it
  tmp = path + '.tmp'
  with open(tmp, 'wb') as f:
    f.write(struct.pack('<Q', len(blob)) + blob)
    for name, shape in layout:
      got_name, x = next(tensors)
      assert got_name == name and x.shape == tuple(shape), (got_name, name, x.shape, shape)
      f.write(np.ascontiguousarray(x, hf.DTYPES[dtype]).reshape(-1).view(np.uint8).data)  # no copy
  os.replace(tmp, path)


def write_weights(params: Mapping | Callable, model: Mapping[str, Any], out: str, *, dtype: str,
                  max_shard_bytes: int = hf.MAX_SHARD_BYTES) -> list[str]:
  """The safetensors file(s) and, when sharded, the index; returns the file names."""
  cfg = model_lib.ModelConfig.from_section(model)
  shapes = {s.hf_name: s.hf_shape for s in hf.export_order(cfg)}  # the order to_hf yields
  itemsize = hf.DTYPES[dtype].itemsize
  sizes = [(n, int(np.prod(s)) * itemsize) for n, s in shapes.items()]
  shards = hf.shard_plan(sizes, max_shard_bytes)
  files = hf.shard_file_names(len(shards))
  tensors = hf.to_hf(params, cfg, dtype=dtype)
  for file, names in zip(files, shards):
    write_safetensors(os.path.join(out, file), tensors, [(n, shapes[n]) for n in names], dtype)
  if len(shards) > 1:
    _write_json(os.path.join(out, 'model.safetensors.index.json'),
                hf.shard_index(shards, sum(b for _, b in sizes)))
  return files


def write_tokenizer(tokenizer_model: str, out: str, *, model_max_length: int) -> None:
  """tokenizer.json, which AutoTokenizer runs and which encodes exactly as the sentencepiece model
  does, with its tokenizer_config.json; tokenizer.model goes beside them for sentencepiece users."""
  import sentencepiece as spm  # jaxllm's own tokenizer dependency
  sp = spm.SentencePieceProcessor(model_file=tokenizer_model)
  shutil.copyfile(tokenizer_model, os.path.join(out, 'tokenizer.model'))
  piece = lambda i: sp.id_to_piece(i) if i >= 0 else None
  specials = dict(bos=piece(sp.bos_id()), eos=piece(sp.eos_id()), unk=piece(sp.unk_id()))
  _write_json(os.path.join(out, 'tokenizer.json'),
              hf.tokenizer_json(sp.serialized_model_proto()))
  _write_json(os.path.join(out, 'tokenizer_config.json'),
              hf.tokenizer_config(**specials, model_max_length=model_max_length))
  _write_json(os.path.join(out, 'special_tokens_map.json'),
              {f'{k}_token': v for k, v in specials.items() if v is not None})


def export(params: Mapping | Callable, model: Mapping[str, Any], out: str, *, dtype: str = 'float32',
           family: str | None = None, tokenizer_model: str | None = None,
           max_position_embeddings: int | None = None, bos_token_id: int | None = 1,
           eos_token_id: int | None = 2, max_shard_bytes: int = hf.MAX_SHARD_BYTES) -> None:
  """An HF model directory from a jaxllm `model` config section and its parameters: a pure dict,
  or a function that reads one parameter by path (hf.to_hf)."""
  if dtype not in hf.DTYPES:
    raise ValueError(f'--dtype={dtype!r}: choose one of {sorted(hf.DTYPES)}')
  # Validate the config before writing anything.
  config = hf.model_config_to_hf(model, family=family, dtype=dtype,
                                 max_position_embeddings=max_position_embeddings,
                                 bos_token_id=bos_token_id, eos_token_id=eos_token_id)
  os.makedirs(out, exist_ok=True)
  if tokenizer_model:  # first: a tokenizer that cannot convert fails before the weights
    write_tokenizer(tokenizer_model, out, model_max_length=config['max_position_embeddings'])
  write_weights(params, model, out, dtype=dtype, max_shard_bytes=max_shard_bytes)
  _write_json(os.path.join(out, 'config.json'), config)
  _write_json(os.path.join(out, 'generation_config.json'),
              hf.generation_config(bos_token_id=bos_token_id, eos_token_id=eos_token_id))


def _write_json(path: str, obj) -> None:
  with open(path, 'w', encoding='utf-8') as f:
    json.dump(obj, f, indent=2, ensure_ascii=False)
    f.write('\n')


def load_checkpoint(workdir: str, step: int = -1) -> tuple[Callable, dict, int]:
  """(a reader of one parameter by path, the run's resolved config dict, step) for a checkpoint
  in <workdir>/checkpoints. The reader loads only the parameter asked for, as a host array, so
  the export holds one parameter at a time, never the whole model (docs/benchmarks.md)."""
  import jax
  from jaxllm import checkpoint as checkpoint_lib
  with open(os.path.join(workdir, 'config.json')) as f:
    config = json.load(f)
  directory = config.get('checkpoint', {}).get('dir') or os.path.join(workdir, 'checkpoints')
  ckpt, step = checkpoint_lib.open_for_init(directory, step)
  try:
    config = ckpt.saved_config(step)  # the config the parameters were written with
    cfg = model_lib.ModelConfig.from_section(config['model'])
    like = {path: jax.ShapeDtypeStruct(shape, jax.numpy.dtype(cfg.param_dtype))
            for path, shape in hf.param_shapes(cfg).items()}
    checkpoint_lib.check_shapes(ckpt.params_metadata(step), _nest(like),
                                where=ckpt.step_dir(step))
  finally:
    ckpt.close()
  return lambda path: ckpt.read_param(step, path, like[path]), config, step


def _nest(flat: Mapping[tuple[str, ...], Any]) -> dict:
  out: dict = {}
  for path, leaf in flat.items():
    node = out
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = leaf
  return out


def main(argv) -> None:
  del argv
  params, config, step = load_checkpoint(FLAGS.workdir, FLAGS.step)
  tokenizer = config.get('data', {}).get('tokenizer') or os.path.join(FLAGS.workdir,
                                                                       'tokenizer.model')
  seq_len = config.get('data', {}).get('seq_len')
  export(params, config['model'], FLAGS.out, dtype=FLAGS.dtype, family=FLAGS.family or None,
         tokenizer_model=tokenizer if os.path.exists(tokenizer) else None,
         max_position_embeddings=FLAGS.max_position_embeddings or seq_len,
         max_shard_bytes=int(FLAGS.max_shard_gb * 10**9))
  print(f'wrote {FLAGS.out} from step {step} of {FLAGS.workdir} ({FLAGS.dtype})')


if __name__ == '__main__':
  from absl import app, flags
  flags.DEFINE_string('workdir', None, 'the jaxllm run directory (its checkpoints and config.json)')
  flags.DEFINE_integer('step', -1, 'checkpoint step to export; -1 = the latest')
  flags.DEFINE_string('out', None, 'the HF model directory to write')
  flags.DEFINE_enum('dtype', 'float32', sorted(hf.DTYPES), 'dtype of the exported tensors')
  flags.DEFINE_string('family', '', f'HF family to write, one of {sorted(hf.FAMILIES)}; '
                      "'' = the plainest one that expresses the model")
  flags.DEFINE_integer('max_position_embeddings', 0, "config.json's value; 0 = data.seq_len")
  flags.DEFINE_float('max_shard_gb', 5.0, 'safetensors shard size limit, GB (10^9 bytes)')
  flags.mark_flags_as_required(['workdir', 'out'])
  FLAGS = flags.FLAGS
  app.run(main)
