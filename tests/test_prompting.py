"""experiments/evaluation/prompting.py: prompt assembly, answer voting, maj@k, zero-shot CoT's
two stages and PAL in the sandbox, all with scripted models (no training)."""
import os

import pytest
from ml_collections import ConfigDict

from experiments.evaluation import prompting, sandbox
from lm.config import ConfigError

FMT = prompting.Format()
Q1 = {'id': 'a', 'question': 'Ann has 2 pens. She buys 3. How many pens now?',
      'rationale': 'Buys 3: 2 + 3 = 5.', 'final': '5', 'program': 'x = 2\nx = x + 3\nprint(x)',
      'steps': 1, 'digits': 1}
Q2 = {'id': 'b', 'question': 'Tom has 9 cups. He eats 4. How many cups now?',
      'rationale': 'Eats 4: 9 - 4 = 5.', 'final': '5', 'program': 'x = 9\nx = x - 4\nprint(x)',
      'steps': 1, 'digits': 1}


class ScriptLM:
  """generate_until answers from a list (in request order) and records every request."""

  def __init__(self, outputs, max_length=None):
    self.outputs, self.requests = list(outputs), []
    if max_length is not None:   # a context to fit prompts into: one token per character
      self.max_length = max_length
      self.encode = lambda text: list(text)

  def generate_until(self, requests):
    self.requests += list(requests)
    out, self.outputs = self.outputs[:len(requests)], self.outputs[len(requests):]
    return out


def test_majority_vote_drops_unparsable_and_breaks_ties_by_first_seen():
  assert prompting.majority_vote(['3', None, '4', '4', '3']) == ('3', 1)   # 2-2: '3' came first
  assert prompting.majority_vote(['4', None, '3', '3', '4']) == ('4', 1)
  assert prompting.majority_vote(['5', '6', '5.0', None, None]) == ('5', 2)  # 5 == 5.0
  assert prompting.majority_vote(['1,000', '7', '1000']) == ('1,000', 0)
  assert prompting.majority_vote([None, None]) == (None, 2)
  assert prompting.majority_vote([]) == (None, 0)


def test_maj_at_k_by_hand():
  preds = [['1', '2', '2', None], ['4', None, '4', '5']]
  golds = ['2', '4']
  # k=1: the mean single-sample accuracy, (2/4 + 2/4) / 2
  # k=2: groups [1,2] -> 1 (tie, first) wrong, [2,None] -> 2 right; [4,None] right, [4,5] right
  # k=4: 2 beats 1; 4 beats 5
  assert prompting.maj_at_k(preds, golds, (1, 2, 4)) == {1: 0.5, 2: 0.75, 4: 1.0}
  with pytest.raises(ValueError, match='maj@8'):
    prompting.maj_at_k(preds, golds, (8,))


def test_few_shot_cot_prompt_extraction_and_unparsable_count():
  lm = ScriptLM(['Buys 3: 2 + 3 = 5.\n#### 5', 'Eats 4: 9 -'])
  recs, counts = prompting.run_cot(lm, [Q1, Q2], [Q2], FMT, prompting.Generation(40))
  demo = ('Q: Tom has 9 cups. He eats 4. How many cups now?\nA:\nEats 4: 9 - 4 = 5.\n#### 5\n\n')
  assert lm.requests[0][0] == demo + 'Q: Ann has 2 pens. She buys 3. How many pens now?\nA:\n'
  assert lm.requests[0][1]['until'] == ['\n\n'] and lm.requests[0][1]['max_new_tokens'] == 40
  assert [r['pred'] for r in recs] == ['5', None] and [r['correct'] for r in recs] == [True, False]
  assert counts == {'demos_dropped': 0, 'unparsable': 1}
  assert prompting.accuracy_by(recs, 'steps') == {1: 0.5}


def test_direct_prompt_ends_with_the_answer_mark():
  lm = ScriptLM([' 5', ' 7'])
  recs, _ = prompting.run_direct(lm, [Q1, Q2], [Q2], FMT, prompting.Generation(4))
  assert lm.requests[1][0] == ('Q: Tom has 9 cups. He eats 4. How many cups now?\nA:\n#### 5\n\n'
                               'Q: Tom has 9 cups. He eats 4. How many cups now?\nA:\n####')
  assert [r['pred'] for r in recs] == ['5', '7'] and prompting.accuracy(recs) == 0.5


