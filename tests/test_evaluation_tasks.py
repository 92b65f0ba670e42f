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
from experiments.evaluation import answers, eval_tasks, fewshot
from experiments.evaluation import eval_model as em
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
  cfg = eval_tasks.preset('gsm8k', path=GSM8K)
  docs, report = eval_tasks.load(cfg)
  assert len(docs) == 5 and report['records'] == 5 and docs[2]['answer'] == '2050'
  outputs = ['3 * 4 = 12 apples.\n#### 12', 'It costs 45 dollars.', 'They sold 2,050 eggs.\n#### 2,050',
             '#### 7', 'nothing']

  class Fixed:
    def generate_until(self, requests, references=None):
      return outputs
  m = eval_tasks.run(cfg, docs, Fixed(), bootstrap_iters=50)['metrics']
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


@pytest.mark.parametrize('how', fewshot.SAMPLERS)
def test_fewshot_never_demos_a_copy_of_the_query_under_another_id(how):
  """A pool often holds the evaluated question again (another split, another id): the
  sampler matches by query text too, for every sampling method."""
  pool = _pool()
  doc = dict(pool[4], id='test-4')           # the same question as pool[4], another id
  for k in (3, 11):
    picks = fewshot.Sampler(pool, k, how, seed=3).demos(doc)
    assert 4 not in picks and len(picks) == k, (k, picks)


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
  cfg = eval_tasks.preset('gsm8k', path=GSM8K, fewshot=dict(k=2, sampler='first_n'))
  docs, _ = eval_tasks.load(cfg)
  assert docs[0]['demo_ids'] == ['2', '3'] and docs[1]['demo_ids'] == ['1', '3']
  assert docs[0]['prompt'].startswith('Question: A book costs') and docs[0]['prompt'].endswith(
      docs[0]['query'])
  assert docs[0]['prompt'].count('####') == 2


def test_fewshot_from_a_separate_file_keeps_the_demo_with_the_same_id(tmp_path):
  """A demonstration file numbers its records from 0 like the evaluated one: demo '0' is not
  document '0', so with fewshot.path every document gets the file's first k (first_n)."""
  lines = [json.loads(l) for l in open(GSM8K)]
  demo = tmp_path / 'demos.jsonl'
  demo.write_text(''.join(json.dumps({'question': f'Demo question {i}?', 'answer': f'So {i}.\n#### {i}'}) + '\n'
                          for i in range(3)))
  cfg = eval_tasks.preset('gsm8k', path=GSM8K, fewshot=dict(k=2, sampler='first_n', path=str(demo)))
  docs, _ = eval_tasks.load(cfg)
  assert len(docs) == len(lines)
  for d in docs:
    assert d['prompt'].startswith('Question: Demo question 0?'), d['id']
    assert d['prompt'].count('Demo question') == 2


def test_bad_input_fails_at_start_up_in_one_sentence(tmp_path):
  with pytest.raises(CorpusError, match='does not exist|No such|not found|exist'):
    eval_tasks.load(eval_tasks.preset('gsm8k', path=str(tmp_path / 'missing.jsonl')))
  empty = tmp_path / 'empty.jsonl'
  empty.write_text('')
  with pytest.raises(CorpusError, match='empty'):
    eval_tasks.load(eval_tasks.preset('gsm8k', path=str(empty)))
  with pytest.raises(ConfigError, match="metric 'acc' does not fit a generate task"):
    eval_tasks.check(eval_tasks.preset('gsm8k', path=GSM8K, metrics=('acc',)))
  with pytest.raises(ConfigError, match='pass@5 needs generation.n >= 5'):
    eval_tasks.check(eval_tasks.preset('humaneval', metrics=('pass@5',)))
  with pytest.raises(ConfigError, match='needs a path'):
    eval_tasks.check(eval_tasks.preset('gsm8k'))
  with pytest.raises(ConfigError, match='unknown metric'):
    eval_tasks.check(eval_tasks.preset('works_cloze', metrics=('f1_macro',)))


def test_bad_records_are_counted(tmp_path):
  f = tmp_path / 'mc.jsonl'
  rows = [{'q': 'Up or down?', 'choices': ['up', 'down'], 'gold': 0},
          {'q': 'Left?', 'choices': ['left'], 'gold': 0},               # one choice
          {'q': 'Yes?', 'choices': ['yes', 'no'], 'gold': 5},           # gold out of range
          {'choices': ['a', 'b'], 'gold': 1}]                            # no q
  f.write_text('\n'.join(json.dumps(r) for r in rows) + '\nnot json\n')
  cfg = eval_tasks.task_config(name='mc', path=str(f), kind='multiple_choice', metrics=('acc', 'acc_norm'),
                          query_template='{q}')
  docs, report = eval_tasks.load(cfg)
  assert len(docs) == 1 and report['skipped'] == {'bad_choices': 1, 'bad_gold': 1,
                                                   'template_field_missing': 1, 'bad_json': 1}
  f.write_text(json.dumps(rows[1]) + '\n')
  with pytest.raises(CorpusError, match='no usable documents'):
    eval_tasks.load(cfg)


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


