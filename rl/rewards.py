"""Rule rewards (verifiable rewards): pure host functions of (prompt, response, example fields).

  rules = rewards.parse({'answer': {'weight': 1.0, 'extract': 'flexible'},
                         'format': {'weight': 0.1, 'pattern': r'#### -?[0-9]'}})
  rewards.check_examples(rules, examples)           # a missing field: one sentence, at start-up
  out = rewards.score(rules, prompts, responses, examples, tokens=lengths)
  out.total [N]  (sum of weight * value),  out.values {name: [N]},  out.counts {tag: n}
  out.metrics()  {'reward/total', 'reward/answer', ..., 'reward/unparsable'}

A rule is an entry of `reward.rules`: its key names it, `fn` picks the function (default: the
key, so two `format` rules can be 'format' and 'format_2' with fn='format'), `weight` scales it,
and the other keys are the function's parameters. A function returns a float, or (float, tag)
where tag names an outcome to count ('unparsable'; a sandbox rule wired in experiments/ adds
'timeout', 'crash').

  answer   1 if the number extracted from the response equals the example's `field` (default
           'answer': a GSM8K solution's number after its last '####', or a bare number), else 0.
           extract='strict' (the number after '#### ') or 'flexible' (the last number anywhere),
           lm-evaluation-harness's filters; no number found -> 0 and counted as 'unparsable'.
           Numbers compare after dropping ',' '$' and a trailing '.': '1,234' == '1234.0'.
  format   1 if `pattern` (a regex) matches the response (match='search' anywhere | 'full').
  length   DAPO's soft overlong penalty (Yu et al. 2025, eq. 13) on the response's length in
           tokens (the caller passes them; characters otherwise): 0 up to max_length - cache,
           then falling linearly to -1 at max_length, and -1 beyond.

`program` (PAL: run the response's program in the sandbox and compare what it prints) and
`tests` (HumanEval: run the example's tests on the completion) are Functions with a `batched`
form, added by experiments/stages/sandbox_rules.py (the sandbox lives in experiments/
evaluation/); `score(..., functions=...)` takes such additions.

rl/ imports no experiments/: the extraction here mirrors experiments/evaluation/answers.py
(the harness keeps its own). Errors are lm.config.ConfigError (set-up) or RewardError (a value
computed during a run), each one sentence naming the function and the example.
"""
from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from lm.config import ConfigError

_STRICT = re.compile(r'#### (-?[0-9.,]+)')
_NUMBER = re.compile(r'-?[$0-9.,]*[0-9]')
EXTRACTORS = ('strict', 'flexible')


class RewardError(ValueError):
  """A rule reward that could not be computed for an example (one sentence)."""


# Numbers --------------------------------------------------------------------------------------
def _number(text: str) -> float | None:
  """'-1,234.' -> -1234.0; None when it is not a number ('1.2.3', ',')."""
  t = text.replace(',', '').replace('$', '').strip().rstrip('.')
  try:
    v = float(t)
  except ValueError:
    return None
  return v if math.isfinite(v) else None


def extract_answer(response: str, how: str = 'strict') -> float | None:
  """The response's final answer as a number: strict = the number after the first '#### ',
  flexible = the last number anywhere; None when there is none."""
  if how == 'strict':
    m = _STRICT.search(response)
    return _number(m.group(1)) if m else None
  if how == 'flexible':
    found = _NUMBER.findall(response)
    return _number(found[-1]) if found else None
  raise ValueError(f'unknown extractor {how!r}; choose one of {EXTRACTORS}')


def reference_answer(value: Any) -> float | None:
  """An example's answer as a number: a GSM8K solution (the number after its last '####') or
  a bare number / numeric string."""
  if isinstance(value, (int, float)) and not isinstance(value, bool):
    return float(value)
  text = str(value)
  if '####' in text:
    text = text.rsplit('####', 1)[1].split('\n')[0]
  return _number(text)


