"""LoRA and QLoRA (issue 17): fresh adapters leave the base's output as it was, the base stays
bit-identical while adapters train, quantized bases within their error bound, resume bit-exact
through the CLI, a changed base refused; PEFT parity (adapters load in `peft` with the same
logits, the merged export is a plain transformers model), import of a PEFT adapter, sampling and
evaluation of a LoRA run.

The PEFT tests need the `hf` extra with peft; skipped without it. Tiny models built here."""

import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxllm import checkpoint as checkpoint_lib
from jaxllm import lora as lora_lib
from jaxllm import model as model_lib
from jaxllm import quant
from test_checkpoint import REPO, cli, logged_losses, run_cli, saved_params, shared_data  # noqa: F401

CFG = model_lib.ModelConfig(vocab_size=96, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2,
                            head_dim=16, mlp_dim=128)


# --- quantized formats ------------------------------------------------------------------------

@pytest.mark.parametrize('fmt,group', [('int8', 0), ('int4', 32), ('int4', 64)])
def test_quantize_dequantize_error_is_within_half_a_step(fmt, group):
  """Every weight comes back within scale / 2 of itself (round to nearest), the scale being the
  largest magnitude of its channel (int8) or group (int4) over 127 or 7; zero columns stay 0."""
  w = jax.random.normal(jax.random.key(0), (3, 128, 40)) * jnp.linspace(0.01, 3.0, 40)[None, None]
  w = w.at[:, :, 7].set(0.0)
  values, scale = quant.quantize(w, fmt=fmt, group_size=group or 64)
  back = quant.dequantize(values, scale, fmt=fmt)
  if fmt == 'int8':
    assert values.dtype == jnp.int8 and scale.shape == (3, 1, 40)
    step = jnp.max(jnp.abs(w), axis=1, keepdims=True) / 127
    per_weight = jnp.broadcast_to(step, w.shape)
  else:
    assert values.dtype == jnp.uint8 and values.shape == (3, 64, 40)  # two codes a byte
    assert scale.shape == (3, 128 // group, 40)
    groups = w.reshape(3, 128 // group, group, 40)
    per_weight = jnp.broadcast_to(jnp.max(jnp.abs(groups), axis=2, keepdims=True) / 7,
                                  groups.shape).reshape(w.shape)
  err = jnp.abs(back - w)
  assert bool(jnp.all(err <= per_weight / 2 + 1e-6 * per_weight + 1e-12)), float(jnp.max(err / per_weight))
  assert bool(jnp.all(back[:, :, 7] == 0))
  # Not a trivially loose bound: the error reaches a good part of it somewhere.
  assert float(jnp.max(err / jnp.where(per_weight > 0, per_weight, 1))) > 0.3


def test_int4_groups_that_do_not_tile_the_width_are_refused():
  with pytest.raises(ValueError, match='groups of 48 rows do not tile an input width of 128'):
    quant.quantize(jnp.ones((128, 4)), fmt='int4', group_size=48)


# --- the model transform ----------------------------------------------------------------------

@pytest.mark.parametrize('quantize', ['none', 'int8', 'int4'])
def test_fresh_adapters_leave_the_base_output_unchanged(quantize):
  """B starts at zero: the model with adapters gives the logits of its base, exactly; with a
  quantized base, those of the plain model whose projections are the dequantized weights."""
  lcfg = lora_lib.LoraConfig(rank=4, quantize=quantize, group_size=32)
  model = lora_lib.build(CFG, lcfg, seed=3)
  tokens = jax.random.randint(jax.random.key(1), (2, 12), 0, CFG.vocab_size)
  plain = model_lib.Llama(CFG, rngs=nnx.Rngs(3))
  if quantize != 'none':  # the reference: the same dequantized weights in a plain model
    for target in lora_lib.TARGETS:
      sub, name, _ = lora_lib.TARGETS[target]
      stored = getattr(getattr(model.layers, sub), name)
      getattr(getattr(plain.layers, sub), name)[...] = stored.dequantize(jnp.float32)
  np.testing.assert_array_equal(model(tokens), plain(tokens))
  adapters, base = lora_lib.split(nnx.to_pure_dict(nnx.state(model)))
  assert set(adapters['layers']['self_attn']) == {'q_proj_lora', 'k_proj_lora', 'v_proj_lora',
                                                  'o_proj_lora'}
  # Nonzero B changes the output by exactly scale x (x @ A) @ B on that projection.
  graphdef = nnx.graphdef(model)
  adapters['layers']['mlp']['down_proj_lora']['b'] = jnp.ones_like(
      adapters['layers']['mlp']['down_proj_lora']['b']) * 0.01
  moved = nnx.merge(graphdef, lora_lib.join(base, adapters))(tokens)
  assert float(jnp.max(jnp.abs(moved - plain(tokens)))) > 1e-3


def test_adapters_are_stacked_and_sharded_like_their_base():
  """One adapter per target with a leading `layers` dim; its dims carry the base weight's
  logical names (the rank none), so the rules table shards it like the base."""
  model = nnx.eval_shape(lambda: lora_lib.build(CFG, lora_lib.LoraConfig(rank=8), seed=0))
  specs = nnx.to_pure_dict(nnx.get_partition_spec(nnx.state(model)))
  attn, mlp = specs['layers']['self_attn'], specs['layers']['mlp']
  assert tuple(attn['q_proj_lora']['a']) == ('layers', 'embed', None)
  assert tuple(attn['q_proj_lora']['b']) == ('layers', None, 'heads', 'head_dim')
  assert tuple(attn['o_proj_lora']['a']) == ('layers', 'heads', 'head_dim', None)
  assert tuple(mlp['down_proj_lora']['b']) == ('layers', None, 'embed')
  shapes = nnx.to_pure_dict(nnx.state(model))
  assert shapes['layers']['self_attn']['k_proj_lora']['b'].shape == (2, 8, 2, 16)


def _terminal_uses(jaxpr, var) -> set[str]:
  """The primitives that consume `var` in `jaxpr`, looking through the higher-order ones
  (scan, remat, pjit) whose inner inputs match their operands one to one."""
  uses = set()
  for eqn in jaxpr.eqns:
    for i, v in enumerate(eqn.invars):
      if v is not var:
        continue
      inner = eqn.params.get('jaxpr', eqn.params.get('call_jaxpr'))
      inner = getattr(inner, 'jaxpr', inner)
      if inner is not None and len(inner.invars) == len(eqn.invars):
        uses |= _terminal_uses(inner, inner.invars[i])
      else:
        uses.add(eqn.primitive.name)
  return uses


@pytest.mark.parametrize('fmt', ['int4', 'int8'])
def test_quantized_base_reaches_the_layer_only_through_a_barrier(fmt):
  """A quantized base's codes and scales reach each layer's dequantize through an optimization
  barrier: else the TPU compiler retiles the whole stacked 4-bit codes in one copy made before
  the scan and kept through the backward pass (about 100 MiB a layer for the 8B: 13.05 vs 9.73
  GiB for the QLoRA step, docs/benchmarks.md, LoRA and QLoRA)."""
  cfg = model_lib.ModelConfig(**{**CFG.__dict__, 'dtype': 'bfloat16', 'remat': 'full'})
  lcfg = lora_lib.LoraConfig(rank=4, base_dtype='bfloat16', quantize=fmt, group_size=32)
  graphdef, state = nnx.split(lora_lib.build(cfg, lcfg, seed=0))
  params = nnx.to_pure_dict(state)
  tokens = jnp.zeros((1, 8), jnp.int32)
  closed = jax.make_jaxpr(lambda p: nnx.merge(graphdef, p)(tokens))(params)
  leaves = jax.tree_util.tree_flatten_with_path(params)[0]
  checked = {}
  for ((path, _), var) in zip(leaves, closed.jaxpr.invars, strict=True):
    keys = [str(getattr(k, 'key', k)) for k in path]
    if keys[0] == 'layers' and keys[-1] in ('values', 'scale'):
      checked['/'.join(keys)] = _terminal_uses(closed.jaxpr, var)
  assert len(checked) == 14, sorted(checked)  # codes and scales of the seven projections
  assert all(uses == {'optimization_barrier'} for uses in checked.values()), checked


def test_the_frozen_base_moves_to_the_layout_the_compiled_step_takes():
  """The step is compiled with the base's memory layout left to XLA (a TPU wants q/k/v head-major
  and would otherwise copy the whole stack each step); XLA:CPU keeps the default. With the TPU's
  head-major q pinned instead, the step refuses a base in the default layout; `place_frozen`
  moves it (the old buffer freed, the other arrays untouched) and the step takes it, computes
  the same loss, and hands it back in the layout it took, bit-identical."""
  from jax.experimental.layout import Format, Layout
  from jaxllm import sharding, train
  from test_config import load
  config = load('configs/tiny.py', '--config.lora.rank=4', '--config.data.seq_len=32',
                '--config.train.global_batch_size=8', '--config.model.n_layers=2')
  trainer = train.setup(config)
  tokens = np.random.default_rng(0).integers(0, config.model.vocab_size, (8, 33), dtype=np.int32)
  batch = sharding.global_batch({'inputs': tokens[:, :-1], 'targets': tokens[:, 1:]},
                                trainer.batch_sharding)
  default = trainer.compile_step_for(batch)
  formats = default.input_formats[0][0]['base']
  q_default = formats['layers']['self_attn']['q_proj']
  head_major = Layout(major_to_minor=(0, 2, 3, 1))
  assert q_default.layout != head_major
  formats['layers']['self_attn']['q_proj'] = Format(head_major, q_default.sharding)
  pinned = trainer.lower_step_for(batch, {'base': formats}).compile()
  state = trainer.init_state()
  host = jax.device_get(state['base'])
  _, want = default(trainer.place_frozen(jax.tree.map(jnp.copy, state), default), batch)
  attn = state['base']['layers']['self_attn']
  q_before, k_before = attn['q_proj'], attn['k_proj']
  with pytest.raises(ValueError, match='layouts'):
    pinned(state, batch)
  placed = trainer.place_frozen(state, pinned)
  q = placed['base']['layers']['self_attn']['q_proj']
  taken = q.format.layout
  assert taken.major_to_minor == head_major.major_to_minor and q_before.is_deleted()
  assert placed['base']['layers']['self_attn']['k_proj'] is k_before
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(placed['base']), host)
  after, metrics = pinned(placed, batch)
  np.testing.assert_allclose(float(metrics['loss']), float(want['loss']), rtol=1e-6)
  assert after['base']['layers']['self_attn']['q_proj'].format.layout == taken
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(after['base']), host)


