"""The over-optimisation study (Gao et al. 2022) on the RLHF testbed: every method's held-out
gold and proxy reward against d = sqrt(KL to the SFT policy), one panel per proxy RM, with
Gao's functional forms fitted per series.

  bon  workdirs -> results.json: one series per proxy RM (n = 1 ... N; KL_bon analytic)
  ppo  workdirs -> eval.jsonl {iteration, gold, proxy, kl, beta}: one series per run (its beta)
  pg   workdirs -> eval.jsonl (GRPO / RLOO; config.json 'method'): one series per run
  dpo  workdirs -> eval.json ('after', and 'before' at KL 0): all runs on a panel form one
                   series (a beta sweep), one point each

Each kind is a comma-separated list of workdirs or glob patterns; a workdir that does not
exist or holds no results is listed and skipped with a printed note, so the study runs with
whatever series exist (none at all is a ConfigError).

Fits (experiments.stages.overopt_fit): R_bon(d) = d (alpha - beta d) for best-of-n, R_RL(d) = d (alpha -
beta log d) for the rest, on the reward gained over the series' own d = 0 point (n = 1,
iteration 0, DPO's 'before'), else the panel's best-of-n n = 1 value, else raw. Writes
overoptimisation.json, a printed table, overoptimisation_gold.png and
overoptimisation_proxy.png (fitted curves dashed).
"""
from __future__ import annotations

import glob
import json
import math
import os

import numpy as np
from ml_collections import ConfigDict

from experiments.stages import online_report, overopt_fit, reward_model, trainer
from lm.config import ConfigError

KINDS = ('bon', 'ppo', 'grpo', 'rloo', 'dpo')
OUT = 'overoptimisation.json'
NO_RM = 'no RM recorded'


def paths_of(spec) -> list[tuple[str, list[str]]]:
  """[(pattern, matching dirs)] for a comma-separated string (or list) of dirs / globs."""
  items = [p.strip() for p in spec.split(',')] if isinstance(spec, str) else list(spec or ())
  out = []
  for p in (x for x in items if x):
    hits = sorted(glob.glob(os.path.expanduser(p))) if glob.has_magic(p) else [os.path.expanduser(p)]
    out.append((p, [h for h in hits if os.path.isdir(h)]))
  return out


def _json(path):
  with open(path) as f:
    return json.load(f)


def _jsonl(path):
  with open(path) as f:
    return [json.loads(x) for x in f if x.strip()]


def _rm_of(workdir: str) -> str:
  """The proxy RM a run optimised (absolute path), from its config.json."""
  try:
    c = _json(os.path.join(workdir, 'config.json'))
  except (OSError, ValueError):
    return NO_RM
  rm = c.get('reward_source') or c.get('reward_from') or ''
  if isinstance(rm, (list, tuple)):
    rm = rm[0] if rm else ''
  rm = str(rm).split(',')[0].strip()
  return os.path.realpath(rm) if rm else NO_RM


def _pt(kl, gold, proxy=None, **extra) -> dict:
  kl = float(kl)
  pt = {'kl': kl, 'd': math.sqrt(max(kl, 0.0)), 'gold': float(gold), **extra}
  if proxy is not None:
    pt['proxy'] = float(proxy)
  return pt


def read_bon(workdir: str) -> list[dict]:
  res = _json(os.path.join(workdir, 'results.json'))
  out = []
  for label, s in res['series'].items():
    pts = [_pt(p['kl'], p['gold'], p.get('proxy'), n=p['n']) for p in s['points']]
    out.append({'name': f'bon {label}', 'method': 'bon', 'form': 'bon', 'source': workdir,
                'rm': os.path.realpath(s["reward_from"]) if s.get('reward_from') else NO_RM,
                'points': pts})
  return out


def read_iterations(workdir: str, method: str) -> list[dict]:
  """A PPO / GRPO / RLOO run's held-out evaluations (results.json 'evals') as one series."""
  res = _json(os.path.join(workdir, online_report.RESULTS))
  rows = res['evals']
  if not rows:
    raise ValueError('results.json holds no evaluations')
  method = res.get('stage', method)
  beta = rows[0].get('beta')
  if beta is None:
    try:
      beta = (_json(os.path.join(workdir, 'config.json')).get('kl') or {}).get('coef')
    except (OSError, ValueError):
      beta = None
  name = f'{method} {os.path.basename(os.path.normpath(workdir))}'
  pts = [_pt(r['kl'], r['gold'], r.get('proxy'), iteration=r.get('iteration')) for r in rows]
  return [{'name': name, 'method': method, 'form': 'rl', 'source': workdir, 'rm': _rm_of(workdir),
           'beta': beta, 'points': sorted(pts, key=lambda p: (p['iteration'] is None, p['iteration']))}]


