"""Hugging Face interop, proven against transformers: import, export, refusals, tokenizer.

Needs the `hf` extra (torch, transformers, safetensors); skipped without it. Every model is a tiny
random one built from its config (no download).
"""

import importlib.util
import json
import os
import pathlib
import sys

import pytest

os.environ.setdefault('HF_HUB_OFFLINE', '1')
torch = pytest.importorskip('torch', reason='the hf extra (torch) is not installed')
transformers = pytest.importorskip('transformers', reason='the hf extra is not installed')
pytest.importorskip('safetensors', reason='the hf extra (safetensors) is not installed')

import jax  # noqa: E402
import ml_dtypes  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402
from safetensors import safe_open  # noqa: E402

from jaxllm import checkpoint as checkpoint_lib  # noqa: E402
from jaxllm import model as model_lib  # noqa: E402
from jaxllm.convert import export, hf, hf_tokenizer, import_, safetensors_io  # noqa: E402

REPO = pathlib.Path(__file__).parent.parent
B, L = 2, 16

# Tiny shape shared by every family: hidden 64, 2 layers, vocab 128, GQA 4/2 unless changed.
TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
            rms_norm_eps=1e-6, attn_implementation='eager')
LLAMA3_ROPE = dict(rope_type='llama3', rope_theta=500_000.0, factor=8.0, low_freq_factor=1.0,
                   high_freq_factor=4.0, original_max_position_embeddings=64)

# name -> (config class, overrides). Together: MHA and GQA, tied and untied, rope scaling on and
# off, each family's switch (q/k/v bias, o bias, q/k norm, sliding window).
CASES = {
    'llama2': ('LlamaConfig', dict(num_key_value_heads=4, tie_word_embeddings=False)),
    'llama3': ('LlamaConfig', dict(tie_word_embeddings=True, rope_parameters=LLAMA3_ROPE)),
    'mistral': ('MistralConfig', dict(tie_word_embeddings=False, sliding_window=5)),
    'qwen2': ('Qwen2Config', dict(tie_word_embeddings=True)),
    'qwen3': ('Qwen3Config', dict(head_dim=32, tie_word_embeddings=False, attention_bias=True)),
}
# Largest |logit difference| allowed between jaxllm and transformers, both float32 on the CPU, in
# either direction (the README claims it). The tiny models' logits are O(1) (max |logit| 1.4-1.9),
# where a float32 ulp is 1.2e-7; the two sum in different orders, so they part by a few ulps:
# 5.4e-7 to 7.2e-7 measured here (8.3e-7 in an earlier session). 2e-6 is about 17 ulps: room
# for another CPU's summation order, far below any real mapping error (those move logits by
# 1e-2 or more).
PARITY_ATOL = 2e-6


def hf_model(case, seed=0):
  cls_name, overrides = CASES[case]
  config = getattr(transformers, cls_name)(**(TINY | overrides))
  torch.manual_seed(seed)
  model = transformers.AutoModelForCausalLM.from_config(config).eval()
  # HF zero-inits biases and one-inits norms: randomise everything so each tensor is tested.
  with torch.no_grad():
    for name, p in model.named_parameters():
      p.copy_(torch.randn_like(p) * (0.1 if 'norm' in name else 0.05) + ('norm' in name))
  return model


def hf_logits(model, tokens):
  with torch.no_grad():
    return model(torch.from_numpy(tokens).long()).logits.float().numpy()


def jax_logits(params, model_section, tokens):
  cfg = model_lib.ModelConfig.from_section(model_section)
  graphdef = nnx.graphdef(nnx.eval_shape(lambda: model_lib.Llama(cfg, rngs=nnx.Rngs(0))))
  return np.asarray(jax.jit(lambda p, t: nnx.merge(graphdef, p)(t))(params, tokens))


# A Llama-3-style chat template (header tokens, each turn closed by <|eot_id|>).
LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + "
    "'<|end_header_id|>\\n\\n' + m['content'] + '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    "{% endif %}")
LLAMA3_SPECIALS = ['<|begin_of_text|>', '<|end_of_text|>', '<|start_header_id|>',
                   '<|end_header_id|>', '<|eot_id|>']


