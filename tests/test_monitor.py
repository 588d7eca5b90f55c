"""Monitoring: goodput accounting (jaxllm/goodput.py), the Prometheus endpoint (jaxllm/monitor.py)
scraped over HTTP from a real tiny run, the Grafana dashboard and alert rules against that scrape,
goodput across a kill -9 and resume, tools/plot_runs.py, and per-layer norms in TensorBoard
(jaxllm/layerstats.py, on in the same run)."""

import json
import os
import pathlib
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from jaxllm import config as config_lib
from jaxllm import data as data_lib
from jaxllm import goodput as goodput_lib
from jaxllm import metrics as metrics_lib
from jaxllm import monitor as monitor_lib
from jaxllm import rundir
from jaxllm import train

REPO = pathlib.Path(__file__).parent.parent


class FakeClock:
  def __init__(self):
    self.now = 100.0

  def __call__(self):
    return self.now


# --- Goodput on a fake clock ---------------------------------------------------------------------

def test_goodput_books_every_second_to_one_cause_and_data_waits_only_when_not_hidden():
  clock = FakeClock()
  g = goodput_lib.Goodput(None, clock=clock)
  clock.now += 5  # start-up
  with g.data_wait():  # the first batch: nothing in flight
    clock.now += 1
  clock.now += 2  # compiling and queuing step 1: start-up ...
  with g.data_wait():  # ... ends when step 2's batch is asked for; step 1 runs meanwhile ...
    clock.now += 0.5
  clock.now += 1.5
  g.fetched(1, blocked_s=1.5)  # ... and was still running: the wait was hidden
  with g.data_wait():
    clock.now += 3
  g.fetched(2, blocked_s=0.0)  # step 2 had finished long before: the device waited
  with g.timed('checkpoint'):
    clock.now += 4
  with g.timed('eval'):
    clock.now += 6
  clock.now += 1
  t = g.totals()
  assert t == pytest.approx({'startup': 5 + 2, 'data': 1 + 3, 'train': 0.5 + 1.5 + 1,
                             'checkpoint': 4, 'eval': 6, 'lost': 0, 'wall': 24,
                             'goodput': 3 / 24})
  with pytest.raises(ValueError, match='compile'):
    with g.timed('compile'):
      pass


def test_goodput_restart_books_steps_after_the_last_checkpoint_as_lost(tmp_path):
  path = str(tmp_path / 'goodput.json')
  clock = FakeClock()
  g = goodput_lib.Goodput(path, clock=clock, flush_every_s=0)
  g.begin(0)
  with g.data_wait():  # the first batch
    pass
  clock.now += 2  # compiling step 1 (start-up)
  for step in range(1, 8):  # 1 s a step; checkpoints at 3 and 6
    with g.data_wait():  # the next batch, ready at once
      pass
    clock.now += 1
    g.fetched(step, blocked_s=1)
    if step % 3 == 0:
      g.saved(step)
  # Killed (-9) here: the file has step 7; the commit of 6 never happened, so it resumes from 3.
  again = goodput_lib.Goodput(path, clock=clock, flush_every_s=0)
  again.begin(3)
  assert again.lost_steps == 4 and again.sessions == 2
  t = again.totals()
  assert t['lost'] == pytest.approx(4) and t['train'] == pytest.approx(3)
  assert t['startup'] == pytest.approx(2) and t['wall'] == pytest.approx(9)
  # A checkpoint that did commit loses nothing: resume from 7 after a clean stop at 7.
  clean = goodput_lib.Goodput(path, clock=clock)
  clean.begin(7)
  assert clean.lost_steps == 0 and clean.totals()['lost'] == 0


# --- A real tiny run, scraped over HTTP ----------------------------------------------------------

@pytest.fixture(scope='module')
def shared_data(tmp_path_factory):
  shared = tmp_path_factory.mktemp('shared')
  data_lib.make_pipeline(cache_dir=str(shared / 'data'), tokenizer_path=str(shared / 'tok.model'),
                         vocab_size=512, seq_len=32, batch_size=8, eval_files=2, seed=0)
  return shared


