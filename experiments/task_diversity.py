"""Task-diversity study (issue 25): does instruction tuning on more task families improve
families never trained on (FLAN / T0's claim), on the composed-task testbed of
data/composed_tasks.py?

  pretrain a small character model on the works (experiment `pretrain`)      -> base/
  for k in study.families, for seed in study.seeds:
      k seen families (a seeded subset) -> train.jsonl -> experiment `sft`   -> runs/k{k}_s{seed}/
  evaluate the base and every run on the held-out families (exact match of greedy answers and
  rank classification over four candidates, chance 0.25), with the training phrasings and with
  paraphrases never trained on, and on the run's own families (held-out words)
  -> results.json, diversity.png (held-out accuracy vs number of families), a printed table

study.grid picks the testbed's grid: 'small' (3 cases x 4 layouts, 9 seen families) or 'wide'
(5 x 7, 30 seen; composed_tasks.GRIDS); study.families may say 'all' for every seen family.

Intervals are Wilson's, pooled over seeds; margins between two models are Newcombe's
difference of two Wilson intervals. Each finished piece leaves a result file, so a rerun
resumes; study.base_from reuses a finished pretraining workdir.
"""
from __future__ import annotations

import copy
import json
import math
import os
import time

from ml_collections import ConfigDict

from data import composed_tasks as ct
from experiments import registry
from experiments.stages import composed_eval, runlog
from lm.config import ConfigError

CONDITIONS = ('phrasing_train', 'phrasing_test')   # held-out families, trained / unseen phrasings


def int_list(text: str, key: str) -> list[int]:
  try:
    out = [int(x) for x in str(text).split(',') if x.strip()]
  except ValueError:
    out = []
  if not out:
    raise ConfigError(f'{key}={text!r} must be a comma-separated list of integers, e.g. 1,2,4.')
  return out


def grid_of(config: ConfigDict) -> ct.Grid:
  name = config.study.get('grid', 'small')
  if name not in ct.GRIDS:
    raise ConfigError(f'study.grid={name!r} must be one of {sorted(ct.GRIDS)}.')
  return ct.GRIDS[name]


def check(config: ConfigDict) -> tuple[list[int], list[int]]:
  """(numbers of families, seeds); ConfigError before anything runs."""
  s = config.study
  n_seen = len(grid_of(config).seen)
  ks = int_list(','.join(str(n_seen) if x.strip() == 'all' else x for x in str(s.families).split(',')),
                'study.families')
  bad = [k for k in ks if not 1 <= k <= n_seen]
  if bad:
    raise ConfigError(f'study.families {bad} must each be between 1 and {n_seen} (the seen families), or all.')
  seeds = int_list(s.seeds, 'study.seeds')
  if min(s.eval_per_family, s.seen_eval_per_family, s.train_examples) < 1:
    raise ConfigError('study.eval_per_family, study.seen_eval_per_family and study.train_examples '
                      'must be positive.')
  if s.base_from and not os.path.exists(os.path.join(s.base_from, 'config.json')):
    raise ConfigError(f'study.base_from={s.base_from!r} is not a finished pretraining workdir.')
  return ks, seeds


def _json(path: str, obj=None):
  if obj is None:
    with open(path) as f:
      return json.load(f)
  with open(path, 'w') as f:
    json.dump(obj, f, indent=1)
  return obj


def held_out_sets(config: ConfigDict) -> dict[str, list[dict]]:
  """The held-out families on evaluation words, once per phrasing condition (seed study.eval_seed)."""
  n, seed, g = config.study.eval_per_family, config.study.eval_seed, grid_of(config)
  return {c: ct.examples(g.held_out, n, 'eval', seed, phrasing=c.split('_')[1], grid_name=g.name)
          for c in CONDITIONS}


def _evaluate(config: ConfigDict, workdir: str, sets: dict) -> dict:
  """composed_eval.evaluate's scores, each family and pooled with the answers' forms counted
  (composed_tasks.form: the primitives right, the letters aside); the answers go to answers.json."""
  params, cfg, tok, template, mesh = composed_eval.load(workdir, config.sft.data.template)
  e, out, said = config.eval, {}, {}
  for name, exs in sets.items():
    said[name] = composed_eval.answers(params, cfg, tok, template, exs, mesh, e.max_new_tokens, e.batch_size)
    out[name] = composed_eval.score(exs, said[name], composed_eval.picks(params, cfg, tok, template, exs, e.batch_size))
    for ex, a in zip(exs, said[name]):
      for counts in (out[name]['families'][ex['family']], out[name]['pooled']):
        counts.setdefault('form', dict.fromkeys(ct.FORMS, 0))[ct.form(ex, a)] += 1
  _json(os.path.join(workdir, 'answers.json'), said)
  return out