def read_dpo(workdir: str) -> dict:
  """One DPO run (results.json): its 'after' point, and 'before' (the reference: KL 0)."""
  e = _json(os.path.join(workdir, online_report.RESULTS))
  after = e['after']
  try:
    beta = (_json(os.path.join(workdir, 'config.json')).get('kl') or {}).get('coef')
  except (OSError, ValueError):
    beta = None
  pts = [_pt(after['kl'], after['gold'], after.get('proxy'), run=workdir, beta=beta)]
  if e.get('before'):
    b = e['before']
    pts.append(_pt(0.0, b['gold'], b.get('proxy'), run=workdir, beta=0.0, before=True))
  return {'rm': _rm_of(workdir), 'points': pts}


READERS = {'bon': read_bon, 'ppo': lambda w: read_iterations(w, 'ppo'),
           'grpo': lambda w: read_iterations(w, 'grpo'), 'rloo': lambda w: read_iterations(w, 'rloo')}
FILES = {kind: online_report.RESULTS for kind in ('bon', 'ppo', 'grpo', 'rloo', 'dpo')}


def collect(config: ConfigDict) -> tuple[list[dict], list[dict]]:
  """(series, skipped): every readable series; every listed path that gave none, with why."""
  series, skipped, dpo_runs = [], [], []
  for kind in KINDS:
    for pattern, dirs in paths_of(config[kind]):
      if not dirs:
        skipped.append({'kind': kind, 'path': pattern, 'why': 'no such directory'})
        continue
      for d in dirs:
        f = os.path.join(d, FILES[kind])
        if not os.path.exists(f):
          skipped.append({'kind': kind, 'path': d, 'why': f'no {FILES[kind]} (not run or not finished)'})
          continue
        try:
          if kind == 'dpo':
            dpo_runs.append(read_dpo(d))
          else:
            series += READERS[kind](d)
        except (ValueError, KeyError, TypeError) as e:
          skipped.append({'kind': kind, 'path': d, 'why': f'unreadable {FILES[kind]} ({type(e).__name__}: {e})'})
  # DPO: one series per RM panel, the runs (a beta sweep) as its points; one shared d = 0.
  for rm in dict.fromkeys(r['rm'] for r in dpo_runs):
    pts = [p for r in dpo_runs if r['rm'] == rm for p in r['points']]
    before = [p for p in pts if p.get('before')]
    pts = [p for p in pts if not p.get('before')] + before[:1]
    series.append({'name': 'dpo', 'method': 'dpo', 'form': 'rl', 'source': sorted({p['run'] for p in pts}),
                   'rm': rm, 'points': sorted(pts, key=lambda p: p['d'])})
  return series, skipped


def _offset(s: dict, key: str, panel_bon: list[dict]) -> tuple[float, str]:
  """The value at d = 0 that the fit subtracts, and where it came from."""
  zero = [p[key] for p in s['points'] if p['d'] < 1e-3 and key in p]
  if zero:
    return float(np.mean(zero)), 'own d=0 point'
  for b in panel_bon:
    z = [p[key] for p in b['points'] if p.get('n') == 1 and key in p]
    if z:
      return float(z[0]), f'{b["name"]} n=1'
  return 0.0, 'none (no d=0 point on this panel)'


def fit_series(s: dict, panel_bon: list[dict]) -> dict:
  fits = {}
  for key in ('gold', 'proxy'):
    pts = [p for p in s['points'] if key in p]
    if not pts:
      continue
    off, where = _offset(s, key, panel_bon)
    d = np.array([p['d'] for p in pts])
    r = np.array([p[key] for p in pts]) - off
    try:
      fits[key] = {**overopt_fit.fit(d, r, s['form']), 'offset': off, 'offset_from': where}
    except ValueError as e:
      fits[key] = {'form': s['form'], 'error': str(e), 'offset': off, 'offset_from': where}
  return fits


def panel_names(rms: list[str]) -> dict[str, str]:
  """Panel titles: the fewest trailing path components that tell the RMs apart."""

  real = [rm for rm in rms if rm != NO_RM]
  return {**dict(zip(real, reward_model.labels_of(real))), **({NO_RM: NO_RM} if NO_RM in rms else {})}


