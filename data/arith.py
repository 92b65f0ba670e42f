"""Multi-step arithmetic word problems, generated on the fly, in GSM8K's format.

  problems = generate(200, seed=0, steps=(1, 3), digits=(1, 2))
  problems[0]['question']  'Ann has 23 pens. She buys 45. She loses 12. How many pens now?'
  problems[0]['answer']    'Buys 45: 23 + 45 = 68.\nLoses 12: 68 - 12 = 56.\n#### 56'
  problems[0]['program']   'x = 23\nx = x + 45\nx = x - 12\nprint(x)'   (PAL's rationale)

A problem starts from one number and applies `steps` additions or subtractions (each operand
has `digits` digits; a subtraction never goes below zero), so the number of reasoning steps
and the size of the numbers are the two knobs a chain-of-thought study varies. The gold
rationale has one line per step, text + an equation: 'Buys 45: 23 + 45 = 68.'.

The CoT-components ablation (Madaan & Yazdanbakhsh 2022, "Text and patterns: for effective
chain of thought, it takes two to tango", cited by the survey's §6.2) is `rationale(steps,
ablation)`: each rationale line has three components, and one can be removed:
  none       'Buys 45: 23 + 45 = 68.'   text, pattern (the equation) and symbols (numbers)
  symbols    'Buys β: α + β = γ.'       every number an abstract placeholder (one per value)
  patterns   'Buys 45: now 68.'         the equation form dropped; text and numbers stay
  text       '23 + 45 = 68'             the equation alone
The final '#### N' line always states the real answer.

Everything is a pure function of its arguments (numpy's seeded generator); no model code.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

ABLATIONS = ('none', 'symbols', 'patterns', 'text')
# Placeholders for the 'symbols' ablation, in order of first appearance.
PLACEHOLDERS = 'αβγδεζηθικλμνξπρστυφχψω'
NAMES = (('Ann', 'She'), ('Tom', 'He'), ('Mia', 'She'), ('Sam', 'He'), ('Eve', 'She'),
         ('Max', 'He'), ('Zoe', 'She'), ('Ben', 'He'))
ITEMS = ('pens', 'cards', 'coins', 'books', 'eggs', 'cups', 'toys', 'rocks')
VERBS = {'+': ('buys', 'finds', 'gets', 'wins'), '-': ('loses', 'sells', 'eats', 'gives')}
_SPLITS = {'train': 0, 'validation': 1, 'test': 2}


class ArithError(ValueError):
  """A generator request that cannot be met; the message says how to fix it."""


@dataclasses.dataclass(frozen=True)
class Step:
  verb: str    # 'buys'
  x: int       # the running value before the step
  op: str      # '+' | '-'
  b: int       # the operand
  y: int       # the running value after the step


def _number(rng, digits: int) -> int:
  lo = 1 if digits == 1 else 10 ** (digits - 1)
  return int(rng.integers(lo, 10 ** digits))


def _check_range(name: str, r: Sequence[int], lo: int) -> tuple[int, int]:
  r = tuple(int(v) for v in r)
  if len(r) != 2 or not lo <= r[0] <= r[1]:
    raise ArithError(f'{name} must be a (min, max) pair with {lo} <= min <= max, got {r}.')
  return r


def solve(start: int, ops: Sequence[tuple[str, int]], verbs: Sequence[str]) -> list[Step]:
  """The steps that apply ops [(op, b), ...] to start."""
  out, x = [], start
  for (op, b), verb in zip(ops, verbs):
    y = x + b if op == '+' else x - b
    out.append(Step(verb, x, op, b, y))
    x = y
  return out


def make_problem(rng, steps: int, digits: int, ops: str = '+-') -> dict:
  """One problem with exactly `steps` operations on `digits`-digit numbers."""
  name, pron = NAMES[rng.integers(len(NAMES))]
  item = ITEMS[rng.integers(len(ITEMS))]
  x = start = _number(rng, digits)
  pairs, verbs = [], []
  for _ in range(steps):
    op = ops[rng.integers(len(ops))]
    b = _number(rng, digits)
    if op == '-' and b > x:   # never below zero: subtract only what is there
      op = '+' if '+' in ops else '-'
      if op == '-':
        b = int(rng.integers(0, x + 1))
    verb = VERBS[op][rng.integers(len(VERBS[op]))]
    pairs.append((op, b))
    verbs.append(verb)
    x = x + b if op == '+' else x - b
  return build(name, pron, item, start, solve(start, pairs, verbs), digits)


def build(name: str, pron: str, item: str, start: int, steps: Sequence[Step], digits: int,
          ablation: str = 'none') -> dict:
  """The GSM8K-format record of a problem (question, answer) plus what a study needs."""
  sentences = [f'{name} has {start} {item}.'] + [f'{pron} {s.verb} {s.b}.' for s in steps]
  question = ' '.join(sentences + [f'How many {item} now?'])
  final = steps[-1].y if steps else start
  lines = rationale(steps, ablation)
  return {'question': question, 'answer': '\n'.join(lines + [f'#### {final}']),
          'rationale': '\n'.join(lines), 'final': str(final), 'program': program(start, steps),
          'steps': len(steps), 'digits': digits}


def rationale(steps: Sequence[Step], ablation: str = 'none') -> list[str]:
  """One line per step, with the CoT component `ablation` removed (see the module doc)."""
  if ablation not in ABLATIONS:
    raise ArithError(f'ablation={ablation!r}; choose one of {ABLATIONS}.')
  symbols: dict[int, str] = {}

  def sym(v: int) -> str:
    if ablation != 'symbols':
      return str(v)
    if v not in symbols:
      symbols[v] = PLACEHOLDERS[len(symbols) % len(PLACEHOLDERS)]
    return symbols[v]

  out = []
  for s in steps:
    text = s.verb.capitalize()
    if ablation == 'text':
      out.append(f'{s.x} {s.op} {s.b} = {s.y}')
    elif ablation == 'patterns':
      out.append(f'{text} {s.b}: now {s.y}.')
    else:   # none / symbols: the values in order x, b, y get their placeholders
      x, b, y = sym(s.x), sym(s.b), sym(s.y)
      out.append(f'{text} {b}: {x} {s.op} {b} = {y}.')
  return out


def program(start: int, steps: Sequence[Step]) -> str:
  """PAL's rationale: straight-line Python that prints the answer."""
  return '\n'.join([f'x = {start}'] + [f'x = x {s.op} {s.b}' for s in steps] + ['print(x)'])


