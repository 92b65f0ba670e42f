"""Chain-of-thought study: train on problems with and without rationales, then compare prompts.

  1. Problems: data/arith.py's generated word problems (training problems and held-out ones,
     never the same question), or a GSM8K-format file (data.source=gsm8k, data.path).
  2. Models (unless init_from names one): for each entry of config.models, a character-level
     model is pretrained through experiments/pretrain.py on documents of problems, each
     document in one style drawn by the entry's weights: direct ('#### N' only: no rationale),
     cot (rationale lines, then '#### N'), zero_shot_cot ("Let's think step by step." ...
     'Therefore, the answer is N.') and pal (a program). The rationales carry the
     data.ablation switch (symbols / patterns / text removed).
  3. Each model answers the held-out problems with every method of
     experiments/evaluation/prompting.py: direct, few-shot CoT, zero-shot CoT,
     self-consistency (maj@k for k in sc.ks from sc.n samples) and PAL (programs run in the
     sandbox).

Writes WORKDIR/results.json (per model: accuracy +- standard error per method, maj@k, accuracy by
steps and digits, counts of unparsable answers, dropped demonstrations and program failures),
samples.jsonl (every prompt, output, extracted answer), cot.txt (the printed table) and
cot.png (maj@k vs k beside the single-answer methods; accuracy by steps; by digits).
"""
from __future__ import annotations

import copy
import json
import math
import os
import time
import types

import numpy as np
from ml_collections import ConfigDict

from experiments.configs import base
from experiments.evaluation import builtin
from experiments.evaluation import eval_model
from experiments.stages import stage
from lm import sharding
from experiments import registry
from data import arith, sources, tokenizers
from experiments.evaluation import prompting, sandbox
from lm.config import ConfigError

STYLES = ('direct', 'cot', 'zero_shot_cot', 'pal')
# data settings a trained model depends on (the evaluation ones may change between runs)
TRAINING_DATA = ('n_train', 'train_steps', 'train_digits', 'ops', 'ablation', 'problems_per_doc')


# 1. Start-up checks ----------------------------------------------------------------------------
def check(config: ConfigDict) -> None:
  d, p = config.data, config.prompt
  bad = sorted(set(config.methods) - set(prompting.METHODS))
  if bad or not config.methods:
    raise ConfigError(f'methods={tuple(config.methods)} has unknown or no methods {bad}; choose '
                      f'from {prompting.METHODS}.')
  if d.source not in ('arith', 'gsm8k'):
    raise ConfigError(f"data.source={d.source!r}; choose 'arith' (generated) or 'gsm8k' (a file).")
  if d.source == 'gsm8k':
    if not d.path or not os.path.exists(os.path.expanduser(d.path)):
      raise ConfigError(f'data.source=gsm8k needs data.path, an existing JSON-lines file of '
                        f'{{question, answer}} records; got {d.path!r}.')
    if not config.init_from:
      raise ConfigError('data.source=gsm8k evaluates a model: set --config.init_from=DIR (e.g. a '
                        'cot_arith run\'s runs/NAME) or hf:PATH.')
    if 'pal' in config.methods and p.k:
      raise ConfigError('PAL on GSM8K needs demonstrations with programs, which GSM8K lacks; '
                        'drop pal from methods or set prompt.k=0.')
  if d.ablation not in arith.ABLATIONS:
    raise ConfigError(f'data.ablation={d.ablation!r}; choose one of {arith.ABLATIONS}.')
  if p.k < 0 or p.max_new_tokens < 1 or p.direct_tokens < 1:
    raise ConfigError('prompt.k must be >= 0 and prompt.max_new_tokens, prompt.direct_tokens >= 1.')
  prompting.check_prompt(p.extract, p.question)
  if 'self_consistency' in config.methods:
    s = config.sc
    if s.n < 1 or s.temperature <= 0 or not s.ks or any(not 1 <= k <= s.n for k in s.ks):
      raise ConfigError(f'self-consistency needs sc.n >= 1, sc.temperature > 0 and every k of sc.ks '
                        f'in [1, sc.n]; got n={s.n}, temperature={s.temperature}, ks={tuple(s.ks)}.')
  if not config.init_from:
    if not config.models:
      raise ConfigError('config.models is empty and init_from is unset: nothing to evaluate.')
    for name, mix in config.models.items():
      w = dict(mix)
      if set(w) - set(STYLES) or any(v < 0 for v in w.values()) or sum(w.values()) <= 0:
        raise ConfigError(f'models.{name}={w} must weight styles among {STYLES} (>= 0, not all 0).')
    if config.model.max_seq_len <= p.max_new_tokens:
      raise ConfigError(f'model.max_seq_len={config.model.max_seq_len} leaves no room for a prompt '
                        f'before prompt.max_new_tokens={p.max_new_tokens}.')
    if d.n_train < 1 or d.problems_per_doc < 1:
      raise ConfigError('data.n_train and data.problems_per_doc must be >= 1.')


