"""The run directory: the one place that knows what a workdir holds, and reopens a finished run.

    <workdir>/config.json       the resolved config of the run (a converter writes config.py too)
    <workdir>/checkpoints/      Orbax steps (or checkpoint.dir)
    <workdir>/tokenizer.model   sentencepiece, trained on first use (or data.tokenizer)
    <workdir>/data/             datasets and token caches (or data.cache_dir)
    <workdir>/tensorboard/      events
    <workdir>/goodput.json      wall time by cause, summed over the run's restarts (jaxllm/goodput.py)

The train loop takes its paths from here; entry points and tools reopen a run through `RunDir`
(config, tokenizer, a checkpoint step, its parameters), so errors name the flag the user passed
(`--workdir`, `--step`), not a config key the user never set. Building a trainer on those pieces
is the wiring's (`jaxllm.train.setup`).

A workdir may be a `gs://` URL (jaxllm.files says which storage and why): every file above is then
written there, except the data cache, which TFDS, array_record and grain build with local file IO:
its default moves to a local `~/.cache/jaxllm/<hash of the workdir>` (`$XDG_CACHE_HOME` if set),
and a `data.cache_dir` URL is refused.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Any

import ml_collections
from absl import logging

from jaxllm import checkpoint as checkpoint_lib
from jaxllm import config as config_lib
from jaxllm import files
from jaxllm import tokenizer as tokenizer_lib

CONFIG_JSON = 'config.json'
CONFIG_PY = 'config.py'  # what tools/convert_from_hf.py writes for `jaxllm.main --config`
CHECKPOINTS = 'checkpoints'
TOKENIZER = 'tokenizer.model'
DATA = 'data'
TENSORBOARD = 'tensorboard'
GOODPUT = 'goodput.json'


MESH_FLAG_HELP = ('mesh for this command: DATA,FSDP,TENSOR (one may be -1: the remaining '
                  'devices), optionally ,DCN_DATA,DCN_FSDP (default 1,1); empty = the saved mesh')


def parse_mesh(text: str) -> dict[str, int]:
  """'DATA,FSDP,TENSOR[,DCN_DATA,DCN_FSDP]' -> mesh.* values. The DCN factors reset to 1 unless
  given: they name the hosts of the run that wrote the checkpoint, not of the one reading it."""
  names = ('data', 'fsdp', 'tensor', 'dcn_data', 'dcn_fsdp')
  try:
    sizes = [int(v) for v in text.split(',')]
  except ValueError:
    sizes = []
  if len(sizes) not in (3, 5):
    raise ValueError(f'--mesh={text}: write DATA,FSDP,TENSOR or DATA,FSDP,TENSOR,DCN_DATA,'
                     'DCN_FSDP as integers, for example --mesh=1,-1,1 (every device in fsdp)')
  return dict(zip(names, sizes + [1, 1][:5 - len(sizes)]))


def local_cache_dir(workdir: str) -> str:
  """Where a remote workdir's data cache lives on this machine: one folder per workdir."""
  root = os.environ.get('XDG_CACHE_HOME') or os.path.join(os.path.expanduser('~'), '.cache')
  return os.path.join(root, 'jaxllm', hashlib.sha256(workdir.encode()).hexdigest()[:16])


