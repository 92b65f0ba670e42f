"""Chain-of-thought prompting, self-consistency and PAL over any harness model.

An example is a dict {question, rationale, final} (the answer as text), optionally with a
PAL `program`; data/arith.py's problems and GSM8K records (via `from_gsm8k`) both are.
Every method asks `lm.generate_until` (experiments/evaluation/eval_model.py) and returns one
record per example: the prompt(s), the output(s), the extracted answer and whether it is right.

  direct            demos 'Q: q\\nA:\\n#### N', query 'Q: q\\nA:\\n####': the answer at once
  cot               few-shot CoT (Wei et al. 2022): demos {input, rationale, output}
                    'Q: q\\nA:\\nrationale\\n#### N', query 'Q: q\\nA:\\n'; answer after '#### '
  zero_shot_cot     Kojima et al. 2022, two stages: 'Q: q\\nA: Let's think step by step.\\n'
                    -> rationale; then that prompt + rationale + 'Therefore, the answer is'
                    -> the answer (the first number of the second output)
  self_consistency  Wang et al. 2023: n CoT samples at a temperature, answers extracted,
                    unparsable ones dropped (counted) before a majority vote; ties go to the
                    answer reached first in sample order; maj@k for several k from the same
                    n samples (the mean over the n // k disjoint groups of k samples)
  pal               Gao et al. 2023: demos 'Q: q\\nA:\\n```\\nprogram\\n```', the model writes a
                    program, experiments/evaluation/sandbox.py runs it; the last line it
                    prints is the answer; crashes, timeouts and silent programs are counted

Demonstrations that do not fit the context with the query and the generation budget are
dropped, farthest from the query first, and counted (`demos_dropped`).
"""
from __future__ import annotations

import collections
import dataclasses
from typing import Any, Sequence

from experiments.evaluation import answers, metrics, sandbox
from lm.config import ConfigError

METHODS = ('direct', 'cot', 'zero_shot_cot', 'self_consistency', 'pal')


@dataclasses.dataclass(frozen=True)
class Format:
  """How examples become text; the training text of a testbed uses the same layout."""
  question: str = 'Q: {question}\nA:'
  sep: str = '\n\n'                                  # between demonstrations
  answer_mark: str = '####'                          # GSM8K's final-answer line
  trigger: str = "Let's think step by step."         # zero-shot CoT, stage 1
  answer_trigger: str = 'Therefore, the answer is'   # zero-shot CoT, stage 2
  fence: str = '```'                                 # around a PAL program

  def demo(self, ex: dict, style: str) -> str:
    q = self.question.format(question=ex['question'])
    final = ex['final']
    if style == 'direct':
      return f'{q}\n{self.answer_mark} {final}'
    if style == 'cot':
      r = ex.get('rationale') or ''
      return f'{q}\n{r}\n{self.answer_mark} {final}' if r else f'{q}\n{self.answer_mark} {final}'
    if style == 'zero_shot_cot':
      return f'{q} {self.trigger}\n{ex.get("rationale") or ""}\n{self.answer_trigger} {final}.'
    if style == 'pal':
      return f'{q}\n{self.fence}\n{ex["program"]}\n{self.fence}'
    raise ValueError(style)

  def query(self, ex: dict, style: str) -> str:
    q = self.question.format(question=ex['question'])
    return {'direct': f'{q}\n{self.answer_mark}', 'cot': f'{q}\n',
            'zero_shot_cot': f'{q} {self.trigger}\n', 'pal': f'{q}\n{self.fence}\n'}[style]


@dataclasses.dataclass
class Generation:
  max_new_tokens: int = 96
  temperature: float = 0.0
  top_k: int = 0

  def kwargs(self, until: Sequence[str], **over) -> dict:
    d = {'until': list(until), 'max_new_tokens': self.max_new_tokens,
         'temperature': self.temperature, 'top_k': self.top_k}
    d.update(over)
    return d


def check_prompt(extract: str, question: str) -> None:
  """Start-up errors of a prompt's answer extractor and question template (one sentence each)."""
  if not answers.check(extract):
    raise ConfigError(f'prompt.extract={extract!r} is not an extractor; use strict, flexible, '
                      'first_line or regex:PATTERN.')
  try:
    question.format(question='q')
  except (KeyError, IndexError, ValueError):
    raise ConfigError(f'prompt.question={question!r} must be a format string with {{question}} only.') from None


def from_gsm8k(docs: Sequence[dict]) -> list[dict]:
  """builtin.gsm8k's documents (query = the bare question) -> examples: the rationale is the
  solution without its '#### N' line."""
  out = []
  for d in docs:
    lines = [l for l in d['target'].split('\n') if not l.startswith('####')]
    out.append({'id': d['id'], 'question': d['query'], 'rationale': '\n'.join(lines).strip(),
                'final': d['answer']})
  return out