def fmt_of(config: ConfigDict) -> prompting.Format:
  return prompting.Format(question=config.prompt.question)


# 2. Problems -------------------------------------------------------------------------------------
def problems(config: ConfigDict) -> tuple[list[dict], list[dict], list[dict], dict]:
  """(training problems, demonstrations, held-out examples, report)."""
  d, p = config.data, config.prompt
  if d.source == 'gsm8k':
    read = lambda path: prompting.from_gsm8k(builtin.gsm8k(
        types.SimpleNamespace(path=path, query_template='{question}'))[0])
    docs = read(d.path)
    if d.demo_path:
      demos, held = read(d.demo_path)[:p.k], docs
    else:
      demos, held = docs[:p.k], docs[p.k:]
    held = held[:d.n_eval or None]
    if not held:
      raise ConfigError(f'{d.path} leaves no problems to evaluate after {p.k} demonstrations.')
    return [], demos, held, {'source': d.path, 'eval': len(held), 'demos': len(demos)}
  try:
    train = arith.generate(d.n_train, seed=config.seed, split='train', steps=d.train_steps,
                           digits=d.train_digits, ops=d.ops, ablation=d.ablation)
    held = arith.generate(d.n_eval, seed=config.seed, split='test', steps=d.eval_steps,
                          digits=d.eval_digits, ops=d.ops, exclude=[t['question'] for t in train])
  except arith.ArithError as e:
    raise ConfigError(str(e)) from None
  pool = [t for t in train if 1 <= t['steps'] <= p.demo_max_steps] or train
  rng = np.random.default_rng([config.seed, 0xDE30])
  demos = [pool[i] for i in rng.choice(len(pool), min(p.k, len(pool)), replace=False)]
  return train, demos, held, {'train': len(train), 'eval': len(held), 'demos': len(demos)}


def documents(problems_: list[dict], mix: dict, fmt: prompting.Format, per_doc: int,
              seed: int) -> list[str]:
  """Training documents: `per_doc` problems each, all in one style drawn by `mix`'s weights
  (so a document's first problem is a demonstration of the style of the next)."""
  names = [s for s in STYLES if mix.get(s, 0) > 0]
  w = np.array([mix[s] for s in names], np.float64)
  rng = np.random.default_rng([seed, 0xD0C5])
  out = []
  for i in range(0, len(problems_), per_doc):
    style = names[rng.choice(len(names), p=w / w.sum())]
    out.append(''.join(fmt.demo(p, style) + fmt.sep for p in problems_[i:i + per_doc]))
  return out


def char_vocabulary(train: list[dict], held: list[dict], fmt: prompting.Format) -> str:
  """Every character any style of any training or held-out problem uses (prompts included)."""
  chars = set()
  for p in train + held:
    for s in STYLES:
      chars.update(fmt.demo(p, s))
  return ''.join(sorted(chars))


