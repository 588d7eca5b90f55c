"""Times checkpoint saves of the real train state: how long the loop is blocked vs the whole save.

    python tools/benchmark_checkpoint.py --config=configs/tiny.py --dir=/tmp/ckpt_bench
    python tools/benchmark_checkpoint.py --config=configs/1b.py --config.model.n_layers=8 \
        --config.model.dtype=float32 --dir=/tmp/ckpt_bench

Initialises the state of `--config` on the devices present (parameters + AdamW moments, float32),
fills the AdamW moments with noise (all-zero moments compress away and would flatter the
write), then saves it `--saves` times through jaxllm.checkpoint.Checkpointer, as the loop does.
`blocked_s` is the time `save()` takes to return (the device-to-host copy; the loop is stopped
for this long), `total_s` the time until the save is committed on disk. The first save also pays
Orbax's one-time set-up and is reported apart. Prints one JSON line. Deletes `--dir` first.
"""

import json
import os
import shutil
import statistics
import time

import grain
import jax
from absl import flags
from ml_collections import config_flags

from jaxllm import checkpoint, cli, metrics, train

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file.', lock_config=True)
_DIR = flags.DEFINE_string('dir', None, 'Scratch directory for the checkpoints (deleted first).')
_SAVES = flags.DEFINE_integer('saves', 4, 'Saves to time.')
flags.mark_flags_as_required(['config', 'dir'])


def main(argv):
  del argv
  config = _CONFIG.value
  shutil.rmtree(_DIR.value, ignore_errors=True)
  trainer = train.setup(config)
  state = trainer.init_state()
  # Fresh AdamW moments are zeros, which compress to nothing; give them noise, as training would.
  def noisy(opt_state):
    leaves, treedef = jax.tree.flatten(opt_state)
    return treedef.unflatten([
        x + 1e-3 * jax.random.normal(jax.random.key(i), x.shape, x.dtype) if x.ndim else x
        for i, x in enumerate(leaves)])
  state['opt_state'] = jax.jit(noisy, donate_argnums=0)(state['opt_state'])
  jax.block_until_ready(state)
  state_bytes = sum(x.nbytes for x in jax.tree.leaves(state))
  data_iter = iter(grain.MapDataset.range(1000).to_iter_dataset())
  ckpt = checkpoint.Checkpointer(_DIR.value, keep_latest=2)
  blocked, total = [], []
  for step in range(1, _SAVES.value + 1):
    start = time.perf_counter()
    ckpt.save(step, state, data_iter, {})
    blocked.append(time.perf_counter() - start)
    ckpt.wait()
    total.append(time.perf_counter() - start)
  ckpt.close()
  on_disk = sum(os.path.getsize(os.path.join(d, f)) for d, _, files in
                os.walk(os.path.join(_DIR.value, str(_SAVES.value))) for f in files)
  later_blocked, later_total = blocked[1:] or blocked, total[1:] or total
  print(json.dumps({
      'config': config.name, 'n_layers': config.model.n_layers,
      'params': trainer.model_cfg.num_params(), 'state_bytes': state_bytes,
      'checkpoint_bytes_on_disk': on_disk, 'devices': jax.device_count(),
      'mesh': dict(trainer.mesh.shape),
      'first_save': {'blocked_s': blocked[0], 'total_s': total[0]},
      'later_saves': {'n': len(later_blocked), 'blocked_s_median': statistics.median(later_blocked),
                      'total_s_median': statistics.median(later_total),
                      'blocked_s': later_blocked, 'total_s': later_total},
      'peak_host_rss_gib': metrics.peak_host_rss_bytes() / 2**30,
      'jax': jax.__version__}))
  shutil.rmtree(_DIR.value, ignore_errors=True)


if __name__ == '__main__':
  cli.run(main)
