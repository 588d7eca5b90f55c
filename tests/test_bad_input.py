"""Bad inputs through the real command-line programs (issue 15): each must exit non-zero with one
stderr line, 'error: ...', that names the culprit (a flag, a config key, a file), no traceback,
and leave every file it was given, and every existing workdir, exactly as it was.

One tiny trained workdir and one HF folder exported from it (module fixtures) are the good inputs
the bad ones are made from. Nearly every case fails before anything is compiled. absl's log lines
(prefix `I1129 20:35:26.736039 139728255265664 main.py:25] `) are the programs' progress, not the
error, and are left out before counting lines.
"""

import gzip
import hashlib
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys

import pytest
import sentencepiece as spm

REPO = pathlib.Path(__file__).parent.parent
ENV = {**os.environ, 'PYTHONPATH': os.pathsep.join(filter(None, [str(REPO),
                                                                  os.environ.get('PYTHONPATH')]))}
# absl's log line: severity, MMDD, time, thread id, file:line]
ABSL_LOG = re.compile(r'^[DIWEF]\d{4} \d\d:\d\d:\d\d\.\d+ +\d+ \S+:\d+\] ')
SHAPE = ('--config.model.vocab_size=512', '--config.model.n_layers=1', '--config.data.seq_len=32',
         '--config.train.global_batch_size=8')
MAIN = ('-m', 'jaxllm.main', '--config=configs/tiny.py', *SHAPE)
DOCS = 'To be, or not to be, that is the question.\n\nWhether tis nobler in the mind to suffer.\n'


def run_cli(*args, timeout=300):
  return subprocess.run([sys.executable, *args], cwd=REPO, env=ENV, capture_output=True,
                        text=True, timeout=timeout)


def checksums(root: pathlib.Path) -> dict[str, str]:
  """Every file under `root` (symlinks as their target's text) -> sha256 of its bytes."""
  out = {}
  for p in sorted(root.rglob('*')):
    if p.is_symlink():
      out[str(p)] = 'link to ' + os.readlink(p)
    elif p.is_file():
      out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
  return out