# 3. Models ---------------------------------------------------------------------------------------
def pretrain_config(config: ConfigDict, corpus: str, tokenizer: str) -> ConfigDict:
  c = base.pretrain()
  c.seed = config.seed
  c.model = copy.deepcopy(config.model)
  c.data.update(path=corpus, tokenizer=tokenizer, val_fraction=0.05)
  c.train.update(config.train.to_dict())
  c.train.update(samples=0, checkpoint_every=c.train.steps)
  c.eval.every = c.train.steps
  c.optim.update(config.optim.to_dict())
  c.mesh = copy.deepcopy(config.mesh)
  return c


def train_models(config: ConfigDict, workdir: str, train: list[dict], held: list[dict]) -> dict:
  """{name: workdir of its trained model}; a finished model is not trained again."""
  pretrain = registry.get('pretrain')   # a study runs the pretrain experiment (drivers never import drivers)
  fmt = fmt_of(config)
  data_dir = os.path.join(workdir, 'data')
  os.makedirs(data_dir, exist_ok=True)
  tok_path = os.path.join(data_dir, 'char_tokenizer.json')
  tokenizers.CharTokenizer(char_vocabulary(train, held, fmt)).save(tok_path)
  out = {}
  for name, mix in config.models.items():
    sub = os.path.join(workdir, 'runs', name)
    out[name] = sub
    corpus = os.path.join(data_dir, f'{name}.jsonl')
    pconfig = pretrain_config(config, corpus, tok_path)
    # what the model depends on: a finished model is reused only when all of it is unchanged
    recipe = {'pretrain': pconfig.to_dict(), 'mix': dict(mix),
              'data': {k: config.data[k] for k in TRAINING_DATA}}
    done = os.path.join(sub, 'done.json')
    if os.path.exists(done):
      with open(done) as f:
        if json.load(f).get('recipe') != json.loads(json.dumps(recipe)):
          raise ConfigError(f'{sub} holds a model trained with other data/model/train settings; '
                            'use a new --workdir (or the same settings) to evaluate again.')
      continue
    with open(corpus, 'w', encoding='utf-8') as f:
      for doc in documents(train, dict(mix), fmt, config.data.problems_per_doc, config.seed):
        f.write(json.dumps({'text': doc}) + '\n')
    t0 = time.perf_counter()
    pretrain(pconfig, sub)
    with open(done, 'w') as f:
      json.dump({'seconds': time.perf_counter() - t0, 'recipe': recipe}, f)
  return out


def language_model(config: ConfigDict, init_from: str):
  import dataclasses

  source = stage.read_source(init_from)
  cfg = dataclasses.replace(source.cfg, dtype=config.eval.dtype)
  mesh = sharding.make_mesh(config.mesh.to_dict())
  params = source.restore_params(mesh, cfg)
  return eval_model.LanguageModel(params, cfg, source.tokenizer, mesh,
                                  batch_size=config.eval.batch_size, seed=config.seed), source


# 4. Evaluation -----------------------------------------------------------------------------------
def encodable(lm, examples: list[dict], fmt: prompting.Format) -> tuple[list[dict], int]:
  """The examples whose prompts the tokenizer can encode (a character model meeting a '$'
  cannot), and how many were skipped."""
  keep = []
  for ex in examples:
    try:
      for s in ('direct', 'cot', 'zero_shot_cot'):
        lm.encode(fmt.demo(ex, s) if ex.get('rationale') is not None else fmt.query(ex, s))
      keep.append(ex)
    except (tokenizers.TokenizerError, KeyError):
      pass
  return keep, len(examples) - len(keep)


def stderr(p: float, n: int) -> float:
  return math.sqrt(p * (1 - p) / n) if n else float('nan')


