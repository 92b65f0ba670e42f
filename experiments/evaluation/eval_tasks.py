"""Tasks as ml_collections configs, and running one against a model.

  cfg = preset('gsm8k', path='problems.jsonl')          # or task_config(name=..., source='jsonl', ...)
  docs, report = load(cfg, tokenizer)                    # start-up: files, records, few-shot demos
  out = run(cfg, docs, lm)                               # -> {'metrics', 'samples', 'report'}

A task names its source (a built-in or a JSON-lines file), the prompt (templates, a
description, the delimiter before the target), few-shot settings (k, sampler, seed, pool),
its kind and metrics:

  multiple_choice  every choice scored by loglikelihood(prompt, delimiter + choice):
                   acc (argmax), acc_norm (argmax of logprob / UTF-8 bytes of the choice)
  generate         generate_until; answers extracted (answers.py) for exact_match; BLEU, chrF,
                   ROUGE on the output; pass@k runs n samples per problem in the sandbox
  rolling          loglikelihood_rolling: perplexity (per token), word_perplexity,
                   byte_perplexity, bits_per_byte

`check(cfg)` refuses a metric that does not fit the kind (and other bad settings) in one
sentence, before anything is loaded or compiled.
"""
from __future__ import annotations

import math
import re

import numpy as np
from ml_collections import ConfigDict

from data import sources
from experiments.evaluation import answers, builtin, fewshot, metrics, sandbox
from lm.config import ConfigError

KINDS = ('multiple_choice', 'generate', 'rolling')


def task_config(**overrides) -> ConfigDict:
  """Every task setting with its default; `overrides` replace them (nested dicts merge)."""
  c = ConfigDict()
  c.name = ''
  c.source = 'jsonl'             # a builtin.SOURCES name
  c.path = ''                    # data file (jsonl, gsm8k; humaneval: default the package's)
  c.kind = 'generate'
  c.metrics = ('exact_match',)
  c.limit = 0                    # evaluate the first `limit` documents (0: all)
  c.description = ''             # text before everything (instructions)
  c.query_template = ''          # jsonl: format string over a record's fields
  c.target_template = ''         # jsonl generate: the reference output
  c.answer_template = ''         # jsonl generate: what exact match compares (default: target)
  c.references_field = ''        # jsonl generate: a list of references (BLEU / ROUGE)
  c.choices_field = 'choices'
  c.gold_field = 'gold'          # index, or the text of the right choice
  c.text_field = 'text'
  c.target_delimiter = ' '       # between the query and the target / a choice
  c.fewshot = ConfigDict(dict(k=0, sampler='random', seed=0, separator='\n\n', path=''))
  c.generation = ConfigDict(dict(max_new_tokens=64, until=('\n\n',), temperature=0.0, top_k=0,
                                 top_p=1.0, n=1))
  c.extract = ('none',)          # answer extractors; several give exact_match_<name> each
  c.numeric = False              # exact match compares numbers ('1,000' == '1000')
  c.execute = ConfigDict(dict(wall_s=3.0, cpu_s=3, memory_mb=1024, workers=2))
  c.bleu = ConfigDict(dict(metrics.BLEU_DEFAULTS))   # sacrebleu's tokenize, smoothing, lowercase
  c.rouge = ConfigDict(dict(use_stemmer=True))        # rouge-score's Porter stemming
  c.options = ConfigDict()       # source-specific settings (built-in tasks)
  return _merge(c, overrides)


def _merge(c: ConfigDict, overrides: dict) -> ConfigDict:
  for k, v in overrides.items():
    if isinstance(v, dict) and k in c and isinstance(c[k], ConfigDict):
      _merge(c[k], v)
    elif isinstance(v, dict):
      c[k] = ConfigDict(v)
    else:
      c[k] = v
  return c


