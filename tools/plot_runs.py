"""Draws one or several runs from their TensorBoard events into one PNG, for the README and for
comparing runs (matplotlib's Agg backend: no display needed).

    python tools/plot_runs.py runs/tiny runs/tiny-lr1e-3 --out=runs.png

Each argument is a --workdir of jaxllm.main (or a directory of TensorBoard events). Panels: train
and eval loss against steps and against tokens (step x global_batch_size x seq_len, from the run's
config), learning rate, tokens/s, gradient norm, and each run's goodput: wall time by cause (its
goodput file, or the goodput/ scalars of its events).
"""

import json
import os

import matplotlib

matplotlib.use('Agg')  # before pyplot: files only, never a window
import matplotlib.pyplot as plt  # noqa: E402
from absl import app, flags  # noqa: E402

from jaxllm import cli  # noqa: E402
from jaxllm import goodput as goodput_lib  # noqa: E402
from jaxllm import metrics  # noqa: E402
from jaxllm import rundir  # noqa: E402


def load_run(path: str) -> dict:
  """{'name', 'scalars': tag -> (steps, values), 'tokens_per_step' (None if unknown), 'goodput'
  (cause -> seconds, or None)} of a workdir or an events directory."""
  run = rundir.RunDir(path)
  is_workdir = os.path.isdir(run.tensorboard)
  logdir = run.tensorboard if is_workdir else path
  scalars = metrics.read_scalars(logdir)
  if not scalars:
    raise SystemExit(f'{path}: no TensorBoard scalars under {logdir}; pass the --workdir of a '
                     'jaxllm.main run or a directory of its events')
  tokens_per_step = None
  if is_workdir and os.path.exists(run.config_json):
    config = run.load_config()
    tokens_per_step = config.train.global_batch_size * config.data.seq_len
  goodput = None
  if is_workdir and os.path.exists(run.goodput):
    with open(run.goodput) as f:
      goodput = json.load(f)['seconds']
  elif all(f'goodput/{c}_seconds' in scalars for c in goodput_lib.CAUSES):
    goodput = {c: scalars[f'goodput/{c}_seconds'][1][-1] for c in goodput_lib.CAUSES}
  name = os.path.basename(os.path.normpath(path))
  return dict(name=name, scalars=scalars, tokens_per_step=tokens_per_step, goodput=goodput)


def _line(ax, run, tag, *, color, x_scale=1, style='-', label=''):
  if tag in run['scalars']:
    steps, values = run['scalars'][tag]
    ax.plot([s * x_scale for s in steps], values, style, color=color, label=label or run['name'])


def plot(runs: list[dict], out: str) -> None:
  fig, axes = plt.subplots(2, 3, figsize=(15, 8.5))
  (loss_steps, loss_tokens, lr), (speed, gnorm, goodput) = axes
  for i, run in enumerate(runs):
    color = f'C{i % 10}'  # one colour per run; eval is the dashed line with dots
    for ax, scale in ((loss_steps, 1), (loss_tokens, run['tokens_per_step'])):
      if scale is None:
        continue
      _line(ax, run, 'train/loss', color=color, x_scale=scale, label=f'{run["name"]} train')
      _line(ax, run, 'eval/loss', color=color, x_scale=scale, style='o--',
            label=f'{run["name"]} eval')
    _line(lr, run, 'train/lr', color=color)
    _line(speed, run, 'train/tokens_per_s', color=color)
    _line(gnorm, run, 'train/grad_norm', color=color)
  for ax, title, xlabel in ((loss_steps, 'loss (nats/token)', 'step'),
                            (loss_tokens, 'loss (nats/token)', 'tokens'),
                            (lr, 'learning rate', 'step'), (speed, 'tokens/s', 'step'),
                            (gnorm, 'gradient norm (before clipping)', 'step')):
    ax.set(title=title, xlabel=xlabel)
    ax.grid(alpha=0.3)
    if ax.lines:
      ax.legend(fontsize=8)
  _goodput_bars(goodput, runs)
  fig.tight_layout()
  fig.savefig(out, dpi=100)
  plt.close(fig)


def _goodput_bars(ax, runs: list[dict]) -> None:
  """One horizontal bar per run, split into the causes' shares of its wall time."""
  shown = [r for r in runs if r['goodput']]
  for i, run in enumerate(shown):
    wall = sum(run['goodput'].values()) or 1.0
    left = 0.0
    for j, cause in enumerate(goodput_lib.CAUSES):
      share = run['goodput'][cause] / wall
      ax.barh(i, share, left=left, color=f'C{j}', label=cause if i == 0 else None)
      left += share
  ax.set(title='goodput: share of wall time by cause', xlim=(0, 1),
         yticks=range(len(shown)), yticklabels=[r['name'] for r in shown])
  if shown:
    ax.legend(fontsize=8, ncols=3, loc='upper center', bbox_to_anchor=(0.5, -0.12))


_OUT = flags.DEFINE_string('out', 'runs.png', 'PNG to write')


def main(argv) -> None:
  paths = argv[1:]  # the workdirs of jaxllm.main runs (or events directories)
  if not paths:
    raise app.UsageError('name at least one run: python tools/plot_runs.py RUN [RUN...] --out=x.png')
  runs = [load_run(path) for path in paths]
  names = [r['name'] for r in runs]
  for run, path in zip(runs, paths):  # runs/a/run and runs/b/run: say a/run and b/run
    if names.count(run['name']) > 1:
      run['name'] = os.path.join(*os.path.normpath(os.path.abspath(path)).split(os.sep)[-2:])
  plot(runs, _OUT.value)
  print(_OUT.value)


if __name__ == '__main__':
  cli.run(main)
