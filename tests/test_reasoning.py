"""The reasoning lab (experiments/reasoning.py, experiment `reasoning`): the pass@k curves against
hand arithmetic and brute-force enumeration of k-subsets, greedy accuracy / pass@k / length on
a scripted model whose answers are known, an end-to-end run on a tiny random policy with an
RL run's logs, start-up checks, and (slow) rlvr_gsm8k's GRPO from a random-weight hf: folder
on a 4-line GSM8K-format file."""
import itertools
import json
import math
import os
import re

import numpy as np
import pytest
from ml_collections import ConfigDict

from experiments import reasoning
from experiments.configs import reasoning_arith
from experiments.stages import passk, reasoning_report
from lm.config import ConfigError


# pass@k ------------------------------------------------------------------------------------------
def brute_pass_at_k(correct: list[bool], k: int) -> float:
  """The fraction of the k-subsets of the samples that hold at least one correct one."""
  subsets = list(itertools.combinations(range(len(correct)), k))
  return sum(any(correct[i] for i in s) for s in subsets) / len(subsets)


def test_pass_at_k_curve_by_hand():
  # n=4: c=1, k=2 -> 1 - C(3,2)/C(4,2) = 1 - 3/6; c=2, k=2 -> 1 - 1/6; c=0 -> 0; k=4, c>0 -> 1
  assert passk.curve([1], 4, [1, 2, 4]) == pytest.approx({1: 0.25, 2: 0.5, 4: 1.0})
  assert passk.curve([2, 0], 4, [1, 2, 4]) == pytest.approx({1: 0.25, 2: 5 / 12, 4: 0.5})
  # n=5, c=2, k=2: 1 - C(3,2)/C(5,2) = 1 - 3/10
  assert passk.curve([2], 5, [2]) == pytest.approx({2: 0.7})


def test_pass_at_k_curve_matches_enumerating_subsets():
  rng = np.random.default_rng(0)
  n = 8
  samples = [list(rng.random(n) < p) for p in (0.0, 0.1, 0.3, 0.6, 1.0, 0.2)]
  ks = passk.powers_of_two(n)
  got = passk.curve([sum(s) for s in samples], n, ks)
  for k in ks:
    want = np.mean([brute_pass_at_k(s, k) for s in samples])
    assert got[k] == pytest.approx(want, abs=1e-12), k


def test_powers_of_two_and_groups():
  assert passk.powers_of_two(256) == [1, 2, 4, 8, 16, 32, 64, 128, 256]
  assert passk.powers_of_two(100) == [1, 2, 4, 8, 16, 32, 64]
  assert passk.powers_of_two(256, max_k=8) == [1, 2, 4, 8]
  assert passk.powers_of_two(1) == [1]
  recs = [{'steps': 2, 'n_correct': 1}, {'steps': 1, 'n_correct': 4}, {'steps': 2, 'n_correct': 0}]
  by = passk.curve_by(recs, 'steps', 4, [1, 2])
  assert list(by) == [1, 2]
  assert by[1] == pytest.approx({1: 1.0, 2: 1.0})
  assert by[2] == pytest.approx({1: 0.125, 2: 0.25})      # (1/4 + 0) / 2, (1/2 + 0) / 2
  m = passk.mean_and_stderr([1.0, 0.0, 0.0, 1.0])
  assert m['value'] == 0.5 and m['stderr'] == pytest.approx(math.sqrt(0.25 / 4))


# One policy on a scripted model ------------------------------------------------------------------
PROBLEMS = [
    {'id': 'p0', 'question': 'Ann has 2 pens. She buys 3. How many pens now?', 'final': '5',
     'steps': 1, 'digits': 1},
    {'id': 'p1', 'question': 'Tom has 9 cups. He eats 4. She buys 1. How many cups now?', 'final': '6',
     'steps': 2, 'digits': 1},
    {'id': 'p2', 'question': 'Mia has 10 toys. She wins 20. He loses 5. How many toys now?', 'final': '25',
     'steps': 2, 'digits': 2},
]
GREEDY = {'p0': 'x\n#### 5', 'p1': '#### 7', 'p2': 'no answer'}     # right, wrong, unparsable
SAMPLED = {'p0': ['#### 5', '#### 4', '#### 5.0', 'none'],           # 2 of 4 right
           'p1': ['#### 7', '#### 8', '#### 7', '#### 7'],           # 0 of 4
           'p2': ['#### 25', '#### 25', '#### 25', '#### 25']}       # 4 of 4


class ScriptLM:
  """Answers each prompt from GREEDY (temperature 0) or the next of SAMPLED, by question."""

  def __init__(self):
    self.seen = {p['id']: 0 for p in PROBLEMS}
    self.requests = []

  def generate_until(self, requests):
    out = []
    for prompt, kw in requests:
      self.requests.append((prompt, kw))
      pid = next(p['id'] for p in PROBLEMS if p['question'] in prompt)
      if kw['temperature'] == 0:
        out.append(GREEDY[pid])
      else:
        out.append(SAMPLED[pid][self.seen[pid]])
        self.seen[pid] += 1
    return out


