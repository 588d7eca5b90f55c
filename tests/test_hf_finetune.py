"""The Hugging Face converters for fine-tuning (issue 16): bf16 checkpoints, the tokenizer and
chat template going out with the model, the context length kept through a fine-tune.

Needs the `hf` extra (torch, transformers, safetensors); skipped without it. Tiny models and
tokenizers built here (no download)."""

import json
import os
import shutil

import pytest

os.environ.setdefault('HF_HUB_OFFLINE', '1')
torch = pytest.importorskip('torch', reason='the hf extra (torch) is not installed')
transformers = pytest.importorskip('transformers', reason='the hf extra is not installed')

import jax  # noqa: E402
import jinja2  # noqa: E402
import ml_dtypes  # noqa: E402
import numpy as np  # noqa: E402

from jaxllm import tokenizer as tokenizer_lib  # noqa: E402
from jaxllm.convert import export, hf_tokenizer, import_, safetensors_io  # noqa: E402
from test_hf import hf_model, save_hf_tokenizer, write_folder  # noqa: E402

CHAT = [{'role': 'system', 'content': 'You answer briefly.'},
        {'role': 'user', 'content': 'Who wrote Hamlet?'},
        {'role': 'assistant', 'content': 'Shakespeare.'},
        {'role': 'user', 'content': 'When?'},
        {'role': 'assistant', 'content': 'About 1600.'}]


def test_bfloat16_safetensors_import(tmp_path):
  """Hub checkpoints are bfloat16: read into float32 exactly (every bf16 value is a float32),
  and into bfloat16 bit for bit."""
  model = hf_model('llama3').to(torch.bfloat16)
  model.save_pretrained(tmp_path / 'bf16')
  with open(tmp_path / 'bf16' / 'model.safetensors', 'rb') as f:
    assert b'"BF16"' in f.read(4096)  # really a bf16 file
  model.float().save_pretrained(tmp_path / 'f32')  # the same values, widened by torch
  params, _ = import_.load_hf(str(tmp_path / 'bf16'))
  want, _ = import_.load_hf(str(tmp_path / 'f32'))
  jax.tree.map(np.testing.assert_array_equal, params, want)
  assert {x.dtype for x in jax.tree.leaves(params)} == {np.dtype(np.float32)}
  narrow, _ = import_.load_hf(str(tmp_path / 'bf16'), dtype='bfloat16')
  assert {x.dtype for x in jax.tree.leaves(narrow)} == {np.dtype(ml_dtypes.bfloat16)}
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(a.view(np.uint16),
                                                          b.astype(a.dtype).view(np.uint16)),
               narrow, want)


def test_a_cut_safetensors_file_is_named(tmp_path):
  folder = tmp_path / 'hf'
  write_folder(folder)
  path = folder / safetensors_io.SINGLE_FILE
  path.write_bytes(path.read_bytes()[:-10])
  with pytest.raises(ValueError, match=f'{path} is not a whole safetensors file .*ends past the '
                     'end of the file.*download it again'):
    import_.load_hf(str(folder))


def _run(tmp_path, tokenizer):
  """An imported run (random tiny weights) with `tokenizer` as the model's."""
  folder = tmp_path / 'hf'
  write_folder(folder)
  import_.convert(str(folder), str(tmp_path / 'run'), tokenizer=str(tokenizer))
  return tmp_path / 'run'


def _set_config(run, **data):
  path = run / 'config.json'
  config = json.loads(path.read_text())
  config['data'].update(data)
  path.write_text(json.dumps(config))


def test_sentencepiece_export_renders_chats_ending_turns_with_eos(tmp_path):
  """A sentencepiece model trained here goes out as tokenizer.json with jaxllm's default chat
  template: transformers' apply_chat_template renders it, and each assistant turn ends with the
  EOS id (not '</s>' spelt out), as the fine-tune was trained."""
  spm = tmp_path / 'tokenizer.model'
  tokenizer_lib.train_sentencepiece(str(spm), [m['content'] for m in CHAT] * 20, 300)
  ours = tokenizer_lib.open_tokenizer(str(spm))
  run = _run(tmp_path, spm)
  export.export_run(str(run), str(tmp_path / 'out'))
  config = json.loads((tmp_path / 'out' / 'tokenizer_config.json').read_text())
  assert config['chat_template'] == tokenizer_lib.DEFAULT_CHAT_TEMPLATE
  assert config['split_special_tokens'] is False
  theirs = transformers.AutoTokenizer.from_pretrained(tmp_path / 'out')
  ids = list(theirs.apply_chat_template(CHAT)['input_ids'])
  assert ids[0] == ours.bos_id and ids[1] != ours.bos_id  # the template's BOS, once
  assert ids[-1] == ours.eos_id
  assert ids.count(ours.eos_id) == sum(m['role'] == 'assistant' for m in CHAT)
  text = jinja2.Environment().from_string(tokenizer_lib.DEFAULT_CHAT_TEMPLATE).render(
      messages=CHAT, bos_token='<s>', eos_token='</s>', add_generation_prompt=False)
  assert theirs.apply_chat_template(CHAT, tokenize=False) == text
  # Between the special tokens, each piece of text is encoded as jaxllm encodes it.
  pieces = text.removeprefix('<s>').split('</s>')
  want = [ours.bos_id] + [i for piece in pieces[:-1] for i in ours.encode(piece) + [ours.eos_id]]
  assert pieces[-1] == '' and ids == want
  exported = json.loads((tmp_path / 'out' / 'config.json').read_text())
  assert (exported['bos_token_id'], exported['eos_token_id']) == (ours.bos_id, ours.eos_id)


