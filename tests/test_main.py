"""The command-line programs, end to end, as a user runs them.

One tiny run of `jaxllm.main` (module fixture) is reopened by the others: `jaxllm.evaluate` and
`jaxllm.sample` must reproduce what the run itself logged at its last step (same checkpoint,
same batches, same sampling seed), and the data tools read the same config keys as the run.
"""

import json
import os
import pathlib
import subprocess
import sys

import pytest
from sentencepiece import sentencepiece_model_pb2
from tensorboard.backend.event_processing import event_accumulator

REPO = pathlib.Path(__file__).parent.parent
# Scripts in tools/ import jaxllm from this checkout, not from wherever it is installed.
ENV = {**os.environ, 'PYTHONPATH': os.pathsep.join(filter(None, [str(REPO),
                                                                  os.environ.get('PYTHONPATH')]))}
# The run's shape; every tool that reads the run's tokenizer or data takes the same overrides.
RUN_FLAGS = ('--config=configs/tiny.py', '--config.model.vocab_size=512')
PROMPTS = ('ROMEO:', 'To be, or not')  # train.sample_prompts of the tiny config


def run_cli(*args, ok=True, timeout=600):
  proc = subprocess.run([sys.executable, *args], cwd=REPO, env=ENV, capture_output=True,
                        text=True, timeout=timeout)
  if ok:
    assert proc.returncode == 0, proc.stderr[-3000:]
  return proc


def json_lines(stdout: str) -> list[dict]:
  return [json.loads(line) for line in stdout.splitlines() if line.startswith('{')]


def logged(acc, tag) -> dict[int, float]:
  return {e.step: e.value for e in acc.Scalars(tag)}


@pytest.fixture(scope='module')
def run(tmp_path_factory):
  """6 steps of the tiny model on a (2, 4, 1) mesh of the 8 fake devices; evals at 3 and 6 over
  the whole held-out split (about 9 batches); the checkpoint of step 6 is kept."""
  workdir = tmp_path_factory.mktemp('main') / 'run'
  proc = run_cli('-m', 'jaxllm.main', *RUN_FLAGS, f'--workdir={workdir}',
                 '--config.train.num_steps=6', '--config.train.log_every=2',
                 '--config.train.eval_every=3', '--config.train.eval_batches=0',
                 '--config.optim.warmup_steps=2', '--config.mesh.data=2')
  acc = event_accumulator.EventAccumulator(str(workdir / 'tensorboard'))
  acc.Reload()
  return workdir, proc.stderr, acc


def test_main_job_trains_and_writes_tensorboard(run):
  workdir, stderr, acc = run
  assert 'step 6/6' in stderr and 'eval at step 6' in stderr
  assert (workdir / 'tokenizer.model').exists() and (workdir / 'config.json').exists()
  tags = acc.Tags()['scalars']
  assert list(logged(acc, 'train/loss')) == [2, 4, 6]
  assert list(logged(acc, 'eval/loss')) == [3, 6]
  assert 'train/tokens_per_s' in tags
  losses = list(logged(acc, 'train/loss').values())
  assert 4.0 < losses[-1] < losses[0]  # ln(512) = 6.24 at init; it must have learnt something


def test_misspelt_override_fails_with_the_key(tmp_path):
  proc = run_cli('-m', 'jaxllm.main', '--config=configs/tiny.py', f'--workdir={tmp_path}',
                 '--config.train.num_stepz=3', ok=False, timeout=120)
  assert proc.returncode != 0
  assert 'num_stepz' in proc.stderr
  assert not any(tmp_path.iterdir())  # nothing written


@pytest.fixture(scope='module')
def evaluated(run):
  return json_lines(run_cli('-m', 'jaxllm.evaluate', f'--workdir={run[0]}').stdout)[-1]