def lab_config(n=4, **over):
  c = reasoning_arith.get_config()
  c.sampling.n = n
  c.sampling.max_k = 0
  for k, v in over.items():
    c[k].update(v)
  return c


def test_greedy_accuracy_pass_at_k_and_length_on_a_scripted_model():
  lm = ScriptLM()
  res, recs = reasoning.evaluate(lab_config(), lm, [], PROBLEMS)
  # the RL prompt: the CoT query with no demonstrations; blank line ends an answer
  assert lm.requests[0][0] == 'Q: Ann has 2 pens. She buys 3. How many pens now?\nA:\n'
  assert lm.requests[0][1]['until'] == ['\n\n'] and lm.requests[0][1]['max_new_tokens'] == 96
  assert sum(kw['temperature'] == 1.0 for _, kw in lm.requests) == 12
  assert res['greedy']['value'] == pytest.approx(1 / 3)
  assert res['greedy']['stderr'] == pytest.approx(math.sqrt((2 / 9) / 3))
  assert res['greedy_by_steps'] == {1: 1.0, 2: 0.0}
  assert res['greedy_by_digits'] == {1: 0.5, 2: 0.0}
  assert [r['n_correct'] for r in recs] == [2, 0, 4]
  # per problem pass@2: 1 - C(2,2)/C(4,2) = 5/6, 0, 1
  assert res['pass_at_k'] == pytest.approx({1: (0.5 + 0 + 1) / 3, 2: (5 / 6 + 0 + 1) / 3, 4: 2 / 3})
  assert res['pass_at_k_by_steps'][1] == pytest.approx({1: 0.5, 2: 5 / 6, 4: 1.0})
  assert res['pass_at_k_by_digits'][2] == pytest.approx({1: 1.0, 2: 1.0, 4: 1.0})
  assert res['sample_accuracy'] == pytest.approx(6 / 12)
  assert res['unparsable'] == {'greedy': 1, 'sampled': 1}
  # no encode: lengths in characters
  assert res['length']['greedy'] == pytest.approx((8 + 6 + 9) / 3)
  assert res['length']['sampled'] == pytest.approx((6 + 6 + 8 + 4 + 6 * 4 + 7 * 4) / 12)


def test_rl_curves_read_back_an_rl_runs_logs(tmp_path):
  (tmp_path / 'metrics.jsonl').write_text(
      '\n'.join(json.dumps({'step': i, 'reward/answer': a, 'loss': 0.1}) for i, a in
                [(2, 0.3), (1, 0.2)]) + '\n')
  (tmp_path / 'eval.jsonl').write_text(
      json.dumps({'iteration': 0, 'reward/answer': 0.1}) + '\n'
      + json.dumps({'iteration': 2, 'reward/answer': 0.4, 'gold': 0}) + '\n')
  got = reasoning_report.rl_curves(str(tmp_path))
  assert got == {'train': [(1, 0.2), (2, 0.3)], 'held_out': [(0, 0.1), (2, 0.4)]}
  assert reasoning_report.rl_curves(str(tmp_path / 'none')) == {'train': [], 'held_out': []}
  assert reasoning_report.plot_iterations({'base': {'train': [], 'held_out': []}},
                                          str(tmp_path / 'x.png')) is None
  assert reasoning_report.plot_iterations({'grpo': got}, str(tmp_path / 'x.png'))
  assert (tmp_path / 'x.png').exists()


# Start-up checks ---------------------------------------------------------------------------------
@pytest.mark.parametrize('change, words', [
    (lambda c: c.policies.update({'base': '/nonexistent/run'}), 'policies.base'),
    (lambda c: c.sampling.update({'n': 0}), 'sampling.n'),
    (lambda c: c.sampling.update({'temperature': 0.0}), 'sampling.temperature'),
    (lambda c: c.prompt.update({'extract': 'bogus'}), 'prompt.extract'),
    (lambda c: c.data.update({'source': 'web'}), 'data.source'),
])
def test_bad_settings_fail_in_one_sentence(tmp_path, change, words):
  (tmp_path / 'config.json').write_text('{}')
  c = lab_config()
  c.policies = ConfigDict({'base': str(tmp_path)})
  change(c)
  with pytest.raises(ConfigError, match=words.replace('.', r'\.')):
    reasoning.check(c)