def pretrain_base(config: ConfigDict, workdir: str) -> str:
  if config.study.base_from:
    return config.study.base_from
  base = os.path.join(workdir, 'base')
  if not os.path.exists(os.path.join(base, 'done.json')):
    c = copy.deepcopy(config.pretrain)
    c.seed = config.seed
    c.data.data_dir = c.data.data_dir or os.path.join(workdir, 'data')
    registry.get('pretrain')(c, base)
    _json(os.path.join(base, 'done.json'), {'steps': c.train.steps})
  return base


def sft_config(config: ConfigDict, base: str, train_path: str, seed: int) -> ConfigDict:
  c = copy.deepcopy(config.sft)
  c.init_from, c.seed = base, seed
  c.data.source = train_path
  c.train.checkpoint_every = c.train.steps   # the final params are what is evaluated
  return c


def tune(config: ConfigDict, base: str, workdir: str, k: int, seed: int, held: dict) -> dict:
  """One run: k families (seeded), SFT, evaluation; its result.json (resumable)."""
  sub = os.path.join(workdir, 'runs', f'k{k}_s{seed}')
  done = os.path.join(sub, 'result.json')
  if os.path.exists(done):
    return _json(done)
  os.makedirs(sub, exist_ok=True)
  g = grid_of(config)
  families = ct.training_families(k, seed, g.name)
  trained = os.path.join(sub, 'trained.json')   # SFT finished: only the evaluation is redone
  t0 = time.time()
  if not os.path.exists(trained):
    path = os.path.join(sub, 'train.jsonl')
    with open(path, 'w') as f:
      for ex in ct.training_set(families, config.study.train_examples, seed, g.name):
        f.write(json.dumps({key: ex[key] for key in ('instruction', 'input', 'output')}) + '\n')
    registry.get('sft')(sft_config(config, base, path, seed), sub)
    _json(trained, {'sft_s': time.time() - t0})
  train_s = _json(trained)['sft_s']
  t0 = time.time() - train_s
  seen = {'seen': ct.examples(families, config.study.seen_eval_per_family, 'eval', config.study.eval_seed,
                              grid_name=g.name)}
  scores = _evaluate(config, sub, {**held, **seen})
  losses = [m['loss'] for m in runlog.read(os.path.join(sub, 'metrics.jsonl')) if 'loss' in m]
  result = {'k': k, 'seed': seed, 'families': families,
            'composable': [f for f in g.held_out if ct.composable(f, families, g.name)],
            'final_train_loss': losses[-1] if losses else None, 'scores': scores,
            'timing': {'sft_s': train_s, 'eval_s': time.time() - t0 - train_s}}
  return _json(done, result)


def newcombe(c1: int, n1: int, c2: int, n2: int) -> tuple[float, float, float]:
  """(p1 - p2, lower, upper): Newcombe's hybrid score interval for a difference of proportions."""
  p1, p2 = c1 / n1, c2 / n2
  l1, u1 = composed_eval.wilson(c1, n1)
  l2, u2 = composed_eval.wilson(c2, n2)
  d = p1 - p2
  return d, d - math.sqrt((p1 - l1) ** 2 + (u2 - p2) ** 2), d + math.sqrt((u1 - p1) ** 2 + (p2 - l2) ** 2)