@pytest.fixture(scope='module')
def root(tmp_path_factory) -> pathlib.Path:
  """ROOT/run: 1 step of a 1-layer tiny model (checkpoint 1, its tokenizer); ROOT/hf: its HF
  export in 3 safetensors shards; ROOT/in: the bad files, each next to good ones."""
  root = tmp_path_factory.mktemp('bad')
  run = root / 'run'
  proc = run_cli(*MAIN, f'--workdir={run}', '--config.train.num_steps=1',
                 '--config.optim.warmup_steps=0', '--config.train.eval_every=0',
                 '--config.train.sample_tokens=0')
  assert proc.returncode == 0, proc.stderr[-3000:]
  proc = run_cli('tools/convert_to_hf.py', f'--workdir={run}', f'--out={root / "hf"}',
                 '--max_shard_gb=0.0005')
  assert proc.returncode == 0, proc.stderr[-3000:]
  hf = root / 'hf'
  assert len(list(hf.glob('*.safetensors'))) == 3

  d = root / 'in'
  (d / 'good').mkdir(parents=True)
  (d / 'good' / 'a.txt').write_text(DOCS)
  (d / 'good' / 'b.txt').write_text(DOCS.upper())
  (d / 'empty').mkdir()
  (d / 'bad.jsonl').write_text('{"text": "fine"}\n{"text": not json}\n')
  (d / 'latin1.txt').write_bytes('caf\xe9 au lait\n'.encode('latin-1'))
  (d / 'cut.txt.gz').write_bytes(gzip.compress(DOCS.encode() * 50)[:60])
  (d / 'corrupt.model').write_bytes(b'\x0a\x05not a sentencepiece model' * 3)
  (d / 'bad.parquet').write_bytes(b'PAR1 a parquet file cut short')
  spm.SentencePieceTrainer.train(sentence_iterator=iter(DOCS.split('\n') * 20), vocab_size=24,
                                 model_prefix=str(d / 'no_bos'), bos_id=-1, eos_id=-1,
                                 minloglevel=2)
  # A tokenizer of the run's vocabulary size trained on other text (the corpus in capitals).
  corpus = sorted((REPO / 'jaxllm' / 'corpus' / 'shakespeare').glob('*.txt'))[0].read_text()
  spm.SentencePieceTrainer.train(sentence_iterator=iter(corpus.upper().split('\n')),
                                 vocab_size=512, model_prefix=str(d / 'other'), minloglevel=2)
  # Copies of the run, each with one file damaged: the checkpoint's metadata, the tokenizer.
  shutil.copytree(run, d / 'run_cut_checkpoint')
  meta = d / 'run_cut_checkpoint' / 'checkpoints' / '1' / 'params' / '_METADATA'
  meta.write_bytes(meta.read_bytes()[:50])
  shutil.copytree(run, d / 'run_bad_tokenizer')
  (d / 'run_bad_tokenizer' / 'tokenizer.model').write_bytes(b'\x0a\x05not a model')
  (d / 'config_broken').mkdir()
  shutil.copy(run / 'tokenizer.model', d / 'config_broken')
  (d / 'config_broken' / 'config.json').write_text((run / 'config.json').read_text()[:200])
  for name in ('hf_missing_shard', 'hf_pickled', 'hf_cut', 'hf_bad_config'):
    shutil.copytree(hf, d / name)
  (d / 'hf_missing_shard' / 'model-00002-of-00003.safetensors').unlink()
  for p in (d / 'hf_pickled').glob('*.safetensors*'):
    p.unlink()
  (d / 'hf_pickled' / 'pytorch_model.bin').write_bytes(b'PK\x03\x04 a pickle would be here')
  cut = d / 'hf_cut' / 'model-00003-of-00003.safetensors'
  cut.write_bytes(cut.read_bytes()[:1000])
  (d / 'hf_bad_config' / 'config.json').write_text('{"model_type": "llama", "hidden_size": ')
  # Conversations: good rows (two files, so eval_files holds one out) and a file with a bad row.
  chats = [{'messages': [{'role': 'user', 'content': f'Who is {w}?'},
                         {'role': 'assistant', 'content': f'{w}, my lord.'}]}
           for w in ('Hamlet', 'Horatio', 'Ophelia')]
  rows = ''.join(json.dumps(c) + '\n' for c in chats)
  for name in ('chats', 'chats_bad'):
    (d / name).mkdir()
    (d / name / 'a.jsonl').write_text(rows)
    (d / name / 'b.jsonl').write_text(rows)
  (d / 'chats_bad' / 'a.jsonl').write_text(rows + '{"messages": [{"role": "king", "content": "x"}]}\n')
  shutil.copytree(hf, d / 'hf_no_tokenizer')
  for p in d.glob('hf_no_tokenizer/tokenizer*'):
    p.unlink()
  # Symlinked outputs: to the very folder being converted, and to nowhere.
  (d / 'link_run').symlink_to(run)
  (d / 'link_hf').symlink_to(hf)
  (d / 'dangling').symlink_to(d / 'nowhere')
  _lora_inputs(run, d)
  return root


