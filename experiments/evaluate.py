"""The `evaluate` experiment: a model (or the reference answers) on a list of tasks.

  results.json   {task: {metric: {value, stderr, n}}, '_meta': {...}} with per-task reports
                 (documents, skipped records, truncations, code execution counts)
  samples.jsonl  one line per document: task, doc id, prompt, demo ids, output, extracted
                 answer, scores
  a table on stdout

Every task is checked and its documents loaded (files, records, demos) before the model is
restored or anything compiles, so bad input fails at start-up in one sentence. A task this
model cannot run (text outside its vocabulary, max_new_tokens as long as its context) is
left out with one warning naming the task and the key to change; a task that fails while
running is reported the same way. Either way the other tasks run and results.json is
written (with '_meta.skipped' / '_meta.failed'); a failure then ends the run with status 1.
"""
from __future__ import annotations

import json
import math
import os
import time
import traceback

from ml_collections import ConfigDict

from lm import sharding
from data.tokenizers import TokenizerError
from experiments.stages import stage
from experiments.evaluation import eval_model
from experiments.evaluation import eval_tasks
from lm.config import ConfigError

TRUNCATION_WARN = 0.1   # warn when more than this fraction of a task's prompts lose tokens
LIST_FIELDS = ('metrics', 'extract')   # comma lists on the command line: --config.task.X.metrics=bleu,chrf
TEXT_FIELDS = ('query_template', 'target_template', 'answer_template', 'description', 'target_delimiter')


def task_names(tasks) -> list[str]:
  """config.tasks as names: a tuple, one name, or 'a,b' (--config.tasks=works_cloze,gsm8k)."""
  items = [tasks] if isinstance(tasks, str) else list(tasks)
  return [n.strip() for item in items for n in str(item).split(',') if n.strip()]


def _unescape(text: str) -> str:
  """'\\n' and '\\t' typed in a shell become a newline and a tab (templates, stop strings)."""
  return text.replace('\\n', '\n').replace('\\t', '\t')


def _split(item: str) -> list[str]:
  """'strict,flexible' -> two names; a regex extractor (which may hold commas) comes last."""
  head, mark, regex = item.partition('regex:')
  return [x.strip() for x in head.split(',') if x.strip()] + ([mark + regex] if mark else [])


def _normalize(cfg: ConfigDict) -> None:
  """Command-line spellings to the task's types: comma lists (the command line gives
  --config.task.X.metrics=bleu,chrf as ('bleu,chrf',)), one stop string, escapes."""
  with cfg.ignore_type():
    for key in LIST_FIELDS:
      v = cfg[key]
      cfg[key] = tuple(x for item in ((v,) if isinstance(v, str) else v) for x in _split(item))
    until = cfg.generation.until
    cfg.generation.until = tuple(_unescape(u) for u in ((until,) if isinstance(until, str) else until))
  for key in TEXT_FIELDS:
    cfg[key] = _unescape(cfg[key])
  cfg.fewshot.separator = _unescape(cfg.fewshot.separator)


def task_configs(config: ConfigDict) -> list[ConfigDict]:
  names = task_names(config.tasks)
  if not names:
    raise ConfigError('config.tasks is empty; name at least one task, e.g. --config.tasks=works_cloze.')
  out = []
  for name in names:
    if name not in config.task:
      raise ConfigError(f'Task {name!r} has no entry in config.task; known: {sorted(config.task)}. '
                        'Name several as --config.tasks=works_cloze,gsm8k or '
                        "--config.tasks=\"('works_cloze','gsm8k')\"; a file of your own goes in the "
                        'jsonl slot (--config.tasks=jsonl --config.task.jsonl.path=FILE ...).')
    cfg = ConfigDict(config.task[name].to_dict())
    cfg.name = name
    if config.limit:
      cfg.limit = config.limit
    _normalize(cfg)
    eval_tasks.check(cfg)
    out.append(cfg)
  return out


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


# Start-up: which tasks this model can run --------------------------------------------------------
def _texts(cfg: ConfigDict, docs: list[dict]):
  """Every string the model will encode for this task."""
  for d in docs:
    for key in ('prompt', 'text'):
      if isinstance(d.get(key), str):
        yield d[key]
    yield from (cfg.target_delimiter + c for c in d.get('choices', ()))
  if cfg.kind == 'generate':
    yield from cfg.generation.until


def refusal(cfg: ConfigDict, docs: list[dict], tokenizer, max_length: int) -> str | None:
  """Why this model cannot run the task, as one sentence naming the key to change; or None."""
  name, g = cfg.name, cfg.generation
  if cfg.kind == 'generate' and g.max_new_tokens >= max_length:
    return (f'task {name} is left out: generation.max_new_tokens={g.max_new_tokens} leaves no room '
            f'for a prompt in max_length={max_length} tokens; set '
            f'--config.task.{name}.generation.max_new_tokens={max_length // 2} (or less).')
  for text in _texts(cfg, docs):
    try:
      tokenizer.encode(text)
    except TokenizerError as e:
      return (f'task {name} is left out: its text cannot be encoded by this model\'s tokenizer '
              f'({str(e).split(";")[0]}); drop it from --config.tasks.')
  return None


def runnable(loaded: list, tokenizer, max_length: int) -> tuple[list, dict]:
  """(the loaded tasks this model can run, {task: the warning for each one left out})."""
  if tokenizer is None:
    return loaded, {}
  keep, skipped = [], {}
  for cfg, docs, report in loaded:
    why = refusal(cfg, docs, tokenizer, max_length)
    if why:
      skipped[cfg.name] = why
      print(f'warning: {why}', flush=True)
    else:
      keep.append((cfg, docs, report))
  return keep, skipped


