"""The `icl_sweep` experiment: classification accuracy over k demonstrations, selection and
ordering, over several seeds (ICL is famously sensitive to all three; this shows how much).

  results.json   {'selection/ordering': {k: {mean, std, accs per seed, dropped demos}}, _meta}
  samples.jsonl  every prompt: combo, seed, k, query id, demo ids, full context, gold, prediction,
                 label log-probs, demos dropped for length
  icl_sweep.png  accuracy vs k with error bars (std over seeds), one line per combo
  a table on stdout

Tasks (config.task.source):
  synthetic  entity classification with arbitrary label words (experiments/induction.py's
             bursty format, 'nn eeL'): n_entities random words, each mapped to a random label
             digit fixed by task.seed; inputs are 'distractor entity'. A model can only know the
             mapping from the demonstrations, so k = 0 is chance and what selection retrieves
             (the same entity, or not) decides the accuracy.
  jsonl      records with an input and a label field (task.path; pool: task.pool_path or the
             first task.n_pool records); labels: task.labels or the sorted label values.

The model: init_from=DIR|hf:PATH, or (empty, the default) the synthetic 2-layer model that
config.pretrain trains in-process (the icl_induction experiment, into WORKDIR/model; a rerun
reuses it).
"""
from __future__ import annotations

import json
import os
import time

import numpy as np
from ml_collections import ConfigDict

from lm import sharding
from experiments.stages import bursty, stage
from experiments.evaluation import icl_prompts
from experiments.evaluation import eval_model
from lm.config import ConfigError


# Tasks -----------------------------------------------------------------------------------------
def synthetic_task(t: ConfigDict) -> tuple[list[dict], list[dict], list[str], icl_prompts.Template]:
  """(pool, eval, labels, template) of the entity-classification task."""
  rng = np.random.default_rng(t.seed)
  if not 1 <= t.n_entities <= len(bursty.LETTERS):
    raise ConfigError('task.n_entities must be in [1, 26] (entities end in distinct letters).')
  entities, lasts = [], set()
  while len(entities) < t.n_entities:
    e = bursty.random_word(rng, t.word_len)
    if e[-1] not in lasts:
      entities.append(e)
      lasts.add(e[-1])
  labels = [str(i) for i in range(t.n_labels)]
  mapping = {e: labels[int(rng.integers(t.n_labels))] for e in entities}

  def examples(n, prefix):
    out = []
    for i in range(n):
      e = entities[int(rng.integers(len(entities)))]
      out.append({'id': f'{prefix}{i}', 'x': f'{bursty.random_word(rng, t.word_len)} {e}',
                  'y': mapping[e], 'entity': e})
    return out
  template = icl_prompts.Template(input='{x}', output='{y}', separator=' ')
  return examples(t.n_pool, 'pool'), examples(t.n_eval, 'eval'), labels, template


def jsonl_task(t: ConfigDict):
  def read(path, prefix):
    if not path or not os.path.exists(path):
      raise ConfigError(f'task.path={path!r} does not exist; give a JSON-lines file of '
                        f'{{"{t.input_field}": ..., "{t.label_field}": ...}} records.')
    out = []
    with open(path, encoding='utf-8') as f:
      for i, line in enumerate(f):
        if line.strip():
          r = json.loads(line)
          out.append({'id': f'{prefix}{i}', 'x': str(r[t.input_field]), 'y': str(r[t.label_field])})
    return out
  records = read(t.path, 'r')
  if t.pool_path:
    pool, evals = read(t.pool_path, 'p'), records
  else:
    pool, evals = records[:t.n_pool], records[t.n_pool:]
  evals = evals[:t.n_eval] if t.n_eval else evals
  if not pool or not evals:
    raise ConfigError(f'task {t.path}: the demonstration pool ({len(pool)}) and the evaluated set '
                      f'({len(evals)}) must both be non-empty; lower task.n_pool or add records.')
  labels = list(t.labels) if t.labels else sorted({e['y'] for e in pool + evals})
  template = icl_prompts.Template(input=t.input_template, output=t.output_template, separator=t.separator)
  return pool, evals, labels, template


TASKS = {'synthetic': synthetic_task, 'jsonl': jsonl_task}