CODE_STOP = ('\nclass', '\ndef', '\n#', '\nif', '\nprint')   # Codex's stop sequences
PRESETS = {
    'humaneval': dict(source='humaneval', kind='generate', metrics=('pass@1',), target_delimiter='',
                      generation=dict(max_new_tokens=256, until=CODE_STOP)),
    'works_ppl': dict(source='works_ppl', kind='rolling', limit=20,
                      metrics=('bits_per_byte', 'word_perplexity', 'byte_perplexity', 'perplexity'),
                      options=dict(chunk_chars=2000, eval_fraction=0.2, split_seed=0)),
    'works_cloze': dict(source='works_cloze', kind='multiple_choice', metrics=('acc', 'acc_norm'),
                        target_delimiter='', fewshot=dict(k=0, sampler='random'),
                        options=dict(n=200, seed=0, eval_fraction=0.2, split_seed=0)),
    'works_instruct': dict(source='works_instruct', kind='generate', target_delimiter='',
                           metrics=('exact_match',), generation=dict(max_new_tokens=64, until=('\n',)),
                           options=dict(template='alpaca', n_per_family=20, seed=0, families=())),
    'gsm8k': dict(source='gsm8k', kind='generate', metrics=('exact_match',), numeric=True,
                  extract=('strict', 'flexible'), fewshot=dict(k=0, sampler='first_n'),
                  generation=dict(max_new_tokens=256, until=('Question:', '\n\n'))),
}


def preset(name: str, **overrides) -> ConfigDict:
  if name not in PRESETS:
    raise ConfigError(f'Unknown built-in task {name!r}; choose from {sorted(PRESETS)} or give a '
                      'task config with source=jsonl.')
  return _merge(task_config(name=name, **PRESETS[name]), overrides)


def metric_keys(cfg: ConfigDict) -> list[str]:
  """The names results.json uses: exact_match_<extractor> when there are several extractors."""
  out = []
  for m in cfg.metrics:
    if m == 'exact_match' and len(cfg.extract) > 1:
      out += [f'exact_match_{e}' for e in cfg.extract]
    else:
      out.append(m)
  return out


def check(cfg: ConfigDict) -> None:
  """One-sentence ConfigErrors for settings that cannot work; nothing is read or compiled."""
  name = cfg.name or '(unnamed)'
  if cfg.source not in builtin.SOURCES:
    raise ConfigError(f'Task {name}: unknown source {cfg.source!r}; choose from {sorted(builtin.SOURCES)}.')
  if cfg.kind not in KINDS:
    raise ConfigError(f'Task {name}: kind={cfg.kind!r} is not one of {KINDS}.')
  if not cfg.metrics:
    raise ConfigError(f'Task {name} lists no metrics.')
  for m in cfg.metrics:
    try:
      metric = metrics.get(m)
    except KeyError:
      raise ConfigError(f'Task {name}: unknown metric {m!r}; known: {metrics.known()}.') from None
    if cfg.kind not in metric.kinds:
      raise ConfigError(f'Task {name}: metric {m!r} does not fit a {cfg.kind} task (it needs '
                        f'{" or ".join(metric.kinds)}); remove it or change the kind.')
    k = re.fullmatch(r'pass@(\d+)', m)
    if k and int(k.group(1)) > cfg.generation.n:
      raise ConfigError(f'Task {name}: {m} needs generation.n >= {k.group(1)} samples per problem, '
                        f'got n={cfg.generation.n}.')
    if k and cfg.source != 'humaneval':
      raise ConfigError(f'Task {name}: pass@k runs programs, which only the humaneval source has.')
  if cfg.source in ('jsonl', 'gsm8k') and not cfg.path:
    raise ConfigError(f'Task {name}: source={cfg.source} needs a path to a JSON-lines file '
                      f'(--config.task.{name}.path=FILE).')
  if cfg.source == 'jsonl' and cfg.kind != 'rolling' and not cfg.query_template:
    raise ConfigError(f'Task {name}: a jsonl task needs query_template, e.g. "Q: {{question}}\\nA:".')
  if cfg.source == 'jsonl' and cfg.kind == 'generate' and not cfg.target_template:
    raise ConfigError(f'Task {name}: a jsonl generate task needs target_template, e.g. "{{answer}}".')
  bad = [e for e in cfg.extract if not answers.check(e)]
  if bad or not cfg.extract:
    raise ConfigError(f'Task {name}: unknown answer extractors {bad}; use {answers.EXTRACTORS} or regex:PATTERN.')
  f = cfg.fewshot
  if f.sampler not in fewshot.SAMPLERS or f.k < 0:
    raise ConfigError(f'Task {name}: fewshot needs k >= 0 and a sampler in {fewshot.SAMPLERS}; got '
                      f'k={f.k}, sampler={f.sampler!r}.')
  if f.k and cfg.kind == 'rolling':
    raise ConfigError(f'Task {name}: a rolling task takes no few-shot demos (fewshot.k=0).')
  if cfg.generation.n < 1 or cfg.limit < 0:
    raise ConfigError(f'Task {name}: generation.n must be >= 1 and limit >= 0.')
  why = metrics.check_bleu_options(cfg.get('bleu', ConfigDict()).to_dict())
  if why:
    raise ConfigError(f'Task {name}: {why} (--config.task.{name}.bleu.KEY=VALUE).')