def save_hf_tokenizer(folder, *, vocab_size=300):
  """A byte-level BPE tokenizer with Llama 3's special tokens and chat template, trained here
  with the `tokenizers` library and saved by transformers into `folder` (as a Hub repo has it);
  the transformers tokenizer."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  tok.train_from_iterator(
      ['Who wrote Hamlet? Shakespeare wrote it, in about 1600.'] * 20,
      trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=LLAMA3_SPECIALS,
                          initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
  bos = LLAMA3_SPECIALS[0]
  tok.post_processor = processors.TemplateProcessing(
      single=f'{bos} $A', pair=f'{bos} $A {bos} $B', special_tokens=[(bos, tok.token_to_id(bos))])
  fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos,
                                              eos_token='<|eot_id|>', chat_template=LLAMA3_TEMPLATE)
  fast.save_pretrained(folder)
  return fast


@pytest.fixture(scope='module')
def tokens():
  return np.random.default_rng(0).integers(0, TINY['vocab_size'], (B, L)).astype(np.int32)


@pytest.mark.parametrize('case', list(CASES))
def test_import_and_export_match_transformers(case, tokens, tmp_path):
  model = hf_model(case)
  # Qwen2 is saved sharded to prove sharded import; the others as one file.
  model.save_pretrained(tmp_path / 'hf', max_shard_size='40KB' if case == 'qwen2' else '5GB')
  expected = hf_logits(model, tokens)

  params, section = import_.load_hf(str(tmp_path / 'hf'))
  ours = jax_logits(params, section, tokens)
  np.testing.assert_allclose(ours, expected, atol=PARITY_ATOL, rtol=0, err_msg='import')

  # Llama 2 is exported sharded (a tiny shard limit) to prove the index.
  limit = 40_000 if case == 'llama2' else safetensors_io.MAX_SHARD_BYTES
  export.export(params, section, str(tmp_path / 'out'), max_shard_bytes=limit)
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(
      tmp_path / 'out', dtype=torch.float32, attn_implementation='eager').eval()
  assert type(reloaded) is type(model), (type(reloaded).__name__, type(model).__name__)
  again = hf_logits(reloaded, tokens)
  np.testing.assert_allclose(again, ours, atol=PARITY_ATOL, rtol=0, err_msg='export')
  # float32 round trip is exact, tensor by tensor.
  original = {k: v.numpy() for k, v in model.state_dict().items()}
  for k, v in reloaded.state_dict().items():
    np.testing.assert_array_equal(v.numpy(), original[k], err_msg=k)
  if case == 'llama2':
    files = sorted(os.listdir(tmp_path / 'out'))
    index = json.loads((tmp_path / 'out' / 'model.safetensors.index.json').read_text())
    shards = sorted(set(index['weight_map'].values()))
    assert len(shards) > 1 and shards[0] == f'model-00001-of-{len(shards):05d}.safetensors'
    assert set(shards) <= set(files) and 'model.safetensors' not in files


def test_bfloat16_export(tokens, tmp_path):
  model = hf_model('llama3')
  model.save_pretrained(tmp_path / 'hf')
  params, section = import_.load_hf(str(tmp_path / 'hf'))
  export.export(params, section, str(tmp_path / 'out'), dtype='bfloat16')
  config = json.loads((tmp_path / 'out' / 'config.json').read_text())
  assert config['dtype'] == config['torch_dtype'] == 'bfloat16'
  with safe_open(str(tmp_path / 'out' / 'model.safetensors'), 'numpy') as f:
    embed = f.get_tensor('model.embed_tokens.weight')
  assert embed.dtype == ml_dtypes.bfloat16
  np.testing.assert_array_equal(embed, params['embed_tokens'].astype(ml_dtypes.bfloat16))
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / 'out', dtype='auto')
  assert reloaded.dtype == torch.bfloat16
  logits = hf_logits(reloaded, tokens)
  assert np.abs(logits - hf_logits(model, tokens)).max() < 0.05  # bf16 weights: loose


def test_config_json_has_both_transformers_forms():
  section = hf.model_config_from_hf(transformers.LlamaConfig(
      **TINY, rope_parameters=LLAMA3_ROPE).to_dict())
  config = hf.model_config_to_hf(section)
  assert config['rope_parameters']['rope_type'] == config['rope_scaling']['rope_type'] == 'llama3'
  assert config['rope_theta'] == config['rope_parameters']['rope_theta'] == 500_000.0
  # The 4.x form alone (rope_theta + rope_scaling with `type`) reads the same.
  old = {k: v for k, v in config.items() if k != 'rope_parameters'}
  old['rope_scaling'] = {k if k != 'rope_type' else 'type': v
                         for k, v in config['rope_scaling'].items()}
  assert hf.model_config_from_hf(old) == section
  loaded = transformers.LlamaConfig.from_dict(old)
  assert loaded.rope_parameters['rope_type'] == 'llama3'
  assert loaded.rope_parameters['rope_theta'] == 500_000.0


def test_import_writes_a_checkpoint_that_init_from_reads(tmp_path):
  model = hf_model('qwen3')
  model.save_pretrained(tmp_path / 'hf')
  save_hf_tokenizer(tmp_path / 'hf')
  section = import_.convert(str(tmp_path / 'hf'), str(tmp_path / 'out'))
  ckpt, step = checkpoint_lib.open_for_init(str(tmp_path / 'out' / 'checkpoints'))
  cfg = model_lib.ModelConfig.from_section(section)
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  abstract = hf.abstract_params(cfg, dtype='float32', sharding=device)
  params = ckpt.restore_params(step, abstract)  # what checkpoint.init_from does
  q_path = ('layers', 'self_attn', 'q_proj')
  alone = ckpt.read_param(step, q_path, abstract['layers']['self_attn']['q_proj'])  # the exporter
  with pytest.raises(checkpoint_lib.CheckpointError, match="no parameter 'layers.self_attn.nope'"):
    ckpt.read_param(step, ('layers', 'self_attn', 'nope'), abstract['layers']['self_attn']['q_proj'])
  assert ckpt.saved_config(step)['data'] == {'seq_len': TINY['max_position_embeddings']}
  ckpt.close()
  q = model.state_dict()['model.layers.1.self_attn.q_proj.weight'].numpy()
  np.testing.assert_array_equal(np.asarray(params['layers']['self_attn']['q_proj'][1]),
                                q.T.reshape(64, 4, 32))
  np.testing.assert_array_equal(alone, np.asarray(params['layers']['self_attn']['q_proj']))
  # The written config file is a jaxllm fine-tuning config: the model section, init_from, the
  # model's own tokenizer, the context length as seq_len, fine-tuning optimizer settings.
  spec = importlib.util.spec_from_file_location('cfg', tmp_path / 'out' / 'config.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  assert config.model.qk_norm and config.model.head_dim == 32
  assert config.checkpoint.init_from == str(tmp_path / 'out' / 'checkpoints')
  assert config.data.tokenizer == str(tmp_path / 'out' / 'tokenizer')
  for name in ('tokenizer.json', 'tokenizer_config.json', 'chat_template.jinja'):
    assert (tmp_path / 'out' / 'tokenizer' / name).read_bytes() == (tmp_path / 'hf' / name).read_bytes()
  assert (tmp_path / 'out' / 'tokenizer' / 'generation_config.json').is_file()
  assert config.data.seq_len == TINY['max_position_embeddings']  # 256, under the 2048 cap
  assert (config.optim.peak_lr, config.optim.weight_decay) == (2e-5, 0.0)
  assert config.optim.warmup_steps < config.train.num_steps // 10
  assert config.train.sample_prompts == () and config.data.eval_fraction > 0
  from jaxllm import sources
  with pytest.raises(ValueError, match='data.sources is required by this config'):
    sources.resolve_specs(config.data.sources)  # the fine-tune has no default data
  from jaxllm import config as config_lib
  config_lib.validate(config, dict(data=1, fsdp=1, tensor=1))
  # The import's output reopens as a run: exporting a step it lacks names the flag, not a key.
  with pytest.raises(checkpoint_lib.CheckpointError, match=r'--step=7 is not a checkpoint of '
                     r'--workdir=.*steps \[0\]'):
    export.export_run(str(tmp_path / 'out'), str(tmp_path / 'again'), step=7)


def test_converters_protect_their_output(tmp_path):
  """A non-empty --out is refused without --overwrite (an earlier import's step 0 would stay
  while config.py changed); --overwrite really replaces the weights, and a stale single-file
  export cannot shadow a new sharded one; --out equal to the source is always refused; a folder
  name with quotes cannot break out of the generated config.py's docstring."""
  first, second = hf_model('llama2', seed=0), hf_model('llama2', seed=1)
  src = tmp_path / 'hf """x'
  first.save_pretrained(src)
  save_hf_tokenizer(src)
  out = tmp_path / 'run'
  import_.convert(str(src), str(out))
  with pytest.raises(FileExistsError, match=f'--out={out} is not empty.*--overwrite'):
    import_.convert(str(src), str(out))
  with pytest.raises(ValueError, match='is the folder being converted'):
    import_.convert(str(src), str(src), overwrite=True)
  second.save_pretrained(src)
  import_.convert(str(src), str(out), overwrite=True)
  spec = importlib.util.spec_from_file_location('cfg', out / 'config.py')
  spec.loader.exec_module(importlib.util.module_from_spec(spec))  # still valid Python
  hf_out = tmp_path / 'hf_out'
  export.export_run(str(out), str(hf_out))
  with pytest.raises(FileExistsError, match='--overwrite'):
    export.export_run(str(out), str(hf_out))
  export.export_run(str(out), str(hf_out), overwrite=True, max_shard_bytes=20_000)
  assert not (hf_out / 'model.safetensors').exists()  # would shadow the shards in transformers
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(hf_out, dtype=torch.float32)
  want = second.state_dict()['model.layers.0.mlp.up_proj.weight']
  np.testing.assert_array_equal(reloaded.state_dict()['model.layers.0.mlp.up_proj.weight'], want)


