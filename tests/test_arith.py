"""data/arith.py: generated word problems, their rationales, PAL programs and the CoT ablation."""
import contextlib
import io
import json
import re
import types

import pytest

from data import arith

LINE = re.compile(r'^([A-Z][a-z]+) (\d+): (\d+) ([+-]) (\d+) = (\d+)\.$')


def test_same_seed_same_problems_and_held_out_split_excludes_training():
  a = arith.generate(60, seed=3)
  assert a == arith.generate(60, seed=3)
  assert a != arith.generate(60, seed=4)
  test = arith.generate(60, seed=3, split='test', exclude=[p['question'] for p in a])
  assert not {p['question'] for p in a} & {p['question'] for p in test}
  assert len({p['question'] for p in a}) == 60   # distinct
  assert [p['id'] for p in a[:2]] == ['train-0', 'train-1']


def test_rationales_compute_the_stated_answer():
  for p in arith.generate(300, seed=0, steps=(0, 4), digits=(1, 3)):
    lines = p['rationale'].split('\n') if p['rationale'] else []
    assert len(lines) == p['steps']
    start = int(p['question'].split()[2])
    x = start
    for line in lines:
      verb, b, x0, op, b2, y = LINE.match(line).groups()
      assert int(x0) == x and b == b2 and len(b) == p['digits']
      assert verb.lower() in arith.VERBS[op]
      assert int(y) == (int(x0) + int(b) if op == '+' else int(x0) - int(b)) >= 0
      x = int(y)
    assert p['answer'] == (p['rationale'] + '\n' if lines else '') + f'#### {x}'
    assert p['final'] == str(x) and len(str(start)) == p['digits']
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
      exec(p['program'], {})   # our own generated straight-line code
    assert out.getvalue().strip() == p['final']


def test_steps_and_digits_ranges_are_covered():
  ps = arith.generate(400, seed=1, steps=(1, 3), digits=(1, 2))
  assert {p['steps'] for p in ps} == {1, 2, 3} and {p['digits'] for p in ps} == {1, 2}
  only_add = arith.generate(50, seed=1, ops='+')
  assert all(' - ' not in p['rationale'] for p in only_add)


def test_ablation_switch_on_a_hand_written_example():
  steps = [arith.Step('buys', 9, '+', 5, 14), arith.Step('loses', 14, '-', 9, 5)]
  assert arith.rationale(steps) == ['Buys 5: 9 + 5 = 14.', 'Loses 9: 14 - 9 = 5.']
  # one placeholder per value, in order of first appearance: 9 α, 5 β, 14 γ
  assert arith.rationale(steps, 'symbols') == ['Buys β: α + β = γ.', 'Loses α: γ - α = β.']
  assert arith.rationale(steps, 'patterns') == ['Buys 5: now 14.', 'Loses 9: now 5.']
  assert arith.rationale(steps, 'text') == ['9 + 5 = 14', '14 - 9 = 5']
  p = arith.build('Ann', 'She', 'pens', 9, steps, 1, 'text')
  assert p['question'] == 'Ann has 9 pens. She buys 5. She loses 9. How many pens now?'
  assert p['answer'] == '9 + 5 = 14\n14 - 9 = 5\n#### 5'
  assert p['program'] == 'x = 9\nx = x + 5\nx = x - 9\nprint(x)'


def test_ablated_generation_keeps_questions_and_answers():
  full = arith.generate(40, seed=2)
  for mode in ('symbols', 'patterns', 'text'):
    abl = arith.generate(40, seed=2, ablation=mode)
    assert [p['question'] for p in abl] == [p['question'] for p in full]
    assert [p['final'] for p in abl] == [p['final'] for p in full]
    assert all(p['answer'].endswith(f'#### {p["final"]}') for p in abl)
  assert all(not re.search(r'\d', p['rationale'])
             for p in arith.generate(40, seed=2, ablation='symbols'))


def test_bad_requests_are_one_sentence_errors():
  for kwargs in (dict(steps=(3, 1)), dict(digits=(0, 2)), dict(ops='*'), dict(ablation='all'),
                 dict(split='dev')):
    with pytest.raises(arith.ArithError):
      arith.generate(5, **kwargs)
  with pytest.raises(arith.ArithError, match='distinct'):
    arith.generate(10_000, steps=(0, 0), digits=(1, 1))   # only 8 names x 8 items x 9 starts exist


def test_gsm8k_format_reads_back_through_the_harness_reader(tmp_path):
  from experiments.evaluation import builtin
  ps = arith.generate(5, seed=0)
  path = tmp_path / 'p.jsonl'
  path.write_text(''.join(json.dumps(r) + '\n' for r in arith.to_gsm8k(ps)))
  docs, report = builtin.gsm8k(types.SimpleNamespace(path=str(path), query_template='{question}'))
  assert report['records'] == 5
  assert [d['answer'] for d in docs] == [p['final'] for p in ps]
  assert [d['query'] for d in docs] == [p['question'] for p in ps]
