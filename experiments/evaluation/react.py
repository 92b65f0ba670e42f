"""ReAct (Yao et al. 2023): Thought / Action / Observation with tools registered by name.

A transcript, one line each (the model writes what follows 'Thought:' up to its action):

  Question: Which play is the line "..." from?
  Thought: I need to search for the line.
  Action: search[...]
  Observation: [Hamlet | Horatio] Two nights together ... / Marcellus and ...
  Thought: The line is from Hamlet.
  Action: finish[Hamlet]

Tools are plain functions tool(env, argument) -> observation, in a dict by name (TOOLS;
`register` adds one): search (top BM25 document: its title and first lines), lookup (the
next line of the last document matching a keyword, and the line after it), calculate
(arithmetic on numbers through an AST walk, never eval), finish (ends the episode with
the answer). A step whose action does not parse, or names a tool not in the registry, gets
an observation saying so and is counted ('malformed', 'unknown_tool'); an episode that does
not finish within max_steps stops with no answer ('step_limit'). Episodes run in lockstep:
one batched generate call per step for every unfinished episode.
"""
from __future__ import annotations

import ast
import dataclasses
import operator
import re
from typing import Callable, Sequence

from experiments.evaluation import retrieval

STOP = '\nObservation:'


@dataclasses.dataclass
class Env:
  """What the tools see: the collection, its index and the episode's reading state."""
  docs: Sequence[retrieval.Passage]
  index: retrieval.BM25Index
  obs_lines: int = 2          # lines of a found document that `search` shows
  last: int | None = None     # the last retrieved document
  looked: dict = dataclasses.field(default_factory=dict)   # keyword -> results shown so far

  def fresh(self) -> 'Env':
    return Env(self.docs, self.index, self.obs_lines)


def search(env: Env, query: str) -> str:
  hits = env.index.search(query, 1)
  if not hits:
    return 'No results.'
  env.last = hits[0][0]
  env.looked = {}
  d = env.docs[env.last]
  return f'[{d.title}] ' + ' / '.join(d.lines[:env.obs_lines])


def lookup(env: Env, keyword: str) -> str:
  if env.last is None:
    return 'No document yet; search first.'
  lines = env.docs[env.last].lines
  found = retrieval.overlap_order(lines, keyword)
  seen = env.looked.get(keyword, 0)
  if seen >= len(found):
    return 'No more results.'
  env.looked[keyword] = seen + 1
  i = found[seen]
  return f'(Result {seen + 1} / {len(found)}) ' + ' / '.join(lines[i:i + 2])


_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
        ast.Div: operator.truediv, ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod,
        ast.Pow: operator.pow, ast.USub: operator.neg, ast.UAdd: operator.pos}
MAX_POWER = 64   # 9**9**9 would hang the harness


def safe_eval(expr: str) -> float | int:
  """An arithmetic expression of numbers, + - * / // % ** and parentheses; anything else
  (names, calls, attributes) raises ValueError."""
  def walk(node):
    if isinstance(node, ast.Expression):
      return walk(node.body)
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
      return node.value
    if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
      a, b = walk(node.left), walk(node.right)
      if isinstance(node.op, ast.Pow) and abs(b) > MAX_POWER:
        raise ValueError(f'exponent {b} is larger than {MAX_POWER}')
      return _OPS[type(node.op)](a, b)
    if isinstance(node, ast.UnaryOp) and type(node.op) in _OPS:
      return _OPS[type(node.op)](walk(node.operand))
    raise ValueError(f'{type(node).__name__} is not arithmetic')
  try:
    return walk(ast.parse(expr.replace(',', ''), mode='eval'))
  except (SyntaxError, ZeroDivisionError, OverflowError, RecursionError) as e:
    raise ValueError(str(e) or type(e).__name__) from None


def calculate(env: Env, expr: str) -> str:
  try:
    v = safe_eval(expr)
  except ValueError as e:
    return f'Invalid expression ({e}).'
  return str(int(v)) if isinstance(v, float) and v.is_integer() and abs(v) < 1e15 else str(v)


def finish(env: Env, answer: str) -> str:
  return answer


TOOLS: dict[str, Callable[[Env, str], str]] = {
    'search': search, 'lookup': lookup, 'calculate': calculate, 'finish': finish}


def register(name: str, fn: Callable[[Env, str], str], tools: dict | None = None) -> dict:
  (TOOLS if tools is None else tools)[name] = fn
  return TOOLS if tools is None else tools