def test_evaluate_reproduces_the_runs_last_eval(run, evaluated):
  """The reopened checkpoint, config and tokenizer give the loss the run logged at step 6 (over
  the same whole held-out split); TensorBoard stores float32, hence the tolerance."""
  loss, bits = logged(run[2], 'eval/loss'), logged(run[2], 'eval/bits_per_byte')
  assert evaluated['step'] == 6
  assert evaluated['eval_loss'] == pytest.approx(loss[6], rel=1e-5)
  assert evaluated['eval_loss'] != pytest.approx(loss[3], rel=1e-3)  # step 6's weights, not 3's
  assert evaluated['eval_bits_per_byte'] == pytest.approx(bits[6], rel=1e-5)


def logged_texts(acc, step) -> list[str]:
  """The run's samples at `step`, without the code fences the writer adds."""
  texts = []
  for i in range(len(PROMPTS)):
    event, = [e for e in acc.Tensors(f'samples/{i}') if e.step == step]
    text = event.tensor_proto.string_val[0].decode('utf-8')
    assert text.startswith('```\n') and text.endswith('\n```')
    texts.append(text[4:-4])
  return texts


def test_sample_reproduces_the_runs_last_samples(run):
  """Same prompts, temperature, seed and length as the run's own eval samples (train.sample_*):
  the CLI must print the same texts, each starting with its prompt."""
  args = [f'--prompt={p}' for p in PROMPTS]
  out = run_cli('-m', 'jaxllm.sample', f'--workdir={run[0]}', *args, '--max_new_tokens=48',
                '--temperature=0.8', '--seed=0').stdout
  want = logged_texts(run[2], 6)
  assert all(text.startswith(prompt) and len(text) > len(prompt) + 10
             for text, prompt in zip(want, PROMPTS))
  assert out == ''.join(f'{text}\n\n' for text in want)


def test_sample_with_a_missing_step_names_the_flag(run):
  proc = run_cli('-m', 'jaxllm.sample', f'--workdir={run[0]}', '--step=5', ok=False)
  assert proc.returncode != 0
  assert '--step=5 is not a checkpoint of --workdir=' in proc.stderr
  assert 'it has steps [6]' in proc.stderr


def test_prepare_data_caches_what_evaluate_reads(run, evaluated):
  """The token caches of the run's own data and tokenizer (found, not rebuilt): the eval cache
  holds exactly the targets and UTF-8 bytes that the evaluation counted from its batches."""
  workdir = run[0]
  tokenizer = (workdir / 'tokenizer.model').read_bytes()
  lines = json_lines(run_cli('tools/prepare_data.py', *RUN_FLAGS, f'--workdir={workdir}').stdout)
  assert [l['split'] for l in lines] == ['train', 'eval']
  for line in lines:
    assert pathlib.Path(line['path']).parent == workdir / 'data' / 'tokens'
    assert line['tokenizer'] == str(workdir / 'tokenizer.model')
  train, ev = lines
  assert train['docs'] > 10 * ev['docs'] > 0
  assert (ev['tokens'], ev['bytes']) == (evaluated['eval_tokens'], evaluated['eval_bytes'])
  assert (workdir / 'tokenizer.model').read_bytes() == tokenizer  # reused, not retrained


def test_benchmark_data_reads_the_config(run):
  """Shape, route and vocabulary from --config overrides; the token cache route on the run's
  tokenizer; every batch full-width and mostly real tokens."""
  seq, batch = 64, 4
  out = json_lines(run_cli(
      'tools/benchmark_data.py', *RUN_FLAGS, f'--workdir={run[0]}', '--seconds=0.5',
      f'--config.data.seq_len={seq}', f'--config.train.global_batch_size={batch}',
      '--config.data.pretokenize=true').stdout)[-1]
  assert (out['seq_len'], out['batch_size'], out['vocab_size']) == (seq, batch, 512)
  assert out['route'] == 'token cache' and out['config'] == 'tiny'
  assert out['batches'] >= 1
  # Packing leaves some padding, but the corpus's documents are long: most positions are real.
  assert 0.5 * out['batches'] * batch * seq < out['real_tokens'] <= out['batches'] * batch * seq


