"""The reasoning lab: what RL with verifiable rewards adds to a CoT policy (experiment `reasoning`).

Several policies (config.policies: {name: workdir or hf:PATH}, e.g. the cot_arith model and
the rlvr_arith runs from it) answer the same held-out problems with the RL prompt (the CoT
query 'Q: q\\nA:\\n', prompt.k demonstrations before it):
  greedy    one greedy rationale per problem: accuracy (+- standard error), by steps / digits
  samples   sampling.n rationales per problem at sampling.temperature (the RL rollouts'
            temperature by default): pass@k for k = 1, 2, 4, ... <= min(n, sampling.max_k) by
            the unbiased estimator (experiments/stages/passk.py), overall and by steps / digits
  length    mean response tokens, greedy and sampled (cut at the blank line ending an answer)
and each RL run's answer reward over its iterations is read back from its metrics.jsonl
(rollouts) and eval.jsonl (held-out). Answers: the number after '#### ' (prompt.extract).

Writes results.json, samples.jsonl (per policy and problem: greedy output, every sampled
output and answer, the number correct), reasoning.txt (the table), passk.png (pass@k base
vs RL, by steps and digits) and iterations.png (answer reward vs RL iteration).
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
import types

from ml_collections import ConfigDict

from data import arith, sources, tokenizers
from experiments.evaluation import builtin, eval_model, prompting
from experiments.stages import passk, reasoning_report, stage
from lm import paths, sharding
from lm.config import ConfigError


# 1. Start-up checks ----------------------------------------------------------------------------
def check(config: ConfigDict) -> None:
  d, p, s = config.data, config.prompt, config.sampling
  if not config.policies:
    raise ConfigError('config.policies is empty: name at least one policy, e.g. '
                      '--config.policies.base=runs/cot/runs/mixed.')
  for name, where in config.policies.items():
    where = str(where)
    if where.startswith('hf:'):
      ok = os.path.exists(os.path.join(os.path.expanduser(where[3:]), 'config.json'))
    else:
      ok = paths.path(os.path.expanduser(where) if not paths.is_url(where) else where).joinpath(
          'config.json').exists()
    if not ok:
      raise ConfigError(f'policies.{name}={where!r} is not a finished run\'s workdir (nor an hf: '
                        'folder) with a config.json; train it first or fix the path.')
  if d.source not in ('arith', 'gsm8k'):
    raise ConfigError(f"data.source={d.source!r}; choose 'arith' (generated) or 'gsm8k' (a file).")
  if d.source == 'gsm8k' and (not d.path or not os.path.exists(os.path.expanduser(d.path))):
    raise ConfigError(f'data.source=gsm8k needs data.path, an existing JSON-lines file of '
                      f'{{question, answer}} records; got {d.path!r}.')
  if d.n_eval < 1 or d.n_train < 0:
    raise ConfigError(f'data.n_eval={d.n_eval} must be >= 1 and data.n_train={d.n_train} >= 0.')
  if s.n < 1 or s.temperature <= 0 or s.max_k < 0:
    raise ConfigError(f'sampling.n={s.n} must be >= 1, sampling.temperature={s.temperature} > 0 '
                      f'and sampling.max_k={s.max_k} >= 0 (0: up to n).')
  if p.k < 0 or p.max_new_tokens < 1:
    raise ConfigError(f'prompt.k={p.k} must be >= 0 and prompt.max_new_tokens={p.max_new_tokens} >= 1.')
  prompting.check_prompt(p.extract, p.question)


# 2. Problems -------------------------------------------------------------------------------------
def problems(config: ConfigDict) -> tuple[list[dict], list[dict], dict]:
  """(demonstrations, held-out problems, report). Generated held-out problems never repeat
  one of the first data.n_train training questions (the CoT pretraining's; an RL run with
  the same seed and sizes draws its prompts from the start of the same sequence)."""
  d, k = config.data, config.prompt.k
  if d.source == 'gsm8k':
    docs = prompting.from_gsm8k(builtin.gsm8k(
        types.SimpleNamespace(path=d.path, query_template='{question}'))[0])
    demos, held = docs[:k], docs[k:][:d.n_eval]
    if not held:
      raise ConfigError(f'{d.path} leaves no problems to evaluate after {k} demonstrations.')
    return demos, held, {'source': d.path, 'eval': len(held), 'demos': len(demos)}
  try:
    train = arith.generate(max(d.n_train, k), seed=config.seed, split='train',
                           steps=d.train_steps, digits=d.train_digits, ops=d.ops)
    held = arith.generate(d.n_eval, seed=config.seed, split='test', steps=d.eval_steps,
                          digits=d.eval_digits, ops=d.ops, exclude=[t['question'] for t in train])
  except arith.ArithError as e:
    raise ConfigError(str(e)) from None
  return train[:k], held, {'source': 'arith', 'eval': len(held), 'demos': k, 'train_excluded': len(train)}


# 3. One policy -----------------------------------------------------------------------------------
def language_model(config: ConfigDict, where: str):
  source = stage.read_source(where)
  cfg = dataclasses.replace(source.cfg, dtype=config.eval.dtype)
  mesh = sharding.make_mesh(config.mesh.to_dict())
  params = source.restore_params(mesh, cfg)
  return eval_model.LanguageModel(params, cfg, source.tokenizer, mesh,
                                  batch_size=config.eval.batch_size, seed=config.seed), source


def _tokens(lm, text: str) -> int:
  """Response length in the policy's tokens (characters for a model without encode)."""
  try:
    return len(lm.encode(text)) if hasattr(lm, 'encode') else len(text)
  except (tokenizers.TokenizerError, KeyError):
    return len(text)