def curve(runs: list[dict], base_scores: dict) -> list[dict]:
  """One row per number of families (0: the pretrained base): per condition, counts pooled over
  seeds with Wilson intervals, and the per-seed rates."""
  rows = [{'k': 0, 'seeds': [], **{c: _pool([base_scores[c]['pooled']]) for c in CONDITIONS}}]
  for k in sorted({r['k'] for r in runs}):
    group = sorted((r for r in runs if r['k'] == k), key=lambda r: r['seed'])
    row = {'k': k, 'seeds': [r['seed'] for r in group]}
    for c in [*CONDITIONS, 'seen']:
      row[c] = _pool([r['scores'][c]['pooled'] for r in group])
      row[c]['per_seed_exact'] = [r['scores'][c]['pooled']['exact_rate'] for r in group]
    # where composition can and cannot happen: held-out families whose primitives were trained
    comp = {'yes': [0, 0], 'no': [0, 0]}
    for r in group:
      for f, s in r['scores']['phrasing_train']['families'].items():
        key = 'yes' if f in r['composable'] else 'no'
        comp[key][0] += s['exact']
        comp[key][1] += s['n']
    row['composable_exact'] = {k2: {'exact': c2, 'n': n2, 'rate': c2 / n2 if n2 else None}
                               for k2, (c2, n2) in comp.items()}
    rows.append(row)
  return rows


def _pool(scores: list[dict]) -> dict:
  n = sum(s['n'] for s in scores)
  out = {'n': n}
  if all('diagnosis' in s for s in scores):
    out['diagnosis'] = {d: sum(s['diagnosis'][d] for s in scores) for d in ct.DIAGNOSES}
  if all('form' in s for s in scores):
    out['form'] = {d: sum(s['form'][d] for s in scores) for d in ct.FORMS}
  for key in ('exact', 'choice'):
    c = sum(s[key] for s in scores)
    out[key], out[f'{key}_rate'], out[f'{key}_ci'] = c, c / n, composed_eval.wilson(c, n)
  return out


def margins(rows: list[dict]) -> dict:
  """All seen families against the base and against one family, per condition and metric."""
  by_k = {r['k']: r for r in rows}
  top, out = max(by_k), {}
  for other in (0, 1):
    if other not in by_k or top == other:
      continue
    for c in CONDITIONS:
      for key in ('exact', 'choice'):
        a, b = by_k[top][c], by_k[other][c]
        out[f'k{top}_minus_k{other}/{c}/{key}'] = newcombe(a[key], a['n'], b[key], b['n'])
  return out


def run(config: ConfigDict, workdir: str):
  ks, seeds = check(config)
  # finished pieces are resumed, so a workdir holds one grid's results only
  marker, name = os.path.join(workdir, 'grid.json'), grid_of(config).name
  if os.path.exists(marker) and _json(marker)['grid'] != name:
    raise ConfigError(f'{workdir} holds a study of the {_json(marker)["grid"]!r} grid; '
                      f'give study.grid={name!r} a workdir of its own.')
  os.makedirs(workdir, exist_ok=True)
  _json(marker, {'grid': name})
  t0 = time.time()
  held = held_out_sets(config)
  base = pretrain_base(config, workdir)
  base_done = os.path.join(workdir, 'base_eval.json')
  base_scores = _json(base_done) if os.path.exists(base_done) else _json(base_done, _evaluate(config, base, held))
  runs = [tune(config, base, workdir, k, seed, held) for k in ks for seed in seeds]
  rows = curve(runs, base_scores)
  g = grid_of(config)
  results = {'grid': g.name, 'held_out_families': list(g.held_out), 'seen_families': list(g.seen),
             'chance': base_scores['phrasing_train']['pooled']['chance'],
             'curve': rows, 'margins': margins(rows), 'base': base_scores,
             'runs': [{key: r[key] for key in ('k', 'seed', 'families', 'composable', 'final_train_loss')}
                      | {'held_out': {c: r['scores'][c] for c in CONDITIONS}, 'seen': r['scores']['seen']['pooled']}
                      for r in runs],
             'timing': {'total_s': time.time() - t0, 'runs': {f"k{r['k']}_s{r['seed']}": r['timing'] for r in runs}}}
  _json(os.path.join(workdir, 'results.json'), results)
  text = table(results)
  print(text)
  with open(os.path.join(workdir, 'results.txt'), 'w') as f:
    f.write(text + '\n')
  plot(results, os.path.join(workdir, 'diversity.png'))
  return results


def _cell(p: dict, key: str) -> str:
  lo, hi = p[f'{key}_ci']
  return f"{p[f'{key}_rate']:.3f} [{lo:.3f},{hi:.3f}]"