def test_a_quantized_base_is_read_and_quantized_one_stack_at_a_time(tmp_path, monkeypatch):
  """QLoRA's base from a checkpoint: bit for bit the base `lora.build` quantizes from the same
  float weights, read one projection stack at a time, so the device never holds the whole float
  base (8B: 5.6 GiB of 4-bit base and one 3.5 GiB bf16 stack, not 15 GiB of bf16)."""
  from jaxllm import train
  from test_config import load
  config = load('configs/tiny.py', '--config.lora.rank=4', '--config.lora.quantize=int4',
                '--config.lora.group_size=32')
  trainer = train.setup(config)
  cfg, lcfg = trainer.model_cfg, trainer.lora
  saved = checkpoint_lib.Checkpointer(str(tmp_path / 'base'), async_save=False)
  saved.save_params(1, jax.device_get(nnx.to_pure_dict(nnx.state(model_lib.Llama(
      lcfg.base_model_config(cfg), rngs=nnx.Rngs(5))))), {})
  saved.close()
  live_bytes = lambda: sum(a.nbytes for a in jax.live_arrays())
  after_reads, restore = [], checkpoint_lib.Checkpointer.restore_params
  def counted(self, *args, **kwargs):
    out = restore(self, *args, **kwargs)
    after_reads.append(live_bytes())
    return out
  monkeypatch.setattr(checkpoint_lib.Checkpointer, 'restore_params', counted)
  before = live_bytes()
  base, _ = trainer.load_base(str(tmp_path / 'base'))
  nbytes = lambda tree: sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(tree))
  floats = trainer._abstract_float_base
  stacks = [nbytes(_at(floats, lora_lib.weight_path(t))) for t in lora_lib.TARGETS]
  quantized = sum(nbytes(_at(base, lora_lib.weight_path(t))) for t in lora_lib.TARGETS)
  # Everything but the stacks, the quantized stacks, and one float stack being quantized.
  bound = nbytes(floats) - sum(stacks) + quantized + max(stacks)
  assert len(after_reads) == 8 and max(after_reads) - before <= bound < nbytes(floats), (
      max(after_reads) - before, bound, nbytes(floats))
  _, want = lora_lib.split(nnx.to_pure_dict(nnx.state(lora_lib.build(cfg, lcfg, seed=5))))
  assert jax.tree.structure(base) == jax.tree.structure(want)
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(base), jax.device_get(want))
  jax.tree.map(lambda a, s: a.sharding.is_equivalent_to(s, a.ndim) or pytest.fail(str(s)),
               base, trainer.state_shardings['base'])
  # The step a LoRA checkpoint names, gone from its base (a keep policy removed it): said so.
  with pytest.raises(checkpoint_lib.CheckpointError,
                     match=r"the adapters' base step=5 is not a checkpoint .* it has steps \[1\]: "
                           'restore it, or start the adapters afresh'):
    trainer.load_base(str(tmp_path / 'base'), 5, expect={'fingerprint': 'x'}, what='the base')


