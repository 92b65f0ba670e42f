"""The over-optimisation study's analysis (experiments/overopt_study.py): per proxy RM, gold and
proxy reward against d = sqrt(KL) for best-of-n and each PPO beta, Gao et al.'s forms fitted
(experiments.stages.overopt_fit) to the gain over the series' d = 0 point; then the fitted
alpha, beta against proxy size (parameters) and data size (groups) as slopes in log10 of
each, and the ensembles beside the single proxy of their size. study.json + study_*.png.

Per series: the gold peak (largest gain over d = 0), the gain at the largest d, and
drop = (peak - last) / peak (the issue's target: >= 0.1 with fitted gold beta > 0, R^2 >= 0.9).
"""
from __future__ import annotations

import json
import math
import os

import numpy as np

from experiments.stages import online_report, overopt_fit
from rl import bon as bon_lib

OUT = 'study.json'


def _json(path):
  with open(path) as f:
    return json.load(f)


def series_stats(points: list[dict], form: str) -> dict:
  """Fits of gold and proxy gained over the d = 0 point, and the gold's peak and fall."""
  pts = sorted(points, key=lambda p: p['d'])
  zero = pts[0]
  out = {'points': pts, 'form': form, 'd0': zero['d']}
  for key in ('gold', 'proxy'):
    d = np.array([p['d'] for p in pts])
    r = np.array([p[key] for p in pts]) - zero[key]
    try:
      out[f'fit_{key}'] = overopt_fit.fit(d, r, form)
    except ValueError as e:
      out[f'fit_{key}'] = {'error': str(e)}
  gain = np.array([p['gold'] - zero['gold'] for p in pts])
  i = int(np.argmax(gain))
  peak, last = float(gain[i]), float(gain[-1])
  out.update(gold_peak_gain=peak, gold_peak_d=float(pts[i]['d']), gold_last_gain=last,
             d_max=float(pts[-1]['d']),
             gold_drop=float((peak - last) / peak) if peak > 0 else None)
  f = out['fit_gold']
  out['turns_down'] = bool('beta' in f and f['beta'] > 0 and f['r2'] >= 0.9 and
                           out['gold_drop'] is not None and out['gold_drop'] >= 0.1)
  return out


def bon_points(bon_dir: str) -> dict[str, list[dict]]:
  """{absolute RM dir: [{n, kl, d, gold, proxy}]} from a bon run's results.json."""
  res = _json(os.path.join(bon_dir, 'results.json'))
  return {os.path.abspath(s['reward_from']): [dict(n=p['n'], kl=p['kl'], d=p['d'], gold=p['gold'], proxy=p['proxy'])
                                             for p in s['points']]
          for s in res['series'].values()}


def bon_bootstrap(bon_dir: str, draws: int = 200, seed: int = 0) -> dict[str, dict]:
  """{absolute RM dir: standard errors over prompts (resampled with replacement) of the gold's
  fall from its peak n to the largest n, and of the gold gained at the largest n}: how much of
  a peak-then-fall the held-out prompts can resolve."""
  res = _json(os.path.join(bon_dir, 'results.json'))
  z = np.load(os.path.join(bon_dir, 'scores.npz'))
  g, ns, rng = z['gold'], res['ns'], np.random.default_rng(seed)
  idx = [rng.integers(0, len(g), len(g)) for _ in range(draws)]
  out = {}
  for i, s in enumerate(res['series'].values()):
    p = z[f'proxy_{i}']
    curves = np.array([[q['gold'] for q in bon_lib.curve(p[j], g[j], None, ns)] for j in idx])
    out[os.path.abspath(s['reward_from'])] = {'fall_se': float(np.std(curves.max(1) - curves[:, -1])),
                                             'gain_se': float(np.std(curves[:, -1] - curves[:, 0]))}
  return out


def ppo_points(ppo_dir: str) -> list[dict]:
  rows = online_report.read(ppo_dir)['evals']
  return [dict(iteration=r['iteration'], kl=r['kl'], d=math.sqrt(max(r['kl'], 0.0)), gold=r['gold'],
               proxy=r['proxy']) for r in rows]


def slope(x, y) -> dict:
  """y against log10 x: least-squares slope, its standard error, and whether y is monotone in x."""
  x, y = np.log10(np.asarray(x, np.float64)), np.asarray(y, np.float64)
  if len(x) < 2:
    return {'slope': None}
  order = np.argsort(x)
  diffs = np.diff(y[order])
  out = {'slope': float(np.polyfit(x, y, 1)[0]), 'monotone': bool(np.all(diffs > 0) or np.all(diffs < 0)),
         'x': x[order].tolist(), 'y': y[order].tolist()}
  if len(x) > 2:
    res = y - np.polyval(np.polyfit(x, y, 1), x)
    out['stderr'] = float(np.sqrt(np.sum(res ** 2) / (len(x) - 2) / np.sum((x - x.mean()) ** 2)))
  return out


