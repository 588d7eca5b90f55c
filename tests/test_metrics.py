"""jaxllm.metrics: TensorBoard events read back by TensorBoard itself, MFU arithmetic, the
peak-FLOPs table, and the Reporter's throughput and ETA under a fake clock."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pathlib
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tensorboard.backend.event_processing import event_accumulator
from tensorboard.plugins.hparams import plugin_data_pb2

from jaxllm import metrics

REPO = pathlib.Path(__file__).resolve().parents[1]


def _read(logdir):
  acc = event_accumulator.EventAccumulator(str(logdir))
  acc.Reload()
  return acc


def test_scalars_round_trip(tmp_path):
  with metrics.SummaryWriter(str(tmp_path)) as w:
    w.write_scalars(1, {"train/loss": 3.5, "train/lr": 1e-3})
    w.write_scalars(2, {"train/loss": 2.25, "train/lr": 2e-3})
  acc = _read(tmp_path)
  assert set(acc.Tags()["scalars"]) == {"train/loss", "train/lr"}
  loss = acc.Scalars("train/loss")
  assert [(e.step, e.value) for e in loss] == [(1, 3.5), (2, 2.25)]
  # simple_value is float32 on disk.
  np.testing.assert_allclose([e.value for e in acc.Scalars("train/lr")], [1e-3, 2e-3], rtol=1e-6)


def test_texts_are_text_plugin_summaries(tmp_path):
  w = metrics.SummaryWriter(str(tmp_path))
  w.write_texts(7, {"sample": "To be, or not to be"})
  w.close()
  acc = _read(tmp_path)
  # The text dashboard lists exactly the tags whose metadata names its plugin.
  assert list(acc.PluginTagToContent("text")) == ["sample"]
  (event,) = acc.Tensors("sample")
  assert event.step == 7
  assert event.tensor_proto.string_val == [b"To be, or not to be"]


def test_hparams_text_and_plugin_session(tmp_path):
  config = {"model": {"d_model": 64, "scan": True}, "optim": {"lr": 3e-4}, "mesh": (1, -1)}
  with metrics.SummaryWriter(str(tmp_path)) as w:
    w.write_hparams(config)
  acc = _read(tmp_path)
  text = acc.Tensors("config")[0].tensor_proto.string_val[0].decode()
  assert "model.d_model = 64" in text and "optim.lr = 0.0003" in text
  content = acc.PluginTagToContent("hparams")["_hparams_/session_start_info"]
  hp = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info.hparams
  assert hp["model.d_model"].number_value == 64
  assert hp["model.scan"].bool_value is True
  assert hp["optim.lr"].number_value == pytest.approx(3e-4)
  assert hp["mesh"].string_value == "(1, -1)"


def test_disabled_writer_writes_nothing(tmp_path):
  logdir = tmp_path / "logs"
  w = metrics.SummaryWriter(str(logdir), enabled=False)
  w.write_scalars(1, {"loss": 1.0})
  w.write_texts(1, {"t": "x"})
  w.write_hparams({"a": 1})
  w.flush()
  w.close()
  assert not logdir.exists()


def test_no_tensorflow_import(tmp_path):
  # TF is not installed here, so a plain sys.modules check could never fail. A stub package named
  # tensorflow first on the path is recorded in sys.modules if anything tries to import TF
  # (tensorboard falls back to TF lazily when some of its helpers are touched).
  (tmp_path / "tensorflow").mkdir()
  (tmp_path / "tensorflow" / "__init__.py").write_text("")
  script = textwrap.dedent(f"""
        import sys
        from jaxllm import metrics
        with metrics.SummaryWriter({str(tmp_path / 'logs')!r}) as w:
            w.write_scalars(1, {{"loss": 1.0}})
            w.write_texts(1, {{"t": "x"}})
            w.write_hparams({{"a": {{"b": 1}}}})
        metrics.parameter_table({{"w": __import__("numpy").zeros((2, 3))}})
        print("tensorflow" in sys.modules)
    """)
  env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), str(REPO)]))
  out = subprocess.run(
      [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60
  )
  assert out.returncode == 0, out.stderr
  assert out.stdout.strip() == "False"


def test_mfu_by_hand():
  # 1,000 tok/s/device * 6e9 FLOPs/token = 6e12 FLOP/s on a 1e13 FLOP/s device: 60 %.
  assert metrics.mfu(1000.0, 6e9, 1e13) == pytest.approx(0.6)
  assert metrics.mfu(1000.0, 6e9, None) is None


@pytest.mark.parametrize(
    "kind, dtype, expected",
    [
        ("NVIDIA H100 80GB HBM3", "bfloat16", 989e12),
        ("NVIDIA H100 PCIe", "bfloat16", 756e12),
        ("NVIDIA H200", "bfloat16", 989e12),
        ("NVIDIA H200 NVL", "bfloat16", 835e12),
        ("NVIDIA A100-SXM4-80GB", "bfloat16", 312e12),
        ("TPU v4", "bfloat16", 275e12),
        ("TPU v5 lite", "bfloat16", 197e12),
        ("TPU v5", "bfloat16", 459e12),
        ("TPU v6 lite", "bfloat16", 918e12),
        ("NVIDIA H100 80GB HBM3", "float32", 494.5e12),  # TF32, dense
        ("TPU v4", "float32", 275e12),  # default precision: one bf16 pass
        ("cpu", "bfloat16", None),
        ("cpu", "float32", None),
        ("NVIDIA H100 80GB HBM3", "int8", None),
        ("Some Future Accelerator", "bfloat16", None),
    ],
)
def test_peak_flops_lookup(kind, dtype, expected):
  assert metrics.peak_flops_per_device(kind, dtype) == expected


def test_peak_memory_bytes():
  class FakeDevice:

    def __init__(self, stats):
      self.stats = stats

    def memory_stats(self):
      return self.stats

  stats = {"peak_bytes_in_use": 123, "bytes_in_use": 5}
  assert metrics.peak_memory_bytes(FakeDevice(stats)) == 123
  assert metrics.peak_memory_bytes(FakeDevice(None)) is None
  assert metrics.peak_memory_bytes(jax.devices("cpu")[0]) is None


class RecordingWriter:

  def __init__(self):
    self.calls = []

  def write_scalars(self, step, scalars):
    self.calls.append((step, dict(scalars)))


def test_reporter_throughput_mfu_eta():
  times = iter([100.0, 102.0])
  lines, writer = [], RecordingWriter()
  rep = metrics.Reporter(
      total_steps=100,
      tokens_per_step=1000,
      flops_per_token=6e6,
      num_devices=4,
      peak_flops=1e10,
      writer=writer,
      clock=lambda: next(times),
      log=lines.append,
  )
  first = rep.report(10, {"loss": 4.0})
  # No interval yet (it would include compilation): no throughput.
  assert first == {"loss": 4.0}
  assert lines[0] == "step 10/100 | loss 4.000"

  out = rep.report(20, {"loss": 3.4124, "lr": 3e-4, "grad_norm": 0.8234})
  # 10 steps in 2 s = 5 steps/s * 1000 tokens = 5000 tok/s; 1250 per device * 6e6 / 1e10 = 0.75;
  # 80 steps left / 5 steps/s = 16 s.
  assert out["tokens_per_s"] == pytest.approx(5000.0)
  assert out["tokens_per_s_per_device"] == pytest.approx(1250.0)
  assert out["mfu"] == pytest.approx(0.75)
  assert lines[1] == (
      "step 20/100 | loss 3.412 | lr 3.0e-04 | gnorm 0.82 | 5,000 tok/s" " | MFU 75.0% | ETA 16s"
  )
  step, scalars = writer.calls[1]
  assert step == 20
  assert scalars == {"train/" + k: v for k, v in out.items()}


def test_reporter_without_peak_omits_mfu():
  times = iter([0.0, 10.0])
  lines = []
  rep = metrics.Reporter(
      total_steps=1000,
      tokens_per_step=512,
      flops_per_token=1.0,
      num_devices=1,
      peak_flops=None,
      clock=lambda: next(times),
      log=lines.append,
  )
  rep.report(0, {})
  out = rep.report(5, {})
  assert "mfu" not in out and "MFU" not in lines[1]
  # 0.5 steps/s: 995 steps left take 1990 s.
  assert lines[1] == "step 5/1000 | 256 tok/s | ETA 33m10s"


@pytest.mark.parametrize("seconds, text", [(7, "7s"), (185, "3m05s"), (3725, "1h02m05s")])
def test_format_duration(seconds, text):
  assert metrics.format_duration(seconds) == text


def test_parameter_table():
  params = {
      "embed_tokens": {"embedding": np.zeros((10, 4), np.float32)},
      "layers": {"q_proj": {"kernel": jax.ShapeDtypeStruct((2, 4, 8), jnp.bfloat16)}},
  }
  table = metrics.parameter_table(params)
  assert "embed_tokens/embedding" in table and "layers/q_proj/kernel" in table
  assert "(2, 4, 8)" in table and "bfloat16" in table
  assert "Total: 104" in table  # 10*4 + 2*4*8


def test_parameter_table_nnx_state():
  from flax import nnx

  state = nnx.state(nnx.Linear(3, 4, rngs=nnx.Rngs(0)), nnx.Param)
  table = metrics.parameter_table(state)
  # Variables are named by their attribute, without the pytree's '/value' suffix.
  assert "| kernel " in table and "/value" not in table
  assert "Total: 16" in table  # 3*4 + 4


def test_format_config_flattens_configdict():
  ml_collections = pytest.importorskip("ml_collections")
  c = ml_collections.ConfigDict({"model": {"n_layers": 2}, "seed": 0})
  assert metrics.format_config(c) == "model.n_layers = 2\nseed = 0"


def test_progress_logs_a_line_every_interval_without_a_terminal():
  import io
  now = [0.0]
  lines = []

  def items():
    for i in range(10):
      now[0] += 10.0  # 10 s an item
      yield i

  got = list(metrics.progress(items(), desc='eval', total=10, unit='batch', every_s=30,
                              stream=io.StringIO(), clock=lambda: now[0], log=lines.append))
  assert got == list(range(10))
  assert lines == ['eval: 3/10 batch, 0.10 batch/s, ETA 1m10s',
                   'eval: 6/10 batch, 0.10 batch/s, ETA 40s',
                   'eval: 9/10 batch, 0.10 batch/s, ETA 10s',
                   'eval: 10/10 batch, 0.10 batch/s']


def test_progress_draws_a_bar_on_a_terminal_and_stays_quiet_for_quick_work():
  import io

  class Terminal(io.StringIO):
    def isatty(self):
      return True

  terminal, lines = Terminal(), []
  assert list(metrics.progress(range(5), desc='convert', total=5, stream=terminal,
                               log=lines.append)) == list(range(5))
  # tqdm's bar (it redraws at most every 0.1 s and clears itself at the end), no log lines.
  assert 'convert:' in terminal.getvalue() and '0/5 [' in terminal.getvalue() and not lines
  assert list(metrics.progress(range(5), desc='eval', stream=io.StringIO(),
                               log=lines.append)) == list(range(5))
  assert not lines  # quicker than every_s: no line at all