def run(config: ConfigDict, workdir: str):
  series, skipped = collect(config)
  for s in skipped:
    print(f'note: skipping {s["kind"]} {s["path"]}: {s["why"]}')
  if not series:
    listed = ', '.join(f'{k}={config[k]!r}' for k in KINDS)
    raise ConfigError(f'overoptimisation found no series to plot: none of the listed workdirs '
                      f'({listed}) holds results; run bon / ppo / pg / dpo first or point the lists at them.')
  os.makedirs(workdir, exist_ok=True)
  trainer.write_config(config, workdir)
  rms = list(dict.fromkeys(s['rm'] for s in series))
  names = panel_names(rms)
  panels = {}
  for rm in rms:
    members = [s for s in series if s['rm'] == rm]
    bon_here = [s for s in members if s['method'] == 'bon']
    for s in members:
      s['fits'] = fit_series(s, bon_here)
    panels[names[rm]] = {'reward_from': rm, 'series': members}
  out = {'panels': panels, 'skipped': skipped,
         'forms': {'bon': 'R(d) = d (alpha - beta d)', 'rl': 'R(d) = d (alpha - beta log d)'},
         'd': 'sqrt(KL to the initial policy, nats)'}
  with open(os.path.join(workdir, OUT), 'w') as f:
    json.dump(out, f, indent=2)
  print(table(out))
  for key in ('gold', 'proxy'):
    plot(out, key, os.path.join(workdir, f'overoptimisation_{key}.png'))
  return out


def _peak(d) -> str:
  """Where the fitted gold turns down ('-': it never does; '>99': far outside the data)."""
  return f'{"-":>5}' if d is None else (f'{">99":>5}' if d > 99 else f'{d:>5.2f}')


def table(out: dict) -> str:
  def f(fit):
    if not fit:
      return f'{"-":>32}'
    if 'error' in fit:
      return f'{"(no fit: < 3 points at d > 0)":>32}'
    return f'{fit["alpha"]:>+9.4f} {fit["beta"]:>+9.4f} {fit["r2"]:>6.3f} {_peak(fit.get("d_peak"))}'
  rows = [f'{"panel (RM)":<14} {"series":<26} {"pts":>4} {"max d":>6} {"gold@max":>9} '
          f'{"gold: alpha":>9} {"beta":>9} {"R2":>6} {"dpk":>5} {"proxy: alpha":>9} {"beta":>9} {"R2":>6} {"dpk":>5}']
  for pname, p in out['panels'].items():
    for s in p['series']:
      top = max(s['points'], key=lambda q: q['d'])
      rows.append(f'{pname[:14]:<14} {s["name"][:26]:<26} {len(s["points"]):>4} {top["d"]:>6.3f} '
                  f'{top["gold"]:>+9.4f} {f(s["fits"].get("gold"))} {f(s["fits"].get("proxy"))}')
  return '\n'.join(rows)


def plot(out: dict, key: str, path: str) -> str:
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  panels = list(out['panels'].items())
  fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.3), squeeze=False)
  markers = {'bon': 'o', 'ppo': 's', 'grpo': '^', 'rloo': 'v', 'dpo': 'D'}
  for ax, (pname, p) in zip(axes[0], panels):
    for s in p['series']:
      pts = [q for q in s['points'] if key in q]
      if not pts:
        continue
      d = np.array([q['d'] for q in pts])
      y = np.array([q[key] for q in pts])
      ls = '-' if s['method'] != 'dpo' else 'none'
      line, = ax.plot(d, y, marker=markers.get(s['method'], 'x'), ls=ls, ms=4, lw=1, label=s['name'])
      fit = s['fits'].get(key)
      if fit and 'alpha' in fit:
        grid = np.linspace(0, d.max() * 1.05, 100)
        ax.plot(grid, fit['offset'] + overopt_fit.predict(grid, fit['alpha'], fit['beta'], fit['form']),
                '--', color=line.get_color(), lw=1)
    ax.set_title(f'proxy RM: {pname}')
    ax.set_xlabel('d = sqrt(KL) (nats^0.5)')
    ax.set_ylabel(f'{key} reward' + (' (normalised)' if key == 'proxy' else ''))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
  fig.suptitle(f'{key} reward vs d (dashed: Gao et al. fits)')
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path
