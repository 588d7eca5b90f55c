"""Where a run's files live (jaxllm/files.py, jaxllm/rundir.py): local files written whole, storage
jaxllm cannot write refused in one line, and a `gs://` workdir end to end on a GCS emulator.

The emulator (the gcp-storage-emulator package, in this process on 127.0.0.1) answers GCS's JSON
API for both clients a run uses: gcsfs under etils.epath (config.json, the tokenizer, goodput.json,
TensorBoard events, Orbax's step directories) and TensorStore's own GCS driver (Orbax's arrays,
pointed at it by TENSORSTORE_GCS_HTTP_URL). No request leaves the machine: google-auth's probes of
the GCE metadata server are switched off and pointed at a closed local port. Without gcsfs or the
emulator (`pip install -e '.[test]'` brings both) those tests skip, saying so.
"""

import json
import logging
import os
import pathlib
import subprocess
import sys

import pytest

from jaxllm import config as config_lib
from jaxllm import files, rundir

REPO = pathlib.Path(__file__).parent.parent
ENV = {**os.environ, 'PYTHONPATH': os.pathsep.join(filter(None, [str(REPO),
                                                                  os.environ.get('PYTHONPATH')]))}
BUCKET = 'jaxllm-test'
TINY = (f'--config={REPO / "configs" / "tiny.py"}', '--config.model.vocab_size=512',
        '--config.model.n_layers=1', '--config.data.seq_len=32',
        '--config.train.global_batch_size=8', '--config.optim.warmup_steps=0',
        '--config.train.log_every=1', '--config.train.eval_every=0',
        '--config.train.eval_batches=2', '--config.train.sample_tokens=0')


def run_cli(*args, cwd, env=ENV, timeout=600):
  return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True,
                        timeout=timeout)


# Local files.

def test_write_config_removes_the_temps_of_a_killed_writer(tmp_path):
  run = rundir.RunDir(str(tmp_path / 'run'))
  run.write_config({'model': {'d_model': 8}})
  stale = tmp_path / 'run' / f'{rundir.CONFIG_JSON}.tmp4242'  # what a kill mid-write leaves
  stale.write_text('{"model": {"d_mo')
  run.write_config({'model': {'d_model': 16}})
  assert sorted(p.name for p in (tmp_path / 'run').iterdir()) == [rundir.CONFIG_JSON]
  assert run.load_config().model.d_model == 16


def test_remove_stale_temps_takes_folders_written_whole(tmp_path):
  """A folder written as `path.tmpPID/` and renamed (data.py's token cache) is cleaned the same
  way; other names beside it are left alone."""
  target = tmp_path / 'abc123'
  (tmp_path / 'abc123.tmp77').mkdir()
  (tmp_path / 'abc123.tmp77' / 'ids.array_record').write_bytes(b'half')
  (tmp_path / 'abc123.tmp78').write_bytes(b'half')
  (tmp_path / 'abc123.tmpx').write_bytes(b'not ours')
  (tmp_path / 'abc1234.tmp1').write_bytes(b'not ours')
  files.remove_stale_temps(str(target))
  assert sorted(p.name for p in tmp_path.iterdir()) == ['abc123.tmpx', 'abc1234.tmp1']


# Storage jaxllm cannot write: one line, before anything is written.

@pytest.mark.parametrize('url', ['s3://b/run', 'file:///tmp/run', 'memory://run'])
def test_other_url_schemes_are_refused_by_name(tmp_path, monkeypatch, url):
  monkeypatch.chdir(tmp_path)
  with pytest.raises(ValueError, match=f'--workdir={url}: jaxllm writes runs to local paths and '
                                       'gs:// buckets only'):
    rundir.RunDir(url)
  config = config_lib.base_config()
  config.checkpoint.dir = url
  with pytest.raises(ValueError, match=f'checkpoint.dir={url}'):
    rundir.RunDir(str(tmp_path / 'run')).checkpoints(config)
  assert not list(tmp_path.iterdir())


def test_data_cache_is_local(tmp_path, monkeypatch):
  """TFDS, array_record and grain need a local cache: a URL there is refused; a gs:// workdir's
  cache defaults to a local folder of its own, which the log names."""
  pytest.importorskip('gcsfs', reason='gs:// workdirs need gcsfs (the test extra)')
  config = config_lib.base_config()
  config.data.cache_dir = f'gs://{BUCKET}/cache'
  with pytest.raises(ValueError, match=f'data.cache_dir=gs://{BUCKET}/cache: the data cache must '
                                       'be a local directory'):
    rundir.RunDir(str(tmp_path)).data_cache(config)
  monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path / 'cache'))
  first, second = rundir.RunDir(f'gs://{BUCKET}/a'), rundir.RunDir(f'gs://{BUCKET}/b')
  assert first.data_cache().startswith(str(tmp_path / 'cache' / 'jaxllm') + os.sep)
  assert first.data_cache() == first.data_cache() != second.data_cache()
  config.data.cache_dir = str(tmp_path / 'mine')
  assert first.data_cache(config) == str(tmp_path / 'mine')
  assert rundir.RunDir(str(tmp_path / 'run')).data_cache() == str(tmp_path / 'run' / rundir.DATA)


