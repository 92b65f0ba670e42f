"""Tool use: the ReAct parser and loop (scripted models), tools, BM25 and recall@k by hand,
bad collections, the works-QA testbed, and the training-format renderer."""
import json
import math

import numpy as np
import pytest
from ml_collections import ConfigDict

from data import tokenizers, works_qa
from experiments import tools as tools_exp
from experiments.configs import tools_works
from experiments.evaluation import react, retrieval
from lm.config import ConfigError

DOCS = [retrieval.Passage('Alpha | Ann', ('the red fox runs', 'over the hill today', 'and sleeps')),
        retrieval.Passage('Beta | Bob', ('a blue bird sings', 'in the morning light')),
        retrieval.Passage('Gamma | Cy', ('seven and five', 'make twelve'))]


def env():
  return react.Env(DOCS, retrieval.BM25Index([d.text for d in DOCS]), obs_lines=1)


# Parser -----------------------------------------------------------------------------------------
def test_parse_well_formed_malformed_unknown():
  s = react.parse_step(' I should look.\nAction: search[red fox]\nObservation: ignored')
  assert (s.thought, s.tool, s.arg, s.error) == (' I should look.', 'search', 'red fox', None)
  assert react.parse_step(' no action here at all').error == 'malformed'
  assert react.parse_step(' x\nAction: search red fox').error == 'malformed'        # no brackets
  assert react.parse_step(' x\nAction: [red fox]').error == 'malformed'             # no tool name
  s = react.parse_step(' x\nAction: google[red fox]')
  assert (s.tool, s.arg, s.error) == ('google', 'red fox', 'unknown_tool')
  # the first action line counts; a later one is ignored
  assert react.parse_step(' x\nAction: finish[a]\nAction: search[b]').tool == 'finish'


def scripted(outputs):
  """A fake model: each call answers every prompt with the next canned text (cut at the
  stop string, as generate_until would), recording the prompts it saw."""
  calls = []

  def generate(prompts):
    calls.append(list(prompts))
    return [outputs[len(calls) - 1].split(react.STOP)[0] for _ in prompts]
  return generate, calls


def test_episode_transcript_and_answer():
  gen, calls = scripted([' Find it.\nAction: search[blue bird]\nObservation: made up',
                         ' Look closer.\nAction: lookup[bird]',
                         ' Got it.\nAction: finish[Beta]'])
  ep, = react.run_episodes(gen, ['Question: Which doc sings?\n'], env(), max_steps=5)
  assert ep.text == ('Thought: Find it.\nAction: search[blue bird]\nObservation: [Beta | Bob] a blue bird sings\n'
                     'Thought: Look closer.\nAction: lookup[bird]\nObservation: (Result 1 / 1) a blue bird sings / in the morning light\n'
                     'Thought: Got it.\nAction: finish[Beta]')
  assert (ep.answer, ep.stop, ep.steps, ep.counts) == ('Beta', 'finish', 3, {'malformed': 0, 'unknown_tool': 0})
  # every step's prompt is the transcript so far plus 'Thought:'
  assert calls[1][0] == 'Question: Which doc sings?\n' + ep.text.split('Thought: Look')[0] + 'Thought:'


def test_episode_counts_bad_actions_and_step_limit():
  gen, _ = scripted([' hmm', ' x\nAction: google[fox]', ' x\nAction: search[fox]'])
  ep, = react.run_episodes(gen, ['Question: q\n'], env(), max_steps=3)
  assert ep.counts == {'malformed': 1, 'unknown_tool': 1}
  assert (ep.answer, ep.stop, ep.steps) == (None, 'step_limit', 3)
  assert 'Observation: Invalid action;' in ep.text and 'Observation: Unknown tool google;' in ep.text
  assert ep.text.endswith('Observation: [Alpha | Ann] the red fox runs\n')


