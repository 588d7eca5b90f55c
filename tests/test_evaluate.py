"""Held-out evaluation: bits per byte by hand on a tiny corpus, byte counting, the CLI surface."""

import json
import math
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxllm import checkpoint as checkpoint_lib
from jaxllm import data as data_lib
from jaxllm import evaluate
from jaxllm import rundir
from jaxllm import sharding
from jaxllm import trainer as trainer_lib
from test_data import eval_stats
from test_train import small_config

SEQ, VOCAB = 32, 320
WORDS = ('the king doth wake tonight and sleeps at noon; café, naïve — fair Verona where we '
         'lay our scene. what light through yonder window breaks? it is the east and juliet is the '
         'sun. ').split()


def write_corpus(directory, files=4, words=400):
  rng = np.random.default_rng(0)
  for i in range(files):
    text = ' '.join(rng.choice(WORDS, words if i else 60))  # file 0: one short eval document
    (directory / f'{i}.txt').write_text(text + '\n', encoding='utf-8')


@pytest.fixture(scope='module')
def tiny(tmp_path_factory):
  root = tmp_path_factory.mktemp('corpus')
  write_corpus(root)
  pipeline = data_lib.make_pipeline(
      source_dir=str(root), cache_dir=str(root / 'cache'), tokenizer_path=str(root / 'spm.model'),
      vocab_size=VOCAB, seq_len=SEQ, batch_size=8, eval_files=1, seed=0)
  config = small_config()
  with config.unlocked():
    config.model.vocab_size = VOCAB
  mesh = sharding.make_mesh({'data': 1, 'fsdp': 1, 'tensor': 1}, jax.devices()[:1])
  trainer = trainer_lib.make_trainer(config, mesh)
  return pipeline, trainer, trainer.init_state()['params']


def hand_bits_per_byte(pipeline, trainer, params):
  """Each eval document as BOS + ids + EOS, cut into SEQ-token rows as the pipeline cuts it;
  nats summed from a plain forward pass; bytes straight from the text."""
  tok = pipeline.tokenizer
  forward = jax.jit(lambda p, x: nnx.merge(trainer.graphdef, p)(x))
  host_params = jax.device_get(params)
  nats, text_bytes = 0.0, 0
  for i in range(len(pipeline.sources.eval)):
    text = pipeline.sources.eval.text(i)
    text_bytes += len(text.encode('utf-8'))
    ids = [tok.bos_id, *tok.encode(text), tok.eos_id]
    for start in range(0, len(ids) - 1, SEQ):
      inputs, targets = ids[start:start + SEQ], ids[start + 1:start + SEQ + 1]
      row = np.zeros((1, SEQ), np.int32)
      row[0, :len(inputs)] = inputs  # padding after the row's end cannot change its logits
      logp = jax.nn.log_softmax(np.asarray(forward(host_params, jnp.asarray(row)))[0])
      nats -= float(sum(logp[t, y] for t, y in enumerate(targets)))
  return nats / math.log(2) / text_bytes, text_bytes


def test_bits_per_byte_matches_a_hand_computation(tiny):
  pipeline, trainer, params = tiny
  out = trainer_lib.evaluate(trainer, params, pipeline.eval_batches(),
                       count_bytes=pipeline.tokenizer.text_bytes_counter())
  want, text_bytes = hand_bits_per_byte(pipeline, trainer, params)
  assert out['eval_bytes'] == text_bytes == eval_stats(pipeline)['bytes']
  assert out['eval_tokens'] == eval_stats(pipeline)['tokens']
  np.testing.assert_allclose(out['eval_bits_per_byte'], want, rtol=1e-5)
  np.testing.assert_allclose(out['eval_perplexity'], math.exp(out['eval_loss']), rtol=1e-9)
  assert 'é' in pipeline.sources.eval.text(0)  # multi-byte characters were counted as bytes


def test_text_bytes_counter_counts_utf8_of_the_text(tiny):
  """The pieces' bytes less sentencepiece's dummy-prefix space: the text's UTF-8 length."""
  tok = tiny[0].tokenizer
  count = tok.text_bytes_counter()
  for text in ('naïve café', ' two  spaces\n', 'x'):
    ids = np.array([tok.bos_id, *tok.encode(text), tok.eos_id], np.int32)
    batch = {'inputs': ids[None, :-1], 'targets': ids[None, 1:],
             'segment_ids': np.ones((1, len(ids) - 1), np.int32)}
    assert count(batch) == len(text.encode('utf-8')), text


def test_missing_run_names_the_workdir(tmp_path):
  with pytest.raises(FileNotFoundError, match=f'--workdir={tmp_path} has no config.json'):
    evaluate.evaluate_run(str(tmp_path))


def test_a_multi_host_run_is_evaluated_on_this_host_with_mesh(tiny, tmp_path):
  """config.json of a run trained on 4 hosts (mesh.dcn_fsdp=4): its saved mesh cannot be built
  in this one process; --mesh=1,-1,1 replaces it (DCN factors back to 1) and gives the same loss."""
  pipeline, trainer, params = tiny
  root = pathlib.Path(pipeline.tokenizer.path).parent  # the corpus of the tiny fixture
  config = small_config()
  with config.unlocked():
    config.model.vocab_size = VOCAB
    config.data.update(source_dir=f'{root}/*.txt', cache_dir=str(root / 'cache'), eval_files=1,
                       tokenizer=str(root / 'spm.model'), seq_len=SEQ)
    config.mesh.update(data=1, fsdp=2, tensor=1, dcn_fsdp=4)
  run = rundir.RunDir(str(tmp_path / 'run'))
  run.write_config(config)
  ckpt = checkpoint_lib.Checkpointer(run.checkpoints())
  ckpt.save_params(7, params, json.loads(config.to_json_best_effort()))
  ckpt.close()
  with pytest.raises(ValueError, match=r'the mesh of --workdir=\S+ \(1,2,1,1,4\) does not fit the '
                                       r'devices here .*pass --mesh=DATA,FSDP,TENSOR'):
    evaluate.evaluate_run(run.workdir)
  out = evaluate.evaluate_run(run.workdir, mesh='1,-1,1')
  want = trainer_lib.evaluate(trainer, params, pipeline.eval_batches())
  assert out['step'] == 7 and out['eval_tokens'] == want['eval_tokens']
  np.testing.assert_allclose(out['eval_loss'], want['eval_loss'], rtol=1e-5)
  assert rundir.parse_mesh('2,-1,1') == dict(data=2, fsdp=-1, tensor=1, dcn_data=1, dcn_fsdp=1)
  for bad in ('1,2', '1,x,1', ''):
    with pytest.raises(ValueError, match='--mesh=.*write DATA,FSDP,TENSOR'):
      rundir.parse_mesh(bad)