def evaluate(config: ConfigDict, lm, demos: list[dict], held: list[dict]) -> tuple[dict, list[dict]]:
  fmt, p, s = fmt_of(config), config.prompt, config.sc
  held, skipped = encodable(lm, held, fmt)
  demos, skipped_demos = encodable(lm, demos, fmt)
  if not held:
    raise ConfigError('No held-out problem can be encoded by the model\'s tokenizer.')
  gen = prompting.Generation(p.max_new_tokens)
  short = prompting.Generation(p.direct_tokens)
  res = {'n': len(held), 'skipped_unencodable': skipped, 'demos_unencodable': skipped_demos,
         'accuracy': {}, 'by_steps': {}, 'by_digits': {}, 'counts': {}, 'seconds': {}}
  samples = []
  for m in config.methods:
    t0 = time.perf_counter()
    if m == 'direct':
      recs, counts = prompting.run_direct(lm, held, demos, fmt, short)
    elif m == 'cot':
      recs, counts = prompting.run_cot(lm, held, demos, fmt, gen, p.extract)
    elif m == 'zero_shot_cot':
      recs, counts = prompting.run_zero_shot_cot(lm, held, fmt, gen, p.direct_tokens)
    elif m == 'self_consistency':
      g = prompting.Generation(p.max_new_tokens, s.temperature, s.top_k)
      recs, counts = prompting.run_self_consistency(lm, held, demos, fmt, g, s.n, s.ks, p.extract)
      res['maj_at_k'] = counts.pop('maj_at_k')
      res['maj_at_k_by_steps'] = maj_by(recs, held, s.ks, 'steps')
    else:
      pal_demos = [d for d in demos if 'program' in d]
      limits = sandbox.Limits(wall_s=config.pal.wall_s, cpu_s=config.pal.cpu_s,
                              memory_mb=config.pal.memory_mb)
      recs, counts = prompting.run_pal(lm, held, pal_demos, fmt, gen, limits, config.pal.workers)
    res['seconds'][m] = time.perf_counter() - t0
    acc = prompting.accuracy(recs)
    res['accuracy'][m] = {'value': acc, 'stderr': stderr(acc, len(recs)), 'n': len(recs)}
    res['by_steps'][m] = prompting.accuracy_by(recs, 'steps')
    res['by_digits'][m] = prompting.accuracy_by(recs, 'digits')
    res['counts'][m] = counts
    samples += recs
    print(f'  {m}: accuracy {acc:.3f} on {len(recs)} problems ({res["seconds"][m]:.0f} s)', flush=True)
  res['truncated_prompts'] = dict(getattr(lm, 'stats', {}))
  return res, samples


def maj_by(recs: list[dict], held: list[dict], ks, key: str) -> dict:
  """maj@k within each group of problems sharing `key` (e.g. the number of steps)."""
  groups: dict = {}
  for r in recs:
    if key in r:
      groups.setdefault(r[key], []).append(r)
  return {g: prompting.maj_at_k([r['samples'] for r in rs], [r['gold'] for r in rs],
                                [k for k in ks if k <= len(rs[0]['samples'])])
          for g, rs in sorted(groups.items())}


# 5. Report ---------------------------------------------------------------------------------------
def _pct(v) -> str:
  return '  -  ' if v is None or (isinstance(v, float) and math.isnan(v)) else f'{100 * v:5.1f}'


def table(results: dict) -> str:
  lines = []
  for name, r in results.items():
    if name.startswith('_'):
      continue
    lines.append(f'model {name}: {r["n"]} held-out problems'
                 + (f' ({r["skipped_unencodable"]} skipped: not encodable)' if r['skipped_unencodable'] else ''))
    lines.append(f'  {"method":<18} {"acc %":>6} {"+-se":>5}   notes')
    for m, a in r['accuracy'].items():
      c = r['counts'].get(m, {})
      notes = ', '.join(f'{k}={v}' for k, v in (c.get('execution') or c).items()
                        if k not in ('samples',) and v)
      lines.append(f'  {m:<18} {_pct(a["value"]):>6} {_pct(a["stderr"]):>5}   {notes}')
    if 'maj_at_k' in r:
      lines.append('  self-consistency  ' + '  '.join(f'maj@{k}={_pct(v).strip()}'
                                                      for k, v in r['maj_at_k'].items()))
    for key in ('by_steps', 'by_digits'):
      vals = sorted({v for accs in r[key].values() for v in accs})
      head = f'  {key.replace("_", " "):<18} ' + ' '.join(f'{v:>6}' for v in vals)
      lines.append(head)
      for m, accs in r[key].items():
        lines.append(f'  {m:<18} ' + ' '.join(f'{_pct(accs.get(v)):>6}' for v in vals))
  return '\n'.join(lines)