# Prompts ---------------------------------------------------------------------------------------
def _length(lm, text: str) -> int | None:
  enc = getattr(lm, 'encode', None)
  return None if enc is None else len(enc(text)) + (getattr(lm, 'bos', None) is not None)


def build_prompt(lm, fmt: Format, demos: Sequence[dict], ex: dict, style: str,
                 max_new_tokens: int, demo_style: str | None = None) -> tuple[str, int]:
  """(few-shot prompt, demonstrations dropped to fit lm's context with max_new_tokens)."""
  query = fmt.query(ex, style)
  texts = [fmt.demo(d, demo_style or style) for d in demos]
  room = getattr(lm, 'max_length', None)
  dropped = 0
  while True:
    prompt = ''.join(t + fmt.sep for t in texts) + query
    n = _length(lm, prompt)
    if not texts or n is None or room is None or n + max_new_tokens <= room:
      return prompt, dropped
    texts, dropped = texts[1:], dropped + 1   # the demo farthest from the query goes first


def same(pred: str | None, gold: str) -> bool:
  return bool(metrics.exact_match(pred, gold, numeric=True))


# Majority vote ------------------------------------------------------------------------------------
def majority_vote(preds: Sequence[str | None]) -> tuple[str | None, int]:
  """(the most frequent answer, how many were unparsable). None answers are dropped before the
  vote; answers equal as numbers vote together; a tie goes to the answer seen first."""
  counts: collections.Counter = collections.Counter()
  first: dict[str, tuple[int, str]] = {}
  dropped = 0
  for i, p in enumerate(preds):
    if p is None:
      dropped += 1
      continue
    key = metrics.normalize_number(p)
    counts[key] += 1
    first.setdefault(key, (i, p))
  if not counts:
    return None, dropped
  best = max(counts, key=lambda k: (counts[k], -first[k][0]))
  return first[best][1], dropped


def maj_at_k(preds: Sequence[Sequence[str | None]], golds: Sequence[str], ks: Sequence[int]) -> dict:
  """{k: accuracy of the majority vote over k samples}, per problem the mean over its
  n // k disjoint groups of k consecutive samples, averaged over problems."""
  out = {}
  for k in ks:
    accs = []
    for p, g in zip(preds, golds):
      groups = [p[i:i + k] for i in range(0, len(p) - k + 1, k)]
      if not groups:
        raise ValueError(f'maj@{k} needs at least {k} samples per problem, got {len(p)}.')
      accs.append(sum(same(majority_vote(grp)[0], g) for grp in groups) / len(groups))
    out[k] = sum(accs) / len(accs) if accs else float('nan')
  return out


# Methods ------------------------------------------------------------------------------------------
def _record(ex, method, prompt, output, pred, **extra) -> dict:
  return {'id': ex.get('id'), 'method': method, 'prompt': prompt, 'output': output,
          'pred': pred, 'gold': ex['final'], 'correct': same(pred, ex['final']),
          **{k: ex[k] for k in ('steps', 'digits') if k in ex}, **extra}


def _prompts(lm, fmt, demos, examples, style, gen, demo_style=None):
  built = [build_prompt(lm, fmt, demos, ex, style, gen.max_new_tokens, demo_style) for ex in examples]
  return [p for p, _ in built], sum(d for _, d in built)


def run_direct(lm, examples, demos, fmt: Format, gen: Generation, extract: str = 'strict'):
  """Answer at once: the prompt ends with the answer mark, the output is the answer."""
  prompts, dropped = _prompts(lm, fmt, demos, examples, 'direct', gen)
  outs = lm.generate_until([(p, gen.kwargs([fmt.sep, '\n'])) for p in prompts])
  recs = []
  for ex, p, o in zip(examples, prompts, outs):
    pred = answers.extract(f'{fmt.answer_mark}{o}', extract)
    recs.append(_record(ex, 'direct', p, o, pred))
  return recs, {'demos_dropped': dropped}


def sample_cot(lm, examples, demos, fmt: Format, gen: Generation, n: int = 1,
               extract: str = 'strict') -> tuple[list[list[str]], list[list], list[str], int]:
  """n CoT outputs per example (the prompt repeated n times in one request list)."""
  prompts, dropped = _prompts(lm, fmt, demos, examples, 'cot', gen)
  reqs = [(p, gen.kwargs([fmt.sep])) for p in prompts for _ in range(n)]
  flat = lm.generate_until(reqs)
  outs = [flat[i * n:(i + 1) * n] for i in range(len(examples))]
  preds = [[answers.extract(o, extract) for o in os_] for os_ in outs]
  return outs, preds, prompts, dropped


def run_cot(lm, examples, demos, fmt: Format, gen: Generation, extract: str = 'strict'):
  outs, preds, prompts, dropped = sample_cot(lm, examples, demos, fmt, gen, 1, extract)
  recs = [_record(ex, 'cot', p, o[0], pr[0]) for ex, p, o, pr in zip(examples, prompts, outs, preds)]
  return recs, {'demos_dropped': dropped, 'unparsable': sum(pr[0] is None for pr in preds)}