# GSM8K gold answers, parsed apart from the extractors ---------------------------------------------
def test_gsm8k_gold_keeps_sign_commas_and_decimals():
  assert answers.gsm8k_gold('It fell by 1,300.\n#### -1,234') == '-1234'
  assert answers.gsm8k_gold('#### 3,000,000\n') == '3000000'
  assert answers.gsm8k_gold('#### $0.50') == '0.50'
  assert answers.gsm8k_gold('x #### 12 (wrong) \n#### 7.') == '7'   # the last '####' wins
  assert answers.gsm8k_gold('no final line') is None
  assert answers.gsm8k_gold('#### twelve') is None


def test_negative_and_comma_answers_score_against_the_final_line(tmp_path):
  f = tmp_path / 'neg.jsonl'
  rows = [('The account went 1,234 below zero.', 'So -1,234.\n#### -1,234'),
          ('It fell from 5 to -2.', '5 - 7 = -2\n#### -2'),
          ('Three million?', '#### 3,000,000')]
  f.write_text(''.join(json.dumps({'question': q, 'answer': a}) + '\n' for q, a in rows))
  cfg = eval_tasks.preset('gsm8k', path=str(f))
  docs, _ = eval_tasks.load(cfg)
  assert [d['answer'] for d in docs] == ['-1234', '-2', '3000000']
  outputs = ['It is below zero: -1,234.\n#### -1,234', 'fell to -2\n#### -2', '#### 3,000,000']

  class Fixed:
    def generate_until(self, requests, references=None):
      return list(outputs)
  m = eval_tasks.run(cfg, docs, Fixed(), bootstrap_iters=0)['metrics']
  assert m['exact_match_strict']['value'] == 1.0 and m['exact_match_flexible']['value'] == 1.0
  outputs[0] = '#### 1,234'   # the sign matters
  m = eval_tasks.run(cfg, docs, Fixed(), bootstrap_iters=0)['metrics']
  assert m['exact_match_strict']['value'] == pytest.approx(2 / 3)


# Task lists and tasks from the command line ----------------------------------------------------
def test_tasks_given_as_a_comma_list_and_the_error_shows_the_spellings(tmp_path):
  assert evaluate.task_names('works_cloze,gsm8k') == ['works_cloze', 'gsm8k']
  assert evaluate.task_names(('works_cloze', ' gsm8k')) == ['works_cloze', 'gsm8k']
  config = evaluate_config.get_config()
  with config.ignore_type():   # what --config.tasks=works_cloze,works_ppl gives: one string
    config.tasks = 'works_cloze,works_ppl'
  config.task.works_cloze.options.n = 5
  config.task.works_ppl.limit = 2
  config.bootstrap_iters = 10
  results = evaluate.run(config, str(tmp_path))
  assert results['works_cloze']['acc']['n'] == 5 and results['works_ppl']['perplexity']['n'] == 2
  with config.ignore_type():
    config.tasks = 'works_cloze,nope'
  with pytest.raises(ConfigError) as e:
    evaluate.run(config, str(tmp_path / 'x'))
  assert "Task 'nope'" in str(e.value) and '--config.tasks=works_cloze,gsm8k' in str(e.value)


def test_jsonl_task_defined_from_the_command_line_with_metric_options(tmp_path):
  import sacrebleu
  from rouge_score import rouge_scorer
  f = tmp_path / 'tr.jsonl'
  rows = [{'en': 'The dogs ran home.', 'fr': 'Les chiens sont rentrés.'},
          {'en': 'A cat sleeps.', 'fr': 'Un chat dort.'},
          {'en': 'The birds are singing.', 'fr': 'Les oiseaux chantent.'}]
  f.write_text(''.join(json.dumps(r) + '\n' for r in rows))
  config = evaluate_config.get_config()
  # what --config.task.jsonl.KEY=VALUE gives: strings, a literal backslash-n, a comma list
  t = config.task.jsonl
  with config.ignore_type():
    config.tasks, t.metrics = 'jsonl', 'bleu,rouge1'
  t.path, t.query_template, t.target_template = str(f), 'French: {fr}\\nEnglish:', '{en}'
  t.bleu.tokenize, t.bleu.lowercase, t.rouge.use_stemmer = 'char', True, False
  (cfg,) = evaluate.task_configs(config)
  assert cfg.metrics == ('bleu', 'rouge1')
  docs, _ = eval_tasks.load(cfg)
  assert docs[0]['prompt'] == 'French: Les chiens sont rentrés.\nEnglish:'
  outputs = ['the dog ran home', 'A cat is sleeping.', 'Birds sing.']

  class Fixed:
    def generate_until(self, requests, references=None):
      return outputs
  m = eval_tasks.run(cfg, docs, Fixed(), bootstrap_iters=0)['metrics']
  refs = [[r['en'] for r in rows]]
  assert m['bleu']['value'] == pytest.approx(
      sacrebleu.corpus_bleu(outputs, refs, tokenize='char', lowercase=True).score)
  assert m['bleu']['value'] != pytest.approx(sacrebleu.corpus_bleu(outputs, refs).score)
  scorer = rouge_scorer.RougeScorer(['rouge1'], use_stemmer=False)
  want = sum(scorer.score(r['en'], o)['rouge1'].fmeasure for r, o in zip(rows, outputs)) / 3
  assert m['rouge1']['value'] == pytest.approx(want)
  t.bleu.tokenize = 'spm'
  with pytest.raises(ConfigError, match='bleu.tokenize'):
    evaluate.task_configs(config)
  config.task.jsonl_2.path = str(f)
  config.tasks = 'jsonl_2'
  with pytest.raises(ConfigError, match='query_template'):
    evaluate.task_configs(config)