def test_hf_tokenizer_goes_back_with_the_configured_chat_template(tmp_path):
  """An imported model's own tokenizer files go out as they came; a run that set
  data.chat_template exports that template instead (in tokenizer_config.json, and no stale
  chat_template.jinja, which transformers would prefer); a missing template file is refused
  before anything is written."""
  save_hf_tokenizer(tmp_path / 'tok')
  run = _run(tmp_path, tmp_path / 'tok')
  export.export_run(str(run), str(tmp_path / 'out'))
  for name in ('tokenizer.json', 'tokenizer_config.json', 'chat_template.jinja'):
    assert (tmp_path / 'out' / name).read_bytes() == (tmp_path / 'tok' / name).read_bytes()
  ids = hf_tokenizer.special_token_ids(str(tmp_path / 'out'))
  theirs = transformers.AutoTokenizer.from_pretrained(tmp_path / 'out')
  assert ids == {'bos_token_id': theirs.bos_token_id, 'eos_token_id': theirs.eos_token_id}
  config = json.loads((tmp_path / 'out' / 'config.json').read_text())
  assert (config['bos_token_id'], config['eos_token_id']) == tuple(ids.values())

  _set_config(run, chat_template='default')
  export.export_run(str(run), str(tmp_path / 'out'), overwrite=True)
  assert not (tmp_path / 'out' / 'chat_template.jinja').exists()
  theirs = transformers.AutoTokenizer.from_pretrained(tmp_path / 'out')
  text = jinja2.Environment().from_string(tokenizer_lib.DEFAULT_CHAT_TEMPLATE).render(
      messages=CHAT, bos_token=theirs.bos_token, eos_token=theirs.eos_token,
      add_generation_prompt=False)
  assert theirs.apply_chat_template(CHAT, tokenize=False) == text
  assert theirs.apply_chat_template(CHAT)['input_ids'][-1] == theirs.eos_token_id

  template = tmp_path / 'mine.jinja'
  template.write_text("{% for m in messages %}{{ m['content'] + eos_token }}{% endfor %}")
  _set_config(run, chat_template=str(template))
  export.export_run(str(run), str(tmp_path / 'out'), overwrite=True)
  config = json.loads((tmp_path / 'out' / 'tokenizer_config.json').read_text())
  assert config['chat_template'] == template.read_text()
  _set_config(run, chat_template=str(tmp_path / 'gone.jinja'))
  with pytest.raises(FileNotFoundError, match='data.chat_template=.*gone.jinja does not exist'):
    export.export_run(str(run), str(tmp_path / 'new'))
  assert not (tmp_path / 'new').exists()


def test_the_model_context_length_survives_a_fine_tune(tmp_path):
  """An import saves the model's context length (max_position_embeddings) as data.seq_len; a
  fine-tune trains shorter rows, and its export still writes the model's length, found through
  checkpoint.init_from (or its own seq_len when that checkpoint is gone)."""
  save_hf_tokenizer(tmp_path / 'tok')
  base = _run(tmp_path, tmp_path / 'tok')
  context = json.loads((tmp_path / 'hf' / 'config.json').read_text())['max_position_embeddings']
  # A stand-in for a fine-tuning run: its checkpoint saved with data.seq_len=64.
  params, model = import_.load_hf(str(tmp_path / 'hf'))
  ft = tmp_path / 'ft'
  import_.write_checkpoint(params, {'model': model, 'data': {'seq_len': 64}},
                           str(ft / 'checkpoints'))
  (ft / 'config.json').write_text(json.dumps({
      'model': model, 'data': {'seq_len': 64, 'tokenizer': str(base / 'tokenizer')},
      'checkpoint': {'init_from': str(base / 'checkpoints')}}))
  export.export_run(str(ft), str(tmp_path / 'out'))
  exported = json.loads((tmp_path / 'out' / 'config.json').read_text())
  assert exported['max_position_embeddings'] == context > 64
  shutil.rmtree(base / 'checkpoints')
  export.export_run(str(ft), str(tmp_path / 'out'), overwrite=True)
  assert json.loads((tmp_path / 'out' / 'config.json').read_text())[
      'max_position_embeddings'] == 64


