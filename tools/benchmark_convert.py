"""Peak host memory and time of the Hugging Face export and import of a large checkpoint.

    python tools/benchmark_convert.py --config=configs/1b.py --dir=/tmp/convert_bench

Writes a randomly initialised float32 parameter checkpoint of `--config`'s model into `--dir`
(the layout tools/convert_from_hf.py writes, which tools/convert_to_hf.py reads), then runs
`tools/convert_to_hf.py` (export, --dtype) and `tools/convert_from_hf.py` (import of that export)
as subprocesses and reports each one's peak resident memory next to the parameter bytes and the
largest single tensor: the export streams tensor by tensor, so its peak should be about two of
the largest tensor; the import holds the parameters it writes plus about one tensor (target:
1.25 x the parameter bytes + 1 GiB, issue 16). The import is given a small sentencepiece model as
--tokenizer (the random run has none; the import refuses a model without one). Prints one JSON
line. Deletes `--dir` first.
"""

import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time

import jax
from absl import flags
from flax import nnx
from ml_collections import config_flags

from jaxllm import cli
from jaxllm import metrics
from jaxllm import model as model_lib
from jaxllm import tokenizer as tokenizer_lib
from jaxllm.convert import import_

REPO = pathlib.Path(__file__).resolve().parent.parent

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file.', lock_config=True)
_DIR = flags.DEFINE_string('dir', None, 'Scratch directory (deleted first).')
_DTYPE = flags.DEFINE_enum('dtype', 'bfloat16', ['float32', 'bfloat16'], 'Export dtype.')
flags.mark_flags_as_required(['config', 'dir'])


def write_random_checkpoint(model: dict, workdir: str) -> tuple[int, int]:
  """A run directory with a params-only checkpoint of `model` at step 0, as an import writes it;
  (parameter bytes, largest tensor bytes)."""
  cfg = model_lib.ModelConfig.from_section(model)
  params = jax.jit(lambda: nnx.to_pure_dict(nnx.state(model_lib.Llama(cfg, rngs=nnx.Rngs(0)))))()
  sizes = [x.nbytes for x in jax.tree.leaves(params)]
  import_.write_run(params, model, workdir, source='a random initialisation')
  del params  # the children below should have the machine's memory to themselves
  return sum(sizes), max(sizes)


def measured(cmd: list[str]) -> dict:
  """Runs `cmd` in a child; its wall time and peak RSS. The peak is the kernel's high-water mark
  VmHWM of the child's own address space, read every 20 ms until it exits (rusage's maxrss
  would start from this parent's size, which a forked child inherits)."""
  start = time.perf_counter()
  with tempfile.TemporaryFile('w+') as log:
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, text=True)
    peak_kib = 0
    while proc.poll() is None:
      try:
        with open(f'/proc/{proc.pid}/status') as f:
          peak_kib = max(peak_kib, *(int(line.split()[1]) for line in f
                                     if line.startswith('VmHWM:')))
      except (OSError, ValueError, TypeError):
        pass  # the child is exiting
      time.sleep(0.02)
    if proc.returncode != 0:
      log.seek(0)
      raise RuntimeError(f'{cmd} failed:\n{log.read()[-3000:]}')
  return {'wall_s': time.perf_counter() - start, 'peak_rss_gib': peak_kib / 2**20}


def main(argv):
  del argv
  config = _CONFIG.value
  root = _DIR.value
  shutil.rmtree(root, ignore_errors=True)
  workdir, exported, imported = (os.path.join(root, d) for d in ('run', 'hf', 'imported'))
  model = config.model.to_dict()
  model['param_dtype'] = 'float32'
  param_bytes, largest = write_random_checkpoint(model, workdir)
  export = measured([sys.executable, 'tools/convert_to_hf.py', f'--workdir={workdir}',
                     f'--out={exported}', f'--dtype={_DTYPE.value}'])
  written = sum(p.stat().st_size for p in pathlib.Path(exported).glob('*.safetensors'))
  tokenizer = os.path.join(root, 'spm.model')  # any will do: the import only copies it
  tokenizer_lib.train_sentencepiece(tokenizer, ['Text for a small tokenizer to learn.'] * 20, 300)
  import_ = measured([sys.executable, 'tools/convert_from_hf.py', f'--hf={exported}',
                      f'--out={imported}', f'--tokenizer={tokenizer}'])
  gib = 2**30
  print(json.dumps({
      'config': config.name, 'params': model_lib.ModelConfig.from_section(model).num_params(),
      'param_gib_float32': param_bytes / gib, 'largest_tensor_gib_float32': largest / gib,
      'export_dtype': _DTYPE.value, 'safetensors_gib': written / gib,
      'export': export, 'import': import_,
      'import_target_gib': 1.25 * param_bytes / gib + 1,
      'this_process_peak_rss_gib': metrics.peak_host_rss_bytes() / 2**30,
      'jax': jax.__version__}))
  shutil.rmtree(root, ignore_errors=True)


if __name__ == '__main__':
  cli.run(main)