# A task that cannot run, or fails, leaves the others' results ----------------------------------
def test_a_failing_task_is_named_with_its_key_and_the_others_are_written(tmp_path, monkeypatch):
  config = evaluate_config.get_config()
  config.tasks = ('works_cloze', 'works_ppl')
  config.task.works_cloze.options.n = 5
  config.task.works_ppl.limit = 2
  config.bootstrap_iters = 10
  real = eval_tasks.run

  def broken(cfg, *a, **k):
    if cfg.name == 'works_cloze':
      raise RuntimeError('device out of memory')
    return real(cfg, *a, **k)
  monkeypatch.setattr(eval_tasks, 'run', broken)
  with pytest.raises(ConfigError) as e:
    evaluate.run(config, str(tmp_path))
  assert 'works_cloze' in str(e.value) and 'results.json' in str(e.value)
  saved = json.loads((tmp_path / 'results.json').read_text())
  assert saved['works_ppl']['perplexity']['n'] == 2 and 'works_cloze' not in saved
  failure = saved['_meta']['failed']['works_cloze']
  assert 'device out of memory' in failure and '--config.task.works_cloze' in failure


def test_skip_and_truncation_counts_are_printed(tmp_path, capsys):
  line = evaluate.counts_line('mc', {'documents': 2, 'records': 2, 'skipped': {'bad_json': 1, 'bad_gold': 0},
                                     'prompts': 8, 'truncated': 8})
  assert line == "mc: 2 documents, skipped records: {'bad_json': 1}, 8 of 8 prompts truncated"

  class Truncating(em.ReferenceModel):   # the counts a LanguageModel keeps
    max_length = 16

    def __init__(self):
      self.stats = {'truncated': 0, 'prompts': 0}

    def loglikelihood(self, requests, references=None):
      self.stats['prompts'] += len(requests)
      self.stats['truncated'] += len(requests) // 2
      return super().loglikelihood(requests, references)
  config = evaluate_config.get_config()
  cfg = eval_tasks.preset('works_cloze', options=dict(n=3))
  docs, report = eval_tasks.load(cfg)
  out = evaluate.run_task(config, cfg, docs, report, Truncating())
  assert (out['report']['prompts'], out['report']['truncated']) == (12, 6)
  printed = capsys.readouterr().out
  assert 'works_cloze: 3 documents, no records skipped, 6 of 12 prompts truncated' in printed
  assert 'warning: task works_cloze: 6 of 12 prompts (50%) lost their oldest tokens' in printed


def test_jsonl_task_and_task_list_from_the_real_command_line(tmp_path):
  import subprocess
  import sys
  f = tmp_path / 'qa.jsonl'
  f.write_text('{"q": "2+2?", "a": "4"}\n{"q": "Capital of France?", "a": "Paris"}\nnot json\n')
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  r = subprocess.run(
      [sys.executable, '-m', 'experiments.run', '--config=experiments/configs/evaluate.py',
       f'--workdir={tmp_path / "w"}', '--config.tasks=jsonl,works_cloze', f'--config.task.jsonl.path={f}',
       '--config.task.jsonl.query_template=Q: {q}\\nA:', '--config.task.jsonl.target_template={a}',
       '--config.task.jsonl.metrics=exact_match,bleu', '--config.task.jsonl.bleu.tokenize=char',
       '--config.task.jsonl.generation.until=\\n', '--config.task.works_cloze.options.n=3',
       '--config.bootstrap_iters=10'],
      cwd=root, capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stderr[-2000:]
  saved = json.loads((tmp_path / 'w' / 'results.json').read_text())
  assert saved['jsonl']['exact_match']['n'] == 2 and saved['jsonl']['bleu']['value'] == pytest.approx(100)
  assert saved['works_cloze']['acc']['n'] == 3
  assert "jsonl: 2 documents, skipped records: {'bad_json': 1}" in r.stdout
  sample = json.loads((tmp_path / 'w' / 'samples.jsonl').read_text().splitlines()[0])
  assert sample['prompt'] == 'Q: 2+2?\nA:'