# The rule functions ---------------------------------------------------------------------------
def answer(prompt: str, response: str, example: Mapping, *, extract: str = 'strict',
           field: str = 'answer', **_):
  want = reference_answer(example[field])
  if want is None:
    raise ValueError(f'its {field!r} field {str(example[field])[-40:]!r} holds no number')
  got = extract_answer(response, extract)
  if got is None:
    return 0.0, 'unparsable'
  return float(got == want)


def format_(prompt: str, response: str, example: Mapping, *, pattern: str = '', match: str = 'search',
            **_):
  m = re.fullmatch(pattern, response) if match == 'full' else re.search(pattern, response)
  return float(m is not None)


def length(prompt: str, response: str, example: Mapping, *, max_length: int = 0, cache: int = 0,
           tokens: int | None = None, **_):
  n = len(response) if tokens is None else int(tokens)
  if n <= max_length - cache:
    return 0.0
  if n <= max_length:
    return (max_length - cache - n) / cache
  return -1.0


@dataclasses.dataclass(frozen=True)
class Function:
  fn: Callable | None            # (prompt, response, example, **params) -> float | (float, tag)
  params: dict                   # parameter -> default (what a rule may set)
  fields: Callable = lambda p: ()   # params -> example fields it reads
  tags: tuple = ()               # outcomes it counts
  batched: Callable | None = None   # (prompts, responses, examples, **params) -> [float | (float, tag)]
                                    # instead of fn: all rows at once (e.g. a sandbox's workers)


FUNCTIONS = {
    'answer': Function(answer, {'extract': 'strict', 'field': 'answer'}, lambda p: (p['field'],),
                       ('unparsable',)),
    'format': Function(format_, {'pattern': '', 'match': 'search'}),
    'length': Function(length, {'max_length': 0, 'cache': 0}),
}


@dataclasses.dataclass(frozen=True)
class Rule:
  name: str                      # the key in reward.rules (the metric is reward/<name>)
  fn: str                        # the function in FUNCTIONS (or one added by the caller)
  weight: float
  params: dict

  def fields(self, functions: Mapping = FUNCTIONS) -> tuple:
    return tuple(functions[self.fn].fields(self.params))


def parse(spec: Mapping[str, Mapping], functions: Mapping[str, Function] = FUNCTIONS,
          defaults: Mapping[str, Mapping] | None = None) -> list[Rule]:
  """reward.rules -> [Rule]; one-sentence ConfigError for an unknown function, an unknown
  parameter or a bad value. `defaults` fills parameters per function (e.g. the length rule's
  max_length from rollout.max_new_tokens)."""
  if not spec:
    raise ConfigError("reward.kind='rules' needs reward.rules, e.g. {'answer': {'weight': 1.0}}.")
  out = []
  for name, entry in dict(spec).items():
    entry = dict(entry or {})
    fn = entry.pop('fn', name)
    weight = entry.pop('weight', 1.0)
    if fn not in functions:
      raise ConfigError(f'reward.rules.{name}: unknown reward function {fn!r}; choose one of '
                        f'{tuple(functions)}.')
    f = functions[fn]
    bad = sorted(set(entry) - set(f.params))
    if bad:
      raise ConfigError(f'reward.rules.{name} ({fn}) has unknown parameters {bad}; it takes '
                        f'{sorted(f.params)} and weight.')
    params = {**f.params, **dict((defaults or {}).get(fn, {})), **entry}
    if not isinstance(weight, (int, float)) or not math.isfinite(weight):
      raise ConfigError(f'reward.rules.{name}.weight={weight!r} must be a finite number.')
    _check_params(name, fn, params)
    out.append(Rule(name, fn, float(weight), params))
  return out