TINY = ['--config.model.vocab_size=512', '--config.model.d_model=64', '--config.model.n_layers=2',
        '--config.model.head_dim=16', '--config.model.mlp_dim=128', '--config.data.seq_len=32',
        '--config.train.global_batch_size=8', '--config.train.log_every=1',
        '--config.train.eval_batches=1', '--config.train.sample_tokens=0',
        '--config.optim.warmup_steps=2', '--config.optim.decay_steps=50']


def tiny_config(shared, **sections):
  """The CLI flags above as a config (in process), plus `sections`: {'train': {...}, ...}."""
  c = config_lib.apply_size(config_lib.base_config(), 'tiny')
  for flag in TINY:
    key, value = flag.removeprefix('--config.').split('=')
    section, name = key.split('.')
    c[section][name] = type(c[section][name])(value)
  c.data.cache_dir, c.data.tokenizer = str(shared / 'data'), str(shared / 'tok.model')
  for section, values in sections.items():
    c[section].update(values)
  return c


def free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def scrape(port: int) -> dict[str, list]:
  """Family name -> its samples, as a Prometheus server would parse them."""
  with urllib.request.urlopen(f'http://127.0.0.1:{port}/metrics', timeout=10) as r:
    text = r.read().decode()
  return {f.name: f.samples for f in text_string_to_metric_families(text)}


def value(families, name, **labels):
  """The one sample of `name` (a family or a sample name) whose labels include `labels`."""
  family = name.removesuffix('_total')
  found = [s.value for s in families[family] if s.name == name
           and labels.items() <= s.labels.items()]
  assert len(found) == 1, (name, labels, families.get(family))
  return found[0]


def wait_for(what: str, ready, timeout: float = 60.0):
  deadline = time.monotonic() + timeout
  while not (result := ready()):
    assert time.monotonic() < deadline, f'timed out waiting for {what}'
    time.sleep(0.2)
  return result


def promql(url: str, query: str) -> list:
  """The result vector of an instant query through Prometheus's HTTP API."""
  with urllib.request.urlopen(f'{url}/api/v1/query?' + urllib.parse.urlencode({'query': query}),
                              timeout=10) as r:
    answer = json.load(r)
  assert answer['status'] == 'success', (query, answer)
  return answer['data']['result']


def _ready(url: str) -> bool:
  try:
    with urllib.request.urlopen(f'{url}/-/ready', timeout=2) as r:
      return r.status == 200
  except OSError:
    return False


@pytest.fixture(scope='module')
def prometheus(tmp_path_factory):
  """A real Prometheus (the Debian package `prometheus`, which .ci/run installs) that scrapes the
  live run every second with the repo's alert rules loaded; None where none is installed."""
  binary = shutil.which('prometheus')
  if not binary:
    yield None
    return
  home = tmp_path_factory.mktemp('prometheus')
  target, web = free_port(), free_port()
  shutil.copy(REPO / 'monitoring' / 'prometheus' / 'alerts.yml', home)
  config = yaml.safe_load((REPO / 'monitoring' / 'prometheus' / 'prometheus.yml').read_text())
  config['global'] = {'scrape_interval': '1s', 'evaluation_interval': '1s'}
  config['scrape_configs'][0]['static_configs'] = [{'targets': [f'127.0.0.1:{target}']}]
  (home / 'prometheus.yml').write_text(yaml.safe_dump(config))
  with open(home / 'log', 'w') as log:
    proc = subprocess.Popen([binary, f'--config.file={home / "prometheus.yml"}',
                             f'--storage.tsdb.path={home / "data"}',
                             f'--web.listen-address=127.0.0.1:{web}'], stdout=log, stderr=log)
  url = f'http://127.0.0.1:{web}'
  try:
    wait_for('Prometheus to start', lambda: proc.poll() is not None or _ready(url))
    assert proc.poll() is None, (home / 'log').read_text()[-3000:]
    yield dict(url=url, target_port=target)
  finally:
    proc.terminate()
    proc.wait(timeout=60)