# End to end on a tiny random policy ----------------------------------------------------------------
def test_the_lab_end_to_end_on_a_tiny_policy_with_rl_logs(tmp_path):
  from data import arith
  from tests import rl_fixtures
  chars = ''.join(sorted({ch for p in arith.generate(200, seed=0, steps=(1, 3), digits=(1, 2))
                          for ch in 'Q: \nA:#' + p['question'] + p['answer']}))
  pol = rl_fixtures.policy_run(tmp_path / 'pol', text=chars, max_seq_len=128, positions='rope')
  (tmp_path / 'pol' / 'eval.jsonl').write_text(json.dumps({'iteration': 3, 'reward/answer': 0.25}) + '\n')
  c = lab_config(n=4, data={'n_eval': 3}, prompt={'max_new_tokens': 8})
  c.policies = ConfigDict({'base': pol, 'again': pol})
  c.eval.batch_size = 8
  out = reasoning.run(c, str(tmp_path / 'lab'))
  for f in ('results.json', 'samples.jsonl', 'reasoning.txt', 'passk.png', 'iterations.png', 'config.json'):
    assert (tmp_path / 'lab' / f).exists(), f
  res = json.loads((tmp_path / 'lab' / 'results.json').read_text())
  assert set(res) == {'base', 'again', '_meta'} and res['_meta']['ks'] == [1, 2, 4]
  recs = [json.loads(l) for l in (tmp_path / 'lab' / 'samples.jsonl').read_text().splitlines()]
  assert len(recs) == 6 and all(len(r['samples']) == 4 for r in recs)
  for name in ('base', 'again'):
    mine = [r for r in recs if r['policy'] == name]
    # n_correct recounted from the texts; pass@1 = the mean fraction correct (c / n)
    for r in mine:
      assert r['n_correct'] == sum(bool(m) and m.group(1) == r['gold'] for m in
                                   (re.search(r'#### (-?[0-9]+)', s) for s in r['samples']))
    assert res[name]['pass_at_k']['1'] == pytest.approx(np.mean([r['n_correct'] / 4 for r in mine]))
    assert res[name]['rl_curves']['held_out'] == [[3, 0.25]]
  # the same policy, the same greedy answers
  assert [r['greedy'] for r in recs[:3]] == [r['greedy'] for r in recs[3:]]
  assert out['base']['greedy']['n'] == 3


# rlvr_gsm8k from a Hugging Face folder ---------------------------------------------------------------
GSM8K = [{'question': 'Ann has 2 pens and buys 3. How many pens?', 'answer': '2 + 3 = 5\n#### 5'},
         {'question': 'Tom has 9 cups and eats 4. How many cups?', 'answer': '9 - 4 = 5\n#### 5'},
         {'question': 'Mia has 7 toys and wins 2. How many toys?', 'answer': '7 + 2 = 9\n#### 9'},
         {'question': 'Sam has 6 eggs and loses 1. How many eggs?', 'answer': '6 - 1 = 5\n#### 5'}]


@pytest.mark.slow   # GRPO and the lab from a random-weight hf: folder (~1 min)
def test_rlvr_gsm8k_from_an_hf_folder_then_the_lab(tmp_path):
  """rlvr_gsm8k.py as shipped, given only init_from=hf:FOLDER and prompts.path (a 4-line GSM8K
  file, 2 held out): one GRPO iteration with the answer + format rules, then the reasoning lab
  on the file's first two problems, base (hf:) beside the GRPO run."""
  pytest.importorskip('transformers')
  from experiments import grpo
  from experiments.configs import rlvr_gsm8k
  from tests.test_hf_chat import hf_folder
  folder = hf_folder(tmp_path / 'hf')
  data = tmp_path / 'gsm8k.jsonl'
  data.write_text(''.join(json.dumps(r) + '\n' for r in GSM8K))
  c = rlvr_gsm8k.get_config()
  c.init_from, c.prompts.path = f'hf:{folder}', str(data)
  c.prompts.update(n_eval=2)
  c.rollout.update(prompts=2, samples=4, max_new_tokens=6)   # 8 rows: one per fake device
  c.train.update(iterations=1, minibatches=1, checkpoint_every=1)
  c.eval.update(every=1, batch_size=8)
  out = grpo.run(c, str(tmp_path / 'grpo'))
  assert out['stage'] == 'grpo' and out['after']['iteration'] == 1
  rows = [json.loads(l) for l in (tmp_path / 'grpo' / 'metrics.jsonl').read_text().splitlines()]
  assert [r['step'] for r in rows] == [1]
  assert {'reward/answer', 'reward/format', 'reward/total'} <= set(rows[0])
  assert 0.0 <= rows[0]['reward/answer'] <= 1.0 and np.isfinite(rows[0]['loss'])

  lab = reasoning_arith.get_config()
  lab.policies = ConfigDict({'base': f'hf:{folder}', 'grpo': str(tmp_path / 'grpo')})
  lab.data.update(source='gsm8k', path=str(data), n_eval=2)
  lab.prompt.update(question="Question: {question}\nAnswer: Let's think step by step.", max_new_tokens=6)
  lab.sampling.update(n=2)
  lab.eval.update(batch_size=8)
  res = reasoning.run(lab, str(tmp_path / 'lab'))
  assert res['base']['n'] == res['grpo']['n'] == 2
  assert res['grpo']['run']['experiment'] == 'grpo'
  assert len(res['grpo']['rl_curves']['train']) == 1