def _at(tree, path):
  for key in path:
    tree = tree[key]
  return tree


def test_targets_from_a_flag_and_from_peft_configs():
  """--config.lora.targets=q,v reaches the config as ('q,v',): it means q and v; PEFT's
  'all-linear' means the seven projections, and a regex is refused by name, not misread."""
  from jaxllm.convert import UnsupportedError, peft
  assert lora_lib.LoraConfig(rank=4, targets=('q,v',)).targets == ('q', 'v')
  assert lora_lib.LoraConfig(rank=4, targets='gate, up').targets == ('gate', 'up')
  with pytest.raises(ValueError, match="lora.targets: 'qkv'; choose among"):
    lora_lib.LoraConfig(rank=4, targets=('q,qkv',))
  with pytest.raises(ValueError, match='lora.alpha=0 must be > 0'):
    lora_lib.LoraConfig(rank=4, alpha=0)
  saved = {'r': 4, 'lora_alpha': 8, 'target_modules': 'all-linear'}
  assert peft.lora_section(saved, what='x')['targets'] == tuple(lora_lib.TARGETS)
  peft.check_adapter_config(saved, lora_lib.LoraConfig(rank=4, alpha=8.0), what='x')
  with pytest.raises(UnsupportedError, match=r"target_modules='.\*\(q\|v\)_proj'"):
    peft.lora_section({**saved, 'target_modules': '.*(q|v)_proj'}, what='x')
  with pytest.raises(ValueError, match=r'x has alpha 8 but lora.alpha=16.0: set --config.lora.alpha=8'):
    peft.check_adapter_config(saved, lora_lib.LoraConfig(rank=4), what='x')