def _lora_inputs(run: pathlib.Path, d: pathlib.Path) -> None:
  """IN/adapter: a PEFT adapter (rank 4 on q and v, random numbers: nothing is trained) of the
  run's shape; copies of it each with one thing wrong; IN/lora_run: it imported as a LoRA run."""
  import numpy as np
  from jaxllm import lora as lora_lib
  from jaxllm.convert import peft
  model = json.loads((run / 'config.json').read_text())['model']
  lcfg = lora_lib.LoraConfig(rank=4, targets=('q', 'v'))
  rng = np.random.default_rng(0)

  def write(out: pathlib.Path, **changes):
    shapes = lora_lib.abstract_adapters({**model, **changes}, lcfg)
    get = lambda t: {ab: rng.normal(size=x.shape) * 0.01 for ab, x in
                     shapes['layers'][lora_lib.TARGETS[t][0]][lora_lib.TARGETS[t][1] + '_lora'].items()}
    peft.write_adapter(get, lcfg, model['n_layers'], str(out))

  write(d / 'adapter')
  write(d / 'adapter_wider', d_model=model['d_model'] * 2)
  for name in ('adapter_bad_json', 'adapter_pickled', 'adapter_dora', 'adapter_bias',
               'adapter_extra'):
    shutil.copytree(d / 'adapter', d / name)
  from safetensors import numpy as st  # a tensor plain LoRA has not: a bias on lora_B
  tensors = st.load_file(str(d / 'adapter_extra' / 'adapter_model.safetensors'))
  name = next(n for n in tensors if n.endswith('q_proj.lora_B.weight'))
  tensors[name.replace('.weight', '.bias')] = np.zeros(tensors[name].shape[0], np.float32)
  st.save_file(tensors, str(d / 'adapter_extra' / 'adapter_model.safetensors'))
  (d / 'adapter_bad_json' / 'adapter_config.json').write_text('{"r": 4,')
  (d / 'adapter_pickled' / 'adapter_model.safetensors').rename(
      d / 'adapter_pickled' / 'adapter_model.bin')
  config = json.loads((d / 'adapter' / 'adapter_config.json').read_text())
  (d / 'adapter_dora' / 'adapter_config.json').write_text(json.dumps({**config, 'use_dora': True}))
  (d / 'adapter_bias' / 'adapter_config.json').write_text(json.dumps({**config, 'lora_bias': True}))
  proc = run_cli('tools/convert_from_hf.py', f'--adapter={d / "adapter"}', f'--base={run}',
                 f'--out={d / "lora_run"}')
  assert proc.returncode == 0, proc.stderr[-3000:]