def test_episodes_run_in_lockstep_and_stop_when_done():
  outs = {0: [' a\nAction: finish[x]'], 1: [' b\nAction: search[fox]', ' c\nAction: finish[y]']}
  seen = []

  def gen(prompts):
    seen.append(len(prompts))
    return [outs[0 if 'q0' in p else 1][p.count('Thought:') - 1] for p in prompts]
  eps = react.run_episodes(gen, ['Question: q0\n', 'Question: q1\n'], env(), max_steps=4)
  assert [e.answer for e in eps] == ['x', 'y'] and seen == [2, 1]   # one call per step, active only


# Tools ------------------------------------------------------------------------------------------
def test_calculate_is_arithmetic_only():
  e = env()
  assert react.calculate(e, '2 + 3 * (4 - 1)') == '11'
  assert react.calculate(e, '7 / 2') == '3.5' and react.calculate(e, '1,000 * 2') == '2000'
  assert react.calculate(e, '-2 ** 2') == '-4'
  for bad in ('__import__("os").system("true")', 'x + 1', '9 ** 9 ** 9', '1 / 0', 'open("f")', '2 +'):
    assert react.calculate(e, bad).startswith('Invalid expression'), bad


def test_search_and_lookup():
  e = env()
  assert react.lookup(e, 'fox') == 'No document yet; search first.'
  assert react.search(e, 'fox hill') == '[Alpha | Ann] the red fox runs'
  assert react.lookup(e, 'the hill') == '(Result 1 / 2) over the hill today / and sleeps'
  assert react.lookup(e, 'the hill') == '(Result 2 / 2) the red fox runs / over the hill today'
  assert react.lookup(e, 'the hill') == 'No more results.'
  assert react.search(e, 'zebra') == 'No results.'


def test_registry_adds_plain_functions():
  reg = react.register('shout', lambda env, arg: arg.upper(), dict(react.TOOLS))
  gen, _ = scripted([' x\nAction: shout[hi]', ' y\nAction: finish[HI]'])
  ep, = react.run_episodes(gen, ['Question: q\n'], env(), tools=reg)
  assert 'Observation: HI\n' in ep.text and ep.answer == 'HI' and 'shout' not in react.TOOLS


# Retrieval --------------------------------------------------------------------------------------
def test_bm25_by_hand():
  idx = retrieval.BM25Index(['a b c', 'a a d', 'e'], k1=1.5, b=0.75)
  idf = math.log(1 + (3 - 2 + 0.5) / (2 + 0.5))    # 'a' is in 2 of 3 documents
  norm = 1.5 * (1 - 0.75 + 0.75 * 3 / (7 / 3))     # both have 3 tokens; avgdl = 7/3
  want = [idf * 1 / (1 + norm), idf * 2 / (2 + norm), 0.0]
  np.testing.assert_allclose(idx.scores('a'), want, rtol=1e-5)
  assert [i for i, _ in idx.search('A!', k=3)] == [1, 0]   # zero-score documents are not hits
  # ties go to the lower index; 'zz' is unknown: no hits
  assert [i for i, _ in retrieval.BM25Index(['x y', 'x y']).search('x', 2)] == [0, 1]
  assert idx.search('zz') == []


def test_recall_at_k_by_hand():
  ranked = [[3, 1, 2], [0, 4, 5], [7, 8, 9]]
  gold = [{1}, {5, 6}, set()]
  assert [retrieval.recall_at_k(ranked, gold, k) for k in (1, 2, 3)] == [0.0, 1 / 3, 2 / 3]


def test_dense_index_cosine():
  vecs = np.array([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]])
  idx = retrieval.DenseIndex(vecs, lambda texts: np.array([[0.0, 1.0] if t == 'up' else [1.0, 0.1]
                                                           for t in texts]))
  assert [i for i, _ in idx.search('up', 3)] == [1, 2, 0]
  assert [i for i, _ in idx.search('right', 2)] == [0, 2]