# Parsing ------------------------------------------------------------------------------------
_ACTION = re.compile(r'^\s*Action\s*:\s*([A-Za-z_]\w*)\s*\[(.*)\]\s*$')


@dataclasses.dataclass
class Step:
  thought: str            # what the model wrote before its action line (raw)
  tool: str | None
  arg: str | None
  error: str | None       # None | 'malformed' | 'unknown_tool'


def parse_step(text: str, tools: Sequence[str] = tuple(TOOLS)) -> Step:
  """The model's text after 'Thought:' -> its thought and first action line."""
  lines = text.split('\n')
  at = next((i for i, l in enumerate(lines) if l.strip().startswith('Action')), None)
  if at is None:
    return Step(text.rstrip(), None, None, 'malformed')
  thought = '\n'.join(lines[:at])
  m = _ACTION.match(lines[at])
  if m is None:
    return Step(thought, None, lines[at].strip(), 'malformed')
  tool, arg = m.group(1), m.group(2).strip()
  if tool not in tools:
    return Step(thought, tool, arg, 'unknown_tool')
  return Step(thought, tool, arg, None)


# Episodes -------------------------------------------------------------------------------------
@dataclasses.dataclass
class Episode:
  prompt: str                    # demonstrations (if any) + 'Question: ...\n'
  env: Env
  text: str = ''                 # the transcript after the prompt
  answer: str | None = None
  steps: int = 0
  stop: str | None = None        # 'finish' | 'step_limit'
  counts: dict = dataclasses.field(default_factory=lambda: {'malformed': 0, 'unknown_tool': 0})
  actions: list = dataclasses.field(default_factory=list)

  @property
  def done(self) -> bool:
    return self.stop is not None


def invalid(step: Step, tools: Sequence[str]) -> str:
  names = ', '.join(tools)
  if step.error == 'unknown_tool':
    return f'Unknown tool {step.tool}; use one of: {names}.'
  return f'Invalid action; write Action: tool[argument] with a tool among: {names}.'


def advance(ep: Episode, output: str, tools: dict) -> None:
  """One step of an episode from the model's output (its text after 'Thought:')."""
  step = parse_step(output, tuple(tools))
  ep.steps += 1
  if step.error:
    ep.counts[step.error] += 1
    shown = output.split(STOP)[0].rstrip()
    ep.text += f'Thought:{shown}{STOP} {invalid(step, tuple(tools))}\n'
    ep.actions.append((step.tool, step.arg, step.error))
    return
  ep.actions.append((step.tool, step.arg, None))
  action = f'Thought:{step.thought}\nAction: {step.tool}[{step.arg}]'
  if step.tool == 'finish':
    ep.text += action
    ep.answer, ep.stop = step.arg, 'finish'
    return
  ep.text += f'{action}{STOP} {tools[step.tool](ep.env, step.arg)}\n'


def run_episodes(generate: Callable[[list[str]], list[str]], prompts: Sequence[str], env: Env,
                 max_steps: int = 6, tools: dict | None = None) -> list[Episode]:
  """ReAct episodes, one per prompt ('Question: ...\\n' after any demonstrations), in
  lockstep. `generate(list of prompts) -> list of outputs` (stop at STOP)."""
  tools = TOOLS if tools is None else tools
  eps = [Episode(p, env.fresh()) for p in prompts]
  for _ in range(max_steps):
    active = [e for e in eps if not e.done]
    if not active:
      break
    outs = generate([e.prompt + e.text + 'Thought:' for e in active])
    for e, out in zip(active, outs):
      advance(e, out, tools)
  for e in eps:
    if not e.done:
      e.stop = 'step_limit'
  return eps


def gold_trajectory(plan: Sequence[tuple[str, str, str]], answer: str, env: Env,
                    tools: dict | None = None) -> tuple[list[tuple[str, bool]], bool]:
  """The plan's steps through the real tools as text segments (text, written by the model?)
  that concatenate to the transcript after the question, and whether the tools showed the
  answer (a trajectory whose observations never contain it teaches guessing: drop it)."""
  tools = TOOLS if tools is None else tools
  env = env.fresh()
  segs, seen = [], False
  for thought, tool, arg in plan:
    thought = thought.format(answer=answer)
    if tool == 'finish':
      segs += [('Thought:', False), (f' {thought}\nAction: finish[{arg}]', True)]
      break
    obs = tools[tool](env, arg)
    seen = seen or retrieval.norm_line(answer) in retrieval.norm_line(obs)
    segs += [('Thought:', False), (f' {thought}\nAction: {tool}[{arg}]{STOP}', True), (f' {obs}\n', False)]
  return segs, seen