def test_demonstrations_that_overflow_the_context_are_dropped_and_counted():
  query = FMT.query(Q1, 'cot')
  demo = FMT.demo(Q2, 'cot') + FMT.sep
  lm = ScriptLM([], max_length=len(query) + len(demo) + 10)   # room for one demo and 10 tokens
  prompt, dropped = prompting.build_prompt(lm, FMT, [Q1, Q2], Q1, 'cot', 10)
  assert (prompt, dropped) == (demo + query, 1)   # the demo farthest from the query went
  prompt, dropped = prompting.build_prompt(lm, FMT, [Q1, Q2], Q1, 'cot', 11)
  assert (prompt, dropped) == (query, 2)


def test_zero_shot_cot_two_stage_prompts():
  lm = ScriptLM(['Buys 3: 2 + 3 = 5.\n', ' 5.'])
  recs, counts = prompting.run_zero_shot_cot(lm, [Q1], FMT, prompting.Generation(50), 6)
  first = "Q: Ann has 2 pens. She buys 3. How many pens now?\nA: Let's think step by step.\n"
  assert lm.requests[0][0] == first
  assert lm.requests[0][1]['until'] == ['Therefore, the answer is', '\n\n']
  assert lm.requests[1][0] == first + 'Buys 3: 2 + 3 = 5.\nTherefore, the answer is'
  assert lm.requests[1][1]['max_new_tokens'] == 6 and lm.requests[1][1]['temperature'] == 0.0
  assert recs[0]['pred'] == '5' and recs[0]['correct'] and counts == {'unparsable': 0}
  assert recs[0]['rationale'] == 'Buys 3: 2 + 3 = 5.\n'


def test_self_consistency_votes_over_samples():
  outs = ['#### 5', '#### 6', '#### 6', 'no answer',     # Q1: 6 wins (wrong)
          '#### 5', 'x', '#### 4', '#### 5']              # Q2: 5 wins (right)
  lm = ScriptLM(outs)
  recs, counts = prompting.run_self_consistency(
      lm, [Q1, Q2], [], FMT, prompting.Generation(20, temperature=0.7), 4, (1, 2, 4, 8))
  assert len(lm.requests) == 8 and lm.requests[0][1]['temperature'] == 0.7
  assert [r['pred'] for r in recs] == ['6', '5'] and [r['unparsable'] for r in recs] == [1, 1]
  # k=1: (1/4 + 2/4) / 2; k=2: Q1 [5,6] -> 5 right, [6,None] -> 6; Q2 [5,None] right, [4,5] -> 4
  assert counts['maj_at_k'] == {1: 0.375, 2: 0.5, 4: 0.5}   # k=8 > n is left out
  assert counts['unparsable'] == 2
  with pytest.raises(ValueError, match='temperature'):
    prompting.run_self_consistency(lm, [Q1], [], FMT, prompting.Generation(20), 4, (1,))


def test_pal_runs_programs_counting_crashes_timeouts_and_silence():
  programs = ['x = 2\nx = x + 3\nprint(x)', 'print(5)\nraise ValueError("bad")',
              'import time\ntime.sleep(30)', 'x = 5']
  lm = ScriptLM(programs)
  ex = [dict(Q1, id=str(i)) for i in range(4)]
  recs, counts = prompting.run_pal(lm, ex, [Q2], FMT, prompting.Generation(30),
                                   sandbox.Limits(wall_s=1.0, cpu_s=1), workers=2)
  assert lm.requests[0][0].endswith('Q: Ann has 2 pens. She buys 3. How many pens now?\nA:\n```\n')
  assert lm.requests[0][0].startswith(FMT.demo(Q2, 'pal') + '\n\n') and lm.requests[0][1]['until'] == ['```']
  assert [r['pred'] for r in recs] == ['5', None, None, None]
  assert [r['status'] for r in recs] == ['passed', 'failed', 'timeout', 'passed']
  assert 'ValueError' in recs[1]['stderr']
  assert counts['execution'] == {'passed': 2, 'failed': 1, 'timeout': 1, 'error': 0, 'no_output': 1}
  assert prompting.accuracy(recs) == 0.25