# (id, argv with {run}, {hf}, {in}, {new} for the paths of the fixture, text the line must hold)
NEW = ('--workdir={new}',)
TOK = '--config.data.tokenizer={run}/tokenizer.model'
CASES = [
    # Numeric config keys below config.MINIMUMS, a representative set (one per kind of check).
    *[(f'{key}={value}', (*MAIN, *NEW, f'--config.{key}={value}'), f'{key}={value}')
      for key, value in [
          ('train.num_steps', 0), ('train.num_steps', -1), ('model.vocab_size', 0),
          ('model.d_model', -1), ('model.n_layers', 0), ('model.n_heads', 0),
          ('model.head_dim', 0), ('model.mlp_dim', -1), ('data.seq_len', 0),
          ('train.global_batch_size', 0), ('train.microbatches', 0), ('train.log_every', -1),
          ('optim.peak_lr', -1), ('optim.eps', -1), ('checkpoint.keep_latest', 0),
          ('mesh.dcn_data', 0), ('data.worker_count', -1), ('train.sample_temperature', -1),
          ('model.n_kv_heads', 0), ('train.eval_batches', -1)]],
    ('eval_files=0', (*MAIN, *NEW, '--config.data.eval_files=0'), 'data.eval_files=0'),
    ('eval_fraction=1', (*MAIN, *NEW, '--config.data.eval_fraction=1'), 'data.eval_fraction=1'),
    ('loss_on=none', (*MAIN, *NEW, '--config.data.loss_on=none'), "data.loss_on='none'"),
    ('chat_overflow=cut', (*MAIN, *NEW, '--config.data.chat_overflow=cut'),
     "data.chat_overflow='cut'"),
    ('data.sources required', (*MAIN, *NEW, '--config.data.sources=REQUIRED'),
     'data.sources is required'),
    ('missing chat template', (*MAIN, *NEW, TOK, '--config.data.chat_template={in}/none.jinja'),
     'data.chat_template={in}/none.jinja'),
    ('conversations without a template', (*MAIN, *NEW, TOK, '--config.data.sources={in}/chats',
                                          '--config.data.eval_files=1'),
     "data.chat_template='default'"),
    ('chat row with a bad role', (*MAIN, *NEW, TOK, '--config.data.sources={in}/chats_bad',
                                  '--config.data.eval_files=1', '--config.data.chat_template=default'),
     'chats_bad/a.jsonl:4'),
    ('sample --chat without a template', ('-m', 'jaxllm.sample', '--workdir={run}', '--chat=hi'),
     "data.chat_template='default'"),
    ('from_hf without a tokenizer', ('tools/convert_from_hf.py', '--hf={in}/hf_no_tokenizer',
                                     '--out={new}'), '--tokenizer=PATH'),
    # Wrong types and unknown keys, refused while the flags are parsed.
    ('num_steps=abc', (*MAIN, *NEW, '--config.train.num_steps=abc'),
     '--config.train.num_steps=abc'),
    ('tie_embeddings=maybe', (*MAIN, *NEW, '--config.model.tie_embeddings=maybe'),
     '--config.model.tie_embeddings=maybe'),
    ('unknown key', (*MAIN, *NEW, '--config.train.num_stepz=3'), "'num_stepz' is not a config key"),
    ('missing config file', ('-m', 'jaxllm.main', '--config=configs/nope.py', *NEW), 'nope.py'),
    ('unknown flag', ('-m', 'jaxllm.sample', '--workdir={run}', '--stepz=1'), 'stepz'),
    # Data: sources, eval split, tokenizer.
    ('missing tokenizer', (*MAIN, *NEW, '--config.data.tokenizer={in}/none.model'), 'none.model'),
    ('tokenizer without BOS/EOS', (*MAIN, *NEW, '--config.data.tokenizer={in}/no_bos.model'),
     'no_bos.model has no BOS or EOS piece'),
    ('corrupt tokenizer', ('tools/prepare_data.py', '--config=configs/tiny.py', *SHAPE, *NEW,
                           '--config.data.tokenizer={in}/corrupt.model'), 'corrupt.model'),
    ('jsonl line not JSON', (*MAIN, *NEW, TOK, '--config.data.sources={in}/bad.jsonl',
                             '--config.data.eval_source={in}/good'), 'bad.jsonl:2'),
    ('txt not UTF-8', (*MAIN, *NEW, TOK, '--config.data.sources={in}/latin1.txt',
                       '--config.data.eval_source={in}/good'), 'latin1.txt'),
    ('truncated gz', (*MAIN, *NEW, TOK, '--config.data.sources={in}/cut.txt.gz',
                      '--config.data.eval_source={in}/good'), 'cut.txt.gz'),
    ('corrupt parquet', (*MAIN, *NEW, TOK, '--config.data.sources={in}/bad.parquet',
                         '--config.data.eval_source={in}/good'), 'bad.parquet: a damaged .parquet'),
    ('missing source', (*MAIN, *NEW, TOK, '--config.data.sources={in}/nothing',
                        '--config.data.eval_source={in}/good'), '{in}/nothing'),
    ('empty eval split', (*MAIN, *NEW, TOK, '--config.data.sources={in}/good',
                          '--config.data.eval_source={in}/empty'), '{in}/empty'),
    ('eval_source overlaps', (*MAIN, *NEW, TOK, '--config.data.sources={in}/good',
                              '--config.data.eval_source={in}/good/a.txt'), 'data.eval_source='),
    ('train_tokenizer over a model', ('tools/train_tokenizer.py', '--config=configs/tiny.py',
                                      *SHAPE, '--workdir={run}'), '{run}/tokenizer.model exists'),
    ('train_tokenizer on bad jsonl', ('tools/train_tokenizer.py', '--config=configs/tiny.py',
                                      *SHAPE, *NEW, '--config.data.sources={in}/bad.jsonl',
                                      '--config.data.eval_source={in}/good'), 'bad.jsonl:2'),
    ('benchmark_data seq_len=0', ('tools/benchmark_data.py', '--config=configs/tiny.py', *SHAPE,
                                  '--workdir={run}', '--config.data.seq_len=0'), 'data.seq_len=0'),
    ('prepare_data eval_files=-1', ('tools/prepare_data.py', '--config=configs/tiny.py', *SHAPE,
                                    '--workdir={run}', '--config.data.eval_files=-1'),
     'data.eval_files=-1'),
    # Reopening a run: evaluate, sample, resume.
    ('evaluate missing workdir', ('-m', 'jaxllm.evaluate', '--workdir={in}/nothing'),
     '--workdir={in}/nothing'),
    ('sample missing workdir', ('-m', 'jaxllm.sample', '--workdir={in}/nothing'),
     '--workdir={in}/nothing'),
    ('evaluate no --workdir', ('-m', 'jaxllm.evaluate'), '--workdir'),
    ('evaluate missing step', ('-m', 'jaxllm.evaluate', '--workdir={run}', '--step=7'), '--step=7'),
    ('sample missing step', ('-m', 'jaxllm.sample', '--workdir={run}', '--step=7'), '--step=7'),
    ('max_new_tokens=0', ('-m', 'jaxllm.sample', '--workdir={run}', '--max_new_tokens=0'),
     '--max_new_tokens=0'),
    ('evaluate bad --mesh', ('-m', 'jaxllm.evaluate', '--workdir={run}', '--mesh=1,x,1'),
     '--mesh=1,x,1'),
    ('corrupt config.json', ('-m', 'jaxllm.evaluate', '--workdir={in}/config_broken'),
     'config_broken/config.json'),
    ('corrupt checkpoint', ('-m', 'jaxllm.evaluate', '--workdir={in}/run_cut_checkpoint'),
     'run_cut_checkpoint/checkpoints/1 is incomplete or corrupt'),
    ('corrupt run tokenizer', ('-m', 'jaxllm.sample', '--workdir={in}/run_bad_tokenizer'),
     'run_bad_tokenizer/tokenizer.model is not a sentencepiece model'),
    ('resume with another width', (*MAIN, '--workdir={run}', '--config.model.d_model=64'),
     '{run}/checkpoints'),
    # Storage jaxllm cannot write (gs:// works: tests/test_storage.py).
    ('s3:// workdir', (*MAIN, '--workdir=s3://bucket/run'), '--workdir=s3://bucket/run'),
    ('remote data.cache_dir', (*MAIN, *NEW, '--config.data.cache_dir=gs://bucket/cache'),
     'data.cache_dir=gs://bucket/cache'),
    ('to_hf --out in a bucket', ('tools/convert_to_hf.py', '--workdir={run}',
                                 '--out=gs://bucket/hf'), '--out=gs://bucket/hf'),
    # The AOT planner.
    ('aot_compile n_heads=0', ('tools/aot_compile.py', '--config=configs/tiny.py',
                               '--config.model.n_heads=0'), 'model.n_heads=0'),
    ('aot_compile batch not dividing', ('tools/aot_compile.py', '--config=configs/tiny.py',
                                        '--config.train.global_batch_size=3'),
     'train.global_batch_size=3'),
    ('aot_compile --slices without --plan_mesh', ('tools/aot_compile.py', '--config=configs/tiny.py',
                                                  '--slices=2'),
     '--slices apply to --plan_mesh only: add it'),
    ('aot_compile --partitioned with --plan', ('tools/aot_compile.py', '--config=configs/tiny.py',
                                               '--plan', '--partitioned'),
     '--partitioned counts one compiled step: drop --plan/--plan_mesh'),
    # Conversion to and from Hugging Face.
    ('to_hf non-empty --out', ('tools/convert_to_hf.py', '--workdir={run}', '--out={hf}'),
     '--out={hf} is not empty'),
    ('to_hf --out is the workdir', ('tools/convert_to_hf.py', '--workdir={run}', '--out={run}'),
     '--out={run}'),
    ('to_hf missing step', ('tools/convert_to_hf.py', '--workdir={run}', '--out={new}', '--step=9'),
     '--step=9'),
    ('to_hf missing workdir', ('tools/convert_to_hf.py', '--workdir={in}/nothing', '--out={new}'),
     '--workdir={in}/nothing'),
    ('to_hf --out links to the workdir', ('tools/convert_to_hf.py', '--workdir={run}',
                                          '--out={in}/link_run'), '--out={in}/link_run'),
    ('to_hf --out dangling link', ('tools/convert_to_hf.py', '--workdir={run}',
                                   '--out={in}/dangling'), '--out={in}/dangling links to'),
    ('from_hf non-empty --out', ('tools/convert_from_hf.py', '--hf={hf}', '--out={run}'),
     '--out={run} is not empty'),
    ('from_hf --out is --hf', ('tools/convert_from_hf.py', '--hf={hf}', '--out={hf}'),
     '--out={hf} is the folder being converted'),
    ('from_hf shard missing', ('tools/convert_from_hf.py', '--hf={in}/hf_missing_shard',
                               '--out={new}'), 'model-00002-of-00003.safetensors'),
    ('from_hf pickled weights', ('tools/convert_from_hf.py', '--hf={in}/hf_pickled', '--out={new}'),
     'pytorch_model.bin'),
    ('from_hf truncated safetensors', ('tools/convert_from_hf.py', '--hf={in}/hf_cut',
                                       '--out={new}'), 'model-00003-of-00003.safetensors'),
    ('from_hf corrupt config.json', ('tools/convert_from_hf.py', '--hf={in}/hf_bad_config',
                                     '--out={new}'), 'hf_bad_config/config.json'),
    ('from_hf missing --hf', ('tools/convert_from_hf.py', '--hf={in}/nothing', '--out={new}'),
     '{in}/nothing has no config.json'),
    ('from_hf --out links to --hf', ('tools/convert_from_hf.py', '--hf={hf}',
                                     '--out={in}/link_hf'), '--out={in}/link_hf'),
    ('from_hf --out dangling link', ('tools/convert_from_hf.py', '--hf={hf}',
                                     '--out={in}/dangling'), '--out={in}/dangling links to'),
]