def test_empty_or_missing_collection_is_one_sentence(tmp_path):
  for make in (lambda: retrieval.BM25Index([]),
               lambda: retrieval.DenseIndex(np.zeros((0, 4)), None),
               lambda: retrieval.load_collection(str(tmp_path / 'nope.jsonl'))):
    with pytest.raises(ConfigError) as e:
      make()
    assert str(e.value).count('.') <= 2 and '\n' not in str(e.value)
  path = tmp_path / 'c.jsonl'
  path.write_text('not json\n{"title": "t"}\n{"text": ""}\n')
  with pytest.raises(ConfigError, match='holds no documents'):
    retrieval.load_collection(str(path))
  path.write_text('not json\n' + json.dumps({'title': 'T', 'text': 'one\n\ntwo'}) + '\n')
  docs, report = retrieval.load_collection(str(path))
  assert docs == [retrieval.Passage('T', ('one', 'two'))] and report == {'skipped': 1}


def test_snippet_and_gold_docs():
  assert retrieval.snippet(DOCS[0].lines, 'Over the HILL') == 'over the hill today / and sleeps'
  assert retrieval.snippet(DOCS[0].lines, 'zebra') == 'the red fox runs / over the hill today'
  assert retrieval.gold_docs(DOCS, ['The  red fox runs', 'nowhere']) == [{0}, set()]


# The testbed ------------------------------------------------------------------------------------
def test_works_qa_questions_split_and_answers():
  docs = works_qa.collection()
  train = works_qa.questions(docs, 'train', n_per_family=30)
  held = works_qa.questions(docs, 'eval', n_per_family=30)
  assert train == works_qa.questions(docs, 'train', n_per_family=30)    # deterministic
  assert {q['doc_id'] for q in train}.isdisjoint({q['doc_id'] for q in held})
  assert len(held) == 90 and {q['family'] for q in held} == set(works_qa.FAMILIES)
  for q in train + held:
    d = docs[q['doc_id']]
    i = d.lines.index(q['quote'])
    want = {'play': d.play, 'speaker': d.speaker, 'next': d.lines[min(i + 1, len(d.lines) - 1)]}
    assert q['answer'] == want[q['family']] and q['quote'] in q['question']
  with pytest.raises(Exception, match='Unknown works_qa families'):
    works_qa.questions(docs, families=['poem'])


def test_gold_trajectory_through_the_tools():
  q = {'family': 'next', 'quote': 'over the hill today', 'answer': 'and sleeps'}
  segs, seen = react.gold_trajectory(works_qa.gold_plan(q), q['answer'], env())
  text = ''.join(s for s, _ in segs)
  assert seen and text == (
      'Thought: I need to search for the line.\nAction: search[over the hill today]\n'
      'Observation: [Alpha | Ann] the red fox runs\n'
      'Thought: I need to look up the line in this speech.\nAction: lookup[over the hill today]\n'
      'Observation: (Result 1 / 2) over the hill today / and sleeps\n'
      'Thought: I found the next line.\nAction: finish[and sleeps]')
  assert all(learned == (not s.startswith(' [') and not s.startswith(' (') and s != 'Thought:')
             for s, learned in segs)
  _, seen = react.gold_trajectory(works_qa.gold_plan({**q, 'family': 'play', 'answer': 'Omega'}),
                                  'Omega', env())
  assert not seen   # the tools never showed 'Omega': such a trajectory is dropped


def test_render_learns_only_model_segments():
  tok = tokenizers.CharTokenizer.from_texts(['Question: q\nAnswer: yes no'])
  ex = tools_exp.render([('Question: q\nAnswer:', False), (' yes', True)], tok, 64)
  bos = tok.special_ids.get('bos') is not None
  n_prompt = len('Question: q\nAnswer:') + bos
  assert ex.loss_mask.tolist() == [0] * n_prompt + [1] * (len(' yes') + (tok.eos_id is not None))
  assert tools_exp.render([('Question: q', False), (' yes', True)], tok, 5) is None   # too long


def test_config_errors_at_start_up():
  for key, value in (('methods', ('closed_book', 'oracle')), ('data.families', 'play,poem'),
                     ('max_steps', 0), ('train.steps', 0)):
    c = tools_works.get_config()
    c.update_from_flattened_dict({key: value})
    with pytest.raises(ConfigError):
      tools_exp.check(c)
  tools_exp.check(tools_works.get_config())