def test_gsm8k_records_become_examples():
  import types
  from experiments.evaluation import builtin
  path = os.path.join(os.path.dirname(__file__), 'data', 'gsm8k_sample.jsonl')
  docs, _ = builtin.gsm8k(types.SimpleNamespace(path=path, query_template='{question}'))
  ex = prompting.from_gsm8k(docs)
  assert ex[0]['question'] == 'Tom has 3 boxes with 4 apples in each. How many apples does he have?'
  assert ex[0]['rationale'] == 'Each box holds 4 apples, so 3 boxes hold 3 * 4 = <<3*4=12>>12 apples.'
  assert ex[0]['final'] == '12' and ex[2]['final'] == '2050'
  assert FMT.demo(ex[0], 'cot').endswith('12 apples.\n#### 12')


def _config(**over):
  from experiments.configs import cot_arith
  c = cot_arith.get_config()
  for k, v in over.items():
    *parents, leaf = k.split('.')
    target = c
    for p in parents:
      target = target[p]
    target[leaf] = v
  return c


@pytest.mark.parametrize('over, match', [
    ({'methods': ('cot', 'tree_of_thought')}, 'unknown'),
    ({'sc.ks': (1, 32)}, 'every k'),
    ({'sc.temperature': 0.0}, 'temperature'),
    ({'data.source': 'gsm8k'}, 'data.path'),
    ({'data.ablation': 'words'}, 'ablation'),
    ({'prompt.extract': 'regex:('}, 'extractor'),
    ({'models': ConfigDict({'m': ConfigDict({'cot': 1.0, 'poetry': 1.0})})}, 'styles'),
])
def test_bad_configs_fail_at_start_up(over, match, tmp_path):
  from experiments import cot
  with pytest.raises(ConfigError, match=match):
    cot.run(_config(**over), str(tmp_path))
  assert not os.listdir(tmp_path)   # nothing written, nothing trained


@pytest.mark.slow
def test_cot_experiment_end_to_end_and_on_a_gsm8k_file(tmp_path):
  """A few training steps, every method on 6 problems; then cot_gsm8k on that model."""
  import json

  from data import arith
  from experiments import cot
  from experiments.configs import cot_gsm8k
  c = _config(**{'train.steps': 4, 'data.n_train': 200, 'data.n_eval': 6, 'sc.n': 2,
                 'sc.ks': (1, 2), 'prompt.max_new_tokens': 24, 'eval.batch_size': 16})
  out = cot.run(c, str(tmp_path / 'arith'))
  r = out['mixed']
  assert set(r['accuracy']) == set(prompting.METHODS) and r['n'] == 6
  assert set(r['maj_at_k']) == {1, 2} and r['counts']['pal']['execution']
  lines = [json.loads(l) for l in open(tmp_path / 'arith' / 'samples.jsonl')]
  assert {l['method'] for l in lines} == set(prompting.METHODS) and len(lines) == 30
  assert (tmp_path / 'arith' / 'cot.png').exists() and (tmp_path / 'arith' / 'cot.txt').exists()
  # GSM8K format: a file the char model can encode runs; one it cannot is a start-up error
  path = tmp_path / 'g.jsonl'
  path.write_text(''.join(json.dumps(r) + '\n' for r in arith.to_gsm8k(arith.generate(5, seed=9))))
  g = cot_gsm8k.get_config()
  g.init_from = str(tmp_path / 'arith' / 'runs' / 'mixed')
  g.data.path = str(path)
  g.prompt.update(k=1, max_new_tokens=24)
  g.sc.update(n=2, ks=(1, 2))
  res = cot.run(g, str(tmp_path / 'gsm8k'))['init_from']
  assert res['n'] == 4 and res['skipped_unencodable'] == 0   # 5 records, 1 demonstration
  g.data.path = os.path.join(os.path.dirname(__file__), 'data', 'gsm8k_sample.jsonl')
  with pytest.raises(ConfigError, match='encoded'):
    cot.run(g, str(tmp_path / 'gsm8k2'))
