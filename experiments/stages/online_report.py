"""What every policy stage reports, in one schema: results.json

  {"stage": "ppo" | "grpo" | "rloo" | "dpo" | ..., "iterations": N (0 for offline stages),
   "started_at": I, "before": {held-out row} | null, "after": {held-out row} | null,
   "evals": [held-out rows], "seconds_per_iteration": {phase: s}, "tokens_per_sec": x}

where a held-out row is experiments.stages.policy.evaluate's report (gold, gold_stderr, proxy,
kl, sqrt_kl, length, eos_rate, prompts) with its `iteration`. The over-optimisation study
reads every stage through `read`. Plus the figures: reward.png (rollout and held-out reward
and KL against iteration) and gold_vs_kl.png (held-out gold and proxy against sqrt(KL), Gao
et al.'s axes)."""
from __future__ import annotations

import json

import jax
import numpy as np

from experiments.stages import runlog
from lm import paths

RESULTS = 'results.json'


def write(workdir: str, results: dict) -> None:
  if jax.process_index() == 0:
    paths.write_text(paths.path(workdir) / RESULTS, json.dumps(results, indent=2))


def read(workdir: str) -> dict:
  return json.loads(paths.read_text(paths.path(workdir) / RESULTS))


def finish(workdir: str, stage: str, start: int, it: int, total: int, evals: list[dict]) -> dict:
  """results.json (once the run is complete), the figures and a table; returns the results."""
  path = paths.path(workdir) / 'metrics.jsonl'
  rows = runlog.read(path) if path.exists() else []
  timed = rows[1:] or rows          # the first iteration compiles
  # every phase a row carries (time_rules: the rule rewards, e.g. a sandbox), and the whole
  split = {k[len('time_'):]: float(np.mean([r[k] for r in timed])) for k in
           ('time_generate', 'time_rules', 'time_score', 'time_update', 'time_reward',
            'time_iteration') if all(k in r for r in timed)} if rows else {}
  results = {'stage': stage, 'iterations': it, 'started_at': start,
             'before': evals[0] if evals and evals[0]['iteration'] == 0 else None,
             'after': evals[-1] if evals else None, 'evals': evals,
             'seconds_per_iteration': split,
             'tokens_per_sec': float(np.mean([r['tokens_per_sec'] for r in timed])) if rows else None}
  if jax.process_index() != 0:
    return results
  if rows:
    plot_iterations(rows, evals, paths.path(workdir) / 'reward.png', stage)
  if evals:
    plot_gold_vs_kl(evals, paths.path(workdir) / 'gold_vs_kl.png', paths.absolute(workdir).name)
  if it >= total:
    write(workdir, results)
  print(f'{"iteration":>9s} {"gold":>7s} {"proxy":>7s} {"KL":>7s} {"length":>6s} {"eos":>5s}')
  for r in evals:
    print(f"{r['iteration']:9d} {r['gold']:+7.3f} {r.get('proxy', float('nan')):+7.3f} "
          f"{r['kl']:7.3f} {r['length']:6.1f} {r['eos_rate']:5.2f}")
  if split:
    print('seconds per iteration: ' + ', '.join(f'{k} {v:.3f}' for k, v in split.items()))
  return results


def plot_iterations(rows: list[dict], evals: list[dict], path, title: str) -> str:
  """Proxy and gold of the rollouts (lines) and of the held-out evaluations (markers) against
  iteration, and the KL to the reference."""
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
  it = [r['step'] for r in rows]
  for name, color in (('proxy', 'C0'), ('gold', 'C1')):
    a.plot(it, [r[name] for r in rows], color=color, label=f'{name} (rollouts)')
    a.plot([r['iteration'] for r in evals if name in r], [r[name] for r in evals if name in r], 'o',
           color=color, label=f'{name} (held-out)')
  b.plot(it, [r['kl'] for r in rows], color='C2', label='KL (rollouts)')
  b.plot([r['iteration'] for r in evals], [r['kl'] for r in evals], 'o', color='C2', label='KL (held-out)')
  for ax, y in ((a, 'reward'), (b, 'KL(pi || ref), nats / sequence')):
    ax.set_xlabel('iteration')
    ax.set_ylabel(y)
    ax.legend()
  fig.suptitle(title)
  fig.tight_layout()
  return runlog.save_png(fig, path, dpi=100)


def plot_gold_vs_kl(evals: list[dict], path, title: str = '') -> str:
  """Held-out gold and proxy reward against sqrt(KL to the reference) (Gao et al.'s axes)."""
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  d = [np.sqrt(max(e['kl'], 0.0)) for e in evals]
  fig, ax = plt.subplots(figsize=(6, 4))
  ax.plot(d, [e['gold'] for e in evals], 'o-', label='gold', ms=3)
  ax2 = ax.twinx()
  ax2.plot(d, [e.get('proxy', np.nan) for e in evals], 's--', color='tab:orange', label='proxy (RM)', ms=3)
  ax.set_xlabel('sqrt(KL(pi || pi_ref)) (nats^0.5)')
  ax.set_ylabel('gold reward')
  ax2.set_ylabel('proxy reward (normalised)')
  ax.set_title(title)
  ax.grid(alpha=0.3)
  lines = ax.get_lines() + ax2.get_lines()
  ax.legend(lines, [l.get_label() for l in lines], loc='upper left')
  fig.tight_layout()
  return runlog.save_png(fig, path, dpi=120)