# Config ----------------------------------------------------------------------------------------
def combos(config: ConfigDict) -> list[tuple[str, str]]:
  out = []
  for c in config.sweep.combos:
    if c.count('/') != 1:
      raise ConfigError(f'sweep.combos entry {c!r} must be "selection/ordering", e.g. "bm25/similar_last".')
    sel, order = c.split('/')
    icl_prompts.check(sel, order)
    out.append((sel, order))
  return out


def check(config: ConfigDict) -> list[tuple[str, str]]:
  s = config.sweep
  if config.task.source not in TASKS:
    raise ConfigError(f'task.source={config.task.source!r}; choose one of {sorted(TASKS)}.')
  if not s.ks or any(k < 0 for k in s.ks):
    raise ConfigError(f'sweep.ks={tuple(s.ks)} must be a non-empty list of k >= 0.')
  if s.seeds < 1:
    raise ConfigError('sweep.seeds must be >= 1.')
  if s.n_perms < 1 or s.n_probe < 1:
    raise ConfigError('sweep.n_perms and sweep.n_probe (global-entropy ordering) must be >= 1.')
  return combos(config)


def load_model(config: ConfigDict, workdir: str):
  """(params, ModelConfig, tokenizer, record): init_from's model, or the synthetic one."""
  if config.init_from:
    source, mcfg = stage.read_model_source(config)
    mesh = sharding.make_mesh(config.mesh.to_dict())
    return source.restore_params(mesh, mcfg), mcfg, source.tokenizer, source.record(), mesh
  if config.task.source != 'synthetic':
    raise ConfigError('init_from is empty: the in-process synthetic model only knows the synthetic '
                      'task; set task.source=synthetic or give init_from=DIR|hf:PATH.')
  pre = config.pretrain
  bursty.check(pre)
  path = os.path.join(workdir, 'model')
  print(f'training the synthetic model into {path} (icl_induction, {pre.train.steps} steps)')
  params, cfg, tok, _ = bursty.train_model(pre, path, log=lambda s: None)
  mesh = sharding.make_mesh(pre.mesh.to_dict())
  return params, cfg, tok, {'path': os.path.abspath(path), 'kind': 'synthetic',
                            'step': pre.train.steps}, mesh


# The sweep -------------------------------------------------------------------------------------
def build_prompts(sel: icl_prompts.Selector, ordering: str, k: int, seed: int, evals, pool, instruction,
                  template, lm, labels, s: ConfigDict):
  """Prompts for every evaluated example, and per prompt the demos dropped to fit."""
  demo_sets = [sel.select(q, k) for q in evals]
  info = [{} for _ in evals]
  if ordering == 'global_entropy':
    make = lambda ds, q: icl_prompts.Prompt(instruction, template, tuple(pool[i] for i in ds), q)
    probe_sets = []
    for ds in demo_sets:
      rng = np.random.default_rng([seed, 7, *ds])
      rest = [i for i in range(len(pool)) if i not in set(ds)]
      probe_sets.append([pool[i] for i in rng.choice(rest, min(s.n_probe, len(rest)), replace=False)])
    demo_sets, info = icl_prompts.global_entropy_orders(
        demo_sets, probe_sets, make, lambda ps: icl_prompts.classify(lm, fit_all(ps, lm, labels, template)[0], labels)[0],
        labels, s.n_perms, seed)
  else:
    demo_sets = [icl_prompts.order(ds, q, ordering, sel, seed) for ds, q in zip(demo_sets, evals)]
  prompts = [icl_prompts.Prompt(instruction, template, tuple(pool[i] for i in ds), q)
             for ds, q in zip(demo_sets, evals)]
  prompts, dropped = fit_all(prompts, lm, labels, template)
  return prompts, dropped, info


def fit_all(prompts, lm, labels, template):
  """Every prompt fitted to the model's context (room for the longest label), drops counted."""
  longest = max(len(lm.encode(template.continuation(y))) for y in labels)
  bos = 1 if lm.bos is not None else 0
  room = lm.max_length + 1 - longest - bos
  n_tokens = lambda text: len(lm.encode(text))
  out = [icl_prompts.fit(p, n_tokens, room) for p in prompts]
  return [p for p, _ in out], [d for _, d in out]