def analyse(workdir: str, proxies: dict, axis_names: dict, bon_dir: str, ppo: dict, gold_rm: str) -> dict:
  """proxies {name: {dir, size, data, kind[, single]}}; axis_names {'size' | 'data': [names]};
  ppo {(name, beta): workdir}."""
  bon = bon_points(bon_dir)
  boot = bon_bootstrap(bon_dir)
  methods = ['bon'] + [f'ppo_b{b:g}' for b in sorted({b for _, b in ppo})]
  table = {}
  for name, p in proxies.items():
    cfg = _json(os.path.join(p['dir'], 'config.json'))
    ev = _json(os.path.join(p['dir'], 'eval.json')) if os.path.exists(os.path.join(p['dir'], 'eval.json')) else {}
    how = p['kind'].split('_', 1)[1] if p['kind'] != 'single' else None   # an ensemble's combination
    acc = ((ev.get('combined') or {}).get(how) or ev.get('reward_model') or {}).get('accuracy')
    row = {**p, 'params': cfg['resolved']['params'], 'heldout_accuracy': acc, 'series': {}}
    row['series']['bon'] = {**series_stats(bon[os.path.abspath(p['dir'])], 'bon'), **boot[os.path.abspath(p['dir'])]}
    for (n, b), d in ppo.items():
      if n == name:
        row['series'][f'ppo_b{b:g}'] = series_stats(ppo_points(d), 'rl')
    table[name] = row
  axes = {}
  for axis, x_of in (('size', lambda r: r['params']), ('data', lambda r: r['data'])):
    members = sorted(axis_names[axis], key=lambda n: x_of(table[n]))
    axes[axis] = {'proxies': members, 'x': [x_of(table[n]) for n in members], 'coefficients': {}}
    for m in methods:
      for key in ('gold', 'proxy'):
        for coef in ('alpha', 'beta'):
          fits = [table[n]['series'].get(m, {}).get(f'fit_{key}', {}) for n in members]
          ok = [(x_of(table[n]), f[coef]) for n, f in zip(members, fits) if coef in f]
          axes[axis]['coefficients'][f'{m}/{key}/{coef}'] = slope([a for a, _ in ok], [b for _, b in ok])
  ensembles = {}
  for n, r in table.items():
    if r['kind'] == 'single':
      continue
    s = table[r['single']]
    ensembles[n] = {m: {k: {'single': s['series'][m].get(k) if k != 'beta' else s['series'][m]['fit_gold'].get('beta'),
                            'ensemble': r['series'][m].get(k) if k != 'beta' else r['series'][m]['fit_gold'].get('beta')}
                        for k in ('gold_drop', 'gold_peak_gain', 'gold_last_gain', 'd_max', 'beta')}
                    for m in methods if m in r['series'] and m in s['series']}
  used = _json(os.path.join(gold_rm, 'config.json'))['resolved']['data']['used']
  out = {'gold_rm': gold_rm, 'gold_rm_groups': used, 'gold_rm_heldout_accuracy': (_json(os.path.join(gold_rm, 'eval.json')).get('reward_model') or {}).get('accuracy')
         if os.path.exists(os.path.join(gold_rm, 'eval.json')) else None,
         'methods': methods, 'proxies': table, 'axes': axes, 'ensembles': ensembles,
         'forms': {'bon': 'R(d) = d (alpha - beta d)', 'rl': 'R(d) = d (alpha - beta log d)'}}
  plot_all(out, workdir)
  return out