def _check_params(name: str, fn: str, p: dict) -> None:
  if fn == 'answer' and p['extract'] not in EXTRACTORS:
    raise ConfigError(f"reward.rules.{name}.extract={p['extract']!r}; choose one of {EXTRACTORS}.")
  if fn == 'format':
    if p['match'] not in ('search', 'full'):
      raise ConfigError(f"reward.rules.{name}.match={p['match']!r}; choose search or full.")
    try:
      re.compile(p['pattern'])
    except re.error as e:
      raise ConfigError(f"reward.rules.{name}.pattern={p['pattern']!r} is not a regex ({e}).") from None
  if fn == 'length' and not 0 < p['cache'] <= p['max_length']:
    raise ConfigError(f"reward.rules.{name} (length) needs 0 < cache <= max_length, got cache="
                      f"{p['cache']}, max_length={p['max_length']}.")


def describe(example: Mapping, index: int) -> str:
  ident = example.get('id', index)
  text = str(example.get('question', example.get('prompt', '')))
  return f'example {ident} ({text[:50]!r})'


def check_examples(rules: Sequence[Rule], examples: Sequence[Mapping],
                   functions: Mapping[str, Function] = FUNCTIONS) -> None:
  """Every example has the fields each rule reads, else one sentence naming both."""
  for rule in rules:
    for field in rule.fields(functions):
      for i, ex in enumerate(examples):
        if field not in ex:
          raise ConfigError(f'Reward function {rule.name!r} ({rule.fn}) needs the field {field!r}, '
                            f'which {describe(ex, i)} lacks (it has {sorted(ex)}).')


@dataclasses.dataclass
class Scores:
  total: np.ndarray              # [N] float64, sum of weight * value
  values: dict                   # rule name -> [N] float64
  counts: dict                   # tag -> count

  def metrics(self) -> dict:
    out = {'reward/total': float(self.total.mean())}
    out.update({f'reward/{k}': float(v.mean()) for k, v in self.values.items()})
    out.update({f'reward/{k}': float(v) for k, v in self.counts.items()})
    return out


def score(rules: Sequence[Rule], prompts: Sequence[str], responses: Sequence[str],
          examples: Sequence[Mapping], tokens: Sequence[int] | None = None,
          functions: Mapping[str, Function] = FUNCTIONS) -> Scores:
  """Every rule on every (prompt, response, example); RewardError (one sentence naming the
  function and the example) for a missing field, a failed rule or a non-finite value."""
  n = len(responses)
  if not len(prompts) == len(examples) == n:
    raise ValueError(f'{len(prompts)} prompts, {n} responses and {len(examples)} examples')
  values, counts = {}, {t: 0 for r in rules for t in functions[r.fn].tags}
  total = np.zeros(n, np.float64)
  for rule in rules:
    f, v = functions[rule.fn], np.zeros(n, np.float64)
    if f.batched is not None:
      for field in rule.fields(functions):
        missing = next((i for i, ex in enumerate(examples) if field not in ex), None)
        if missing is not None:
          raise RewardError(f'Reward function {rule.name!r} ({rule.fn}) needs the field {field!r}, '
                            f'which {describe(examples[missing], missing)} lacks.')
      results = list(f.batched(list(prompts), list(responses), list(examples), **rule.params))
    for i in range(n):
      ex = examples[i]
      extra = {'tokens': int(tokens[i])} if tokens is not None and rule.fn == 'length' else {}
      try:
        got = results[i] if f.batched is not None else f.fn(prompts[i], responses[i], ex, **rule.params, **extra)
      except KeyError as e:
        raise RewardError(f'Reward function {rule.name!r} ({rule.fn}) needs the field {e.args[0]!r}, '
                          f'which {describe(ex, i)} lacks.') from None
      except (ValueError, TypeError) as e:
        raise RewardError(f'Reward function {rule.name!r} ({rule.fn}) failed on {describe(ex, i)}: '
                          f'{e}.') from None
      if isinstance(got, tuple):
        got, tag = got
        counts[tag] = counts.get(tag, 0) + 1
      got = float(got)
      if not math.isfinite(got):
        raise RewardError(f'Reward function {rule.name!r} ({rule.fn}) gave {got} on {describe(ex, i)}; '
                          'rewards must be finite.')
      v[i] = got
    values[rule.name] = v
    total += rule.weight * v
  return Scores(total, values, counts)