def table(results: dict) -> str:
  head = (f"{'families':>8} {'seeds':>5} {'n':>5}  {'held-out EM':>21}  {'EM paraphrased':>21}  "
          f"{'rank (chance ' + format(results['chance'], '.2f') + ')':>21}  {'seen EM':>7}  composable / not EM")
  lines = [head, '-' * len(head)]
  for r in results['curve']:
    a, b = r['phrasing_train'], r['phrasing_test']
    name = 'base' if r['k'] == 0 else str(r['k'])
    seen = f"{r['seen']['exact_rate']:.3f}" if 'seen' in r else '-'
    comp = r.get('composable_exact')
    comp = (' / '.join('-' if comp[x]['rate'] is None else f"{comp[x]['rate']:.3f}" for x in ('yes', 'no'))
            if comp else '-')
    lines.append(f"{name:>8} {len(r['seeds']):>5} {a['n']:>5}  {_cell(a, 'exact'):>21}  "
                 f"{_cell(b, 'exact'):>21}  {_cell(a, 'choice'):>21}  {seen:>7}  {comp}")
  lines += ['', 'held-out answers (trained phrasings), seeds pooled: ' + ' / '.join(ct.DIAGNOSES)]
  for r in results['curve']:
    diag = r['phrasing_train'].get('diagnosis')
    if diag:
      lines.append(f"{'base' if r['k'] == 0 else r['k']:>8}  " + ' / '.join(f'{diag[d] / r["phrasing_train"]["n"]:.3f}'
                                                                         for d in ct.DIAGNOSES))
  lines += ['', "held-out answers' form, letters aside (trained phrasings; seen families): " + ' / '.join(ct.FORMS)]
  for r in results['curve']:
    forms = [r[c].get('form') for c in ('phrasing_train', 'seen') if c in r]
    if forms and forms[0]:
      lines.append(f"{'base' if r['k'] == 0 else r['k']:>8}  " + ';  '.join(
          ' / '.join(f'{f[d] / sum(f.values()):.3f}' for d in ct.FORMS) for f in forms if f))
  lines.append('')
  for name, (d, lo, hi) in results['margins'].items():
    lines.append(f'{name:<44} {d:+.3f} [{lo:+.3f},{hi:+.3f}]')
  return '\n'.join(lines)


def _bars(y, cis):
  """Error bar lengths below and above; clipped at 0, as Wilson's upper bound of n/n rounds to
  just under 1 and matplotlib refuses a negative bar."""
  return [[max(0.0, y_ - lo) for y_, (lo, _) in zip(y, cis)], [max(0.0, hi - y_) for y_, (_, hi) in zip(y, cis)]]


def plot(results: dict, path: str) -> str:
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  rows = [r for r in results['curve'] if r['k']]
  base = results['curve'][0]
  ks = [r['k'] for r in rows]
  fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharex=True)
  panels = (('exact', 'held-out exact match'), ('choice', 'held-out rank classification'))
  for ax, (key, title) in zip(axes, panels):
    for c, label, colour in (('phrasing_train', 'trained phrasings', 'tab:blue'),
                             ('phrasing_test', 'paraphrased at test time', 'tab:orange')):
      y = [r[c][f'{key}_rate'] for r in rows]
      ax.errorbar(ks, y, yerr=_bars(y, [r[c][f'{key}_ci'] for r in rows]), marker='o', capsize=3,
                  label=label, color=colour)
      ax.axhline(base[c][f'{key}_rate'], ls=':', color=colour, alpha=0.7)
    if key == 'exact':   # the run's own families on held-out words: what there is to compose
      y = [r['seen']['exact_rate'] for r in rows]
      ax.errorbar(ks, y, yerr=_bars(y, [r['seen']['exact_ci'] for r in rows]),
                  marker='s', capsize=3, ls='--', color='tab:green', label='trained families')
    if key == 'choice':
      ax.axhline(results['chance'], ls='--', color='grey', label='chance')
    ax.plot([], [], ls=':', color='k', label='pretrained base')
    ax.set_xscale('log', base=2)
    ax.set_xticks(ks, [str(k) for k in ks])
    ax.set_xlabel('number of training task families')
    ax.set_title(title)
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
  axes[0].set_ylabel('accuracy (95% Wilson interval, seeds pooled)')
  axes[0].legend(fontsize=8)
  axes[1].legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return path