@pytest.fixture(scope='module')
def live_run(tmp_path_factory, shared_data, prometheus):
  """8 steps in process with the endpoint on, eval at 4 and 8, checkpoints at 3, 6 and 8, and
  per-layer norms written at 4 and 8; scraped after step 3's results are read (mid-run) and once
  more just before the endpoint closes (and then kept open until a real Prometheus, if any, has
  scraped step 8)."""
  workdir = tmp_path_factory.mktemp('live') / 'run'
  port = prometheus['target_port'] if prometheus else free_port()
  config = tiny_config(shared_data, train={'num_steps': 8, 'eval_every': 4, 'layer_stats_every': 4},
                       checkpoint={'every': 3}, monitor={'prometheus_port': port})
  scrapes = {}
  fetch, close = monitor_lib.Monitor.fetch, monitor_lib.Monitor.close

  def fetch_then_scrape(self, step, device_metrics):
    host = fetch(self, step, device_metrics)
    if step == 3:
      scrapes['mid'] = scrape(self.port)
    return host

  def scrape_then_close(self):
    scrapes['end'] = scrape(self.port)
    if prometheus:  # asked while the target is up: once it is gone, its series turn stale
      url = prometheus['url']
      wait_for('Prometheus to scrape step 8', lambda: [
          r for r in promql(url, 'jaxllm_step') if r['value'][1] == '8'])
      time.sleep(2)  # two rule evaluations on the final values
      queries = ['jaxllm_loss{job="jaxllm"}', 'jaxllm_tokens_per_second']
      queries += [q.replace('$job', '.+').replace('$__rate_interval', '1m')
                  for q in dashboard_queries() + alert_queries()]
      scrapes['promql'] = {q: promql(url, q) for q in queries}
      with urllib.request.urlopen(f'{url}/api/v1/rules', timeout=10) as r:
        scrapes['rules'] = [rule for g in json.load(r)['data']['groups'] for rule in g['rules']]
    close(self)

  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(monitor_lib.Monitor, 'fetch', fetch_then_scrape)
    mp.setattr(monitor_lib.Monitor, 'close', scrape_then_close)
    start = time.monotonic()
    last = train.train_and_evaluate(config, str(workdir))
    wall = time.monotonic() - start
  return dict(workdir=workdir, port=port, scrapes=scrapes, wall=wall, last=last)


def test_endpoint_serves_every_series_with_sane_values(live_run):
  mid, end, last = live_run['scrapes']['mid'], live_run['scrapes']['end'], live_run['last']
  for name in monitor_lib.SERIES:  # every family is declared, with a value or not
    assert monitor_lib.PREFIX + name in end, name
  p = {'process': '0'}
  assert value(mid, 'jaxllm_step', **p) == 3 and value(end, 'jaxllm_step', **p) == 8
  assert 4.0 < value(end, 'jaxllm_loss', **p) < value(mid, 'jaxllm_loss', **p) < 7.0
  assert value(end, 'jaxllm_loss') == pytest.approx(last['loss'])
  assert value(end, 'jaxllm_learning_rate') == pytest.approx(last['lr'])
  assert value(end, 'jaxllm_grad_norm') == pytest.approx(last['grad_norm'])
  assert value(end, 'jaxllm_tokens_per_second') > 0
  assert value(end, 'jaxllm_tokens_trained') == 8 * 8 * 32
  assert 0 < value(end, 'jaxllm_step_seconds') < 60
  assert value(end, 'jaxllm_data_wait_seconds_total') > 0
  assert value(end, 'jaxllm_host_rss_bytes') > 100e6
  assert value(end, 'jaxllm_host_rss_peak_bytes') >= value(end, 'jaxllm_host_rss_bytes')
  assert value(end, 'jaxllm_eval_loss') == pytest.approx(last['eval_loss'])
  assert value(end, 'jaxllm_eval_bits_per_byte') == pytest.approx(last['eval_bits_per_byte'])
  assert 'jaxllm_eval_loss' in mid and not mid['jaxllm_eval_loss']  # no eval before step 4
  assert value(end, 'jaxllm_checkpoint_last_step') == 8
  assert time.time() - 600 < value(end, 'jaxllm_checkpoint_last_timestamp_seconds') < time.time()
  assert 0 < value(end, 'jaxllm_checkpoint_blocked_seconds') <= value(
      end, 'jaxllm_checkpoint_wait_seconds_total')
  assert value(end, 'jaxllm_checkpoint_save_seconds') > 0
  assert value(end, 'jaxllm_skipped_steps_total') == 0
  assert value(end, 'jaxllm_restarts_total') == 0 and value(end, 'jaxllm_lost_steps_total') == 0
  causes = {s.labels['cause']: s.value for s in end['jaxllm_goodput_seconds']}
  assert set(causes) == set(goodput_lib.CAUSES) and causes['train'] > 0
  assert causes['startup'] > causes['data']  # start-up compiles the step
  assert value(end, 'jaxllm_goodput_ratio') == pytest.approx(
      causes['train'] / sum(causes.values()), rel=1e-3)
  # CPU devices keep no memory statistics: the families are declared without samples.
  assert end['jaxllm_device_memory_bytes'] == []


