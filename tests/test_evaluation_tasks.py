"""Evaluation tasks: answer extraction, few-shot demos, bad input at start-up, and the
`evaluate` experiment end to end with the reference model reaching every ceiling."""
import json
import os

import pytest
from ml_collections import ConfigDict

from data import tasks as data_tasks
from data.sources import CorpusError
from experiments import evaluate
from experiments.configs import evaluate as evaluate_config
from experiments.evaluation import answers, fewshot, tasks
from experiments.evaluation import model as em
from lm.config import ConfigError

GSM8K = os.path.join(os.path.dirname(__file__), 'data', 'gsm8k_sample.jsonl')


def test_gsm8k_strict_and_flexible_extraction():
  out = 'She has 3 + 4 = 7 apples.\n#### 7\n\nQuestion: next'
  assert answers.extract(out, 'strict') == '7' and answers.extract(out, 'flexible') == '7'
  loose = 'The answer is $1,250.'
  assert answers.extract(loose, 'strict') is None and answers.extract(loose, 'flexible') == '1,250'
  assert answers.extract('it fell to -7 degrees', 'flexible') == '-7'
  assert answers.extract('no number', 'flexible') is None
  assert answers.gsm8k_gold('... #### 2,050') == '2050'
  assert answers.extract('  Hamlet\nmore', 'first_line') == 'Hamlet'
  assert answers.extract('x = 42;', 'regex:x = (\\d+)') == '42'


def test_gsm8k_task_scores_strict_and_flexible_apart():
  cfg = tasks.preset('gsm8k', path=GSM8K)
  docs, report = tasks.load(cfg)
  assert len(docs) == 5 and report['records'] == 5 and docs[2]['answer'] == '2050'
  outputs = ['3 * 4 = 12 apples.\n#### 12', 'It costs 45 dollars.', 'They sold 2,050 eggs.\n#### 2,050',
             '#### 7', 'nothing']

  class Fixed:
    def generate_until(self, requests, references=None):
      return outputs
  m = tasks.run(cfg, docs, Fixed(), bootstrap_iters=50)['metrics']
  assert m['exact_match_strict']['value'] == pytest.approx(2 / 5)     # 12, 2,050
  assert m['exact_match_flexible']['value'] == pytest.approx(3 / 5)   # 12, 45, 2,050 (7 is wrong: -7)


WORDS = ['alpha', 'bravo', 'charlie', 'delta', 'echo', 'foxtrot', 'golf', 'hotel', 'india',
         'juliet', 'kilo', 'lima']


def _pool(n=12):
  return [{'id': f'd{i}', 'query': f'question {WORDS[i]} about {"cats" if i % 3 == 0 else "stocks"}',
           'target': 'x', 'answer': 'yes' if i % 2 else 'no'} for i in range(n)]


@pytest.mark.parametrize('how', fewshot.SAMPLERS)
def test_fewshot_never_demos_the_document_itself(how):
  pool = _pool()
  s = fewshot.Sampler(pool, 4, how, seed=3)
  for d in pool:
    picks = s.demos(d)
    assert len(picks) == 4 and len(set(picks)) == 4
    assert all(pool[i]['id'] != d['id'] for i in picks)
  assert fewshot.Sampler(pool, 20, how).demos(pool[0]).__len__() == 11   # all the others, at most


def test_fewshot_samplers_behave():
  pool = _pool()
  assert fewshot.Sampler(pool, 3, 'first_n').demos(pool[0]) == [1, 2, 3]
  a = fewshot.Sampler(pool, 3, 'random', seed=1).demos(pool[5])
  assert a == fewshot.Sampler(pool, 3, 'random', seed=1).demos(pool[5])              # seeded
  assert a != fewshot.Sampler(pool, 3, 'random', seed=2).demos(pool[5])
  labels = [pool[i]['answer'] for i in fewshot.Sampler(pool, 4, 'class_balanced').demos(pool[0])]
  assert sorted(labels) == ['no', 'no', 'yes', 'yes']
  near = fewshot.Sampler(pool, 3, 'bm25').demos({'id': 'q', 'query': 'cats golf'})
  assert near[-1] == 6 and all(int(pool[i]['id'][1:]) % 3 == 0 for i in near)


def test_demo_ids_logged_and_prompt_built(tmp_path):
  cfg = tasks.preset('gsm8k', path=GSM8K, fewshot=dict(k=2, sampler='first_n'))
  docs, _ = tasks.load(cfg)
  assert docs[0]['demo_ids'] == ['2', '3'] and docs[1]['demo_ids'] == ['1', '3']
  assert docs[0]['prompt'].startswith('Question: A book costs') and docs[0]['prompt'].endswith(
      docs[0]['query'])
  assert docs[0]['prompt'].count('####') == 2