def test_converters_refuse_a_url_out(tmp_path, monkeypatch):
  from jaxllm import convert
  monkeypatch.chdir(tmp_path)
  with pytest.raises(ValueError, match=f'--out=gs://{BUCKET}/hf: the converters write a local'):
    convert.check_out(f'gs://{BUCKET}/hf', source=str(tmp_path), overwrite=False)
  assert not list(tmp_path.iterdir())


# A gs:// bucket: the emulator.

def _send_generations(server) -> None:
  """The emulator's media downloads lack GCS's `x-goog-generation` header, from which TensorStore
  reads an object's generation: it then takes generation 0, and OCDBT's conditional rewrite of a
  manifest it has read fails ('Malformed StorageGeneration'). Add the header, as GCS sends it."""
  from gcp_storage_emulator.exceptions import NotFound
  from gcp_storage_emulator.handlers import objects
  plain = objects.download
  if getattr(plain, 'sends_generation', False):
    return

  def download(request, response, storage, *args, **kwargs):
    plain(request, response, storage, *args, **kwargs)
    try:
      obj = storage.get_file_obj(request.params['bucket_name'], request.params['object_id'])
    except NotFound:
      return
    response['x-goog-generation'] = str(obj['generation'])
    response['x-goog-metageneration'] = str(obj.get('metageneration', 1))

  download.sends_generation = True
  objects.download = download  # objects.get calls it for ?alt=media
  for _, methods in server.HANDLERS:  # the routes that name it directly
    for method, handler in list(methods.items()):
      if handler is plain:
        methods[method] = download


@pytest.fixture(scope='module')
def gcs(tmp_path_factory):
  """(env for the CLIs, cache root) with a fresh emulator serving bucket BUCKET; this process's
  own environment points at it too while the module's tests run."""
  pytest.importorskip('gcsfs', reason='gs:// workdirs need gcsfs (the test extra)')
  server = pytest.importorskip('gcp_storage_emulator.server',
                               reason='the GCS emulator is the test extra gcp-storage-emulator')
  logging.getLogger('gcp_storage_emulator').setLevel(logging.CRITICAL)  # 404s are expected
  logging.getLogger('gcsfs').setLevel(logging.ERROR)
  _send_generations(server)
  emulator = server.create_server('127.0.0.1', 0, in_memory=True, default_bucket=BUCKET)
  emulator.start()
  url = f'http://127.0.0.1:{emulator._api._httpd.server_address[1]}'  # port 0: the one it took
  cache = tmp_path_factory.mktemp('cache')
  point = {'STORAGE_EMULATOR_HOST': url, 'TENSORSTORE_GCS_HTTP_URL': url,
           'GOOGLE_AUTH_TOKEN_FOR_TESTING': 'emulator',  # TensorStore's test credentials
           'NO_GCE_CHECK': 'true', 'GCE_METADATA_HOST': '127.0.0.1:9',
           'GCE_METADATA_IP': '127.0.0.1:9',
           # gcsfs's default file system asks the storage-control API for the bucket's layout.
           'GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT': 'false', 'XDG_CACHE_HOME': str(cache)}
  with pytest.MonkeyPatch.context() as mp:
    for key, value in point.items():
      mp.setenv(key, value)
    mp.delenv('GOOGLE_APPLICATION_CREDENTIALS', raising=False)
    yield {**ENV, **point}, cache
  emulator.stop()


def test_files_on_a_bucket(gcs):
  path = f'gs://{BUCKET}/files/notes.json'
  assert not files.exists(path) and files.listdir(f'gs://{BUCKET}/files') == []
  with files.replacing(path) as f:
    f.write('{"a": 1}')
  with pytest.raises(RuntimeError):
    with files.replacing(path) as f:
      f.write('{"a": 2, "half')
      raise RuntimeError('killed mid-write')
  assert json.loads(files.read_text(path)) == {'a': 1}  # the failed write uploaded nothing
  assert files.isfile(path) and files.isdir(f'gs://{BUCKET}/files')
  assert files.listdir(f'gs://{BUCKET}/files') == ['notes.json']