@dataclasses.dataclass(frozen=True)
class RunDir:
  """Paths of one workdir; the config's `checkpoint.dir`, `data.tokenizer` and `data.cache_dir`
  override their defaults inside it. A path on storage jaxllm cannot write is refused by the name
  of its flag or key (files.check_storage) before anything is written."""

  workdir: str

  def __post_init__(self):
    files.check_storage(self.workdir, '--workdir')

  @classmethod
  def of_checkpoints(cls, path: str) -> 'RunDir':
    """The workdir whose checkpoints folder is `path` (checkpoint.init_from's usual value)."""
    return cls(str(path).rstrip('/').rsplit('/', 1)[0])

  def path(self, name: str) -> str:
    return os.path.join(self.workdir, name)

  @property
  def config_json(self) -> str:
    return self.path(CONFIG_JSON)

  @property
  def config_py(self) -> str:
    return self.path(CONFIG_PY)

  @property
  def tensorboard(self) -> str:
    return self.path(TENSORBOARD)

  @property
  def goodput(self) -> str:
    return self.path(GOODPUT)

  def checkpoints(self, config: ml_collections.ConfigDict | None = None) -> str:
    return files.check_storage((config and config.checkpoint.dir) or self.path(CHECKPOINTS),
                               'checkpoint.dir')

  def tokenizer_path(self, config: ml_collections.ConfigDict | None = None) -> str:
    return files.check_storage((config and config.data.tokenizer) or self.path(TOKENIZER),
                               'data.tokenizer')

  def data_cache(self, config: ml_collections.ConfigDict | None = None) -> str:
    """`data.cache_dir`, else `<workdir>/data`, else (a remote workdir) local_cache_dir."""
    chosen = config and config.data.cache_dir
    if chosen and files.is_url(chosen):
      raise ValueError(f'data.cache_dir={chosen}: the data cache must be a local directory (TFDS, '
                       'array_record and grain build it with local file IO); set '
                       '--config.data.cache_dir to a local path')
    if chosen or not files.is_url(self.workdir):
      return chosen or self.path(DATA)
    cache = local_cache_dir(self.workdir)
    logging.info('data cache of --workdir=%s is local: %s (set data.cache_dir to choose)',
                 self.workdir, cache)
    return cache

  def create(self) -> None:
    """Makes the workdir (a bucket prefix needs none; nothing is written there then)."""
    files.makedirs(self.workdir)

  def write_config(self, config: ml_collections.ConfigDict | dict[str, Any]) -> None:
    """config.json, written whole (files.replacing: a killed writer's temps are removed)."""
    self.create()
    text = (config.to_json_best_effort(indent=2) if isinstance(config, ml_collections.ConfigDict)
            else json.dumps(config, indent=2))
    with files.replacing(self.config_json) as f:
      f.write(text)

  def saved_config(self) -> ml_collections.ConfigDict | None:
    """The config.json an earlier start of this run wrote (load_config), or None if none did."""
    return self.load_config() if files.exists(self.config_json) else None

  def load_config(self, mesh: str = '') -> ml_collections.ConfigDict:
    """The resolved config the run wrote, over today's defaults (keys added since then take their
    default values); `mesh` ('DATA,FSDP,TENSOR[,DCN_DATA,DCN_FSDP]', see parse_mesh) replaces the
    saved mesh, so a run trained on several hosts can be reopened on one."""
    if not files.exists(self.config_json):
      raise FileNotFoundError(f'--workdir={self.workdir} has no {CONFIG_JSON}: pass the --workdir '
                              'of a jaxllm.main run (or the --out of tools/convert_from_hf.py)')
    config = config_lib.base_config()
    try:
      config.update(json.loads(files.read_text(self.config_json)))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
      raise ValueError(f'{self.config_json} is not valid JSON ({e}): the run wrote it whole, so '
                       'restore it from a copy of the run or pass another --workdir') from None
    if mesh:
      config.mesh.update(parse_mesh(mesh))
    return config

  def mesh_error(self, config: ml_collections.ConfigDict, mesh: str, e: ValueError) -> ValueError:
    """A mesh that does not fit the devices here, said in terms of the flag the user can pass."""
    saved = ','.join(str(config.mesh[k]) for k in ('data', 'fsdp', 'tensor', 'dcn_data', 'dcn_fsdp'))
    where = f'--mesh={mesh}' if mesh else f'the mesh of --workdir={self.workdir} ({saved})'
    return ValueError(f'{where} does not fit the devices here ({e}); pass --mesh=DATA,FSDP,TENSOR '
                      'for them, for example --mesh=1,-1,1')

  def has_tokenizer(self, config: ml_collections.ConfigDict | None = None) -> bool:
    return tokenizer_lib.exists(self.tokenizer_path(config))

  def tokenizer(self, config: ml_collections.ConfigDict) -> tokenizer_lib.Tokenizer:
    """The run's tokenizer; never trains one (only the data pipeline of a new run does)."""
    path = self.tokenizer_path(config)
    if not tokenizer_lib.exists(path):  # a sentencepiece .model, or an HF tokenizer folder
      raise FileNotFoundError(f'tokenizer {path} of --workdir={self.workdir} does not exist: set '
                              '--config.data.tokenizer to the tokenizer the run was trained with')
    return tokenizer_lib.open_tokenizer(path, chat_template=config.data.get('chat_template', ''))

  def open_checkpoint(self, config: ml_collections.ConfigDict, step: int = -1,
                      ) -> tuple[checkpoint_lib.Checkpointer, int]:
    """A read-only Checkpointer on the run's checkpoints and the step to read (-1: the latest)."""
    return checkpoint_lib.open_read_only(self.checkpoints(config), step, what=f'--workdir={self.workdir}',
                                         step_flag='--step')

  def restore_params(self, config: ml_collections.ConfigDict, abstract_params, step: int = -1,
                     ) -> tuple[dict, int]:
    """(parameters on the shardings of `abstract_params`, the step they come from)."""
    ckpt, step = self.open_checkpoint(config, step)
    try:
      return ckpt.restore_params(step, abstract_params), step
    finally:
      ckpt.close()

  def reopen(self, setup, *, step: int = -1, mesh: str = ''):
    """(config, trainer, params, step) of a finished run, on this machine's devices: the config
    (with `mesh` replacing the saved one), `setup(config)` (jaxllm.train.setup: the wiring builds
    trainers, rundir does not import it), and the parameters of `step` (-1: the latest). The
    tokenizer must exist (only a new run's pipeline trains one)."""
    config = self.load_config(mesh)
    self.tokenizer(config)
    try:
      trainer = setup(config)
    except ValueError as e:
      if 'mesh' not in str(e):  # ours name mesh.* keys; jax's hybrid mesh says dcn_mesh_shape
        raise
      raise self.mesh_error(config, mesh, e) from None
    ckpt, step = self.open_checkpoint(config, step)
    try:  # the trainer knows what its run's checkpoints hold (a LoRA run's: adapters, a base)
      params = trainer.restore_params(ckpt, step)
    finally:
      ckpt.close()
    return config, trainer, params, step


