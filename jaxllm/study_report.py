"""What a study leaves for people (`jaxllm.tune`): the trials table (markdown and CSV), the best
trial's config as a file `jaxllm.main --config` takes, and plots (PNG, matplotlib's Agg backend).

Every figure is read back from what the study stored: the journal (values, states, reasons) and
each trial's own TensorBoard events (its held-out loss curve, through metrics.read_scalars), so
the report can be rewritten at any time, also while workers run, and shows lost, rejected and
failed trials with their reason rather than hiding them.
"""

from __future__ import annotations

import csv
import math
import os
import runpy

import matplotlib

matplotlib.use('Agg')  # files only, never a window
import matplotlib.pyplot as plt  # noqa: E402
import optuna  # noqa: E402
from optuna.trial import TrialState  # noqa: E402

from jaxllm import files  # noqa: E402
from jaxllm import metrics as metrics_lib  # noqa: E402
from jaxllm import rundir  # noqa: E402
from jaxllm import study as study_lib  # noqa: E402


def write(study: optuna.Study, workdir: str) -> str:
  """The whole report of the study in `workdir`; returns trials.md's text."""
  study_dir = rundir.StudyDir(os.path.abspath(workdir))
  write_tables(study, study_dir)
  write_best_config(study, study_dir)
  write_plots(study, study_dir)
  if not os.path.exists(study_dir.trials_md):
    return 'no trials yet\n'
  with open(study_dir.trials_md, encoding='utf-8') as f:
    return f.read()


def status(trial: optuna.trial.FrozenTrial, retried: set[int]) -> str:
  """complete | pruned | rejected | failed | lost (retried as another trial) | surplus (asked for
  beyond --trials, never trained) | running | waiting."""
  if trial.state == TrialState.FAIL:
    if trial.number in retried:
      return 'lost'
    if study_lib.SURPLUS in trial.user_attrs:
      return 'surplus'
    return 'rejected' if 'rejected' in trial.user_attrs else 'failed'
  return trial.state.name.lower()


def loss(trial: optuna.trial.FrozenTrial) -> tuple[float | None, int | None]:
  """(held-out loss, its step): the final one, or the last reported (pruned and unfinished
  trials)."""
  if not trial.intermediate_values:
    return trial.value, None
  step = max(trial.intermediate_values)
  return trial.intermediate_values[step] if trial.value is None else trial.value, step


def rows(study: optuna.Study) -> list[dict]:
  """One dict per trial, in trial order: the table's rows."""
  trials = study.get_trials(deepcopy=False)
  retried = study_lib.retried(trials)
  keys = sorted({k for t in trials for k in t.params})
  out = []
  for t in trials:
    a = t.user_attrs
    note = a.get('rejected') or a.get('error') or ''
    if 'retry_of' in a:
      note = f'resumes trial {a["retry_of"]} ({a.get("retry_reason", "")}) {note}'.strip()
    if 'pruned_at' in a:
      note = '; '.join(filter(None, [note, f'pruned at step {a["pruned_at"]}']))
    value, step = loss(t)
    out.append({'trial': t.number, 'status': status(t, retried), 'eval_loss': value, 'at_step': step,
                **{k: t.params.get(k) for k in keys}, 'steps': a.get('steps'), 'note': note,
                'workdir': a.get('workdir', '')})
  return out


def _cell(value, key: str = '') -> str:
  if value is None:
    return ''
  if isinstance(value, float):
    return f'{value:.4f}' if key == 'eval_loss' else f'{value:.4g}'
  return str(value).replace('|', '\\|').replace('\n', ' ')


def write_tables(study: optuna.Study, study_dir: rundir.StudyDir) -> list[dict]:
  """trials.md (a markdown table, the best trial in bold) and trials.csv; returns the rows."""
  table = rows(study)
  if not table:
    return table
  best = _best(study)
  header = list(table[0])
  lines = ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
  for r in table:
    cells = [_cell(r[k], k) for k in header]
    if best is not None and r['trial'] == best.number:
      cells = [f'**{c}**' if c else c for c in cells]
    lines.append('| ' + ' | '.join(cells) + ' |')
  steps = sum(r['steps'] or 0 for r in table)
  counts = {s: sum(r['status'] == s for r in table) for s in dict.fromkeys(r['status'] for r in table)}
  lines += ['', f'{len(table)} trials ({", ".join(f"{n} {s}" for s, n in counts.items())}); '
            f'{steps:,} training steps in all.']
  if best is not None:
    lines.append(f'Best: trial {best.number}, held-out loss {best.value:.4f}; its config: '
                 f'{study_dir.best_config}')
  with files.replacing(study_dir.trials_md) as f:
    f.write('\n'.join(lines) + '\n')
  with files.replacing(study_dir.trials_csv) as f:
    writer = csv.DictWriter(f, fieldnames=header, lineterminator='\n')
    writer.writeheader()
    writer.writerows(table)
  return table