def _load_config_py(path):
  import importlib.util
  spec = importlib.util.spec_from_file_location('imported_config', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def imported_chat_run(tmp_path, *, peak_lr: float, **train):
  """(config, end-of-turn id): a random tiny Llama-3-style HF model with a byte-level BPE
  tokenizer and chat template (test_chat.py), imported into `tmp_path/base`, its generated
  fine-tune config set to 30 steps of 8 x 128 tokens on the built-in chat demo."""
  from test_chat import llama3_tokenizer, save_hf
  hf_dir = tmp_path / 'hf'
  tok, specials = llama3_tokenizer()
  save_hf(hf_dir, tok, specials)
  eot = tok.token_to_id('<|eot_id|>')
  cfg = transformers.LlamaConfig(
      vocab_size=tok.get_vocab_size(), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
      bos_token_id=tok.token_to_id('<|begin_of_text|>'), eos_token_id=eot,
      tie_word_embeddings=False)
  torch.manual_seed(0)
  transformers.LlamaForCausalLM(cfg).save_pretrained(hf_dir)
  import_.convert(str(hf_dir), str(tmp_path / 'base'))
  config = _load_config_py(tmp_path / 'base' / 'config.py')
  with config.unlocked():
    config.data.sources = 'builtin:shakespeare_chat'
    config.data.seq_len = 128
    config.train.update(num_steps=30, global_batch_size=8, eval_every=0, eval_batches=4,
                        log_every=10, **train)
    config.optim.update(peak_lr=peak_lr, warmup_steps=3)
    config.checkpoint.every = 30
  return config, eot


def test_import_fine_tune_on_chats_export_and_generate_as_transformers_does(tmp_path):
  """The README's fine-tuning path on a random tiny Llama-3-style model with a byte-level BPE
  tokenizer and chat template: import, fine-tune 30 steps on the built-in chat demo, export.
  Held-out loss on assistant tokens falls; transformers loads the export (model, tokenizer and
  template), renders three held-out conversations to the prompt ids jaxllm renders, and its
  greedy generate gives the tokens jaxllm's chat sampling gives."""
  from jaxllm import chat, rundir, train
  from jaxllm import trainer as trainer_lib
  from jaxllm.sample import chat as sample_chat

  config, eot = imported_chat_run(tmp_path, peak_lr=3e-3)  # a random model, not a pretrained one
  workdir = str(tmp_path / 'ft')
  trainer = train.setup(config)
  pipeline = train.make_pipeline(config, workdir, trainer.process_batch_size(8, 128))
  assert pipeline.weights and pipeline.sources.eval.chat
  held_out = lambda params: trainer_lib.evaluate(trainer, params, pipeline.eval_batches(4))['eval_loss']
  base, _ = rundir.RunDir(str(tmp_path / 'base')).restore_params(
      config, trainer.abstract_state['params'])
  before = held_out(base)
  state = train.train_and_evaluate(config, workdir)['state']
  after = held_out(state['params'])
  print(f'held-out loss on assistant tokens: {before:.3f} -> {after:.3f}')
  assert after < before - 0.5, (before, after)

  export.export_run(workdir, str(tmp_path / 'out'))
  theirs_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / 'out')
  theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / 'out',
                                                             dtype=torch.float32)
  ours_tok = rundir.RunDir(workdir).tokenizer(config)
  docs = pipeline.sources.eval
  conversations = [json.loads(docs.text(i))[:-1] for i in (0, len(docs) // 2, len(docs) - 1)]
  ours = sample_chat.replies(trainer.graphdef, state['params'], ours_tok, conversations,
                             mesh=trainer.mesh, rules=trainer.rules, max_new_tokens=12)
  for conversation, our_ids in zip(conversations, ours):
    prompt = theirs_tok.apply_chat_template(conversation, add_generation_prompt=True,
                                            tokenize=True, return_dict=True)['input_ids']
    assert prompt == chat.prompt_ids(ours_tok, conversation).tolist()
    out = theirs.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False,
                          eos_token_id=chat.end_of_turn_ids(ours_tok))[0, len(prompt):].tolist()
    stop = next((i for i, t in enumerate(out) if t in chat.end_of_turn_ids(ours_tok)), len(out))
    assert out[:stop] == our_ids and stop < len(out)  # both stop at the end of turn
  # The CLI on a multi-turn file prints the same replies.
  chats = tmp_path / 'held_out.jsonl'
  chats.write_text(''.join(json.dumps({'messages': c}) + '\n' for c in conversations))
  import subprocess
  import sys
  proc = subprocess.run([sys.executable, '-m', 'jaxllm.sample', f'--workdir={workdir}',
                         f'--chat_file={chats}', '--temperature=0', '--max_new_tokens=12'],
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert proc.stdout == ''.join(ours_tok.decode(ids) + '\n\n' for ids in ours)
  # Thirty steps teach short replies: 12 tokens past the end of turn compare the models further.
  from jaxllm import sample
  prompts = [chat.prompt_ids(ours_tok, c).tolist() for c in conversations]
  ours = sample.generate_ids(trainer.graphdef, state['params'], prompts, mesh=trainer.mesh,
                             rules=trainer.rules, stop_ids=[-1], max_new_tokens=12)
  theirs.generation_config.eos_token_id = None
  for prompt, our_ids in zip(prompts, ours):
    out = theirs.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False)
    assert out[0, len(prompt):].tolist() == our_ids and len(our_ids) == 12