# Loading -------------------------------------------------------------------------------------------
def load(cfg: ConfigDict, tokenizer=None) -> tuple[list[dict], dict]:
  """(documents with their prompts and demo ids, report); errors before any compile."""
  check(cfg)
  docs, report = builtin.SOURCES[cfg.source](cfg, tokenizer)
  if not docs:
    skipped = report.get('skipped') or {}
    raise sources.CorpusError(f'Task {cfg.name}: no usable documents in {cfg.path or cfg.source}'
                              + (f' (skipped: {skipped})' if skipped else '') + '; fix the data or the task.')
  seen = set()
  for d in docs:
    if d['id'] in seen:
      d['id'] = f"{d['id']}#{len(seen)}"
    seen.add(d['id'])
  pool = docs
  if cfg.fewshot.path:
    pool, pool_report = builtin.SOURCES[cfg.source](_with_path(cfg, cfg.fewshot.path), tokenizer)
    report['fewshot_pool'] = pool_report
  if cfg.limit:
    docs = docs[:cfg.limit]
  k = cfg.fewshot.k
  if k and any(not isinstance(d['query'], str) for d in docs + pool):
    raise ConfigError(f'Task {cfg.name}: few-shot demos need text prompts; this template gives '
                      'token ids (chat): set fewshot.k=0 or a text template.')
  sampler = fewshot.Sampler(pool, k, cfg.fewshot.sampler, cfg.fewshot.seed,
                            same_pool=not cfg.fewshot.path)
  for d in docs:
    demos = [pool[i] for i in sampler.demos(d)]
    d['demo_ids'] = [x['id'] for x in demos]
    if cfg.kind != 'rolling':
      d['prompt'] = prompt(cfg, d, demos)
  report['documents'] = len(docs)
  return docs, report


def _with_path(cfg, path):
  c = ConfigDict(cfg.to_dict())
  c.path = path
  return c


def prompt(cfg: ConfigDict, doc: dict, demos: list[dict]):
  """description + demo (query + delimiter + target) ... + the document's query."""
  if not isinstance(doc['query'], str):
    return doc['query']   # token ids (chat template), no demos
  sep = cfg.fewshot.separator
  shots = [d['query'] + cfg.target_delimiter + d['target'] for d in demos]
  head = cfg.description + ('\n\n' if cfg.description else '')
  return head + ''.join(s + sep for s in shots) + doc['query']


# Running ------------------------------------------------------------------------------------------
def _text(prompt_):
  return prompt_ if isinstance(prompt_, str) else f'<{len(prompt_)} token ids>'


def run(cfg: ConfigDict, docs: list[dict], lm, bootstrap_iters: int = 1000, seed: int = 0) -> dict:
  """Score every document; {'metrics': {key: {value, stderr, n}}, 'samples': [...], 'counts': ...}."""
  runner = {'multiple_choice': _multiple_choice, 'generate': _generate, 'rolling': _rolling}[cfg.kind]
  items, samples, extra = runner(cfg, docs, lm)
  base = lambda key: 'exact_match' if key.startswith('exact_match') else key
  options = {'bleu': cfg.bleu.to_dict()} if 'bleu' in cfg else {}
  out = {key: metrics.summarize(base(key), items[key], bootstrap_iters, seed, options.get(key))
         for key in metric_keys(cfg)}
  return {'metrics': out, 'samples': samples, **extra}


def _multiple_choice(cfg, docs, lm):
  reqs, refs, owner = [], [], []
  for i, d in enumerate(docs):
    for j, c in enumerate(d['choices']):
      reqs.append((d['prompt'], cfg.target_delimiter + c))
      refs.append(j == d['gold'])
      owner.append(i)
  scored = lm.loglikelihood(reqs, references=refs)
  per_doc = [[] for _ in docs]
  for i, s in zip(owner, scored):
    per_doc[i].append(s)
  items = {'acc': [], 'acc_norm': []}
  samples = []
  for d, res in zip(docs, per_doc):
    lps = np.array([lp for lp, _ in res])
    nbytes = np.array([max(len((cfg.target_delimiter + c).encode('utf-8')), 1) for c in d['choices']])
    pick, pick_norm = int(np.argmax(lps)), int(np.argmax(lps / nbytes))
    acc, acc_norm = float(pick == d['gold']), float(pick_norm == d['gold'])
    items['acc'].append(acc)
    items['acc_norm'].append(acc_norm)
    samples.append({'doc_id': d['id'], 'prompt': _text(d['prompt']), 'demo_ids': d['demo_ids'],
                    'choices': d['choices'], 'gold': d['gold'], 'logprobs': lps.tolist(),
                    'is_greedy': [g for _, g in res], 'output': d['choices'][pick],
                    'scores': {'acc': acc, 'acc_norm': acc_norm}})
  return items, samples, {}