# Running -------------------------------------------------------------------------------------------
def _model(config: ConfigDict, source, mcfg):
  if source is None:
    return eval_model.ReferenceModel(), {'model': 'reference'}
  mesh = sharding.make_mesh(config.mesh.to_dict())
  params = source.restore_params(mesh, mcfg)
  lm = eval_model.LanguageModel(params, mcfg, source.tokenizer, mesh, batch_size=config.batch_size,
                                add_bos=config.add_bos, truncate=config.truncate,
                                max_length=config.max_length or None,
                                rolling_stride=config.rolling_stride or None, seed=config.seed,
                                engine=config.engine)
  return lm, {'model': source.record()}


def counts_line(name: str, report: dict) -> str:
  """Documents, skipped records and truncated prompts, for the console."""
  n = report.get('documents', 0)
  parts = [f'{n} documents']
  if report.get('records', n) > n:
    parts.append(f"the first {n} of {report['records']} (limit)")
  skipped = {k: v for k, v in (report.get('skipped') or {}).items() if v}
  parts.append(f'skipped records: {skipped}' if skipped else 'no records skipped')
  if report.get('prompts'):
    parts.append(f"{report['truncated']} of {report['prompts']} prompts truncated")
  return f'{name}: ' + ', '.join(parts)


def _truncation_warning(cfg: ConfigDict, report: dict, lm) -> str | None:
  n, t = report.get('prompts', 0), report.get('truncated', 0)
  if not n or t / n <= TRUNCATION_WARN:
    return None
  return (f'warning: task {cfg.name}: {t} of {n} prompts ({t / n:.0%}) lost their oldest tokens to '
          f'fit max_length={lm.max_length}; use fewer demos (--config.task.{cfg.name}.fewshot.k), '
          'a shorter description, or a model with a longer context.')


def run_task(config: ConfigDict, cfg: ConfigDict, docs: list[dict], report: dict, lm) -> dict:
  """One task: {'metrics', 'samples', 'report'} with the model's counts for this task."""
  t0 = time.perf_counter()
  before = dict(getattr(lm, 'stats', {}))
  if hasattr(lm, 'progress'):
    lm.progress = cfg.name
  out = eval_tasks.run(cfg, docs, lm, config.bootstrap_iters, config.seed)
  stats = getattr(lm, 'stats', {})
  delta = {k: stats.get(k, 0) - before.get(k, 0) for k in ('truncated', 'prompts')}
  report = {**report, 'seconds': time.perf_counter() - t0, **delta}
  if 'execution' in out:
    report['execution'] = out['execution']
  print(counts_line(cfg.name, report), flush=True)
  warn = _truncation_warning(cfg, report, lm)
  if warn:
    print(warn, flush=True)
  return {**out, 'report': report}


def _failure(cfg: ConfigDict, e: Exception) -> str:
  what = str(e) if isinstance(e, (ConfigError, TokenizerError)) else f'{type(e).__name__}: {e}'
  return (f'task {cfg.name} failed: {" ".join(what.split())}; change its settings under '
          f'--config.task.{cfg.name} or drop it from --config.tasks.')


def _write_json(path: str, obj) -> None:
  with open(path + '.tmp', 'w', encoding='utf-8') as f:
    json.dump(obj, f, indent=2, default=str)
  os.replace(path + '.tmp', path)


def run(config: ConfigDict, workdir: str):
  cfgs = task_configs(config)                       # start-up checks: nothing loaded yet
  if config.truncate not in eval_model.TRUNCATE:
    raise ConfigError(f"truncate={config.truncate!r}; choose 'left' or 'error'.")
  source = mcfg = None
  if config.init_from != 'reference':
    source, mcfg = stage.read_model_source(config)
  tokenizer = source.tokenizer if source else None
  loaded = [(cfg, *eval_tasks.load(cfg, tokenizer)) for cfg in cfgs]   # files, records, demos
  loaded, skipped = runnable(loaded, tokenizer, config.max_length or (mcfg.max_seq_len if mcfg else 0))
  if not loaded:
    raise ConfigError('No listed task can run on this model: ' + ' '.join(skipped.values()))
  os.makedirs(workdir, exist_ok=True)
  lm, meta = _model(config, source, mcfg)
  results, failed = {}, {}
  meta = {**meta, 'tasks': [c.name for c in cfgs], 'seed': config.seed, 'skipped': skipped}
  path = os.path.join(workdir, 'results.json')
  with open(os.path.join(workdir, 'samples.jsonl'), 'w', encoding='utf-8') as f:
    for cfg, docs, report in loaded:
      try:
        out = run_task(config, cfg, docs, report, lm)
      except Exception as e:   # the other tasks still run and are written
        failed[cfg.name] = _failure(cfg, e)
        if not isinstance(e, (ConfigError, TokenizerError)):
          traceback.print_exc()
        print(f'error: {failed[cfg.name]}', flush=True)
        continue
      results[cfg.name] = {**out['metrics'], '_report': out['report']}
      for s in out['samples']:
        f.write(json.dumps({'task': cfg.name, **s}, default=str) + '\n')
      f.flush()
      _write_json(path, {**results, '_meta': {**meta, 'failed': failed}})   # a crash keeps these
  results['_meta'] = {**meta, 'failed': failed}
  _write_json(path, results)
  print(table(results), flush=True)
  if failed:
    raise ConfigError(f'{len(failed)} of {len(cfgs)} tasks failed ({", ".join(failed)}: see above); '
                      f'the results of the others are in {path}.')
  return results