# LoRA (jaxllm/lora.py, convert/peft.py): its keys, PEFT folders, and LoRA runs where a whole
# model is needed. Each fails before a step is compiled.
LORA = (*MAIN, *NEW, TOK, '--config.checkpoint.init_from={run}/checkpoints')
# The imported adapter run, resumed as its config.json says (the base's tokenizer and data cache).
LORA_RUN = (*MAIN, '--workdir={in}/lora_run', TOK, '--config.data.cache_dir={run}/data',
            '--config.checkpoint.init_from={run}/checkpoints')
CASES += [
    ('lora.rank=-1', (*LORA, '--config.lora.rank=-1'), 'lora.rank=-1 must be >= 0'),
    ('lora.alpha=0', (*LORA, '--config.lora.rank=16', '--config.lora.alpha=0'),
     'lora.alpha=0.0 must be > 0'),
    ('lora.dropout=1', (*LORA, '--config.lora.rank=16', '--config.lora.dropout=1'),
     'lora.dropout=1.0 must be in [0, 1)'),
    ('lora.targets unknown', (*LORA, '--config.lora.rank=16', '--config.lora.targets=q,qkv'),
     "lora.targets=('q,qkv',): 'qkv' is not a projection"),
    ('lora.quantize=int3', (*LORA, '--config.lora.rank=16', '--config.lora.quantize=int3'),
     "lora.quantize='int3' must be one of none, int8, int4"),
    ('lora.quantize without rank', (*LORA, '--config.lora.quantize=int4'),
     "lora.quantize='int4' quantizes the frozen base of adapters: set lora.rank > 0"),
    ('init_from with another tokenizer', (*MAIN, *NEW, '--config.lora.rank=4',
                                          '--config.checkpoint.init_from={run}/checkpoints',
                                          '--config.data.tokenizer={in}/other.model'),
     'set --config.data.tokenizer={run}/tokenizer.model'),
    ('resume with another lora.rank', (*LORA_RUN, '--config.lora.rank=8', '--config.lora.targets=q,v'),
     '--config.lora.rank=4 --config.lora.targets=q,v, or start afresh'),
    ('resume a LoRA run without lora', LORA_RUN,
     'was written with lora.rank=4 on q,v, not lora.rank=0'),
    ('init_from a LoRA run', (*MAIN, *NEW, TOK, '--config.checkpoint.init_from={in}/lora_run/checkpoints'),
     "checkpoint.init_from='{in}/lora_run/checkpoints' is a LoRA run"),
    ('import an adapter over a run', ('tools/convert_from_hf.py', '--adapter={in}/adapter',
                                      '--base={run}', '--out={in}/run_cut_checkpoint',
                                      '--overwrite'),
     '--out={in}/run_cut_checkpoint holds the checkpoints of a run'),
    ('lora.adapter without rank', (*LORA, '--config.lora.adapter={in}/adapter'),
     'lora.adapter={in}/adapter needs adapters to load into: set lora.rank'),
    ('lora with ptq.format', (*LORA, '--config.lora.rank=16', '--config.ptq.format=int8'),
     "ptq.format='int8' and lora.rank=16 do not combine"),
    ('lora.adapter missing', (*LORA, '--config.lora.rank=4', '--config.lora.adapter={in}/nothing'),
     'lora.adapter={in}/nothing is not a folder'),
    ('lora.adapter not PEFT', (*LORA, '--config.lora.rank=4', '--config.lora.adapter={run}'),
     'lora.adapter={run} has no adapter_config.json'),
    ('lora.adapter bad JSON', (*LORA, '--config.lora.rank=4',
                               '--config.lora.adapter={in}/adapter_bad_json'),
     '{in}/adapter_bad_json/adapter_config.json is not JSON'),
    ('lora.adapter pickled', (*LORA, '--config.lora.rank=4',
                              '--config.lora.adapter={in}/adapter_pickled'),
     'only a pickled adapter_model.bin'),
    ('lora.adapter DoRA', (*LORA, '--config.lora.rank=4', '--config.lora.adapter={in}/adapter_dora'),
     'use_dora=True (DoRA) is not supported'),
    ('lora.adapter other rank', (*LORA, '--config.lora.rank=16',
                                 '--config.lora.adapter={in}/adapter'),
     'has rank 4 but lora.rank=16: set --config.lora.rank=4'),
    ('lora.adapter other targets', (*LORA, '--config.lora.rank=4',
                                    '--config.lora.adapter={in}/adapter'),
     'has targets q,v but lora.targets='),
    ('lora.adapter other base', (*LORA, '--config.lora.rank=4', '--config.lora.targets=q,v',
                                 '--config.lora.adapter={in}/adapter_wider'),
     'it was trained on another base'),
    ('lora.adapter fewer layers', (*LORA, '--config.lora.rank=4', '--config.lora.targets=q,v',
                                   '--config.model.n_layers=2', '--config.lora.adapter={in}/adapter'),
     'adapts 1 layers but this model has 2: it was trained on another base'),
    ('lora.adapter lora_bias', (*LORA, '--config.lora.rank=4', '--config.lora.targets=q,v',
                                '--config.lora.adapter={in}/adapter_bias'),
     'lora_bias=True (a bias on lora_B) is not supported'),
    ('lora.adapter extra tensor', (*LORA, '--config.lora.rank=4', '--config.lora.targets=q,v',
                                   '--config.lora.adapter={in}/adapter_extra'),
     'q_proj.lora_B.bias, which plain LoRA adapters do not have'),
    ('from_hf --adapter without --base', ('tools/convert_from_hf.py', '--adapter={in}/adapter',
                                          '--out={new}'), '--adapter and --base go together'),
    ('from_hf --adapter on a LoRA base', ('tools/convert_from_hf.py', '--adapter={in}/adapter',
                                          '--base={in}/lora_run', '--out={new}'),
     '--base={in}/lora_run is a LoRA run'),
    ('from_hf --adapter missing base', ('tools/convert_from_hf.py', '--adapter={in}/adapter',
                                        '--base={in}/nothing', '--out={new}'),
     '--base={in}/nothing is not a jaxllm run'),
    ('quantize a LoRA run', ('tools/quantize.py', '--workdir={in}/lora_run', '--out={new}'),
     '--workdir={in}/lora_run is a LoRA run'),
    ('prune a LoRA run', ('tools/compress.py', '--teacher={in}/lora_run', '--out={new}',
                          '--mlp_dim=64'), '--teacher={in}/lora_run is a LoRA run'),
    ('distill from a LoRA run', (*MAIN, *NEW, TOK, '--config.distill.teacher={in}/lora_run'),
     "distill.teacher='{in}/lora_run' is a LoRA run"),
]


