"""The `evaluate` experiment: a model (or the reference answers) on a list of tasks.

  results.json   {task: {metric: {value, stderr, n}}, '_meta': {...}} with per-task reports
                 (documents, skipped records, truncations, code execution counts)
  samples.jsonl  one line per document: task, doc id, prompt, demo ids, output, extracted
                 answer, scores
  a table on stdout

Every task is checked and its documents loaded (files, records, demos) before the model is
restored or anything compiles, so bad input fails at start-up in one sentence.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import time

from ml_collections import ConfigDict

from experiments.evaluation import model as eval_model
from experiments.evaluation import tasks as eval_tasks
from lm.config import ConfigError


def task_configs(config: ConfigDict) -> list[ConfigDict]:
  names = [config.tasks] if isinstance(config.tasks, str) else list(config.tasks)
  if not names:
    raise ConfigError('config.tasks is empty; name at least one task, e.g. --config.tasks=works_cloze.')
  out = []
  for name in names:
    if name not in config.task:
      raise ConfigError(f'Task {name!r} has no entry in config.task; known: {sorted(config.task)}.')
    cfg = ConfigDict(config.task[name].to_dict())
    cfg.name = name
    if config.limit:
      cfg.limit = config.limit
    eval_tasks.check(cfg)
    out.append(cfg)
  return out


def read_model_source(config: ConfigDict):
  """(source, ModelConfig with config.model's runtime fields) for a run workdir or hf:PATH;
  no weights are read yet."""
  if not config.init_from:
    raise ConfigError("config.init_from is empty; give a run workdir, hf:PATH, or 'reference'.")
  from experiments import stage
  source = stage.read_source(config.init_from)
  runtime = {k: v for k, v in config.model.to_dict().items() if k in stage.RUNTIME_FIELDS}
  return source, dataclasses.replace(source.cfg, **runtime)


def _format(v):
  return 'nan' if v is None or (isinstance(v, float) and math.isnan(v)) else f'{v:.4f}'


def table(results: dict) -> str:
  rows = [('task', 'metric', 'value', 'stderr', 'n')]
  for task, ms in results.items():
    if task.startswith('_'):
      continue
    for m, r in ms.items():
      if m.startswith('_'):
        continue
      rows.append((task, m, _format(r['value']), _format(r['stderr']), str(r['n'])))
  widths = [max(len(r[i]) for r in rows) for i in range(5)]
  return '\n'.join('  '.join(c.ljust(w) for c, w in zip(r, widths)) for r in rows)


def run(config: ConfigDict, workdir: str):
  cfgs = task_configs(config)                       # start-up checks: nothing loaded yet
  if config.truncate not in eval_model.TRUNCATE:
    raise ConfigError(f"truncate={config.truncate!r}; choose 'left' or 'error'.")
  source = tokenizer = None
  if config.init_from != 'reference':
    source, mcfg = read_model_source(config)
    tokenizer = source.tokenizer
  loaded = [(cfg, *eval_tasks.load(cfg, tokenizer)) for cfg in cfgs]   # files, records, demos
  os.makedirs(workdir, exist_ok=True)
  if source is None:
    lm = eval_model.ReferenceModel()
    meta = {'model': 'reference'}
  else:
    from lm import sharding
    mesh = sharding.make_mesh(config.mesh.to_dict())
    params = source.restore_params(mesh, mcfg)
    lm = eval_model.LanguageModel(params, mcfg, tokenizer, mesh, batch_size=config.batch_size,
                                  add_bos=config.add_bos, truncate=config.truncate,
                                  max_length=config.max_length or None,
                                  rolling_stride=config.rolling_stride or None, seed=config.seed)
    meta = {'model': source.record()}
  results = {}
  with open(os.path.join(workdir, 'samples.jsonl'), 'w', encoding='utf-8') as f:
    for cfg, docs, report in loaded:
      t0 = time.perf_counter()
      before = dict(getattr(lm, 'stats', {}))
      out = eval_tasks.run(cfg, docs, lm, config.bootstrap_iters, config.seed)
      stats = getattr(lm, 'stats', {})
      report = {**report, 'seconds': time.perf_counter() - t0,
                'truncated': stats.get('truncated', 0) - before.get('truncated', 0)}
      if 'execution' in out:
        report['execution'] = out['execution']
      results[cfg.name] = {**out['metrics'], '_report': report}
      for s in out['samples']:
        f.write(json.dumps({'task': cfg.name, **s}, default=str) + '\n')
  results['_meta'] = {**meta, 'tasks': [c.name for c in cfgs], 'seed': config.seed}
  with open(os.path.join(workdir, 'results.json'), 'w', encoding='utf-8') as f:
    json.dump(results, f, indent=2, default=str)
  print(table(results), flush=True)
  return results