def test_command_lines_round_trip(tokens, tmp_path):
  """HF -> tools/convert_from_hf.py -> a jaxllm checkpoint dir -> tools/convert_to_hf.py -> HF,
  with the tokenizer taken from another folder (--tokenizer) and given back with the model."""
  import subprocess
  model = hf_model('llama3')
  model.save_pretrained(tmp_path / 'hf')
  theirs = save_hf_tokenizer(tmp_path / 'tok')
  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=str(REPO))
  run = lambda *args: subprocess.run([sys.executable, *args], cwd=REPO, env=env,
                                     capture_output=True, text=True)
  # No tokenizer in the folder: refused in one line that names the flag, before any file.
  proc = run('tools/convert_from_hf.py', f'--hf={tmp_path / "hf"}', f'--out={tmp_path / "jax"}')
  assert proc.returncode != 0 and 'pass --tokenizer=PATH' in proc.stderr.strip().splitlines()[-1]
  assert not (tmp_path / 'jax').exists()
  proc = run('tools/convert_from_hf.py', f'--hf={tmp_path / "hf"}', f'--out={tmp_path / "jax"}',
             f'--tokenizer={tmp_path / "tok"}')
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert '--config.data.sources=' in proc.stdout
  # The import's output directory has the layout of a run's workdir (config.json, checkpoints/).
  proc = run('tools/convert_to_hf.py', f'--workdir={tmp_path / "jax"}', f'--out={tmp_path / "out"}')
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert 'from step 0' in proc.stdout
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(
      tmp_path / 'out', dtype=torch.float32, attn_implementation='eager')
  np.testing.assert_array_equal(hf_logits(reloaded, tokens), hf_logits(model, tokens))
  config = json.loads((tmp_path / 'out' / 'config.json').read_text())
  assert config['max_position_embeddings'] == TINY['max_position_embeddings']
  # The model's own generation_config.json (its stop tokens) comes back as it was, and sets
  # config.json's ids.
  generation = (tmp_path / 'hf' / 'generation_config.json').read_bytes()
  assert (tmp_path / 'out' / 'generation_config.json').read_bytes() == generation
  generation = json.loads(generation)
  assert config['eos_token_id'] == generation['eos_token_id']
  back = transformers.AutoTokenizer.from_pretrained(tmp_path / 'out')
  chat = [{'role': 'user', 'content': 'Who wrote Hamlet?'},
          {'role': 'assistant', 'content': 'Shakespeare.'}]
  assert back.apply_chat_template(chat) == theirs.apply_chat_template(chat)