def summary(out: dict) -> str:
  rows = [f'gold RM held-out pair accuracy (VADER labels): {out["gold_rm_heldout_accuracy"]} '
          f'(groups with a comparison: {out["gold_rm_groups"]})',
          f'{"proxy":<26} {"params":>8} {"data":>5} {"acc":>6} {"method":<9} {"pts":>3} {"d_max":>6} '
          f'{"peak":>7} {"@d":>5} {"last":>7} {"drop":>6} {"alpha":>8} {"beta":>8} {"R2":>6} {"p.alpha":>8} {"p.beta":>8} {"down":>5}']
  for n, r in out['proxies'].items():
    acc = r['heldout_accuracy']
    for m, s in r['series'].items():
      f, fp = s['fit_gold'], s['fit_proxy']
      g = lambda d, k: f'{d[k]:>+8.4f}' if k in d else f'{"-":>8}'
      drop = f'{s["gold_drop"]:>6.2f}' if s['gold_drop'] is not None else f'{"-":>6}'
      rows.append(f'{n[:26]:<26} {r["params"]:>8,} {r["data"]:>5} {acc if acc is None else round(acc, 3)!s:>6} '
                  f'{m:<9} {len(s["points"]):>3} {s["d_max"]:>6.2f} {s["gold_peak_gain"]:>+7.3f} '
                  f'{s["gold_peak_d"]:>5.2f} {s["gold_last_gain"]:>+7.3f} {drop} {g(f, "alpha")} {g(f, "beta")} '
                  f'{f.get("r2", float("nan")):>6.3f} {g(fp, "alpha")} {g(fp, "beta")} {str(s["turns_down"]):>5}' +
                  (f'  (bootstrap se: fall {s["fall_se"]:.3f}, gain {s["gain_se"]:.3f})' if 'fall_se' in s else ''))
  for axis, a in out['axes'].items():
    rows.append(f'{axis} axis: {a["proxies"]} at x = {a["x"]}')
    for k, v in a['coefficients'].items():
      if v.get('slope') is not None and '/gold/' in k:
        rows.append(f'  {k:<22} slope per decade {v["slope"]:+.4f}' +
                    (f' +- {v["stderr"]:.4f}' if 'stderr' in v else '') + f', monotone {v["monotone"]}')
  for n, e in out['ensembles'].items():
    for m, v in e.items():
      rows.append(f'{n} {m}: gold drop {v["gold_drop"]["ensemble"]} vs single {v["gold_drop"]["single"]}; '
                  f'last gain {v["gold_last_gain"]["ensemble"]:+.3f} vs {v["gold_last_gain"]["single"]:+.3f}; '
                  f'fitted beta {v["beta"]["ensemble"]} vs {v["beta"]["single"]}')
  return '\n'.join(rows)


def plot_all(out: dict, workdir: str) -> None:
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  cmap = plt.get_cmap('viridis')
  table = out['proxies']
  for method in out['methods']:
    fig, axs = plt.subplots(2, 2, figsize=(11, 8), squeeze=False)
    for row, axis in enumerate(('size', 'data')):
      names = out['axes'][axis]['proxies']
      for i, n in enumerate(names):
        s = table[n]['series'].get(method)
        if s is None:
          continue
        color = cmap(i / max(1, len(names) - 1))
        label = f'{table[n]["params"]:,} params' if axis == 'size' else f'{table[n]["data"]} groups'
        for col, key in enumerate(('gold', 'proxy')):
          ax = axs[row][col]
          d = np.array([p['d'] for p in s['points']])
          y = np.array([p[key] for p in s['points']]) - s['points'][0][key]
          ax.plot(d, y, 'o', color=color, ms=3, label=label)
          f = s[f'fit_{key}']
          if 'alpha' in f:
            grid = np.linspace(0, d.max(), 80)
            ax.plot(grid, overopt_fit.predict(grid, f['alpha'], f['beta'], s['form']), '-', color=color, lw=1)
          ax.set_title(f'{method}: {key} vs d, proxies by {axis}')
          ax.set_xlabel('d = sqrt(KL) (nats^0.5)')
          ax.set_ylabel(f'{key} gain over d=0 ({"gold RM" if key == "gold" else "proxy RM"}, normalised)')
          ax.grid(alpha=0.3)
          ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(workdir, f'study_{method}.png'), dpi=100)
    plt.close(fig)
  fig, axs = plt.subplots(2, 2, figsize=(11, 8), squeeze=False)
  for col, axis in enumerate(('size', 'data')):
    for row, coef in enumerate(('alpha', 'beta')):
      ax = axs[row][col]
      for j, m in enumerate(out['methods']):
        v = out['axes'][axis]['coefficients'].get(f'{m}/gold/{coef}', {})
        if v.get('x'):
          ax.plot(10 ** np.array(v['x']), v['y'], 'o-', color=f'C{j}', label=m)
      ax.set_xscale('log')
      ax.set_xlabel('proxy parameters' if axis == 'size' else 'proxy training groups')
      ax.set_ylabel(f'gold {coef}')
      ax.grid(alpha=0.3)
      ax.legend(fontsize=7)
  fig.suptitle('fitted gold coefficients against proxy size and data')
  fig.tight_layout()
  fig.savefig(os.path.join(workdir, 'study_coefficients.png'), dpi=100)
  plt.close(fig)
  if out['ensembles']:
    fig, axs = plt.subplots(1, len(out['methods']), figsize=(5 * len(out['methods']), 4), squeeze=False)
    single = table[next(iter(out['ensembles']))]['single']
    for ax, m in zip(axs[0], out['methods']):
      for j, r in enumerate([table[single]] + [table[n] for n in out['ensembles']]):
        s = r['series'].get(m)
        if s is None:
          continue
        ax.plot([p['d'] for p in s['points']], [p['gold'] - s['points'][0]['gold'] for p in s['points']],
                'o-', color=f'C{j}', ms=3, label=r['kind'])
      ax.set_title(f'{m}: gold vs d, smallest proxy')
      ax.set_xlabel('d = sqrt(KL)')
      ax.set_ylabel('gold gain over d=0')
      ax.grid(alpha=0.3)
      ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(workdir, 'study_ensembles.png'), dpi=100)
    plt.close(fig)
