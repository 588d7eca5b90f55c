"""A Hugging Face model folder (safetensors only) as a jaxllm run directory to fine-tune from.

Writes, through `rundir.RunDir(out)`: the checkpoint at step 0 (parameters and config, the layout
`checkpoint.init_from` reads), config.json (the jaxllm `model` section, data.tokenizer and the
model's context length as data.seq_len, so the export and the evaluation CLIs reopen it as a run)
and config.py, a fine-tuning config (`FINE_TUNE`, the model section, checkpoint.init_from and
the tokenizer). Pickled `.bin` weights are refused: unpickling runs code.

The tokenizer comes along, never a new one: the folder's tokenizer.json with its companions
(`hf_tokenizer.TOKENIZER_FILES`, and generation_config.json, which the export writes back)
copied into `tokenizer_dir(run)`, which data.tokenizer names (Llama 3, Qwen, Mistral); else its
sentencepiece tokenizer.model, copied to the run's tokenizer path; else `tokenizer=` (the
`--tokenizer` flag) names one elsewhere. None of those is an error before anything is read.

Memory: the parameters are filled tensor by tensor (`hf.from_hf`; the files are read, not
memory-mapped) and written by Orbax from those numpy arrays without a copy and uncompressed
(`write_checkpoint`), so the import holds the output parameters plus about one tensor
(docs/benchmarks.md).

Imports six jaxllm modules: it is the conversion's wiring (the key table and the safetensors
reader on one side; the checkpointer and the run directory on the other).
"""

from __future__ import annotations

import json
import os
import pprint
import shutil
from typing import Any

import numpy as np

from jaxllm import model as model_lib
from jaxllm import rundir
from jaxllm.convert import check_out, hf, hf_tokenizer, replacing, safetensors_io

# The fine-tuning settings of the generated config.py, over base_config(). Chosen to be what users
# of TRL's SFTTrainer and torchtune's full fine-tune recipes expect: AdamW at 2e-5 with
# beta2 0.999 (both use PyTorch's default), no weight decay (TRL's and transformers' Trainer
# default: the pretrained weights are not pulled towards 0), a short warmup (about 3% of
# train.num_steps' 300), gradient norm clipped at 1.0 (as base).
FINE_TUNE = {
    'optim.peak_lr': 2e-5, 'optim.warmup_steps': 10, 'optim.weight_decay': 0.0,
    'optim.b2': 0.999,
}
MAX_SEQ_LEN = 2048  # data.seq_len of the generated config: the model's context length, capped


def tokenizer_dir(run: rundir.RunDir) -> str:
  """Where an import puts an HF tokenizer: beside the run's sentencepiece tokenizer path, with
  its name less the extension (<workdir>/tokenizer/)."""
  return os.path.splitext(run.tokenizer_path())[0]


_JSON, _MODEL = hf_tokenizer.TOKENIZER_JSON, hf_tokenizer.TOKENIZER_MODEL


def find_tokenizer(hf_dir: str, tokenizer: str | None = None) -> str:
  """The tokenizer to carry: `tokenizer` if given (a folder with tokenizer.json, or a
  sentencepiece .model), else `hf_dir` if it has tokenizer.json, else its sentencepiece
  tokenizer.model. Raises naming the folder and the --tokenizer flag when there is none."""
  if tokenizer:
    if os.path.isfile(os.path.join(tokenizer, _JSON)):
      return tokenizer
    if os.path.isfile(tokenizer) and _is_sentencepiece(tokenizer):
      return tokenizer
    raise FileNotFoundError(f'--tokenizer={tokenizer} is neither a folder with {_JSON} nor a '
                            'sentencepiece .model file: pass the tokenizer the model was '
                            'trained with')
  if os.path.isfile(os.path.join(hf_dir, _JSON)):
    return hf_dir
  model = os.path.join(hf_dir, _MODEL)
  if os.path.isfile(model) and _is_sentencepiece(model):
    return model
  raise FileNotFoundError(f'{hf_dir} has no {_JSON} and no sentencepiece {_MODEL}: pass '
                          f'--tokenizer=PATH, a folder with the {_JSON} the model was trained '
                          'with (its Hub repo) or its sentencepiece .model')


def _is_sentencepiece(path: str) -> bool:
  with open(path, 'rb') as f:  # Llama 3's original/tokenizer.model is tiktoken's text instead
    return hf_tokenizer.is_sentencepiece(f.read())