def test_pickled_weights_are_refused(tmp_path):
  (tmp_path / 'pytorch_model.bin').write_bytes(b'not read')
  (tmp_path / 'config.json').write_text(json.dumps(transformers.LlamaConfig(**TINY).to_dict()))
  with pytest.raises(hf.UnsupportedError, match='pytorch_model.bin.*unpickling runs arbitrary'):
    import_.load_hf(str(tmp_path))


@pytest.mark.parametrize('change, named', [
    (dict(model_type='gpt2'), "model_type='gpt2'"),
    (dict(rope_parameters=dict(rope_type='yarn', rope_theta=1e4, factor=4.0)), "'yarn'"),
    (dict(rope_parameters=None, rope_scaling=dict(type='dynamic', factor=2.0)), "'dynamic'"),
    (dict(mlp_bias=True), 'mlp_bias'),
    (dict(hidden_act='gelu'), 'hidden_act'),
    (dict(architectures=['LlamaForSequenceClassification']), 'architectures'),
])
def test_unsupported_config_is_refused_by_name(change, named):
  config = transformers.LlamaConfig(**TINY).to_dict() | change
  with pytest.raises(hf.UnsupportedError, match=named.replace('(', r'\(')):
    hf.model_config_from_hf(config)


def test_qwen_sliding_window_is_refused():
  config = transformers.Qwen2Config(**TINY, use_sliding_window=True).to_dict()
  with pytest.raises(hf.UnsupportedError, match='use_sliding_window'):
    hf.model_config_from_hf(config)