def test_file_sizes_are_listed_alike_on_a_bucket_and_a_disk(gcs, tmp_path):
  """What checkpoint.params_fingerprint hashes (a LoRA run's base may be on a bucket): every
  file's relative path and size, a folder's own files before its subfolders'."""
  tree = {'b': 3, 'a/x': 5, 'a/c/y': 7, 'a-b': 2, 'a-c/q': 4, 'z/q': 11}
  for rel, size in tree.items():
    for root in (str(tmp_path), f'gs://{BUCKET}/sizes'):
      files.makedirs(os.path.dirname(os.path.join(root, rel)))
      with files.replacing(os.path.join(root, rel)) as f:
        f.write('x' * size)
  # sorted(os.walk(...))'s order, which the fingerprint has always hashed in: 'a-c' < 'a/c'.
  want = {'a-b': 2, 'b': 3, 'a/x': 5, 'a-c/q': 4, 'a/c/y': 7, 'z/q': 11}
  assert list(files.file_sizes(str(tmp_path)).items()) == list(want.items())
  assert list(files.file_sizes(f'gs://{BUCKET}/sizes').items()) == list(want.items())


def test_tensorboard_on_a_bucket_keeps_every_event(gcs):
  """An events file grows by appends; gcsfs would turn each into an overwrite."""
  from jaxllm import metrics
  logdir = f'gs://{BUCKET}/tb'
  writer = metrics.SummaryWriter(logdir)
  writer.write_scalars(1, {'train/loss': 3.0})
  writer.flush()
  writer.write_scalars(2, {'train/loss': 2.0})
  writer.flush()
  writer.write_scalars(3, {'train/loss': 1.0})
  writer.close()
  assert metrics.read_scalars(logdir)['train/loss'] == ([1, 2, 3], [3.0, 2.0, 1.0])


def test_a_run_on_a_bucket_trains_resumes_evaluates_and_exports(gcs, tmp_path):
  """Every file of the run is in the bucket, its data cache local, nothing under ./gs:/."""
  from etils import epath
  from jaxllm import metrics
  env, cache = gcs
  workdir = f'gs://{BUCKET}/run'
  first = run_cli('-m', 'jaxllm.main', *TINY, f'--workdir={workdir}',
                  '--config.train.num_steps=2', cwd=tmp_path, env=env)
  assert first.returncode == 0, first.stderr[-3000:]
  assert f'data cache of --workdir={workdir} is local: {cache}' in first.stderr
  second = run_cli('-m', 'jaxllm.main', *TINY, f'--workdir={workdir}',
                   '--config.train.num_steps=4', cwd=tmp_path, env=env)
  assert second.returncode == 0, second.stderr[-3000:]
  assert f'resuming from {workdir}/checkpoints/2' in second.stderr

  names = sorted(p.name for p in epath.Path(workdir).iterdir())
  assert names == sorted([rundir.CHECKPOINTS, rundir.CONFIG_JSON, rundir.GOODPUT,
                          rundir.TENSORBOARD, rundir.TOKENIZER])
  assert {'2', '4'} <= {p.name for p in epath.Path(f'{workdir}/checkpoints').iterdir()}
  # A bucket's steps are committed by a marker (the loop's checkpoint metrics read it).
  from jaxllm import checkpoint as checkpoint_lib
  saved, _ = checkpoint_lib.open_read_only(f'{workdir}/checkpoints', -1, what='the test',
                                           step_flag='--step')
  assert saved.is_committed(4) and saved.is_committed(2) and not saved.is_committed(3)
  saved.close()
  goodput = json.loads(files.read_text(f'{workdir}/{rundir.GOODPUT}'))
  assert goodput['sessions'] == 2 and goodput['step'] == 4
  scalars = metrics.read_scalars(f'{workdir}/{rundir.TENSORBOARD}')
  assert scalars['train/loss'][0] == [1, 2, 3, 4]  # both sessions' events files
  assert list(cache.glob('jaxllm/*/*'))  # the datasets were built here

  evaluated = run_cli('-m', 'jaxllm.evaluate', f'--workdir={workdir}', '--eval_batches=2',
                      cwd=tmp_path, env=env)
  assert evaluated.returncode == 0, evaluated.stderr[-3000:]
  result = json.loads(evaluated.stdout.strip().splitlines()[-1])
  assert result['step'] == 4
  # The run's own last eval: the same checkpoint, batches and tokenizer read back from the bucket.
  assert result['eval_loss'] == pytest.approx(scalars['eval/loss'][1][-1], rel=1e-5)

  out = tmp_path / 'hf'
  exported = run_cli(str(REPO / 'tools' / 'convert_to_hf.py'), f'--workdir={workdir}',
                     f'--out={out}', cwd=tmp_path, env=env)
  assert exported.returncode == 0, exported.stderr[-3000:]
  assert (out / 'config.json').exists() and (out / 'tokenizer.json').exists()
  assert sorted(p.name for p in tmp_path.iterdir()) == ['hf']  # no ./gs:/ anywhere
  assert not (REPO / 'gs:').exists()