def read_hf_config(hf_dir: str) -> dict[str, Any]:
  """The folder's config.json as a dict."""
  path = os.path.join(hf_dir, hf.CONFIG_FILE)
  if not os.path.isfile(path):
    raise FileNotFoundError(f'{hf_dir} has no {hf.CONFIG_FILE}: pass a Hugging Face model folder '
                            '(config.json and *.safetensors)')
  with open(path, encoding='utf-8') as f:
    try:
      return json.load(f)
    except json.JSONDecodeError as e:
      raise ValueError(f'{path} is not valid JSON ({e}): download it again') from None


def open_hf(hf_dir: str, *, dtype: str = 'float32'
            ) -> tuple[dict[str, Any], dict[str, Any], list[str], Any]:
  """(config.json, jaxllm `model` section in `dtype`, tensor names, reader of one tensor) of an
  HF model folder; only headers are read, so a refused config or a missing or cut weight file is
  named before the long read."""
  hf_config = read_hf_config(hf_dir)
  model = hf.model_config_from_hf(hf_config)
  model['param_dtype'] = dtype
  names, read = safetensors_io.open_weights(hf_dir)
  return hf_config, model, names, read


def load_hf(hf_dir: str, *, dtype: str = 'float32') -> tuple[dict, dict[str, Any]]:
  """(params pure dict of numpy arrays in `dtype`, jaxllm `model` section) from an HF model
  folder, read tensor by tensor (see `hf.from_hf`)."""
  _, model, names, read = open_hf(hf_dir, dtype=dtype)
  return hf.from_hf(names, read, model_lib.ModelConfig.from_section(model)), model


def write_checkpoint(params: dict, config: dict[str, Any], directory: str) -> str:
  """Step 0 in the checkpoint directory `directory` as `checkpoint.Checkpointer.save_params`
  writes it (a `params` item that `restore_params` and `read_param` read, a `meta` item
  {'step': 0, 'config': config}); returns the directory.

  Written lean, which is why this does not call save_params: Orbax's defaults copy every numpy
  leaf before writing it (a guard against the caller changing it meanwhile) and hold each
  zstd-compressed leaf until the write ends, about twice the parameters more at the peak
  (docs/benchmarks.md). Here the leaves are written from the arrays themselves (nothing else
  holds them), uncompressed: float weights shrink little under zstd, and a training run's first
  save writes its own compressed checkpoint."""
  import jax
  import orbax.checkpoint as ocp

  registry = ocp.type_handlers.create_type_handler_registry(  # jax.Array: Orbax expects one
      (np.ndarray, ocp.type_handlers.NumpyHandler(deepcopy_host_arrays=False)),
      (jax.Array, ocp.type_handlers.ArrayHandler()))
  handler = ocp.PyTreeCheckpointHandler(use_compression=False, type_handler_registry=registry)
  manager = ocp.CheckpointManager(
      os.path.abspath(directory),
      options=ocp.CheckpointManagerOptions(enable_async_checkpointing=False, create=True),
      item_handlers={'params': handler, 'meta': ocp.JsonCheckpointHandler()})
  try:
    manager.save(0, args=ocp.args.Composite(
        params=ocp.args.PyTreeSave(jax.tree.map(np.asarray, params)),
        meta=ocp.args.JsonSave({'step': 0, 'config': config})))
    manager.wait_until_finished()
  finally:
    manager.close()
  return os.path.abspath(directory)


_CONFIG_PY = '''"""Fine-tune {source} (imported by tools/convert_from_hf.py).

    python -m jaxllm.main --config={path} --workdir=DIR --config.data.sources=DATA.jsonl

data.sources is required (there is no default corpus for a fine-tune): jsonl conversations
(`messages`, or `prompt` and `completion`) or text. The model's context length is {context}
tokens; data.seq_len is {seq_len}.
"""

from jaxllm import config as config_lib

MODEL = {model}


def get_config():
  c = config_lib.base_config()
  c.name = {name!r}
  c.model.update(MODEL)
  c.checkpoint.init_from = {init_from!r}
  c.data.tokenizer = {tokenizer!r}  # the model's own, carried over by the import
  c.data.sources = 'REQUIRED'  # --config.data.sources=DATA.jsonl (there is no default data)
  c.data.eval_fraction = 0.05  # held out by content hash: works for one file too
  c.data.seq_len = {seq_len}  # min(the model's context length {context}, {max_seq_len})
  c.train.sample_prompts = ()  # raw-text prompts do not suit a chat model
{fine_tune}  return c
'''