def test_normalize_answers():
  assert tools_exp.normalize('  "Hamlet." ') == tools_exp.normalize('hamlet') == 'hamlet'
  assert tools_exp.normalize(None) == ''


def test_mean_pooled_ignores_padding_and_batching():
  import jax
  from experiments.evaluation import eval_model
  from lm import model
  from lm.config import ModelConfig
  tok = tokenizers.CharTokenizer.from_texts(['abcdefgh xyz'])
  cfg = ModelConfig(vocab_size=tok.vocab_size, d_model=16, n_layers=1, n_heads=2, max_seq_len=32)
  lm = eval_model.LanguageModel(model.init(cfg, jax.random.key(0)), cfg, tok, batch_size=2)
  texts = ['abc', 'defgh xy', 'z']
  got = retrieval.mean_pooled(lm, texts)
  for t, row in zip(texts, got):   # naive: one unpadded text at a time
    h, _ = model.hidden_states(lm.params, np.asarray([tok.encode(t)]), cfg)
    np.testing.assert_allclose(row, np.asarray(h[0]).mean(0), rtol=1e-5, atol=1e-6)


def test_tools_qa_end_to_end(tmp_path):
  c = tools_works.get_config()
  c.update_from_flattened_dict(over := {
      'data.plays': 'Macbeth,The Tempest', 'data.n_train': 12, 'data.n_eval': 2, 'tokenizer': 'char',
      'model.d_model': 16, 'model.n_layers': 1, 'model.n_heads': 2, 'model.d_ff': 32,
      'model.max_seq_len': 512, 'seq_len': 512, 'train.steps': 2, 'train.batch_size': 8,
      'train.log_every': 1, 'max_steps': 2, 'max_step_tokens': 6, 'max_answer_tokens': 4,
      'batch_size': 8, 'dense': True, 'recall_k': (1, 3)})
  res = tools_exp.run(c, str(tmp_path))
  for m in ('closed_book', 'rag', 'react', 'react_oracle'):
    assert res[m]['all']['n'] == 6 and 0 <= res[m]['all']['value'] <= 1
  rec = res['_retrieval']['recall_at_k']
  assert set(rec['bm25']) == set(rec['dense']) == {'1', '3'} and rec['bm25']['3'] >= rec['bm25']['1']
  assert res['_react']['episodes'] == 6 and res['_react']['steps'] <= 12
  assert res['_react']['finished'] + res['_react']['step_limit'] == 6
  rows = [json.loads(l) for l in (tmp_path / 'samples.jsonl').read_text().splitlines()]
  assert len(rows) == 6 and all(r['react_transcript'].startswith('Question: ') for r in rows)
  assert all(r['rag_prompt'].startswith('Passage: [') for r in rows)
  assert (tmp_path / 'tools_qa.png').stat().st_size > 0
  assert json.loads((tmp_path / 'results.json').read_text())['_meta']['documents'] == res['_meta']['documents']
  # the workdir is a model source: evaluated again without training, the same greedy answers
  c2 = tools_works.get_config()
  c2.update_from_flattened_dict({k: v for k, v in over.items() if not k.startswith('model.')} | {
      'init_from': str(tmp_path), 'train.steps': 0, 'methods': ('closed_book',), 'dense': False})
  again = tools_exp.run(c2, str(tmp_path / 'again'))
  assert again['closed_book'] == res['closed_book']
  outs = [json.loads(l)['closed_book_output'] for l in (tmp_path / 'again' / 'samples.jsonl').read_text().splitlines()]
  assert outs == [r['closed_book_output'] for r in rows]


def test_batch_rows_are_pure_epochs():
  got = [tools_exp.batch_rows(3, s, 4, 10) for s in range(5)]   # 20 rows = two epochs of 10
  assert all(np.array_equal(g, tools_exp.batch_rows(3, s, 4, 10)) for s, g in enumerate(got))
  flat = np.concatenate(got)
  assert sorted(flat[:10]) == list(range(10)) and sorted(flat[10:]) == list(range(10))
  assert not np.array_equal(flat[:10], flat[10:])   # a new permutation each epoch