# --- training ---------------------------------------------------------------------------------

def _lora_cli(workdir, shared, steps, base, *extra):
  return cli(workdir, shared, steps, '--config.lora.rank=4', '--config.lora.alpha=8',
             '--config.lora.dropout=0.1', f'--config.checkpoint.init_from={base}', *extra)


def _run(args):
  proc = subprocess.run(args, cwd=REPO, env=os.environ, capture_output=True, text=True,
                        timeout=600)
  return proc


def test_lora_resume_is_exact_through_the_cli_and_a_changed_base_is_refused(tmp_path,
                                                                          shared_data):  # noqa: F811
  """6 LoRA steps straight == 3, exit, 3 more (dropout on: its keys follow the step), on a
  (2, 2, 2) mesh with the real pipeline; the checkpoints hold adapters only and name the base;
  `jaxllm.evaluate` reopens the run (base + adapters); a base rewritten since is refused."""
  run_cli(tmp_path / 'base', shared_data, 2)
  base = tmp_path / 'base' / 'checkpoints'
  straight, split = tmp_path / 'straight', tmp_path / 'split'
  for workdir, steps in ((straight, 6), (split, 3), (split, 6)):
    proc = _run(_lora_cli(workdir, shared_data, steps, base))
    assert proc.returncode == 0, proc.stderr[-3000:]
  assert 'resuming from' in proc.stderr and 'step 4/6' in proc.stderr
  want, got = logged_losses(straight), logged_losses(split)
  assert list(want) == list(range(1, 7)) and got == want  # bit for bit
  ckpt = checkpoint_lib.Checkpointer(str(split / 'checkpoints'), read_only=True)
  saved = ckpt.params_metadata(6)
  assert all(k.endswith('_lora') for k in saved['layers']['self_attn'])  # adapters only
  meta = ckpt.saved_meta(6)
  ckpt.close()
  assert meta['base']['path'] == str(base) and meta['base']['step'] == 2
  # Evaluation reopens the run's adapters on the named base.
  proc = _run([sys.executable, '-m', 'jaxllm.evaluate', f'--workdir={split}', '--eval_batches=1',
               '--mesh=2,2,2'])
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert np.isfinite(json.loads(proc.stdout.strip().splitlines()[-1])['eval_loss'])
  # The base rewritten (same values, new files): resuming is refused, naming the base.
  params = saved_params(base, 2)
  shutil.rmtree(base / '2')
  rewritten = checkpoint_lib.Checkpointer(str(base), async_save=False)
  rewritten.save_params(2, params, {})
  rewritten.close()
  proc = _run(_lora_cli(split, shared_data, 8, base))
  assert proc.returncode == 1
  assert 'the adapters were trained on base' in proc.stderr and 'holds other parameters' in proc.stderr