_CONFIG_PY = '''"""{doc}"""

from jaxllm import config as config_lib

# Every key that differs from jaxllm.config.base_config(), so this file stands alone.
CHANGES = {{
{changes}}}


def get_config():
  c = config_lib.base_config()
  for key, value in CHANGES.items():
    *sections, name = key.split('.')
    node = c
    for section in sections:
      node = node[section]
    node[name] = value
  return c
'''


def write_config_py(path: str, config: ml_collections.ConfigDict, *, doc: str) -> None:
  """A config file for `jaxllm.main --config=path` that gives back `config` (its keys that differ
  from base_config(), as Python literals) under the docstring `doc`; written whole or not at all."""
  def flat(c, prefix=''):
    out = {}
    for key, value in c.items():
      out.update(flat(value, f'{prefix}{key}.') if isinstance(value, ml_collections.ConfigDict)
                 else {f'{prefix}{key}': value})
    return out
  base = flat(config_lib.base_config())
  changes = ''.join(f'    {k!r}: {v!r},\n' for k, v in sorted(flat(config).items()) if base.get(k) != v)
  text = _CONFIG_PY.format(doc=doc.replace('\\', '\\\\').replace('"""', '\\"""'), changes=changes)
  files.makedirs(os.path.dirname(path) or '.')
  with files.replacing(path) as f:
    f.write(text)


# A tuning study's directory (jaxllm.tune): each trial is an ordinary workdir inside it.
STUDY_JOURNAL = 'study.journal'  # Optuna's journal: every trial, its values and state
TRIAL_PREFIX = 'trial_'
TRIAL_LOGS = 'logs'  # one console log per trial
WORKERS = 'workers'  # one heartbeat file per worker process
TRIALS_MD, TRIALS_CSV = 'trials.md', 'trials.csv'
BEST_CONFIG = 'best_config.py'  # the best trial's config, for `jaxllm.main --config`
PLOTS = 'plots'


@dataclasses.dataclass(frozen=True)
class StudyDir:
  """Paths of one study directory (`jaxllm.tune --workdir`); URLs are refused (`local`)."""

  workdir: str

  def __post_init__(self):
    if files.is_url(self.workdir):  # Optuna's journal locks a file; trials run as local processes
      raise ValueError(f'--workdir={self.workdir}: a study directory must be a local path (or '
                       'a shared filesystem mounted on every worker), not a URL')

  def path(self, *names: str) -> str:
    return os.path.join(self.workdir, *names)

  @property
  def journal(self) -> str:
    return self.path(STUDY_JOURNAL)

  def trial(self, number: int) -> RunDir:
    return RunDir(self.path(f'{TRIAL_PREFIX}{number}'))

  def log(self, number: int) -> str:
    return self.path(TRIAL_LOGS, f'{TRIAL_PREFIX}{number}.log')

  def heartbeat(self, worker: str) -> str:
    return self.path(WORKERS, worker.replace(os.sep, '_'))

  @property
  def trials_md(self) -> str:
    return self.path(TRIALS_MD)

  @property
  def trials_csv(self) -> str:
    return self.path(TRIALS_CSV)

  @property
  def best_config(self) -> str:
    return self.path(BEST_CONFIG)

  def plot(self, name: str) -> str:
    return self.path(PLOTS, f'{name}.png')
