"""safetensors files of an HF model folder: which to read, reading by name, streaming writing,
and the plan of shards and their index (transformers' names and layout).

Knows nothing of jaxllm models: tensors are numpy arrays, named and shaped by the caller.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import ml_dtypes
import numpy as np

from jaxllm.convert import UnsupportedError

MAX_SHARD_BYTES = 5 * 10**9  # shard above this, as transformers does ('5GB')
SINGLE_FILE = 'model.safetensors'
INDEX_FILE = 'model.safetensors.index.json'
# numpy dtype -> the safetensors header's name for it.
_CODES = {np.dtype(np.float32): 'F32', np.dtype(ml_dtypes.bfloat16): 'BF16'}


def check_weight_files(names: Iterable[str]) -> list[str]:
  """The safetensors files to read among a model folder's file names. Pickled weights (`.bin`,
  `.pt`, `.pth`) are never read: unpickling runs arbitrary code."""
  names = sorted(names)
  found = [n for n in names if n.endswith('.safetensors')]
  if found:
    return found
  pickles = [n for n in names if n.endswith(('.bin', '.pt', '.pth', '.ckpt'))]
  if pickles:
    raise UnsupportedError(
        f'{pickles[0]} is a pickled PyTorch checkpoint: refused, since unpickling runs arbitrary '
        'code. Convert it to safetensors first from a trusted environment (transformers: '
        'model.save_pretrained(dir, safe_serialization=True)).')
  raise UnsupportedError('no *.safetensors weights found')


def open_weights(folder: str) -> tuple[list[str], Callable[[str], np.ndarray]]:
  """(every tensor name in the folder's safetensors files, a reader of one tensor by name).
  The files are memory-mapped: a tensor is read when asked for."""
  from safetensors import safe_open  # the `hf` extra
  files = check_weight_files(os.listdir(folder))
  handles = [safe_open(os.path.join(folder, f), framework='numpy') for f in files]
  where = {name: h for h in handles for name in h.keys()}
  return list(where), lambda name: where[name].get_tensor(name)


def shard_plan(sizes: Iterable[tuple[str, int]], max_shard_bytes: int = MAX_SHARD_BYTES
               ) -> list[list[str]]:
  """Tensor names grouped in order into shards of at most `max_shard_bytes` (a bigger tensor
  gets a shard of its own)."""
  shards: list[list[str]] = [[]]
  used = 0
  for name, nbytes in sizes:
    if shards[-1] and used + nbytes > max_shard_bytes:
      shards.append([])
      used = 0
    shards[-1].append(name)
    used += nbytes
  return shards


def shard_file_names(n: int) -> list[str]:
  if n == 1:
    return [SINGLE_FILE]
  return [f'model-{i + 1:05d}-of-{n:05d}.safetensors' for i in range(n)]


def shard_index(shards: list[list[str]], total_bytes: int) -> dict:
  """model.safetensors.index.json for a sharded checkpoint."""
  files = shard_file_names(len(shards))
  return {'metadata': {'total_size': total_bytes},
          'weight_map': {name: f for f, names in zip(files, shards) for name in names}}


def write_file(path: str, tensors: Iterator[tuple[str, np.ndarray]],
               layout: list[tuple[str, tuple[int, ...]]], dtype: np.dtype) -> None:
  """Streams `tensors` (in `layout` order) into one safetensors file: the header is written from
  the shapes first, then each tensor's bytes as it arrives, so only one is held at a time."""
  dtype = np.dtype(dtype)
  header: dict[str, Any] = {'__metadata__': {'format': 'pt'}}
  offset = 0
  for name, shape in layout:
    nbytes = math.prod(shape) * dtype.itemsize
    header[name] = {'dtype': _CODES[dtype], 'shape': list(shape),
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
      f.write(np.ascontiguousarray(x, dtype).reshape(-1).view(np.uint8).data)  # no copy
  os.replace(tmp, path)


def write_folder(folder: str, tensors: Iterator[tuple[str, np.ndarray]],
                 layout: list[tuple[str, tuple[int, ...]]], dtype: np.dtype, *,
                 max_shard_bytes: int = MAX_SHARD_BYTES) -> list[str]:
  """`tensors` (in `layout` order) as model.safetensors, or as shards of at most
  `max_shard_bytes` plus their index; returns the weight file names."""
  itemsize = np.dtype(dtype).itemsize
  sizes = [(name, math.prod(shape) * itemsize) for name, shape in layout]
  shards = shard_plan(sizes, max_shard_bytes)
  files = shard_file_names(len(shards))
  shapes = dict(layout)
  for file, names in zip(files, shards):
    write_file(os.path.join(folder, file), tensors, [(n, shapes[n]) for n in names], dtype)
  if len(shards) > 1:
    with open(os.path.join(folder, INDEX_FILE), 'w') as f:
      json.dump(shard_index(shards, sum(b for _, b in sizes)), f, indent=2)
  return files