def test_bad_input_fails_at_start_up_in_one_sentence(tmp_path):
  with pytest.raises(CorpusError, match='does not exist|No such|not found|exist'):
    tasks.load(tasks.preset('gsm8k', path=str(tmp_path / 'missing.jsonl')))
  empty = tmp_path / 'empty.jsonl'
  empty.write_text('')
  with pytest.raises(CorpusError, match='empty'):
    tasks.load(tasks.preset('gsm8k', path=str(empty)))
  with pytest.raises(ConfigError, match="metric 'acc' does not fit a generate task"):
    tasks.check(tasks.preset('gsm8k', path=GSM8K, metrics=('acc',)))
  with pytest.raises(ConfigError, match='pass@5 needs generation.n >= 5'):
    tasks.check(tasks.preset('humaneval', metrics=('pass@5',)))
  with pytest.raises(ConfigError, match='needs a path'):
    tasks.check(tasks.preset('gsm8k'))
  with pytest.raises(ConfigError, match='unknown metric'):
    tasks.check(tasks.preset('works_cloze', metrics=('f1_macro',)))


def test_bad_records_are_counted(tmp_path):
  f = tmp_path / 'mc.jsonl'
  rows = [{'q': 'Up or down?', 'choices': ['up', 'down'], 'gold': 0},
          {'q': 'Left?', 'choices': ['left'], 'gold': 0},               # one choice
          {'q': 'Yes?', 'choices': ['yes', 'no'], 'gold': 5},           # gold out of range
          {'choices': ['a', 'b'], 'gold': 1}]                            # no q
  f.write_text('\n'.join(json.dumps(r) for r in rows) + '\nnot json\n')
  cfg = tasks.task_config(name='mc', path=str(f), kind='multiple_choice', metrics=('acc', 'acc_norm'),
                          query_template='{q}')
  docs, report = tasks.load(cfg)
  assert len(docs) == 1 and report['skipped'] == {'bad_choices': 1, 'bad_gold': 1,
                                                   'template_field_missing': 1, 'bad_json': 1}
  f.write_text(json.dumps(rows[1]) + '\n')
  with pytest.raises(CorpusError, match='no usable documents'):
    tasks.load(cfg)


def test_evaluate_reference_reaches_every_ceiling(tmp_path):
  config = evaluate_config.get_config()
  config.tasks = ('works_cloze', 'works_ppl', 'works_instruct', 'gsm8k', 'humaneval')
  config.task.works_cloze.options.n = 20
  config.task.works_ppl.limit = 3
  config.task.works_instruct.options.n_per_family = 3
  config.task.gsm8k.path = GSM8K
  config.task.gsm8k.fewshot.k = 2
  config.task.humaneval.limit = 10
  config.bootstrap_iters = 100
  results = evaluate.run(config, str(tmp_path))
  assert results['works_cloze']['acc']['value'] == 1.0 and results['works_cloze']['acc_norm']['value'] == 1.0
  assert results['works_ppl']['bits_per_byte']['value'] == 0.0
  assert results['works_ppl']['word_perplexity']['value'] == 1.0
  n_instruct = 3 * len(data_tasks.FAMILIES)   # 3 held-out-play examples of every family
  assert results['works_instruct']['exact_match'] == {'value': 1.0, 'stderr': 0.0, 'n': n_instruct}
  assert results['gsm8k']['exact_match_strict']['value'] == 1.0
  assert results['gsm8k']['exact_match_flexible']['value'] == 1.0
  assert results['humaneval']['pass@1'] == {'value': 1.0, 'stderr': 0.0, 'n': 10}
  assert results['humaneval']['_report']['execution']['passed'] == 10
  saved = json.loads((tmp_path / 'results.json').read_text())
  assert saved['works_cloze']['acc']['n'] == 20
  samples = [json.loads(l) for l in (tmp_path / 'samples.jsonl').read_text().splitlines()]
  assert len(samples) == 20 + 3 + n_instruct + 5 + 10
  g = [s for s in samples if s['task'] == 'gsm8k']
  assert all(len(s['demo_ids']) == 2 and s['doc_id'] not in s['demo_ids'] for s in g)
  assert g[0]['extracted'] == {'strict': '12', 'flexible': '12'}


def test_evaluate_refuses_bad_config_before_loading(tmp_path):
  config = evaluate_config.get_config()
  config.tasks = ('nope',)
  with pytest.raises(ConfigError, match="Task 'nope' has no entry"):
    evaluate.run(config, str(tmp_path))
  config.tasks = ('works_ppl',)
  config.task.works_ppl.metrics = ('acc',)
  with pytest.raises(ConfigError, match='does not fit a rolling task'):
    evaluate.run(config, str(tmp_path))
  assert not os.listdir(tmp_path)