def generate(n: int, *, seed: int = 0, split: str = 'train', steps: Sequence[int] = (1, 3),
             digits: Sequence[int] = (1, 2), ops: str = '+-', ablation: str = 'none',
             exclude: Sequence[str] = ()) -> list[dict]:
  """n distinct problems (by question), steps and digits uniform in their inclusive ranges.

  The same (seed, split, ...) gives the same problems; `exclude` lists questions to leave out
  (a held-out split excludes the training questions). Each record has an 'id'."""
  steps, digits = _check_range('steps', steps, 0), _check_range('digits', digits, 1)
  if not ops or set(ops) - {'+', '-'}:
    raise ArithError(f"ops={ops!r}; use '+', '-' or '+-'.")
  if split not in _SPLITS:
    raise ArithError(f'split={split!r}; choose one of {sorted(_SPLITS)}.')
  if ablation not in ABLATIONS:
    raise ArithError(f'ablation={ablation!r}; choose one of {ABLATIONS}.')
  rng = np.random.default_rng([seed, _SPLITS[split], 0xA817])
  seen = set(exclude)
  out, misses = [], 0
  while len(out) < n:
    if misses > 2000:   # that many repeats in a row: (nearly) every question is taken
      raise ArithError(f'Only {len(out)} distinct problems could be drawn; ask for fewer or '
                       'widen steps/digits.')
    s = int(rng.integers(steps[0], steps[1] + 1))
    d = int(rng.integers(digits[0], digits[1] + 1))
    p = make_problem(rng, s, d, ops)
    if p['question'] in seen:
      misses += 1
      continue
    misses = 0
    seen.add(p['question'])
    if ablation != 'none':
      p = ablated(p, ablation)
    p['id'] = f'{split}-{len(out)}'
    out.append(p)
  return out


def parse_question(question: str) -> tuple[str, str, str, int, list[tuple[str, str, int]]]:
  """(name, pronoun, item, start, [(verb, op, b), ...]) of a generated question."""
  sentences = [s.strip() for s in question.split('.') if s.strip()]
  first = sentences[0].split()
  name, start, item = first[0], int(first[2]), first[3]
  ops = []
  for s in sentences[1:]:
    if s.startswith('How many'):
      break
    pron, verb, b = s.split()
    op = '+' if verb in VERBS['+'] else '-'
    ops.append((pron, verb, op, int(b)))
  pron = ops[0][0] if ops else dict(NAMES).get(name, 'They')
  return name, pron, item, start, [(v, o, b) for _, v, o, b in ops]


def ablated(problem: dict, ablation: str) -> dict:
  """The same problem with its rationale's `ablation` component removed."""
  name, pron, item, start, ops = parse_question(problem['question'])
  steps = solve(start, [(o, b) for _, o, b in ops], [v for v, _, _ in ops])
  out = build(name, pron, item, start, steps, problem['digits'], ablation)
  return {**problem, **{k: out[k] for k in ('answer', 'rationale')}}


def to_gsm8k(problems: Sequence[dict]) -> list[dict]:
  """Only GSM8K's two fields ({question, answer}), e.g. to write a GSM8K-format file."""
  return [{'question': p['question'], 'answer': p['answer']} for p in problems]