def evaluate(config: ConfigDict, lm, demos: list[dict], held: list[dict]) -> tuple[dict, list[dict]]:
  """(the policy's results, one record per problem)."""
  p, s = config.prompt, config.sampling
  fmt = prompting.Format(question=p.question)
  t0 = time.perf_counter()
  g_outs, g_preds, prompts, dropped = prompting.sample_cot(
      lm, held, demos, fmt, prompting.Generation(p.max_new_tokens), 1, p.extract)
  t1 = time.perf_counter()
  outs, preds, _, _ = prompting.sample_cot(
      lm, held, demos, fmt, prompting.Generation(p.max_new_tokens, s.temperature, s.top_k),
      s.n, p.extract)
  t2 = time.perf_counter()
  recs = []
  for ex, prompt, go, gp, os_, ps in zip(held, prompts, g_outs, g_preds, outs, preds):
    right = [prompting.same(x, ex['final']) for x in ps]
    recs.append({'id': ex.get('id'), **{k: ex[k] for k in ('steps', 'digits') if k in ex},
                 'gold': ex['final'], 'prompt': prompt, 'greedy': go[0], 'greedy_pred': gp[0],
                 'greedy_correct': prompting.same(gp[0], ex['final']), 'n_correct': sum(right),
                 'samples': os_, 'preds': ps})
  ks = passk.powers_of_two(s.n, s.max_k)
  res = {'n': len(recs), 'samples_per_problem': s.n, 'temperature': s.temperature,
         'greedy': passk.mean_and_stderr([float(r['greedy_correct']) for r in recs]),
         'greedy_by_steps': prompting.accuracy_by([{**r, 'correct': r['greedy_correct']} for r in recs], 'steps'),
         'greedy_by_digits': prompting.accuracy_by([{**r, 'correct': r['greedy_correct']} for r in recs], 'digits'),
         'pass_at_k': passk.curve([r['n_correct'] for r in recs], s.n, ks),
         'pass_at_k_by_steps': passk.curve_by(recs, 'steps', s.n, ks),
         'pass_at_k_by_digits': passk.curve_by(recs, 'digits', s.n, ks),
         'sample_accuracy': sum(r['n_correct'] for r in recs) / (s.n * len(recs)),
         'length': {'greedy': sum(_tokens(lm, r['greedy']) for r in recs) / len(recs),
                    'sampled': sum(_tokens(lm, o) for r in recs for o in r['samples']) / (s.n * len(recs))},
         'unparsable': {'greedy': sum(r['greedy_pred'] is None for r in recs),
                        'sampled': sum(x is None for r in recs for x in r['preds'])},
         'demos_dropped': dropped, 'seconds': {'greedy': t1 - t0, 'sampled': t2 - t1}}
  return res, recs


def run_record(source) -> dict:
  """What kind of run a policy is (an RL run's experiment and loss switches)."""
  c = source.config.to_dict() if source.config is not None else {}
  out = {'experiment': c.get('experiment'), 'init_from': c.get('init_from')}
  for key in ('loss', 'rollout', 'kl'):
    if key in c:
      out[key] = c[key]
  if 'train' in c and 'iterations' in c['train']:
    out['iterations'] = c['train']['iterations']
  return out


# 4. The lab ----------------------------------------------------------------------------------------
def run(config: ConfigDict, workdir: str) -> dict:
  check(config)
  os.makedirs(workdir, exist_ok=True)
  try:
    demos, held, report = problems(config)
  except sources.CorpusError as e:
    raise ConfigError(str(e)) from None
  with open(os.path.join(workdir, 'config.json'), 'w') as f:
    json.dump({**config.to_dict(), 'resolved': {'data': report}}, f, indent=2, default=str)
  results, curves = {}, {}
  with open(os.path.join(workdir, 'samples.jsonl'), 'w', encoding='utf-8') as f:
    for name, where in config.policies.items():
      lm, source = language_model(config, str(where))
      print(f'{name} ({source.path}, step {source.step}): {len(held)} held-out problems, greedy '
            f'+ {config.sampling.n} samples each', flush=True)
      results[name], recs = evaluate(config, lm, demos, held)
      results[name].update(source=source.record(), run=run_record(source))
      if source.kind == 'run':
        curves[name] = reasoning_report.rl_curves(source.path)
        results[name]['rl_curves'] = curves[name]
      r = results[name]
      print(f'  greedy {100 * r["greedy"]["value"]:.1f}%, pass@k '
            + ', '.join(f'{k}: {100 * v:.1f}' for k, v in r['pass_at_k'].items())
            + f' ({r["seconds"]["greedy"] + r["seconds"]["sampled"]:.0f} s)', flush=True)
      for rec in recs:
        f.write(json.dumps({'policy': name, **rec}, default=str) + '\n')
  results['_meta'] = {'data': report, 'demos': [d.get('id') for d in demos],
                      'ks': list(next(iter(results.values()))['pass_at_k'])}
  with open(os.path.join(workdir, 'results.json'), 'w', encoding='utf-8') as f:
    json.dump(results, f, indent=2, default=str)
  text = reasoning_report.table(results)
  with open(os.path.join(workdir, 'reasoning.txt'), 'w') as f:
    f.write(text + '\n')
  print(text, flush=True)
  reasoning_report.plot_passk(results, os.path.join(workdir, 'passk.png'))
  reasoning_report.plot_iterations(curves, os.path.join(workdir, 'iterations.png'))
  return results
