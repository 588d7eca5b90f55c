"""Configs load, validate and fail loudly; the model-size table gives the published sizes."""

import pathlib
import re

import jax
import pytest
from absl import flags
from flax import nnx
from ml_collections import config_flags

from jaxllm import config as config_lib
from jaxllm import model as model_lib
from jaxllm import sharding

CONFIGS = sorted((pathlib.Path(__file__).parent.parent / 'configs').glob('*.py'))


def load(path, *overrides):
  """Loads a config file the way main.py does: locked, with --config.* overrides."""
  argv = [__file__, f'--config={path}', *overrides]
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file('config', None, 'config', flag_values=fv, lock_config=True,
                                  sys_argv=argv)
  fv(argv)
  return fv.config


@pytest.mark.parametrize('path', CONFIGS, ids=lambda p: p.stem)
def test_every_config_loads_and_validates(path):
  config = load(path)
  shape = sharding.resolve_mesh_shape(config.mesh, 8)
  config_lib.validate(config, shape)
  assert config.name == path.stem
  model_lib.ModelConfig.from_section(config.model)  # every model key is a ModelConfig field
  assert f'--config=configs/{path.name}' in path.read_text()  # the docstring gives the command


@pytest.mark.parametrize('name,expected', [
    ('7b', 6_738_415_616),  # Llama-2-7B, as published
    ('8b', 8_030_261_248),  # Meta-Llama-3-8B
    ('1b', 1_235_814_400),  # Llama-3.2-1B (tied embeddings)
])
def test_published_parameter_counts(name, expected):
  cfg = model_lib.ModelConfig.from_section(load(f'configs/{name}.py').model)
  assert cfg.num_params() == expected
  # And the model really creates that many (abstractly: nothing is allocated).
  state = nnx.state(nnx.eval_shape(lambda: model_lib.Llama(cfg, rngs=nnx.Rngs(0))))
  assert sum(x.size for x in jax.tree.leaves(state)) == expected


def test_override_and_misspelt_key():
  assert load('configs/tiny.py', '--config.model.n_layers=2').model.n_layers == 2
  with pytest.raises(Exception, match='n_layerz'):
    load('configs/tiny.py', '--config.model.n_layerz=2')


def test_locked_config_rejects_new_keys():
  config = load('configs/tiny.py')
  with pytest.raises(AttributeError, match='lerning_rate'):
    config.optim.lerning_rate = 1.0


def test_mesh_that_does_not_divide_devices():
  with pytest.raises(ValueError, match=r'mesh\.data=3.*do not divide the 8 devices'):
    sharding.resolve_mesh_shape({'data': 3, 'fsdp': -1, 'tensor': 1}, 8)
  with pytest.raises(ValueError, match='4 devices, but 8 are present'):
    sharding.resolve_mesh_shape({'data': 2, 'fsdp': 2, 'tensor': 1}, 8)
  with pytest.raises(ValueError, match='at most one -1'):
    sharding.resolve_mesh_shape({'data': -1, 'fsdp': -1, 'tensor': 1}, 8)
  assert sharding.resolve_mesh_shape({'data': 2, 'fsdp': -1, 'tensor': 2}, 8) == {
      'data': 2, 'fsdp': 2, 'tensor': 2}


@pytest.mark.parametrize('overrides,keys', [
    ({'train.global_batch_size': 13}, 'train.global_batch_size=13'),
    ({'model.n_heads': 6, 'model.n_kv_heads': 4}, 'model.n_heads=6'),
    ({'model.n_kv_heads': 2}, 'model.n_kv_heads=2 is not divisible by mesh.tensor=4'),
    ({'train.microbatches': 3}, 'train.microbatches=3'),
    ({'train.loss_chunk': 100}, 'train.loss_chunk=100 must be 0 or divide data.seq_len'),
    ({'train.microbatch_gather': 'twice'}, "train.microbatch_gather='twice' must be one of"),
    ({'train.microbatch_gather': 'once', 'lora.rank': 4},
     "train.microbatch_gather='once' gathers the trained parameters only"),
    ({'optim.shard_over_data': True}, 'optim.shard_over_data splits the AdamW moments over '
                                      'mesh.data, which is 1 here'),
])
def test_validate_names_the_keys(overrides, keys):
  config = load('configs/tiny.py')
  with config.unlocked():
    for k, v in overrides.items():
      section, key = k.split('.')
      config[section][key] = v
  with pytest.raises(ValueError, match=keys.replace('.', r'\.')):
    config_lib.validate(config, {'data': 1, 'fsdp': 2, 'tensor': 4})


def test_every_size_cites_a_source():
  for name, row in config_lib.MODEL_SIZES.items():
    assert row['source'], name


@pytest.mark.parametrize('key', sorted(config_lib.MINIMUMS))
def test_each_numeric_key_below_its_minimum_is_named(key):
  """Zero and negative values fail validation naming the key, before anything divides by them."""
  config = config_lib.base_config()
  section, name = key.split('.')
  least = config_lib.MINIMUMS[key]
  config[section][name] = type(config[section][name])(least - 1)
  with pytest.raises(ValueError, match=rf'{re.escape(key)}=\S+ must be >= {least}'):
    config_lib.validate(config, {'data': 1, 'fsdp': 1, 'tensor': 1})
  config[section][name] = type(config[section][name])(least)
  assert not config_lib._below_minimum(config)  # the minimum itself is valid


def test_no_eval_split_is_named():
  config = config_lib.base_config()
  config.data.eval_files = 0
  with pytest.raises(ValueError, match='data.eval_files=0 leaves no held-out split'):
    config_lib.validate(config, {'data': 1, 'fsdp': 1, 'tensor': 1})
  config.data.eval_source = '/data/held_out.txt'
  config_lib.validate(config, {'data': 1, 'fsdp': 1, 'tensor': 1})


def test_model_defaults_are_declared_once():
  """base_config().model and ModelConfig's field defaults must agree (config.py cannot import
  the model, so both exist): every field with a default has the same value in the config."""
  import dataclasses
  section = config_lib.base_config().model
  fields = dataclasses.fields(model_lib.ModelConfig)
  assert {f.name for f in fields} == set(section)
  for f in fields:
    if f.default is not dataclasses.MISSING:
      assert section[f.name] == f.default, f'model.{f.name}: {section[f.name]!r} != {f.default!r}'
  with pytest.raises(ValueError, match='model.nope is not a model setting'):
    model_lib.ModelConfig.from_section({**section, 'nope': 1})
