"""The reasoning lab's report: the RL runs' logs read back, the printed table and the PNGs.

  rl_curves(workdir)  {'train': [(iteration, value)], 'held_out': [...]} of one RL run's
                      reward/answer (metrics.jsonl: the iteration's rollouts; eval.jsonl: the
                      held-out problems at eval.every), empty lists for a run without them
  table(results)      greedy accuracy, pass@k, length per policy; by steps and digits
  plot_passk          pass@k vs k per policy (overall, and one panel per steps / digits value)
  plot_iterations     reward/answer vs iteration of each RL run, train and held-out
"""
from __future__ import annotations

import json
import math
import os

KEY = 'reward/answer'   # the answer rule's mean: the accuracy of the rollouts' answers


def _rows(path: str) -> list[dict]:
  if not os.path.exists(path):
    return []
  with open(path, encoding='utf-8') as f:
    return [json.loads(l) for l in f if l.strip()]


def rl_curves(workdir: str, key: str = KEY) -> dict:
  train = [(int(r['step']), float(r[key])) for r in _rows(os.path.join(workdir, 'metrics.jsonl'))
           if key in r and 'step' in r]
  held = [(int(r['iteration']), float(r[key])) for r in _rows(os.path.join(workdir, 'eval.jsonl'))
          if key in r and 'iteration' in r]
  return {'train': sorted(train), 'held_out': sorted(held)}


def _pct(v) -> str:
  return '  -  ' if v is None or (isinstance(v, float) and math.isnan(v)) else f'{100 * v:5.1f}'


def table(results: dict) -> str:
  pols = {k: v for k, v in results.items() if not k.startswith('_')}
  lines = []
  for name, r in pols.items():
    g, ks = r['greedy'], list(r['pass_at_k'])
    lines.append(f'{name}: {r["n"]} held-out problems, {r["samples_per_problem"]} samples each '
                 f'(T={r["temperature"]}); greedy {_pct(g["value"]).strip()}% +- '
                 f'{_pct(g["stderr"]).strip()}, length greedy {r["length"]["greedy"]:.1f} / '
                 f'sampled {r["length"]["sampled"]:.1f} tokens, unparsable greedy '
                 f'{r["unparsable"]["greedy"]} / sampled {r["unparsable"]["sampled"]}')
    lines.append('  ' + f'{"":<10}' + ''.join(f'{"pass@" + str(k):>9}' for k in ks))
    lines.append('  ' + f'{"all":<10}' + ''.join(f'{_pct(r["pass_at_k"][k]):>9}' for k in ks))
    for key in ('steps', 'digits'):
      for v, cur in r[f'pass_at_k_by_{key}'].items():
        lines.append('  ' + f'{key[:-1]} {v:<5}' + ''.join(f'{_pct(cur[k]):>9}' for k in ks)
                     + f'   greedy {_pct(r[f"greedy_by_{key}"][v]).strip()}')
  return '\n'.join(lines)


def _plt():
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  return plt


def plot_passk(results: dict, path: str) -> str:
  plt = _plt()
  pols = {k: v for k, v in results.items() if not k.startswith('_')}
  first = next(iter(pols.values()))
  panels = ([('all', None)] + [('steps', v) for v in first['pass_at_k_by_steps']]
            + [('digits', v) for v in first['pass_at_k_by_digits']])
  fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.8), squeeze=False)
  for ax, (key, v) in zip(axes[0], panels):
    for i, (name, r) in enumerate(pols.items()):
      cur = r['pass_at_k'] if v is None else r[f'pass_at_k_by_{key}'].get(v, {})
      greedy = r['greedy']['value'] if v is None else r[f'greedy_by_{key}'].get(v)
      ks = [int(k) for k in cur]
      ax.plot(ks, [100 * cur[k] for k in cur], 'o-', ms=3, color=f'C{i}', label=f'{name} pass@k')
      if greedy is not None:
        ax.axhline(100 * greedy, color=f'C{i}', ls='--', lw=1, label=f'{name} greedy')
    ax.set_xscale('log', base=2)
    ax.set(xlabel='k', ylabel='%', ylim=(-3, 103),
           title='all held-out problems' if v is None else f'{key} = {v}')
    ax.grid(alpha=0.3)
  axes[0][0].legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path


def plot_iterations(curves: dict, path: str) -> str | None:
  """curves: {policy: rl_curves(...)}; None (no file) when no run logged the answer reward."""
  curves = {k: c for k, c in curves.items() if c['train'] or c['held_out']}
  if not curves:
    return None
  plt = _plt()
  fig, ax = plt.subplots(figsize=(6, 4))
  for i, (name, c) in enumerate(curves.items()):
    if c['train']:
      ax.plot(*zip(*[(x, 100 * y) for x, y in c['train']]), color=f'C{i}', alpha=0.4, lw=1,
              label=f'{name}: rollouts (sampled)')
    if c['held_out']:
      ax.plot(*zip(*[(x, 100 * y) for x, y in c['held_out']]), 'o-', color=f'C{i}',
              label=f'{name}: held-out (sampled)')
  ax.set(xlabel='RL iteration', ylabel='answer reward = accuracy (%)', ylim=(-3, 103))
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path