def test_the_table_is_large_enough():
  assert len(CASES) >= 40 and len({c[0] for c in CASES}) == len(CASES)


@pytest.mark.parametrize('name,argv,culprit', CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line(root, tmp_path, name, argv, culprit):
  # {new} (a workdir or --out that does not exist yet) is the test's own: what a failed new run
  # leaves there (datasets it built before the bad input) is not checked, only that it did not
  # touch its inputs or the existing run.
  paths = {'run': root / 'run', 'hf': root / 'hf', 'in': root / 'in', 'new': tmp_path / 'new'}
  before = checksums(root)
  proc = run_cli(*[a.format(**paths) for a in argv])
  lines = [l for l in proc.stderr.splitlines() if l.strip() and not ABSL_LOG.match(l)]
  assert proc.returncode != 0, proc.stderr[-3000:]
  assert len(lines) == 1 and lines[0].startswith('error: '), proc.stderr[-3000:]
  print(lines[0])  # the table of messages: pytest -rP tests/test_bad_input.py
  assert culprit.format(**paths) in lines[0]
  assert checksums(root) == before, name


def test_verbose_shows_the_traceback(tmp_path):
  proc = run_cli('-m', 'jaxllm.evaluate', f'--workdir={tmp_path}', '--verbose')
  assert proc.returncode != 0
  assert 'Traceback (most recent call last)' in proc.stderr
  assert f'FileNotFoundError: --workdir={tmp_path} has no config.json' in proc.stderr


def test_a_bug_keeps_its_traceback():
  """Only the errors written for the user (cli.USER_ERRORS) are shortened."""
  proc = run_cli('-c', 'from jaxllm import cli\n'
                       'def main(argv):\n'
                       '  raise KeyError("a bug")\n'
                       'cli.run(main)\n')
  assert proc.returncode != 0
  assert 'Traceback (most recent call last)' in proc.stderr and "KeyError: 'a bug'" in proc.stderr


def test_gs_without_gcsfs_is_refused_not_written_locally(tmp_path):
  """Without a gs:// client, `--workdir=gs://bucket/run` would be the relative path
  ./gs:/bucket/run on each host: one line naming the flag and the package, nothing written."""
  blocked = tmp_path / 'blocked'
  blocked.mkdir()
  (blocked / 'gcsfs.py').write_text('raise ImportError("gcsfs is not installed here")\n')
  env = {**ENV, 'PYTHONPATH': os.pathsep.join([str(blocked), ENV['PYTHONPATH']])}
  work = tmp_path / 'cwd'
  work.mkdir()
  proc = subprocess.run([sys.executable, '-m', 'jaxllm.main', f'--config={REPO}/configs/tiny.py',
                         '--workdir=gs://b/run'], cwd=work, env=env, capture_output=True,
                        text=True, timeout=300)
  lines = [l for l in proc.stderr.splitlines() if l.strip() and not ABSL_LOG.match(l)]
  assert proc.returncode != 0
  assert lines == ['error: --workdir=gs://b/run: gs:// needs the gcsfs package, which is not '
                   'installed (pip install gcsfs); or mount the bucket (gcsfuse) and pass the '
                   'local path'], proc.stderr[-3000:]
  assert not list(work.iterdir())