def test_goodput_adds_up_to_the_wall_time_and_reaches_tensorboard(live_run):
  with open(rundir.RunDir(str(live_run['workdir'])).goodput) as f:
    record = json.load(f)
  assert sum(record['seconds'].values()) == pytest.approx(record['wall'])
  assert record['wall'] == pytest.approx(live_run['wall'], rel=0.01)
  assert record['step'] == 8 and record['sessions'] == 1
  from tensorboard.backend.event_processing import event_accumulator
  acc = event_accumulator.EventAccumulator(str(live_run['workdir'] / 'tensorboard'))
  acc.Reload()
  assert [e.step for e in acc.Scalars('goodput/ratio')] == [8]
  assert acc.Scalars('goodput/train_seconds')[0].value > 0


def test_layer_stats_reach_tensorboard_every_n_steps(live_run):
  """train.layer_stats_every=4: a tag per layer (2) and stacked leaf, one per other leaf, at steps
  4 and 8 only; at each, the gradient norms together make the step's global one."""
  scalars = metrics_lib.read_scalars(rundir.RunDir(str(live_run['workdir'])).tensorboard)
  stats = {tag: series for tag, series in scalars.items() if tag.startswith(('layers/', 'params/'))}
  assert {'layers/00/self_attn/q_proj/grad_norm', 'layers/01/mlp/down_proj/update_norm',
          'params/embed_tokens/param_norm', 'params/norm/weight/grad_norm'} <= set(stats)
  assert {tag.split('/')[1] for tag in stats if tag.startswith('layers/')} == {'00', '01'}
  assert all(steps == [4, 8] for steps, _ in stats.values())
  grads = [values for tag, (_, values) in stats.items() if tag.endswith('/grad_norm')]
  steps, global_norms = scalars['train/grad_norm']
  for i, step in enumerate([4, 8]):
    total = sum(v[i] ** 2 for v in grads) ** 0.5
    assert total == pytest.approx(global_norms[steps.index(step)], rel=1e-5)


def test_endpoint_is_off_by_default_and_port_is_freed(live_run):
  assert config_lib.base_config().monitor.prometheus_port == 0
  # Closed with the run (on errors too: Monitor.close is in a finally), so a rerun can serve it.
  rerun = monitor_lib.Monitor(goodput_path=None, tokens_per_step=1,
                              prometheus_port=live_run['port'])
  assert value(scrape(rerun.port), 'jaxllm_goodput_ratio') >= 0
  rerun.close()


# --- Across a kill -9 and a resume, through the CLI ----------------------------------------------

def cli(workdir, shared, num_steps, *extra):
  return [sys.executable, '-m', 'jaxllm.main', '--config=configs/tiny.py', f'--workdir={workdir}',
          f'--config.data.cache_dir={shared}/data', f'--config.data.tokenizer={shared}/tok.model',
          *TINY, f'--config.train.num_steps={num_steps}', '--config.train.eval_every=0',
          '--config.checkpoint.every=4', '--config.checkpoint.async_save=False',
          '--config.monitor.goodput_flush_seconds=0', *extra]