def test_train_tokenizer_writes_where_the_run_reads(run, tmp_path):
  """A unigram model of the config's vocab_size into the workdir's tokenizer path, trained on
  the run's datasets (reused from --config.data.cache_dir); never over an existing model."""
  workdir = tmp_path / 'tok'
  args = ['tools/train_tokenizer.py', *RUN_FLAGS, f'--workdir={workdir}',
          '--config.model.vocab_size=400', f'--config.data.cache_dir={run[0] / "data"}',
          '--model_type=unigram', '--max_docs=300', '--eval_docs=40']
  out = json_lines(run_cli(*args).stdout)[-1]
  path = workdir / 'tokenizer.model'
  assert out['out'] == str(path) and out['vocab_size'] == 400
  assert out['round_trips'] is True and out['held_out_docs'] >= 40
  # 336 of the 400 pieces are single characters (or bytes): few merges, but some.
  assert 1.2 < out['bytes_per_token'] < 2
  proto = sentencepiece_model_pb2.ModelProto.FromString(path.read_bytes())
  assert proto.trainer_spec.model_type == proto.trainer_spec.UNIGRAM
  assert proto.trainer_spec.byte_fallback and proto.trainer_spec.vocab_size == 400
  assert not (workdir / 'data').exists()  # the datasets came from the run's cache_dir
  again = run_cli(*args, ok=False, timeout=120)
  assert again.returncode != 0
  assert f'{path} exists' in again.stderr and '--config.data.tokenizer' in again.stderr


def _on_a_terminal(args, timeout=300) -> str:
  """What `args` writes to stderr when stderr is a terminal (a pseudo-terminal here)."""
  import fcntl
  import pty
  import struct
  import termios
  parent, child = pty.openpty()
  fcntl.ioctl(child, termios.TIOCSWINSZ, struct.pack('HHHH', 24, 100, 0, 0))  # 100 columns
  proc = subprocess.Popen([sys.executable, *args], cwd=REPO, env=ENV, stdout=subprocess.DEVNULL,
                          stderr=child, stdin=subprocess.DEVNULL)
  os.close(child)
  chunks = []
  while True:
    try:
      chunk = os.read(parent, 65536)
    except OSError:  # the child closed its end
      break
    if not chunk:
      break
    chunks.append(chunk)
  assert proc.wait(timeout=timeout) == 0, b''.join(chunks)[-3000:]
  os.close(parent)
  return b''.join(chunks).decode('utf-8', 'replace')


def test_converters_and_data_tools_show_progress_on_a_terminal(run, tmp_path):
  """The long tools draw a bar with rate on a terminal: the HF export and import tensor by
  tensor, the pre-tokenizing pass of prepare_data over each source, and the AOT planner's
  search over its candidates."""
  workdir, _, _ = run
  out = _on_a_terminal(['tools/convert_to_hf.py', f'--workdir={workdir}', f'--out={tmp_path / "hf"}'])
  assert 'export' in out and 'tensor/s' in out, out[-2000:]
  out = _on_a_terminal(['tools/convert_from_hf.py', f'--hf={tmp_path / "hf"}',
                        f'--out={tmp_path / "back"}'])
  assert 'import' in out and 'tensor/s' in out, out[-2000:]
  out = _on_a_terminal(['tools/prepare_data.py', *RUN_FLAGS, f'--workdir={tmp_path / "prep"}',
                        f'--config.data.tokenizer={workdir / "tokenizer.model"}'])
  assert 'tokenizing' in out and 'block/s' in out, out[-2000:]
  out = _on_a_terminal(['tools/aot_compile.py', *RUN_FLAGS, '--devices=2', '--plan',
                        '--plan_batches=1', '--plan_remat=none,full', '--hbm_gib=80'])
  assert 'planner' in out and 'remat policy/s' in out, out[-2000:]
