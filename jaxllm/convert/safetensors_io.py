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
from absl import logging

from jaxllm.convert import UnsupportedError, replacing

MAX_SHARD_BYTES = 5 * 10**9  # shard above this, as transformers does ('5GB')
SINGLE_FILE = 'model.safetensors'
INDEX_FILE = 'model.safetensors.index.json'
# numpy dtype -> the safetensors header's name for it.
_CODES = {np.dtype(np.float32): 'F32', np.dtype(ml_dtypes.bfloat16): 'BF16'}
# What an import reads: the floating dtypes HF checkpoints are saved in.
_DTYPES_BY_CODE = {'F32': np.dtype(np.float32), 'BF16': np.dtype(ml_dtypes.bfloat16),
                   'F16': np.dtype(np.float16), 'F64': np.dtype(np.float64)}


def check_weight_files(names: Iterable[str], where: str = 'the folder') -> list[str]:
  """The safetensors files among a model folder's file names. Pickled weights (`.bin`, `.pt`,
  `.pth`) are never read: unpickling runs arbitrary code."""
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
  raise UnsupportedError(f'{where} has no *.safetensors weights: pass the HF model folder')


def read_index(path: str) -> dict[str, str]:
  """The weight_map (tensor name -> file name) of a model.safetensors.index.json."""
  try:
    with open(path, encoding='utf-8') as f:
      weight_map = json.load(f)['weight_map']
  except (ValueError, KeyError, TypeError) as e:
    raise UnsupportedError(f'{path} is not a safetensors index ({type(e).__name__}: {e}): '
                           'download it again') from None
  if not (isinstance(weight_map, dict)
          and all(isinstance(v, str) for v in weight_map.values())):
    raise UnsupportedError(f'{path}: weight_map is not a map of tensor names to file names')
  return weight_map


def weight_files(folder: str) -> tuple[list[str], dict[str, str]]:
  """(the safetensors files of a model folder to read, the index's weight_map or {}), chosen as
  transformers chooses: model.safetensors, else the files model.safetensors.index.json names.
  Other safetensors files beside them (Mistral's consolidated.safetensors, a PEFT
  adapter_model.safetensors) hold another layout of the weights or no model at all: skipped,
  with a log line."""
  listing = os.listdir(folder)
  found = check_weight_files(listing, folder) if INDEX_FILE not in listing else []
  weight_map: dict[str, str] = {}
  if SINGLE_FILE in listing:
    chosen, by = [SINGLE_FILE], SINGLE_FILE
  elif INDEX_FILE in listing:
    weight_map = read_index(os.path.join(folder, INDEX_FILE))
    chosen, by = sorted(set(weight_map.values())), INDEX_FILE
    missing = [f for f in chosen if f not in listing]
    if missing:
      more = f' (and {len(missing) - 1} more)' if len(missing) > 1 else ''
      raise FileNotFoundError(f'{os.path.join(folder, missing[0])}{more}, named by {INDEX_FILE}, '
                              'is missing: download the model again')
  else:
    raise UnsupportedError(
        f'{folder} has {", ".join(found)} but neither {SINGLE_FILE} nor {INDEX_FILE}: jaxllm '
        'reads the transformers layout (what save_pretrained writes)')
  skipped = sorted(n for n in listing if n.endswith(('.safetensors', '.safetensors.index.json'))
                   and n not in chosen + [by])
  if skipped:
    logging.warning('%s: skipping %s (the weights are those of %s)', folder, ', '.join(skipped), by)
  return chosen, weight_map


def open_weights(folder: str) -> tuple[list[str], Callable[[str], np.ndarray]]:
  """(every tensor name in the folder's weight files, a reader of one tensor by name). Only the
  headers are read here; a tensor is read from its file when asked for, into an array of its
  own (no memory map: the pages of a map that was read stay resident, which would add the whole
  checkpoint to an import's peak memory). A tensor in two files is refused (which copy is the
  model's cannot be told), as is one the index names that no file holds."""
  files, weight_map = weight_files(folder)
  where: dict[str, tuple[str, dict]] = {}
  for file in files:
    path = os.path.join(folder, file)
    for name, entry in read_header(path).items():
      if name in where:
        raise UnsupportedError(f'tensor {name!r} is in both {where[name][0]} and {file} of '
                               f'{folder}: remove the file that is not part of the model')
      where[name] = (file, entry)
  lost = [(name, file) for name, file in weight_map.items() if name not in where]
  if lost:
    raise UnsupportedError(f'{INDEX_FILE} of {folder} places tensor {lost[0][0]!r} in '
                           f'{lost[0][1]}, which lacks it (and {len(lost) - 1} more): download '
                           'the model again')
  return list(where), lambda name: read_tensor(os.path.join(folder, where[name][0]),
                                               where[name][1])


def read_header(path: str) -> dict[str, dict]:
  """Tensor name -> {'dtype': numpy dtype, 'shape', 'start' (byte offset in the file), 'nbytes'}
  of a safetensors file, checked against the file's size (a truncated download is named)."""
  bad = lambda why: ValueError(f'{path} is not a whole safetensors file ({why}): download it '
                               'again')
  size = os.path.getsize(path)
  with open(path, 'rb') as f:
    head = f.read(8)
    if len(head) < 8:
      raise bad('shorter than its header')
    (length,) = struct.unpack('<Q', head)
    if length > min(size - 8, 100 << 20):
      raise bad(f'header of {length} bytes')
    try:
      header = json.loads(f.read(length))
    except ValueError as e:
      raise bad(f'header: {e}') from None
  if not isinstance(header, dict):
    raise bad('header is not a JSON object')
  header.pop('__metadata__', None)
  out = {}
  for name, entry in header.items():
    try:
      dtype = _DTYPES_BY_CODE[entry['dtype']]
      shape, (begin, end) = tuple(int(n) for n in entry['shape']), entry['data_offsets']
    except KeyError as e:
      raise UnsupportedError(f'{path}: tensor {name!r} has dtype or field {e} that jaxllm does '
                             f'not read (it reads {sorted(_DTYPES_BY_CODE)})') from None
    except (TypeError, ValueError):
      raise bad(f'entry of tensor {name!r}') from None
    if end - begin != math.prod(shape) * dtype.itemsize or not 0 <= begin <= end:
      raise bad(f'tensor {name!r}: offsets {begin}..{end} for shape {list(shape)}')
    if 8 + length + end > size:
      raise bad(f'tensor {name!r} ends past the end of the file')
    out[name] = {'dtype': dtype, 'shape': shape, 'start': 8 + length + begin,
                 'nbytes': end - begin}
  return out


def read_tensor(path: str, entry: dict) -> np.ndarray:
  """One tensor of `read_header`'s table, read from `path` into a new array."""
  out = np.empty(entry['shape'], entry['dtype'])
  with open(path, 'rb') as f:
    f.seek(entry['start'])
    got = f.readinto(out.reshape(-1).view(np.uint8))
  if got != entry['nbytes']:
    raise ValueError(f'{path} ends inside a tensor: download it again')
  return out


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
  with replacing(path, 'wb') as f:
    f.write(struct.pack('<Q', len(blob)) + blob)
    for name, shape in layout:
      got_name, x = next(tensors)
      assert got_name == name and x.shape == tuple(shape), (got_name, name, x.shape, shape)
      f.write(np.ascontiguousarray(x, dtype).reshape(-1).view(np.uint8).data)  # no copy


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
    with replacing(os.path.join(folder, INDEX_FILE)) as f:
      json.dump(shard_index(shards, sum(b for _, b in sizes)), f, indent=2)
  return files