@pytest.fixture(scope='module')
def killed_run(tmp_path_factory, shared_data):
  """Killed with SIGKILL once step 5 is logged (checkpoint 4 committed: saves are synchronous
  here; 8 not reached), then resumed to 2 steps past where it died."""
  workdir = tmp_path_factory.mktemp('killed') / 'run'
  proc = subprocess.Popen(cli(workdir, shared_data, 1000), cwd=REPO, env=os.environ,
                          stderr=subprocess.PIPE, text=True)
  lines = []
  for line in proc.stderr:
    lines.append(line)
    if 'step 5/1000' in line:
      proc.send_signal(signal.SIGKILL)
      break
  proc.wait(timeout=300)
  assert proc.returncode == -signal.SIGKILL, ''.join(lines[-40:])
  goodput_path = rundir.RunDir(str(workdir)).goodput
  with open(goodput_path) as f:
    before = json.load(f)
  committed = max(int(d) for d in os.listdir(workdir / 'checkpoints') if d.isdigit())
  proc = subprocess.run(cli(workdir, shared_data, before['step'] + 2), cwd=REPO, env=os.environ,
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  with open(goodput_path) as f:
    after = json.load(f)
  return dict(workdir=workdir, before=before, after=after, committed=committed, log=proc.stderr)


def test_goodput_counts_the_steps_a_kill_9_lost(killed_run):
  before, after, committed = killed_run['before'], killed_run['after'], killed_run['committed']
  assert before['step'] >= 5 and committed == 4, (before['step'], committed)
  assert f'resuming from {killed_run["workdir"] / "checkpoints" / "4"}' in killed_run['log']
  assert after['sessions'] == 2 and after['lost_steps'] == before['step'] - committed
  assert after['step'] == before['step'] + 2
  # The dead session's train time after its save of step 4 moved from train to lost.
  lost = before['seconds']['train'] - before['saved_train_s']['4']
  assert after['seconds']['lost'] == pytest.approx(lost) and lost > 0
  for cause in ('startup', 'data', 'checkpoint', 'eval'):  # carried over and added to
    assert after['seconds'][cause] >= before['seconds'][cause]
  assert after['wall'] > before['wall']
  assert 'steps lost to restarts' in killed_run['log']


# --- tools/plot_runs.py --------------------------------------------------------------------------

def test_plot_runs_draws_two_real_runs_to_a_png(live_run, killed_run, tmp_path):
  import matplotlib.image
  out = tmp_path / 'runs.png'
  env = {**os.environ, 'PYTHONPATH': str(REPO)}
  proc = subprocess.run([sys.executable, 'tools/plot_runs.py', str(live_run['workdir']),
                         str(killed_run['workdir']), f'--out={out}'], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  image = matplotlib.image.imread(out)
  assert image.shape[:2] == (850, 1500)
  assert image[..., :3].std() > 0.05  # drawn on, not a blank canvas


def test_plot_runs_names_a_directory_without_events(tmp_path):
  env = {**os.environ, 'PYTHONPATH': str(REPO)}
  proc = subprocess.run([sys.executable, 'tools/plot_runs.py', str(tmp_path)], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode != 0 and f'{tmp_path}: no TensorBoard scalars' in proc.stderr


# --- The Grafana dashboard and the alert rules ----------------------------------------------------

DASHBOARD = REPO / 'monitoring' / 'grafana' / 'jaxllm-training.json'
ALERTS = REPO / 'monitoring' / 'prometheus' / 'alerts.yml'


def dashboard_queries() -> list[str]:
  dashboard = json.loads(DASHBOARD.read_text())
  return [t['expr'] for p in dashboard['panels'] for t in p.get('targets', [])]


def alert_queries() -> list[str]:
  return [r['expr'] for g in yaml.safe_load(ALERTS.read_text())['groups'] for r in g['rules']]


def series_named(query: str) -> set[str]:
  return set(re.findall(r'\bjaxllm_[a-z_]+', query))


def test_dashboard_and_alerts_query_only_series_the_exporter_emits(live_run):
  emitted = {name for family, samples in live_run['scrapes']['end'].items()
             for name in [family] + [s.name for s in samples]}
  queries = dashboard_queries() + alert_queries()
  assert len(dashboard_queries()) > 20 and len(alert_queries()) >= 6
  for query in queries:
    named = series_named(query)
    assert named or query == 'up{job="jaxllm"} == 0', query  # `up`: Prometheus's own series
    assert named <= emitted, (query, named - emitted)
  # And every series the exporter serves has a place on the dashboard.
  shown = set().union(*map(series_named, dashboard_queries()))
  assert {monitor_lib.PREFIX + n for n in monitor_lib.SERIES} <= {
      n.removesuffix('_total') for n in shown}


def test_dashboard_imports_as_is():
  dashboard = json.loads(DASHBOARD.read_text())
  assert dashboard['uid'] and dashboard['title'] and 'id' not in dashboard
  variables = {v['name']: v for v in dashboard['templating']['list']}
  assert variables['datasource']['type'] == 'datasource'  # picks the Prometheus at import
  ids = [p['id'] for p in dashboard['panels']]
  assert len(ids) == len(set(ids))
  for panel in dashboard['panels']:
    for target in panel.get('targets', []):
      assert target['datasource']['uid'] == '${datasource}', panel['title']


def test_alert_rules_pass_promtool_and_fire_on_their_unit_tests():
  """monitoring/prometheus/alerts_test.yml: each alert fires (and not before its time) on
  synthetic series: a NaN loss, skipped steps, a spike, a tokens/s drop, a stall, no checkpoint
  for an hour, low goodput, a target down."""
  promtool = shutil.which('promtool')
  if not promtool:
    pytest.skip('promtool (Debian package prometheus, installed by .ci/run) is not installed')
  for command in (['check', 'rules', ALERTS.name], ['test', 'rules', 'alerts_test.yml']):
    proc = subprocess.run([promtool, *command], cwd=ALERTS.parent, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
  tested = set(re.findall(r'alertname: (\w+)', (ALERTS.parent / 'alerts_test.yml').read_text()))
  assert tested == set(re.findall(r'- alert: (\w+)', ALERTS.read_text()))


# --- A real Prometheus scraping the run ----------------------------------------------------------

def test_real_prometheus_scrapes_the_run_and_evaluates_every_query(live_run, prometheus):
  if not prometheus:
    pytest.skip('needs the prometheus binary (Debian package prometheus, which .ci/run installs)')
  answers, last = live_run['scrapes']['promql'], live_run['last']
  [loss] = answers['jaxllm_loss{job="jaxllm"}']
  assert loss['metric']['process'] == '0'
  assert float(loss['value'][1]) == pytest.approx(last['loss'])
  [speed] = answers['jaxllm_tokens_per_second']
  assert float(speed['value'][1]) > 0
  # Every dashboard and alert query is valid PromQL on these series (promql() checked that),
  # and every dashboard query has a value but those of device memory and MFU (CPUs have none).
  empty = [q for q in dashboard_queries()
           if not answers[q.replace('$job', '.+').replace('$__rate_interval', '1m')]]
  assert all('device_memory' in q or 'mfu' in q for q in empty), empty
  assert len(empty) < len(dashboard_queries()) / 4
  # The alert rules loaded and evaluate without errors.
  rules = live_run['scrapes']['rules']
  assert len(rules) == len(alert_queries())
  assert all(rule['health'] == 'ok' for rule in rules), rules


def test_other_processes_serve_only_their_own_series_on_port_plus_index(monkeypatch):
  """Process 1 of a job (jax.process_index faked: a real two-process job is
  tests/test_multiprocess.py's, without the endpoint) serves on port + 1 with process="1", and
  leaves the job-level series (loss, goodput, ...) to process 0, so a sum() counts them once."""
  monkeypatch.setattr(monitor_lib.jax, 'process_index', lambda: 1)
  base = free_port()
  m = monitor_lib.Monitor(goodput_path=None, tokens_per_step=1, prometheus_port=base - 1)
  try:
    assert m.port == base
    m.observe({'loss': 3.0})
    families = scrape(m.port)
  finally:
    m.close()
  assert set(families) == {monitor_lib.PREFIX + n for n in monitor_lib.PER_PROCESS}
  assert value(families, 'jaxllm_host_rss_bytes', process='1') > 0