def plot(results: dict, path: str) -> str:
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  models = [n for n in results if not n.startswith('_')]
  fig, axes = plt.subplots(len(models), 3, figsize=(15, 4 * len(models)), squeeze=False)
  for row, name in zip(axes, models):
    r = results[name]
    ax = row[0]
    if 'maj_at_k' in r:
      ks = [int(k) for k in r['maj_at_k']]
      ax.plot(ks, [100 * v for v in r['maj_at_k'].values()], 'o-', color='black',
              label='self-consistency maj@k')
      ax.set_xscale('log', base=2)
      ax.set_xticks(ks, [str(k) for k in ks])
    for i, (m, a) in enumerate((m, a) for m, a in r['accuracy'].items() if m != 'self_consistency'):
      ax.axhline(100 * a['value'], color=f'C{i}', ls='--', label=f'{m} ({100 * a["value"]:.1f}%)')
    ax.set(xlabel='samples k', ylabel='accuracy (%)', title=f'{name}: held-out accuracy')
    ax.legend(fontsize=8)
    for ax, key in zip(row[1:], ('by_steps', 'by_digits')):
      xs = sorted({x for accs in r[key].values() for x in accs})
      for i, (m, accs) in enumerate(r[key].items()):
        xm = sorted(accs)
        ax.plot(xm, [100 * accs[x] for x in xm], 'o-', color=f'C{i}', label=m)
      ax.set_xticks(xs)
      ax.set(xlabel=key.split('_')[1], ylabel='accuracy (%)', title=f'{name}: accuracy {key.replace("_", " ")}')
      ax.legend(fontsize=8)
    for ax in row:
      ax.set_ylim(-3, 103)
      ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path


def run(config: ConfigDict, workdir: str):
  check(config)
  os.makedirs(workdir, exist_ok=True)
  try:
    train, demos, held, report = problems(config)
  except sources.CorpusError as e:
    raise ConfigError(str(e)) from None
  with open(os.path.join(workdir, 'config.json'), 'w') as f:
    json.dump({**config.to_dict(), 'resolved': {'data': report}}, f, indent=2, default=str)
  if config.init_from:
    runs = {'init_from': config.init_from}
  else:
    runs = train_models(config, workdir, train, held)
  results = {}
  with open(os.path.join(workdir, 'samples.jsonl'), 'w', encoding='utf-8') as f:
    for name, path in runs.items():
      lm, source = language_model(config, path)
      print(f'evaluating {name} ({source.path}, step {source.step}) on {len(held)} problems: '
            f'{", ".join(config.methods)}', flush=True)
      results[name], samples = evaluate(config, lm, demos, held)
      results[name]['source'] = source.record()
      for s in samples:
        f.write(json.dumps({'model': name, **s}, default=str) + '\n')
  results['_meta'] = {'data': report, 'demos': [d.get('id') for d in demos],
                      'sandbox': sandbox.sandbox_report()}
  with open(os.path.join(workdir, 'results.json'), 'w', encoding='utf-8') as f:
    json.dump(results, f, indent=2, default=str)
  text = table(results)
  with open(os.path.join(workdir, 'cot.txt'), 'w') as f:
    f.write(text + '\n')
  print(text, flush=True)
  plot(results, os.path.join(workdir, 'cot.png'))
  return results