def _best(study: optuna.Study) -> optuna.trial.FrozenTrial | None:
  complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
  return min(complete, key=lambda t: t.value) if complete else None


def write_best_config(study: optuna.Study, study_dir: rundir.StudyDir) -> str | None:
  """best_config.py: the config the best complete trial trained with (its own config.py, which
  its config.json records), under a docstring that says where it comes from; None if no trial
  completed."""
  best = _best(study)
  if best is None:
    return None
  run = rundir.RunDir(best.user_attrs['workdir'])
  config = runpy.run_path(run.config_py)['get_config']()
  values = ', '.join(f'{k}={_cell(v)}' for k, v in best.params.items())
  rundir.write_config_py(study_dir.best_config, config, doc=(
      f'The best trial of the study in {study_dir.workdir} (jaxllm.tune): trial {best.number}, '
      f'held-out loss {best.value:.4f} at step {config.train.num_steps}, with {values}.\n\n'
      f'    python -m jaxllm.main --config={study_dir.best_config} --workdir=runs/best\n\n'
      'Raise train.num_steps (--config.train.num_steps=N) to train it for longer.\n'))
  return study_dir.best_config


def write_plots(study: optuna.Study, study_dir: rundir.StudyDir, *, top: int = 5) -> list[str]:
  """plots/history.png (each trial's loss, and the best so far), plots/params.png (loss against
  each searched value), plots/curves.png (held-out loss curves: the `top` best trials in colour,
  the others grey). Pruned trials are drawn at their last reported loss."""
  table = [r for r in rows(study) if r['eval_loss'] is not None and math.isfinite(r['eval_loss'])]
  if not table:
    return []
  os.makedirs(os.path.dirname(study_dir.plot('history')), exist_ok=True)
  return [_history(table, study_dir.plot('history')),
          _params(study, table, study_dir.plot('params')),
          _curves(table, study_dir.plot('curves'), top)]


def _history(table: list[dict], path: str) -> str:
  fig, ax = plt.subplots(figsize=(7, 4.5))
  for status, marker in (('complete', 'o'), ('pruned', 'x')):
    pts = [(r['trial'], r['eval_loss']) for r in table if r['status'] == status]
    if pts:
      ax.plot(*zip(*pts), marker, linestyle='', label=status)
  done = sorted((r['trial'], r['eval_loss']) for r in table if r['status'] == 'complete')
  if done:
    best = [min(v for _, v in done[:i + 1]) for i in range(len(done))]
    last = max(r['trial'] for r in table)  # drawn on to the last trial
    ax.step([n for n, _ in done] + [last], best + best[-1:], where='post', color='k',
            label='best complete so far')
  ax.set(xlabel='trial', ylabel='held-out loss', title='optimisation history')
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path


def _params(study: optuna.Study, table: list[dict], path: str) -> str:
  space = {}
  for t in study.get_trials(deepcopy=False):
    space.update(t.distributions)
  keys = [k for k, d in space.items() if not isinstance(d, optuna.distributions.CategoricalDistribution)
          or all(isinstance(c, (int, float)) for c in d.choices)]
  fig, axes = plt.subplots(1, max(1, len(keys)), figsize=(5.5 * max(1, len(keys)), 4.2), squeeze=False)
  for ax, key in zip(axes[0], keys):
    for status, marker in (('complete', 'o'), ('pruned', 'x')):
      pts = [(r[key], r['eval_loss']) for r in table if r['status'] == status and r.get(key) is not None]
      if pts:
        ax.plot(*zip(*pts), marker, linestyle='', label=status)
    if getattr(space[key], 'log', False):
      ax.set_xscale('log')
    ax.set(xlabel=key, ylabel='held-out loss', title=f'loss against {key}')
    ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path


_NOT_PARAMS = ('trial', 'status', 'eval_loss', 'at_step', 'steps', 'note', 'workdir')


def _curves(table: list[dict], path: str, top: int) -> str:
  # Best first: complete trials by loss, then the others by how far they got, then by loss.
  ranked = sorted(table, key=lambda r: (r['status'] != 'complete', -(r['at_step'] or 0),
                                        r['eval_loss']))
  fig, ax = plt.subplots(figsize=(7, 4.5))
  for rank, r in enumerate(ranked):
    logdir = rundir.RunDir(r['workdir']).tensorboard
    steps, values = metrics_lib.read_scalars(logdir).get(study_lib.EVAL_TAG, ([], []))
    if rank < top:
      params = ', '.join(f'{k.split(".")[-1]}={_cell(r[k])}' for k in r if k not in _NOT_PARAMS)
      ax.plot(steps, values, '-o', markersize=3, label=f'trial {r["trial"]}: {params}',
              zorder=3 + top - rank)
    else:
      ax.plot(steps, values, '-o', markersize=2, color='0.75', linewidth=1, zorder=1)
  ax.set(xlabel='step', ylabel='held-out loss',
         title=f'held-out loss of the {min(top, len(ranked))} best trials (others grey)')
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path