# --- Hugging Face: a chat fine-tune with LoRA, PEFT parity, import ----------------------------

def test_lora_chat_fine_tune_then_peft_and_merged_exports_match_transformers(tmp_path):
  """The README path with LoRA: an imported (random, tiny) Llama fine-tuned 30 steps on the chat
  demo with rank-16 adapters lowers the held-out assistant loss and leaves the base bit-identical;
  its PEFT export loads with `peft.PeftModel.from_pretrained` onto the HF export of the base and
  gives jaxllm's logits (1e-4, float32); the merged export is a plain transformers model with the
  same logits; the PEFT folder imported back as a run samples what the trained run samples, and
  `lora.adapter` starts training from it."""
  torch = pytest.importorskip('torch', reason='the hf extra (torch) is not installed')
  transformers = pytest.importorskip('transformers', reason='the hf extra is not installed')
  peft_lib = pytest.importorskip('peft', reason='peft (the hf extra) is not installed')
  os.environ.setdefault('HF_HUB_OFFLINE', '1')
  from jaxllm import rundir, train
  from jaxllm import trainer as trainer_lib
  from jaxllm.convert import export, peft
  from test_hf_finetune import imported_chat_run

  config, _ = imported_chat_run(tmp_path, peak_lr=1e-2, sample_tokens=0)  # on a random base
  with config.unlocked():
    config.lora.update(rank=16, alpha=32.0)
  workdir = str(tmp_path / 'ft')
  trainer = train.setup(config)
  assert trainer.lora and set(trainer.abstract_state) == {'step', 'params', 'opt_state', 'base'}
  pipeline = train.make_pipeline(config, workdir, trainer.process_batch_size(8, 128))
  held_out = lambda params: trainer_lib.evaluate(trainer, params,
                                                 pipeline.eval_batches(4))['eval_loss']
  base, _ = trainer.load_base(config.checkpoint.init_from)
  base_host = jax.device_get(base)
  before = held_out(lora_lib.join(base, jax.device_get(trainer.init_state()['params'])))
  state = train.train_and_evaluate(config, workdir)['state']
  after = held_out(trainer.model_params(state))
  print(f'LoRA: held-out loss on assistant tokens {before:.3f} -> {after:.3f}')
  # Frozen random embeddings and head bound what adapters can learn in 30 steps: 6.41 -> 6.27 here.
  assert after < before - 0.07, (before, after)
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(state['base']), base_host)
  # No optimizer state for the base: every moment is an adapter's shape.
  adapter_shapes = {x.shape for x in jax.tree.leaves(state['params'])}
  assert {x.shape for x in jax.tree.leaves(state['opt_state']) if x.ndim} <= adapter_shapes

  # jaxllm's logits of the trained run, reopened as sampling and evaluation reopen it.
  _, reopened, params, _ = rundir.RunDir(workdir).reopen(train.setup)
  tokens = np.array([[5, 17, 42, 99, 3, 250, 7, 12]], np.int32) % config.model.vocab_size
  ours = np.asarray(nnx.merge(reopened.graphdef, params)(jnp.asarray(tokens)))
  without = np.asarray(nnx.merge(reopened.graphdef, lora_lib.join(
      base, jax.tree.map(jnp.zeros_like, state['params'])))(jnp.asarray(tokens)))
  assert np.max(np.abs(ours - without)) > 1e-2  # the adapters matter: parity means something

  export.export_run(str(tmp_path / 'base'), str(tmp_path / 'hf_base'))
  peft.export_adapter(workdir, str(tmp_path / 'adapter'))
  hf_base = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / 'hf_base',
                                                              dtype=torch.float32)
  theirs = peft_lib.PeftModel.from_pretrained(hf_base, str(tmp_path / 'adapter')).eval()
  with torch.no_grad():
    got = theirs(torch.tensor(tokens, dtype=torch.long)).logits.numpy()
  np.testing.assert_allclose(got, ours, atol=1e-4, rtol=0)
  export.export_run(workdir, str(tmp_path / 'merged'))  # a LoRA run exports merged
  merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / 'merged',
                                                             dtype=torch.float32)
  with torch.no_grad():
    got = merged(torch.tensor(tokens, dtype=torch.long)).logits.numpy()
  np.testing.assert_allclose(got, ours, atol=1e-4, rtol=0)
  assert not (tmp_path / 'merged' / peft.ADAPTER_CONFIG).exists()

  # The PEFT folder imported as a run: sampling reopens it, and samples as the trained run does.
  peft.import_adapter(str(tmp_path / 'adapter'), str(tmp_path / 'base'), str(tmp_path / 'imp'))
  proc = [subprocess.run([sys.executable, '-m', 'jaxllm.sample', f'--workdir={w}',
                          '--prompt=Who wrote Hamlet?', '--temperature=0', '--max_new_tokens=8'],
                         cwd=REPO, env=os.environ, capture_output=True, text=True, timeout=300)
          for w in (workdir, tmp_path / 'imp')]
  assert all(p.returncode == 0 for p in proc), [p.stderr[-2000:] for p in proc]
  assert proc[0].stdout == proc[1].stdout and proc[0].stdout.strip()
  # lora.adapter: a new run starts from the PEFT adapters (on the same base).
  with config.unlocked():
    config.lora.adapter = str(tmp_path / 'adapter')
  start = train._initial_lora_state(trainer, checkpoint_lib.Checkpointer(
      str(tmp_path / 'fresh'), async_save=False), config)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-7),
               jax.device_get(start['params']), jax.device_get(state['params']))
  with config.unlocked():
    config.lora.rank = 8
  with pytest.raises(ValueError, match=r'has rank 16 but lora.rank=8: set --config.lora.rank'):
    train._initial_lora_state(train.setup(config), checkpoint_lib.Checkpointer(
        str(tmp_path / 'fresh2'), async_save=False), config)