def _gen_kwargs(cfg) -> dict:
  g = cfg.generation
  return {'until': list(g.until), 'max_new_tokens': g.max_new_tokens, 'temperature': g.temperature,
          'top_k': g.top_k, 'top_p': g.top_p}


def _generate(cfg, docs, lm):
  n = cfg.generation.n
  kwargs = _gen_kwargs(cfg)
  reqs = [(d['prompt'], kwargs) for d in docs for _ in range(n)]
  refs = [d['target'] for d in docs for _ in range(n)]
  outputs = lm.generate_until(reqs, references=refs)
  outs = [outputs[i * n:(i + 1) * n] for i in range(len(docs))]
  keys = metric_keys(cfg)
  items = {k: [] for k in keys}
  samples = []
  extra = {}
  passed = None
  if any(k.startswith('pass@') for k in keys):
    programs = [builtin.program_text(d, o) for d, os_ in zip(docs, outs) for o in os_]
    e = cfg.execute
    results = sandbox.run_programs(programs, sandbox.Limits(wall_s=e.wall_s, cpu_s=e.cpu_s,
                                                           memory_mb=e.memory_mb), e.workers)
    extra['execution'] = {**sandbox.status_counts(results), 'sandbox': sandbox.sandbox_report()}
    passed = [results[i * n:(i + 1) * n] for i in range(len(docs))]
  for i, (d, os_) in enumerate(zip(docs, outs)):
    first = os_[0]
    extracted = {e: answers.extract(first, e) for e in cfg.extract}
    scores = {}
    for k in keys:
      if k.startswith('exact_match'):
        e = cfg.extract[0] if k == 'exact_match' else k[len('exact_match_'):]
        v = metrics.exact_match(extracted[e], d.get('answer', d['target']), numeric=cfg.numeric)
        items[k].append(v)
      elif k in ('bleu', 'chrf'):
        v = None
        items[k].append((first, d.get('references') or [d['target']]))
      elif k in metrics.ROUGE:
        v = metrics.rouge(first, d.get('references') or [d['target']],
                          use_stemmer=cfg.rouge.use_stemmer if 'rouge' in cfg else True)[k]
        items[k].append(v)
      else:   # pass@k
        c = sum(r.status == 'passed' for r in passed[i])
        v = metrics.pass_at_k(n, c, int(k.split('@')[1]))
        items[k].append(v)
      if v is not None:
        scores[k] = v
    sample = {'doc_id': d['id'], 'prompt': _text(d['prompt']), 'demo_ids': d['demo_ids'],
              'output': first if n == 1 else os_, 'extracted': extracted, 'target': d.get('answer', d['target']),
              'scores': scores}
    if passed is not None:
      sample['execution'] = [{'status': r.status, 'reason': r.reason} for r in passed[i]]
    samples.append(sample)
  return items, samples, extra


def _rolling(cfg, docs, lm):
  texts = [d['text'] for d in docs]
  lps, counts = lm.loglikelihood_rolling(texts, references=texts, return_counts=True)
  items = {k: [] for k in metric_keys(cfg)}
  samples = []
  for d, lp, n in zip(docs, lps, counts):
    units = {'perplexity': n, 'word_perplexity': len(d['text'].split()),
             'byte_perplexity': len(d['text'].encode('utf-8')), 'bits_per_byte': len(d['text'].encode('utf-8'))}
    for k in items:
      items[k].append((lp, units[k]))
    samples.append({'doc_id': d['id'], 'demo_ids': [], 'logprob': lp, 'tokens': n,
                    'bytes': units['bits_per_byte'], 'words': units['word_perplexity'],
                    'scores': {'bits_per_byte': -lp / max(units['bits_per_byte'], 1) / math.log(2)}})
  return items, samples, {}