def write_config_py(run: rundir.RunDir, model: dict[str, Any], *, source: str, checkpoints: str,
                    tokenizer: str, context_length: int) -> None:
  """config.py: the fine-tuning config (`jaxllm.main --config=`)."""
  # Paths go into the docstring escaped (a folder name with quotes must not end it) and into
  # code as repr.
  escape = lambda text: json.dumps(text)[1:-1]
  fine_tune = ''.join(f'  c.{key} = {value!r}\n' for key, value in FINE_TUNE.items())
  body = _CONFIG_PY.format(
      source=escape(source), path=escape(run.config_py),
      model=pprint.pformat(model, indent=4, sort_dicts=False),
      name=os.path.basename(run.workdir.rstrip('/')), init_from=checkpoints, tokenizer=tokenizer,
      context=context_length, seq_len=min(context_length, MAX_SEQ_LEN), max_seq_len=MAX_SEQ_LEN,
      fine_tune=fine_tune)
  with replacing(run.config_py) as f:
    f.write(body)


def copy_tokenizer(tokenizer: str, run: rundir.RunDir, *, source: str | None = None) -> str:
  """`tokenizer` (`find_tokenizer`'s answer) into the run; its path there, absolute. A folder's
  TOKENIZER_FILES go to `tokenizer_dir(run)` with `source`'s generation_config.json (the
  model's stop tokens), if it has one; a sentencepiece model to the run's tokenizer path."""
  if not os.path.isdir(tokenizer):
    path = os.path.abspath(run.tokenizer_path())
    _copy(tokenizer, path)
    return path
  folder = os.path.abspath(tokenizer_dir(run))
  os.makedirs(folder, exist_ok=True)
  names = [n for n in hf_tokenizer.TOKENIZER_FILES if os.path.isfile(os.path.join(tokenizer, n))]
  for name in os.listdir(folder):  # an earlier import's file this tokenizer lacks would mix in
    if name not in names:
      os.remove(os.path.join(folder, name))
  for name in names:
    _copy(os.path.join(tokenizer, name), os.path.join(folder, name))
  generation = os.path.join(source or tokenizer, hf.GENERATION_CONFIG_FILE)
  if os.path.isfile(generation):
    _copy(generation, os.path.join(folder, hf.GENERATION_CONFIG_FILE))
  return folder


def _copy(src: str, dst: str) -> None:
  with open(src, 'rb') as f, replacing(dst, 'wb') as g:
    shutil.copyfileobj(f, g)


def write_run(params: dict, model: dict[str, Any], out: str, *, source: str,
              tokenizer: str | None = None, context_length: int | None = None,
              overwrite: bool = False) -> rundir.RunDir:
  """The run directory `out`: checkpoint, config.json, and with a `tokenizer` (`find_tokenizer`'s
  answer) a copy of it and config.py. `context_length`: the model's (config.json's
  max_position_embeddings), saved as data.seq_len, which the export writes back. `overwrite`
  replaces an earlier import's checkpoint there; without it a non-empty `out` is refused."""
  check_out(out, source=source, overwrite=overwrite)
  run = rundir.RunDir(out)
  os.makedirs(out, exist_ok=True)
  if overwrite and os.path.isdir(run.checkpoints()):
    shutil.rmtree(run.checkpoints())  # asked for: the old step 0 would otherwise be kept
  data: dict[str, Any] = {'seq_len': context_length} if context_length else {}
  checkpoints = write_checkpoint(params, {'model': model, 'data': data}, run.checkpoints())
  if tokenizer:
    data['tokenizer'] = copy_tokenizer(tokenizer, run, source=source)
  run.write_config({'model': model, 'data': data})
  if tokenizer:
    write_config_py(run, model, source=source, checkpoints=checkpoints,
                    tokenizer=data['tokenizer'], context_length=context_length or MAX_SEQ_LEN)
  return run


def convert(hf_dir: str, out: str, *, dtype: str = 'float32', tokenizer: str | None = None,
            overwrite: bool = False) -> dict[str, Any]:
  """An HF model folder as the run directory `out` (`write_run`) with the folder's tokenizer or
  `tokenizer` (see `find_tokenizer`); returns the jaxllm `model` section."""
  check_out(out, source=hf_dir, overwrite=overwrite)  # the refusals first, then the (long) read
  hf_config, model, names, read = open_hf(hf_dir, dtype=dtype)
  found = find_tokenizer(hf_dir, tokenizer)
  params = hf.from_hf(names, read, model_lib.ModelConfig.from_section(model))
  write_run(params, model, out, source=hf_dir, tokenizer=found,
            context_length=hf_config.get('max_position_embeddings'), overwrite=overwrite)
  return model
