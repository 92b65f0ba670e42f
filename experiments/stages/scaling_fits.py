"""Scaling-law fits of a sweep's results and their figures (the `fit` and `scaling_sweep`
experiments share these)."""
from __future__ import annotations

import json
import os
import numpy as np
from experiments.stages import runlog, scaling_plots
from lm import scaling


def points_from_results(results: list[dict]) -> dict[str, np.ndarray]:
  return {'N': np.array([r['N'] for r in results], float), 'D': np.array([r['D'] for r in results], float),
          'C': np.array([6.0 * r['N'] * r['D'] for r in results]),
          'budget': np.array([r['flops'] for r in results], float),
          'loss': np.array([r['loss'] for r in results], float)}


def _safe(fn, *args, **kw):
  try:
    return fn(*args, **kw), None
  except (ValueError, RuntimeError) as e:
    return None, str(e)


def fit_and_plot(results_or_points, workdir: str, n_boot: int = 200,
                 curves: list[dict] | None = None) -> dict:
  """All fits and figures. `curves` (points along each run's loss curve) feed approach 1;
  without them it uses the final points."""
  pts = (points_from_results(results_or_points) if isinstance(results_or_points, list)
         else results_or_points)
  env_pts = pts
  if curves:
    env_pts = {k: np.array([c[k] for c in curves], float) for k in ('N', 'D', 'C', 'loss')}
  # IsoFLOP groups runs by the planned budget (the realised C differs by step rounding).
  group = pts.get('budget', pts['C'])
  out, figures, errors = {}, {}, {}
  best_n = sorted(set(pts['N']))
  best_loss = [pts['loss'][pts['N'] == n].min() for n in best_n]
  km, errors['km_N'] = _safe(scaling.fit_km, np.array(best_n), np.array(best_loss), 'N', n_boot)
  joint, errors['km_joint'] = _safe(scaling.fit_km_joint, pts['N'], pts['D'], pts['loss'], n_boot // 4)
  env, errors['approach1'] = _safe(scaling.fit_chinchilla_envelope, env_pts['N'], env_pts['D'],
                                   env_pts['C'], env_pts['loss'], n_boot)
  iso, errors['approach2'] = _safe(scaling.fit_chinchilla_isoflop, pts['N'], group, pts['loss'], n_boot)
  par, errors['approach3'] = _safe(scaling.fit_chinchilla_parametric, pts['N'], pts['D'], pts['loss'],
                                   n_boot=min(n_boot, 30))
  for name, f in (('km_N', km), ('km_joint', joint), ('approach1_envelope', env),
                  ('approach2_isoflop', iso), ('approach3_parametric', par)):
    if f is not None:
      j = f.to_json()
      j.pop('bootstrap_samples', None)
      out[name] = j
  if par is not None:
    out['approach3_parametric']['tokens_per_param_at_max_C'] = float(
        scaling.compute_optimal(par, pts['C'].max())['tokens_per_param'])
  out['errors'] = {k: v for k, v in errors.items() if v}
  if km is not None:
    figures['loss_vs_n'] = scaling_plots.loss_vs_n(pts, km, os.path.join(workdir, 'loss_vs_n.png'))
  if iso is not None:
    iso_pts = dict(pts, C=group)
    figures['isoflop'] = scaling_plots.isoflop(iso_pts, iso, os.path.join(workdir, 'isoflop.png'))
  if env is not None:
    figures['loss_vs_flops'] = scaling_plots.loss_vs_flops(
        env_pts, env, os.path.join(workdir, 'loss_vs_flops.png'),
        ylabel='training loss along each run (smoothed)' if curves else 'validation loss')
  alloc = {k: f for k, f in (('approach 1', env), ('approach 2', iso), ('approach 3', par)) if f is not None}
  if iso is not None and alloc:
    figures['optimal_allocation'] = scaling_plots.optimal_allocation(
        alloc, iso, (pts['C'].min(), pts['C'].max()), os.path.join(workdir, 'optimal_allocation.png'))
  out['figures'] = figures
  with open(os.path.join(workdir, 'fits.json'), 'w') as f:
    json.dump(out, f, indent=2)
  print(summary(out))
  return out


def summary(out: dict) -> str:
  lines = ['scaling-law fits:']
  def ci(i, k):
    return f' [{i[k][0]:.2f}, {i[k][1]:.2f}]' if k in i else ' [no bootstrap interval]'
  if 'km_N' in out:
    p, i = out['km_N']['params'], out['km_N']['intervals']
    lines.append(f"  KM L(N): alpha_N = {p['alpha_N']:.3f}{ci(i, 'alpha_N')}, N_c = {p['N_c']:.3g}")
  for key, label in (('approach1_envelope', 'approach 1 (envelope)'), ('approach2_isoflop', 'approach 2 (IsoFLOP)'),
                     ('approach3_parametric', 'approach 3 (parametric)')):
    if key in out:
      p, i = out[key]['params'], out[key]['intervals']
      lines.append(f"  {label}: N_opt ∝ C^{p['a']:.2f}{ci(i, 'a')}, D_opt ∝ C^{p['b']:.2f}{ci(i, 'b')}")
  if 'approach3_parametric' in out:
    p = out['approach3_parametric']['params']
    lines.append(f"  approach 3: E = {p['E']:.3f}, A = {p['A']:.3g}, B = {p['B']:.3g}, alpha = {p['alpha']:.3f}, "
                 f"beta = {p['beta']:.3f}")
  for k, v in out.get('errors', {}).items():
    lines.append(f'  {k}: not fitted ({v})')
  return '\n'.join(lines)


def loss_curves(results: list[dict], workdir: str, smooth: int = 5) -> list[dict]:
  """Each run's training-loss curve as (N, D so far, C so far, smoothed loss) points:
  the data of Chinchilla's approach 1 (the envelope over all runs' curves)."""
  points = []
  for r in results:
    rows = [x for x in runlog.read(os.path.join(workdir, 'runs', r['name'], 'metrics.jsonl'))
            if x.get('loss') is not None]
    tokens_per_step = r['D'] / r['steps']
    for i in range(smooth - 1, len(rows)):
      window = rows[i - smooth + 1:i + 1]
      d = rows[i]['step'] * tokens_per_step
      points.append({'N': r['N'], 'D': d, 'C': 6.0 * r['N'] * d,
                     'loss': sum(x['loss'] for x in window) / smooth})
  return points