def run_self_consistency(lm, examples, demos, fmt: Format, gen: Generation, n: int,
                         ks: Sequence[int], extract: str = 'strict'):
  """n sampled rationales per example (gen.temperature > 0); maj@k for each k <= n."""
  if gen.temperature <= 0:
    raise ValueError('self-consistency samples with a temperature > 0.')
  outs, preds, prompts, dropped = sample_cot(lm, examples, demos, fmt, gen, n, extract)
  golds = [ex['final'] for ex in examples]
  recs = []
  for ex, p, o, pr in zip(examples, prompts, outs, preds):
    vote, unparsable = majority_vote(pr)
    recs.append(_record(ex, 'self_consistency', p, o, vote, samples=pr, unparsable=unparsable))
  ks = [k for k in ks if k <= n]
  return recs, {'demos_dropped': dropped, 'maj_at_k': maj_at_k(preds, golds, ks),
                'unparsable': sum(r['unparsable'] for r in recs), 'samples': n * len(examples)}


def run_zero_shot_cot(lm, examples, fmt: Format, gen: Generation, answer_tokens: int = 8):
  """Stage 1 writes the rationale after the trigger; stage 2 reads the answer after the
  answer trigger, from the stage-1 prompt + rationale (Kojima et al. 2022)."""
  first = [fmt.query(ex, 'zero_shot_cot') for ex in examples]
  rationales = lm.generate_until([(p, gen.kwargs([fmt.answer_trigger, fmt.sep])) for p in first])
  second = [zero_shot_second_prompt(fmt, p, r) for p, r in zip(first, rationales)]
  outs = lm.generate_until([(p, gen.kwargs(['\n'], max_new_tokens=answer_tokens,
                                           temperature=0.0)) for p in second])
  recs = []
  for ex, p2, r, o in zip(examples, second, rationales, outs):
    pred = answers.extract(o, 'regex:(-?[0-9][0-9,]*(?:\\.[0-9]+)?)')
    recs.append(_record(ex, 'zero_shot_cot', p2, o, pred, rationale=r))
  return recs, {'unparsable': sum(r['pred'] is None for r in recs)}


def zero_shot_second_prompt(fmt: Format, first_prompt: str, rationale: str) -> str:
  """Stage 2's prompt: stage 1's prompt, its rationale (one newline after it), the trigger."""
  return f'{first_prompt}{rationale.rstrip()}\n{fmt.answer_trigger}'


def program_answer(result: sandbox.Result) -> str | None:
  """The last line a program printed, when it exited cleanly; else None."""
  if result.status != 'passed':
    return None
  lines = [l.strip() for l in result.stdout.strip().split('\n') if l.strip()]
  return lines[-1] if lines else None


def execute(programs: Sequence[str], limits: sandbox.Limits = sandbox.Limits(),
            workers: int = 2) -> tuple[list[str | None], list[sandbox.Result], dict]:
  """Run programs in the sandbox: (answers, results, counts by status plus 'no_output')."""
  results = sandbox.run_programs(list(programs), limits, workers)
  preds = [program_answer(r) for r in results]
  counts = sandbox.status_counts(results)
  counts['no_output'] = sum(r.status == 'passed' and p is None for r, p in zip(results, preds))
  return preds, results, counts


def run_pal(lm, examples, demos, fmt: Format, gen: Generation,
            limits: sandbox.Limits = sandbox.Limits(), workers: int = 2):
  """The model writes a program after the opening fence; the sandbox runs it."""
  if any('program' not in d for d in demos):
    raise ValueError('PAL demonstrations need a `program` field.')
  prompts, dropped = _prompts(lm, fmt, demos, examples, 'pal', gen)
  programs = lm.generate_until([(p, gen.kwargs([fmt.fence])) for p in prompts])
  preds, results, counts = execute(programs, limits, workers)
  recs = [_record(ex, 'pal', p, prog, pred, status=r.status, reason=r.reason,
                  stderr=r.stderr[-300:] if r.status != 'passed' else '')
          for ex, p, prog, pred, r in zip(examples, prompts, programs, preds, results)]
  return recs, {'demos_dropped': dropped, 'execution': counts}


def accuracy(recs: Sequence[dict]) -> float:
  return sum(r['correct'] for r in recs) / len(recs) if recs else float('nan')


def accuracy_by(recs: Sequence[dict], key: str) -> dict[Any, float]:
  """{value of key: accuracy of the records with it}, keys sorted."""
  groups: dict = collections.defaultdict(list)
  for r in recs:
    if key in r:
      groups[r[key]].append(r)
  return {k: accuracy(groups[k]) for k in sorted(groups)}