def plot(results: dict, ks, path: str) -> None:
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(8, 5))
  names = [n for n in results if not n.startswith('_')]
  xs = np.arange(len(ks))
  for j, name in enumerate(names):
    off = (j - (len(names) - 1) / 2) * 0.04
    mean = [results[name][str(k)]['mean'] for k in ks]
    std = [results[name][str(k)]['std'] for k in ks]
    ax.errorbar(xs + off, mean, yerr=std, marker='o', capsize=3, label=name)
  chance = results.get('_meta', {}).get('chance')
  if chance:
    ax.axhline(chance, ls=':', c='gray', label='chance')
  ax.set_xticks(xs, [str(k) for k in ks])
  ax.set(xlabel='k demonstrations', ylabel='accuracy', title='ICL accuracy vs k (error bars: std over seeds)')
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def table(results: dict, ks) -> str:
  rows = [['selection/ordering'] + [f'k={k}' for k in ks] + ['dropped']]
  for name, r in results.items():
    if name.startswith('_'):
      continue
    rows.append([name] + [f'{r[str(k)]["mean"]:.3f}±{r[str(k)]["std"]:.3f}' for k in ks]
                + [str(sum(r[str(k)]['dropped'] for k in ks))])
  widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
  return '\n'.join('  '.join(c.ljust(w) for c, w in zip(r, widths)) for r in rows)


def run(config: ConfigDict, workdir: str):
  pairs = check(config)                                  # start-up checks
  pool, evals, labels, template = TASKS[config.task.source](config.task)
  os.makedirs(workdir, exist_ok=True)
  params, cfg, tok, record, mesh = load_model(config, workdir)
  lm = eval_model.LanguageModel(params, cfg, tok, mesh, batch_size=config.batch_size,
                                add_bos=config.add_bos, truncate='left')
  embed = None
  if any(sel in icl_prompts.NEEDS_EMBEDDINGS for sel, _ in pairs):
    fn = lambda texts: icl_prompts.mean_pooled(params, cfg, tok, texts, config.batch_size)
    embed = (fn([str(e['x']) for e in pool]), fn)
  s, ks = config.sweep, list(config.sweep.ks)
  results, t0 = {}, time.perf_counter()
  with open(os.path.join(workdir, 'samples.jsonl'), 'w', encoding='utf-8') as f:
    for sel_name, ordering in pairs:
      name = f'{sel_name}/{ordering}'
      results[name] = {}
      for k in ks:
        accs, dropped = [], 0
        for seed in range(s.seeds):
          sel = icl_prompts.Selector(pool, sel_name, seed, embed if sel_name in icl_prompts.NEEDS_EMBEDDINGS
                             or (ordering == 'similar_last' and embed) else None)
          if sel._embed_fn is not None:
            sel.prefetch(evals)
          prompts, drops, info = build_prompts(sel, ordering, k, seed, evals, pool,
                                               config.task.instruction, template, lm, labels, s)
          preds, lp = icl_prompts.classify(lm, prompts, labels)
          correct = [p == q['y'] for p, q in zip(preds, evals)]
          accs.append(float(np.mean(correct)))
          dropped += sum(drops)
          for q, pr, pred, row, d, extra in zip(evals, prompts, preds, lp, drops, info):
            f.write(json.dumps({'combo': name, 'seed': seed, 'k': k, 'id': q['id'],
                                'demos': [e['id'] for e in pr.demos], 'context': pr.context(),
                                'gold': q['y'], 'pred': pred, 'logprobs': np.round(row, 4).tolist(),
                                'dropped': d, **extra}) + '\n')
        results[name][str(k)] = {'mean': float(np.mean(accs)),
                                 'std': float(np.std(accs, ddof=1)) if len(accs) > 1 else 0.0,
                                 'accs': accs, 'dropped': dropped, 'n': len(evals)}
      print(f'{name}: ' + '  '.join(f'k={k} {results[name][str(k)]["mean"]:.3f}' for k in ks)
            + f'  ({time.perf_counter() - t0:.0f}s)', flush=True)
  prior = max(np.mean([e['y'] == y for e in evals]) for y in labels)
  results['_meta'] = {'model': record, 'task': config.task.to_dict(), 'labels': labels,
                      'n_eval': len(evals), 'n_pool': len(pool), 'seeds': s.seeds, 'ks': ks,
                      'chance': 1.0 / len(labels), 'majority': float(prior),
                      'truncated': lm.stats['truncated'], 'seconds': time.perf_counter() - t0}
  with open(os.path.join(workdir, 'results.json'), 'w') as f:
    json.dump(results, f, indent=2, default=str)
  plot(results, ks, os.path.join(workdir, 'icl_sweep.png'))
  print(table(results, ks), flush=True)
  return results