# A model folder written with the safetensors package alone (no torch): the tensors of a tiny
# Llama by their HF names, in one file or two shards with their index.
FOLDER_MODEL = dict(vocab_size=32, d_model=8, n_layers=2, n_heads=2, n_kv_heads=1, head_dim=4,
                    mlp_dim=16)


def write_folder(path, *, shards=1):
  from safetensors.numpy import save_file
  cfg = model_lib.ModelConfig.from_section(FOLDER_MODEL)
  rng = np.random.default_rng(0)
  tensors = {name: rng.standard_normal(shape).astype(np.float32)
             for name, shape in hf.hf_tensor_shapes(cfg).items()}
  path.mkdir()
  (path / 'config.json').write_text(json.dumps(hf.model_config_to_hf(FOLDER_MODEL)))
  names = list(tensors)
  groups = [names] if shards == 1 else [names[:len(names) // 2], names[len(names) // 2:]]
  for file, group in zip(safetensors_io.shard_file_names(len(groups)), groups):
    save_file({n: tensors[n] for n in group}, str(path / file))
  if shards > 1:
    index = safetensors_io.shard_index(groups, 0)
    (path / safetensors_io.INDEX_FILE).write_text(json.dumps(index))
  return tensors


def assert_params_are(params, tensors):
  cfg = model_lib.ModelConfig.from_section(FOLDER_MODEL)
  jax.tree.map(np.testing.assert_array_equal, params, hf.from_hf(tensors, tensors.get, cfg))


@pytest.mark.parametrize('shards', [1, 2])
def test_stray_weight_files_beside_the_model_are_skipped(tmp_path, shards, caplog):
  """Mistral's repos ship consolidated.safetensors (other names, the same weights) beside the
  transformers files, and a PEFT adapter may sit in the folder: the import reads what
  transformers reads (model.safetensors, else the files the index names) and says what it
  skipped."""
  from safetensors.numpy import save_file
  folder = tmp_path / 'hf'
  tensors = write_folder(folder, shards=shards)
  save_file({'layers.0.attention.wq.weight': np.ones((8, 8), np.float32)},
            str(folder / 'consolidated.safetensors'))
  save_file({'model.norm.weight': np.zeros(8, np.float32)},  # a name the model has, other values
            str(folder / 'adapter_model.safetensors'))
  with caplog.at_level('WARNING'):
    params, _ = import_.load_hf(str(folder))
  assert_params_are(params, tensors)
  assert 'skipping adapter_model.safetensors, consolidated.safetensors' in caplog.text


def test_index_names_the_files_read(tmp_path):
  """Only the index's files are read, every one of them must be there, a tensor in two of them
  is refused naming both (never the last one read winning), and a cut index is named."""
  from safetensors.numpy import load_file, save_file
  folder = tmp_path / 'hf'
  write_folder(folder, shards=2)
  first, second = safetensors_io.shard_file_names(2)
  os.rename(folder / second, tmp_path / second)
  with pytest.raises(FileNotFoundError, match=f'{second}, named by {safetensors_io.INDEX_FILE}, '
                     'is missing'):  # one file: no '(and 0 more)'
    import_.load_hf(str(folder))
  os.rename(tmp_path / second, folder / second)
  twice = load_file(str(folder / second)) | {'model.embed_tokens.weight': np.zeros((32, 8),
                                                                                  np.float32)}
  save_file(twice, str(folder / second))  # also still in the first shard
  with pytest.raises(hf.UnsupportedError, match=f"'model.embed_tokens.weight' is in both {first} "
                     f'and {second}'):
    import_.load_hf(str(folder))
  del twice['model.embed_tokens.weight'], twice['model.norm.weight']
  save_file(twice, str(folder / second))  # the index still places model.norm.weight there
  with pytest.raises(hf.UnsupportedError, match=f"'model.norm.weight' in {second}, which lacks it"):
    import_.load_hf(str(folder))
  (folder / safetensors_io.INDEX_FILE).write_text('{"weight_map": ')  # a cut download
  with pytest.raises(hf.UnsupportedError, match='index.json is not a safetensors index'):
    import_.load_hf(str(folder))


def test_a_folder_without_the_transformers_files_is_refused_by_name(tmp_path):
  from safetensors.numpy import save_file
  folder = tmp_path / 'hf'
  write_folder(folder)
  os.rename(folder / safetensors_io.SINGLE_FILE, folder / 'consolidated.safetensors')
  save_file({'x': np.zeros(2, np.float32)}, str(folder / 'adapter_model.safetensors'))
  with pytest.raises(hf.UnsupportedError, match='has adapter_model.safetensors, consolidated'
                     '.safetensors but neither model.safetensors nor model.safetensors.index.json'):
    import_.load_hf(str(folder))
  (folder / 'empty').mkdir()
  with pytest.raises(hf.UnsupportedError, match='empty has no \\*.safetensors weights'):
    safetensors_io.weight_files(str(folder / 'empty'))


def test_import_finds_the_model_tokenizer_or_refuses(tmp_path):
  """tokenizer.json first (Llama 3, Qwen, Mistral), else a sentencepiece tokenizer.model; one of
  another format (tiktoken's base64 lines, as Llama 3's original/ folder has) is no tokenizer:
  the import is refused, naming the folder and --tokenizer, before anything is written.
  --tokenizer takes a folder with tokenizer.json or a sentencepiece model, and nothing else."""
  import base64
  from jaxllm import rundir, tokenizer as tokenizer_lib
  folder = tmp_path / 'hf'
  write_folder(folder)
  tiktoken = b''.join(base64.b64encode(bytes([i])) + b' %d\n' % i for i in range(256))
  (folder / 'tokenizer.model').write_bytes(tiktoken)
  with pytest.raises(FileNotFoundError, match=f'{folder} has no tokenizer.json and no '
                     'sentencepiece tokenizer.model: pass --tokenizer=PATH'):
    import_.convert(str(folder), str(tmp_path / 'a'))
  assert not (tmp_path / 'a').exists()
  with pytest.raises(FileNotFoundError, match=f'--tokenizer={folder / "tokenizer.model"} is '
                     'neither a folder with tokenizer.json nor a sentencepiece'):
    import_.convert(str(folder), str(tmp_path / 'a'), tokenizer=str(folder / 'tokenizer.model'))

  tokenizer_lib.train_sentencepiece(str(folder / 'tokenizer.model'),
                                    ['Text to learn pieces from.'] * 20, 300)
  import_.convert(str(folder), str(tmp_path / 'b'))
  copy = rundir.RunDir(str(tmp_path / 'b')).tokenizer_path()
  config_py = (tmp_path / 'b' / 'config.py').read_text()
  assert f'c.data.tokenizer = {os.path.abspath(copy)!r}' in config_py
  assert open(copy, 'rb').read() == (folder / 'tokenizer.model').read_bytes()
  # The context length of this config.json (4096) is capped for data.seq_len.
  assert 'c.data.seq_len = 2048' in config_py

  save_hf_tokenizer(folder)  # beside the sentencepiece model: tokenizer.json wins
  import_.convert(str(folder), str(tmp_path / 'c'))
  carried = tmp_path / 'c' / 'tokenizer'
  assert f"c.data.tokenizer = '{carried}'" in (tmp_path / 'c' / 'config.py').read_text()
  assert sorted(os.listdir(carried)) == ['chat_template.jinja', 'tokenizer.json',
                                         'tokenizer.model', 'tokenizer_config.json']
  assert not os.path.exists(rundir.RunDir(str(tmp_path / 'c')).tokenizer_path())


def test_writers_replace_whole_files_and_remove_stale_temps(tmp_path):
  """Every file a converter writes is written under a temp name and renamed: an interrupted
  write leaves the old file, and its temp file (from a killed process) goes on the next write."""
  folder = tmp_path / 'hf'
  write_folder(folder)
  params, section = import_.load_hf(str(folder))
  out = tmp_path / 'out'
  out.mkdir()
  stale = ['model.safetensors.tmp4242', 'model-00001-of-00003.safetensors.tmp7',
           'model.safetensors.index.json.tmp', 'config.json.tmp12',
           'generation_config.json.tmp3']
  for name in stale:
    (out / name).write_bytes(b'half a file')
  (out / 'notes.txt.tmp1').write_text('not a converter file')
  export.export(params, section, str(out))
  assert sorted(os.listdir(out)) == ['config.json', 'generation_config.json', 'model.safetensors',
                                     'notes.txt.tmp1']
  # A write that fails midway (a tensor of the wrong shape) keeps the file it was replacing.
  before = (out / 'model.safetensors').read_bytes()
  layout = [('a', (2,)), ('b', (3,))]
  tensors = iter([('a', np.zeros(2, np.float32)), ('b', np.zeros(4, np.float32))])
  with pytest.raises(AssertionError):
    safetensors_io.write_file(str(out / 'model.safetensors'), tensors, layout, np.float32)
  assert (out / 'model.safetensors').read_bytes() == before
  assert not [n for n in os.listdir(out) if n.startswith('model.safetensors.tmp')]
  # The import's own files: config.py (and config.json, through rundir).
  run = tmp_path / 'run'
  run.mkdir()
  (run / 'config.py.tmp99').write_text('half a config')
  save_hf_tokenizer(folder)
  import_.convert(str(folder), str(run), overwrite=True)
  assert not [n for n in os.listdir(run) if '.tmp' in n]


def test_unknown_tensor_is_refused():
  section = hf.model_config_from_hf(transformers.LlamaConfig(**TINY).to_dict())
  cfg = model_lib.ModelConfig.from_section(section)
  names = list(hf.hf_tensor_shapes(cfg)) + ['model.layers.0.mlp.up_proj.bias']
  with pytest.raises(hf.UnsupportedError, match='up_proj.bias'):
    hf.from_hf(names, lambda n: None, cfg)


def test_key_table_covers_every_parameter_of_every_variant():
  cfg = model_lib.ModelConfig(vocab_size=16, d_model=8, n_layers=2, n_heads=2, n_kv_heads=1,
                              head_dim=4, mlp_dim=8, qkv_bias=True, o_bias=True, qk_norm=True)
  specs = hf.tensor_specs(cfg)
  assert len(specs) == 3 + 2 * 15
  assert sum(np.prod(s.hf_shape) for s in specs) == cfg.num_params()


def test_shard_plan():
  plan = safetensors_io.shard_plan([('a', 4), ('b', 4), ('c', 10), ('d', 1)], max_shard_bytes=8)
  assert plan == [['a', 'b'], ['c'], ['d']]
  assert safetensors_io.shard_index(plan, 19)['weight_map']['c'] == 'model-00002-of-00003.safetensors'


# Where sentencepiece and a careless HF conversion part: a leading space ('▁▁a', not '▁a'),
# whitespace runs and ends, newlines and tabs, the empty text, chars the tokenizer never saw (byte
# fallback), '▁' itself, and special-token spellings that sentencepiece reads as plain text.
TOKENIZER_TEXTS = ['', ' ', '   ', ' a', '  a', 'a ', 'a  ', ' Hello world', 'Two  spaces  ',
                   '\n', ' \n', '\n ', '\n\nnewlines\tand a tab\r\n', ' \t x', '▁', ' ▁▁a ▁',
                   'ünïcödé ☃ 12345 😀', '\x00\x1b[0m\u200b\ufeff', '<s> and </s>, <unk> or <0x41>']


@pytest.mark.parametrize('options', [
    {},  # jaxllm's default: BPE, byte fallback, identity normalization
    {'user_defined_symbols': ['<tool>', '</tool>']},  # tools/train_tokenizer.py --special_tokens
    {'model_type': 'unigram', 'user_defined_symbols': ['<tool>']},
], ids=['bpe', 'bpe-special', 'unigram'])
def test_exported_tokenizer_encodes_like_jaxllm(tmp_path, options):
  """AutoTokenizer, offline, on the exported files: bos + the ids of jaxllm's tokenizer, and the
  text back from decode, on held-out Shakespeare (as is, and after a space) and edge cases."""
  from jaxllm import data, sources, tokenizer as tokenizer_lib
  files = sources.list_source_files(sources.default_source_dir())
  train = sources.split_documents(sources.read_text(files[0]))[:200]
  held_out = sources.split_documents(sources.read_text(files[1]))[:40]
  # Markup for the BPE tokenizers, so that pieces such as '</' span control-token spellings;
  # the unigram one is left without '<' (where tokenizers' lattice reached control pieces).
  if options.get('model_type') != 'unigram':
    train += [f'<p>A <b>bold</b> and <s>struck</s> line {i}.</p>' for i in range(100)]
  data.train_tokenizer(str(tmp_path / 'tokenizer.model'), train, 512, **options)
  out = tmp_path / 'out'
  out.mkdir()
  ours = tokenizer_lib.open_tokenizer(str(tmp_path / 'tokenizer.model'))
  export.write_tokenizer(ours.model_proto(), str(out), model_max_length=1 << 20)
  # A model_type, as an export has, takes AutoTokenizer down the route a real export does.
  (out / 'config.json').write_text(json.dumps({'model_type': 'llama'}))
  theirs = transformers.AutoTokenizer.from_pretrained(out)
  assert any(ours.sp.is_byte(i) for i in ours.encode('☃'))  # byte fallback is exercised
  texts = TOKENIZER_TEXTS + held_out + [' ' + t for t in held_out[:10]]
  texts += ['<tool>x</tool> <tool>', ' <tool>']
  # Control-token and byte-piece spellings stay text, also beside a user-defined piece (where
  # BPE's ignore_merges would emit a pre-token that is a vocabulary entry whole) and in the
  # unigram model (whose lattice would take one where '<' is not in the vocabulary).
  texts += ['a</s>b<s>', '<tool></s>', '</tool><s>x', '<tool><0x41>', ' <unk>', '<s>struck</s>',
            '<p><s>x</s></p>', '<|eot_id|><|start_header_id|>', '<|im_end|>', '[INST] x [/INST]']
  for text in texts:
    # As text, as sentencepiece reads it: the export leaves split_special_tokens False (so that
    # a chat template's '</s>' is EOS), so a document asks for it.
    ids = theirs(text, split_special_tokens=True)['input_ids']
    assert ids == [ours.bos_id] + ours.encode(text), repr(text[:60])
    back = theirs.decode(ids, skip_special_tokens=True)
    assert back == ours.decode(ours.encode(text)), repr(text[:60])
    assert back == text or '▁' in text  # sentencepiece itself reads '▁' back as a space

  from sentencepiece import sentencepiece_model_pb2
  proto = sentencepiece_model_pb2.ModelProto.FromString(ours.sp.serialized_model_proto())
  proto.trainer_spec.treat_whitespace_as_suffix = True  # an option with no equivalent: refused
  with pytest.raises(hf.UnsupportedError, match='treat_whitespace_as_suffix'):
    hf_tokenizer.tokenizer_json(proto.SerializeToString())


def test_trained_model_generates_the_same_tokens_in_transformers(tmp_path):
  """Train a few steps on the embedded corpus, export with the CLI: transformers' greedy
  `generate` continues a held-out prompt with exactly jaxllm's greedy tokens."""
  import subprocess
  from jaxllm import rundir, sample as sample_lib, sharding, train
  workdir, out = tmp_path / 'run', tmp_path / 'hf'
  env = dict(os.environ, PYTHONPATH=str(REPO))
  run = lambda *args: subprocess.run([sys.executable, *args], cwd=REPO, env=env,
                                     capture_output=True, text=True, timeout=600)
  proc = run('-m', 'jaxllm.main', '--config=configs/tiny.py', f'--workdir={workdir}',
             '--config.train.num_steps=30', '--config.train.eval_every=0',
             '--config.train.eval_batches=1', '--config.optim.warmup_steps=3',
             '--config.model.vocab_size=512', '--config.model.n_layers=2',
             '--config.data.seq_len=64', '--config.train.sample_prompts=()')
  assert proc.returncode == 0, proc.stderr[-2000:]
  proc = run('tools/convert_to_hf.py', f'--workdir={workdir}', f'--out={out}')
  assert proc.returncode == 0, proc.stderr[-2000:]

  run_dir = rundir.RunDir(str(workdir))
  config, trainer, params, _ = run_dir.reopen(train.setup)
  tokenizer = run_dir.tokenizer(config)
  prompts = [[tokenizer.bos_id] + tokenizer.encode(text)
             for text in ('KING HENRY.\nWhat', 'ROMEO.\nO, my', 'First Citizen.\nWe are')]
  tokens_BP, starts_B = sample_lib.left_pad(prompts, rows=8)
  with sharding.activate(trainer.mesh, trainer.rules):
    ours = sample_lib.generate(trainer.graphdef, params, tokens_BP, starts_B, jax.random.key(0),
                               max_new_tokens=16, temperature=0.0)
  ours = np.asarray(ours['tokens'])[:len(prompts)].tolist()

  model = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32,
                                                            attn_implementation='eager')
  theirs = []
  for prompt in prompts:
    with torch.no_grad():
      theirs.append(model.generate(torch.tensor([prompt]), max_new_tokens=16, do_sample=False,
                                   eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist())
  assert theirs == ours, [tokenizer.decode(t) for t in theirs + ours]
  # A few steps of training leave a model that may repeat one token: the logits of the prompt
  # and its continuation, compared directly, are what makes this check sharp. They reach about 4
  # here, where a float32 ulp is 4.8e-7: 2.4e-6 measured (5 ulps), so 1e-5 as the bound.
  full = np.asarray([prompts[0] + ours[0]], np.int32)
  jax_out = np.asarray(jax.jit(lambda p, t: nnx.merge(trainer.graphdef, p)(t))(params, full))
  np.testing.assert_allclose(hf_logits(model, full), jax_out, atol=1e-5, rtol=0)
