"""Evaluating a finished run on the composed-task testbed (data/composed_tasks.py): exact match
of greedy answers and rank classification over each example's four candidate answers (chance
0.25; the options are scored, never shown in the prompt), with Wilson intervals."""
from __future__ import annotations

import math

import jax
import numpy as np

from data import composed_tasks, formats, tokenizers
from experiments.stages import sft_data, sft_eval, stage
from lm import decode, sharding


def wilson(correct: int, n: int, z: float = 1.96) -> tuple[float, float]:
  """The Wilson score interval of a binomial proportion (95% at z = 1.96)."""
  if n == 0:
    return (0.0, 1.0)
  p = correct / n
  centre = (p + z * z / (2 * n)) / (1 + z * z / n)
  half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
  return (max(0.0, centre - half), min(1.0, centre + half))


def load(workdir: str, template_name: str, mesh=None):
  """(params, cfg, tokenizer, template) of a pretraining or SFT workdir, its vocabulary grown
  by the template's special tokens (a pretrained base has none: their rows are its untrained
  padding, as the SFT stage's own 'before' evaluation has them)."""
  template = formats.get_template(template_name)
  source = stage.read_source(workdir)
  tok = tokenizers.add_special_tokens(source.tokenizer, sft_data.needed_tokens(template, source.tokenizer))
  cfg = stage.with_tokens(source.cfg, tok)
  mesh = mesh or sharding.make_mesh({'data': -1})
  return source.restore_params(mesh, cfg), cfg, tok, template, mesh


def answers(params, cfg, tok, template, examples, mesh, max_new_tokens: int, batch: int) -> list[str]:
  """Greedy answers, each ended by the template's end token."""
  end = tok.special_ids[template.end]
  sampling = decode.SamplingConfig(temperature=0.0, max_new_tokens=max_new_tokens, eos_ids=(end,))
  keep = cfg.max_seq_len - max_new_tokens
  prompts = [formats.prompt_tokens(ex, template, tok)[-keep:] for ex in examples]
  out = []
  for i in range(0, len(prompts), batch):
    gen = decode.generate(params, prompts[i:i + batch], jax.random.key(0), cfg=cfg,
                          sampling=sampling, mesh=mesh)
    for row, m in zip(np.asarray(gen.tokens), np.asarray(gen.mask)):
      ids = [int(t) for t, k in zip(row, m) if k and int(t) != end]
      out.append(tok.decode(np.asarray(ids, np.int32)))
  return out


def picks(params, cfg, tok, template, examples, batch: int) -> list[int]:
  """Rank classification: per example, the index of the option (+ the end token) with the
  highest mean log-probability per token after the prompt (summed, the shortest option wins
  whatever it says: a spelled-out or doubled answer is longer than the plain distractors)."""
  end = tok.special_ids[template.end]
  logp = sft_eval._sequence_logprob_fn(cfg)
  seqs = []
  for ex in examples:
    prompt = formats.prompt_tokens(ex, template, tok)
    for opt in ex['options']:
      cont = np.concatenate([tok.encode(opt), [end]]).astype(np.int32)
      seqs.append((np.concatenate([prompt, cont])[-cfg.max_seq_len - 1:], len(cont)))
  t, totals = cfg.max_seq_len, []
  for i in range(0, len(seqs), batch):
    chunk = seqs[i:i + batch]
    toks = np.zeros((batch, t + 1), np.int32)
    w = np.zeros((batch, t), np.float32)
    for r, (seq, n) in enumerate(chunk):
      toks[r, :len(seq)] = seq
      w[r, len(seq) - 1 - n:len(seq) - 1] = 1.0      # the targets that are the option
    sums = np.asarray(logp(params, toks[:, :-1], toks[:, 1:], w))[:len(chunk)]
    totals += [total / n for total, (_, n) in zip(sums, chunk)]
  k = len(examples[0]['options']) if examples else 0
  return [int(np.argmax(totals[j * k:(j + 1) * k])) for j in range(len(examples))]


def score(examples, answers_: list[str], picks_: list[int]) -> dict:
  """Per family and pooled: exact-match and rank-classification counts, rates, intervals, and
  which primitive each answer got right (composed_tasks.diagnose); chance is one over the
  number of options."""
  fams: dict = {}
  for ex, a, p in zip(examples, answers_, picks_):
    f = fams.setdefault(ex['family'], {'n': 0, 'exact': 0, 'choice': 0,
                                       'diagnosis': dict.fromkeys(composed_tasks.DIAGNOSES, 0)})
    f['n'] += 1
    f['diagnosis'][composed_tasks.diagnose(ex, a)] += 1
    f['exact'] += sft_eval.normalise(a) == sft_eval.normalise(ex['output'])
    f['choice'] += ex['options'][p] == ex['output']
  pooled = {'n': sum(f['n'] for f in fams.values()),
            'exact': sum(f['exact'] for f in fams.values()),
            'choice': sum(f['choice'] for f in fams.values()),
            'diagnosis': {d: sum(f['diagnosis'][d] for f in fams.values()) for d in composed_tasks.DIAGNOSES}}
  for f in [*fams.values(), pooled]:
    for key in ('exact', 'choice'):
      f[f'{key}_rate'] = f[key] / max(f['n'], 1)
      f[f'{key}_ci'] = wilson(f[key], f['n'])
  pooled['chance'] = 1 / len(examples[0]['options']) if examples else None
  return {'pooled': pooled, 'families': fams,
          'samples': [{'family': ex['family'], 'output': ex['output'], 'answer': a}
                      for ex, a in list(zip(examples, answers_))[:8]]}


def evaluate(params, cfg, tok, template, mesh, sets: dict, max_new_tokens: int, batch: int) -> dict:
  """{set name: score(...)} for each named list of examples."""
  out = {}
  for name, exs in sets.items():
    out[name] = score(exs, answers(params, cfg, tok, template, exs, mesh, max_new_tokens, batch),
                      picks(params, cfg, tok, template, exs, batch))
  return out
