"""experiments/evaluation/icl_prompts.py: prompt construction, selection, ordering, overflow, scoring;
experiments/icl.py: start-up checks and a tiny end-to-end sweep."""
import itertools
import json
import math

import numpy as np
import pytest

from experiments import icl as sweep
from experiments.configs import icl_sweep as sweep_config
from experiments.evaluation import icl_prompts
from lm.config import ConfigError


def ex(i, x, y):
  return {'id': f'p{i}', 'x': x, 'y': y}


def test_prompt_is_the_surveys_decomposition():
  t = icl_prompts.Template(input='Q: {x}\nA:', output=' {y}', separator='\n\n')
  p = icl_prompts.Prompt('Answer yes or no.', t, (ex(0, 'a?', 'yes'), ex(1, 'b?', 'no')), ex(2, 'c?', 'yes'))
  assert p.context() == 'Answer yes or no.\n\nQ: a?\nA: yes\n\nQ: b?\nA: no\n\nQ: c?\nA:'
  assert t.continuation('yes') == ' yes'
  assert icl_prompts.Prompt('', t, (), ex(2, 'c?', 'yes')).context() == 'Q: c?\nA:'


POOL = [ex(0, 'cherry grape', 'a'), ex(1, 'apple kiwi', 'b'), ex(2, 'apple banana kiwi', 'a'),
        ex(3, 'melon lemon', 'c'), ex(4, 'banana', 'b'), ex(5, 'lemon tart', 'c')]


def bm25_by_hand(docs, query, k1=1.5, b=0.75):
  """bm25s' default ('lucene'): idf = ln(1 + (N - df + .5) / (df + .5)), tf part
  tf / (tf + k1 (1 - b + b dl / avgdl)) (no (k1 + 1) factor: it does not change the order)."""
  toks = [d.split() for d in docs]
  avgdl = np.mean([len(t) for t in toks])
  out = []
  for t in toks:
    s = 0.0
    for w in set(query.split()):
      df = sum(w in u for u in toks)
      tf = t.count(w)
      if tf:
        idf = math.log(1 + (len(toks) - df + 0.5) / (df + 0.5))
        s += idf * tf / (tf + k1 * (1 - b + b * len(t) / avgdl))
    out.append(s)
  return np.asarray(out)


def test_bm25_selection_matches_hand_computed_order():
  q = {'id': 'q', 'x': 'apple banana'}
  sel = icl_prompts.Selector(POOL, 'bm25')
  want = bm25_by_hand([e['x'] for e in POOL], q['x'])
  np.testing.assert_allclose(sel.bm25_scores(q), want, rtol=1e-5)
  # hand: p2 has both words (0.70) > p4 'banana' (a 1-word doc, 0.53) > p1 'apple' (0.43) > 0
  assert list(np.argsort(-want)[:3]) == [2, 4, 1]
  assert sel.select(q, 3) == [1, 4, 2]              # the nearest last (closest to the query)
  assert icl_prompts.order([2, 1, 4], q, 'similar_last', sel) == [1, 4, 2]


def test_class_balanced_counts_and_seeded_determinism():
  pool = [ex(i, f'w{i}', 'abc'[i % 3]) for i in range(30)]
  q = {'id': 'q', 'x': 'zzz'}
  for k, want in ((6, {'a': 2, 'b': 2, 'c': 2}), (4, {'a': 2, 'b': 1, 'c': 1}), (3, {'a': 1, 'b': 1, 'c': 1})):
    got = icl_prompts.Selector(pool, 'class_balanced', seed=1).select(q, k)
    counts = {c: sum(pool[i]['y'] == c for i in got) for c in 'abc'}
    assert counts == want and len(set(got)) == k
  a = icl_prompts.Selector(pool, 'random', seed=3).select(q, 5)
  assert a == icl_prompts.Selector(pool, 'random', seed=3).select(q, 5)
  assert a != icl_prompts.Selector(pool, 'random', seed=4).select(q, 5)
  assert len(set(a)) == 5


def test_a_query_is_never_its_own_demo():
  pool = [ex(0, 'same text', 'a'), ex(1, 'other', 'b'), ex(2, 'third', 'a')]
  emb = np.eye(3)
  for how in icl_prompts.SELECTIONS:
    sel = icl_prompts.Selector(pool, how, embed=(emb, lambda xs: np.eye(3)[[0] * len(xs)]))
    for q in ({'id': 'p0', 'x': 'zzz'}, {'id': 'new', 'x': 'same text'}):
      assert 0 not in sel.select(q, 3), how


def test_knn_by_embeddings_and_diversity_by_clusters():
  rng = np.random.default_rng(0)
  centers = np.asarray([[10.0, 0, 0], [0, 10.0, 0], [0, 0, 10.0]])
  emb = np.concatenate([c + 0.1 * rng.normal(size=(4, 3)) for c in centers])   # 3 tight clusters
  pool = [ex(i, f'w{i}', 'abc'[i // 4]) for i in range(12)]
  query_vec = np.asarray([[1.0, 0.2, 0.0]])
  sel = icl_prompts.Selector(pool, 'knn', embed=(emb, lambda xs: query_vec))
  q = {'id': 'q', 'x': 'zzz'}
  cos = (emb / np.linalg.norm(emb, axis=1, keepdims=True)) @ (query_vec[0] / np.linalg.norm(query_vec))
  assert sel.select(q, 3) == list(np.argsort(-cos)[:3])       # nearest first
  assert icl_prompts.order(sel.select(q, 3), q, 'similar_last', sel) == list(np.argsort(-cos)[:3])[::-1]
  div = icl_prompts.Selector(pool, 'diversity', seed=0, embed=(emb, lambda xs: query_vec)).select(q, 3)
  assert sorted(i // 4 for i in div) == [0, 1, 2]             # one per cluster
  for i in div:                                               # the member nearest its centroid
    members = range(4 * (i // 4), 4 * (i // 4) + 4)
    centroid = emb[list(members)].mean(0)
    assert i == min(members, key=lambda j: ((emb[j] - centroid) ** 2).sum())
  c1, a1 = icl_prompts.kmeans(emb, 3, seed=5)
  c2, a2 = icl_prompts.kmeans(emb, 3, seed=5)
  np.testing.assert_array_equal(a1, a2)


def test_random_ordering_is_seeded_per_query():
  q = {'id': 'q', 'x': 'x'}
  a = icl_prompts.order([1, 2, 3, 4, 5], q, 'random', seed=0)
  assert sorted(a) == [1, 2, 3, 4, 5]
  assert a == icl_prompts.order([1, 2, 3, 4, 5], q, 'random', seed=0)
  assert any(icl_prompts.order([1, 2, 3, 4, 5], q, 'random', seed=s) != a for s in range(1, 5))
  assert icl_prompts.order([1, 2, 3], q, 'selection') == [1, 2, 3]


def test_entropy_and_candidate_orders():
  assert icl_prompts.entropy(['a', 'a', 'b', 'b'], ['a', 'b', 'c']) == pytest.approx(math.log(2))
  assert icl_prompts.entropy(['a'] * 4, ['a', 'b']) == 0.0
  assert icl_prompts.candidate_orders(3, 6, 0, 'k') == list(itertools.permutations(range(3)))
  c = icl_prompts.candidate_orders(4, 5, 0, 'k')
  assert len(c) == 5 and c[0] == (0, 1, 2, 3) and len(set(c)) == 5
  assert c == icl_prompts.candidate_orders(4, 5, 0, 'k')


def test_global_entropy_picks_the_max_entropy_permutation():
  pool = [ex(0, 'u', '0'), ex(1, 'v', '1'), ex(2, 'w', '0')]
  t = icl_prompts.Template()
  probes = [{'id': f'r{i}', 'x': 'odd' if i % 2 else 'even'} for i in range(4)]
  make = lambda ds, q: icl_prompts.Prompt('', t, tuple(pool[i] for i in ds), q)
  # a fake model: odd probes copy the last demo's label, even ones the first's, so an order
  # whose first and last labels differ predicts both labels (entropy ln 2), else one (0)
  predict = lambda ps: [p.demos[-1]['y'] if p.query['x'] == 'odd' else p.demos[0]['y'] for p in ps]
  chosen, info = icl_prompts.global_entropy_orders([[0, 1, 2], [2]], [probes, probes], make, predict,
                                           ['0', '1'], n_perms=6)
  # permutations in order: (0,1,2) -> 0; (0,2,1) -> labels 0 and 1 -> ln 2: the first maximum
  assert chosen[0] == [0, 2, 1]
  assert info[0]['entropies'][:2] == [0.0, round(math.log(2), 4)] and info[0]['candidates'] == 6
  assert chosen[1] == [2] and info[1]['candidates'] == 0     # one demo: nothing to order


def test_overflow_drops_demos_from_the_front_and_counts_them():
  t = icl_prompts.Template(input='{x}', output='{y}', separator=' ')
  demos = (ex(0, 'aa', '1'), ex(1, 'bb', '2'), ex(2, 'cc', '3'))
  p = icl_prompts.Prompt('', t, demos, {'id': 'q', 'x': 'dd'})
  assert p.context() == 'aa1 bb2 cc3 dd'           # 14 chars
  fitted, dropped = icl_prompts.fit(p, len, 14)
  assert dropped == 0 and fitted == p
  fitted, dropped = icl_prompts.fit(p, len, 9)              # 'bb2 cc3 dd' is 10
  assert dropped == 2 and fitted.context() == 'cc3 dd'
  fitted, dropped = icl_prompts.fit(p, len, 1)             # even the query alone is too long
  assert dropped == 3 and fitted.context() == 'dd'


class FakeLM:
  """loglikelihood = a fixed score per continuation; records the requests."""

  def __init__(self, scores):
    self.scores, self.requests = scores, []

  def loglikelihood(self, requests):
    self.requests += requests
    return [(self.scores[c], False) for _, c in requests]


def test_classify_scores_every_label_and_takes_the_argmax():
  t = icl_prompts.Template(input='{x}', output=' {y}')
  prompts = [icl_prompts.Prompt('', t, (), {'id': 'a', 'x': 'hi'}), icl_prompts.Prompt('', t, (), {'id': 'b', 'x': 'yo'})]
  lm = FakeLM({' pos': -1.0, ' neg': -2.0})
  preds, lp = icl_prompts.classify(lm, prompts, ['neg', 'pos'])
  assert preds == ['pos', 'pos'] and lp.shape == (2, 2)
  assert lm.requests[:2] == [('hi', ' neg'), ('hi', ' pos')]
  preds, _ = icl_prompts.classify(FakeLM({' pos': -1.0, ' neg': -1.0}), prompts, ['neg', 'pos'])
  assert preds == ['neg', 'neg']                   # ties: the first label


def test_bad_configs_fail_in_one_sentence():
  with pytest.raises(ConfigError, match='unknown'):
    icl_prompts.check('nearest', 'random')
  with pytest.raises(ConfigError, match='unknown'):
    icl_prompts.check('random', 'sorted')
  with pytest.raises(ConfigError, match='embeddings'):
    icl_prompts.Selector(POOL, 'knn')
  c = sweep_config.get_config()
  c.sweep.combos = ('random',)
  with pytest.raises(ConfigError, match='selection/ordering'):
    sweep.check(c)
  c = sweep_config.get_config()
  c.sweep.ks = (0, -1)
  with pytest.raises(ConfigError, match='k >= 0'):
    sweep.check(c)
  c = sweep_config.get_config()
  c.task.source, c.task.path = 'jsonl', '/nonexistent.jsonl'
  with pytest.raises(ConfigError, match='does not exist'):
    sweep.jsonl_task(c.task)


def test_synthetic_task_matches_the_training_format():
  c = sweep_config.get_config()
  pool, evals, labels, t = sweep.synthetic_task(c.task)
  assert len(pool) == c.task.n_pool and len(evals) == c.task.n_eval and labels == ['0', '1', '2', '3']
  mapping = {}
  for e in pool + evals:
    assert mapping.setdefault(e['entity'], e['y']) == e['y']    # one label per entity
  d, e = pool[0]['x'].split()
  assert t.demo(pool[0]) == f'{d} {e}{pool[0]["y"]}'
  assert len({e['entity'][-1] for e in pool + evals}) == len({e['entity'] for e in pool + evals})


@pytest.mark.slow
def test_tiny_sweep_end_to_end(tmp_path):
  """Trains the synthetic model a few steps, sweeps, writes every output (slow: compiles)."""
  c = sweep_config.get_config()
  c.pretrain.train.steps = 4
  c.pretrain.probe.every = 4
  c.pretrain.probe.batch = 8
  c.pretrain.train.batch_size = 8
  c.task.n_pool, c.task.n_eval = 12, 8
  c.sweep.update(ks=(0, 2, 16), seeds=2, n_perms=2, n_probe=2,
                 combos=('random/random', 'knn/similar_last', 'diversity/random',
                         'bm25/global_entropy'))
  res = sweep.run(c, str(tmp_path))
  assert set(res) - {'_meta'} == {'random/random', 'knn/similar_last', 'diversity/random',
                                  'bm25/global_entropy'}
  assert res['random/random']['16']['dropped'] > 0                # 16 demos overflow 64 chars
  for f in ('results.json', 'samples.jsonl', 'icl_sweep.png', 'model/config.json'):
    assert (tmp_path / f).exists()
  rows = [json.loads(line) for line in open(tmp_path / 'samples.jsonl')]
  assert len(rows) == 4 * 3 * 2 * 8
  assert all(len(r['context']) <= 64 for r in rows)


def test_mean_pooled_is_the_mean_of_the_models_hidden_states():
  import jax
  from data import tokenizers
  from lm import model
  from lm.config import ModelConfig
  tok = tokenizers.CharTokenizer('abcdefgh ')
  cfg = ModelConfig(vocab_size=tok.vocab_size, d_model=16, n_layers=1, n_heads=2, max_seq_len=32,
                    vocab_multiple=8, init_std=0.2)
  rng = np.random.default_rng(0)   # numpy params from the specs: no init program to compile
  params = jax.tree.map(lambda s: np.ones(s.shape, np.float32) if s.init == 'ones' else
                        (s.std * rng.normal(size=s.shape)).astype(np.float32),
                        model.param_specs(cfg), is_leaf=lambda x: hasattr(x, 'init'))
  got = icl_prompts.mean_pooled(params, cfg, tok, ['abc', 'hgfedcba ab'], batch_size=4)
  h = jax.jit(lambda p, x: model.hidden_states(p, x, cfg)[0])(params, tok.encode('abc')[None])
  np.testing.assert_allclose(got[0], np.asarray(h[0]).mean(0), rtol=1e-4, atol=1e-5)  # pads unseen
  assert got.shape == (2, 16)


def test_jsonl_task_splits_pool_and_eval(tmp_path):
  p = tmp_path / 'task.jsonl'
  p.write_text('\n'.join(json.dumps({'text': f'review {i}', 'label': 'pos' if i % 2 else 'neg'})
                         for i in range(10)) + '\n')
  c = sweep_config.get_config().task
  c.update(source='jsonl', path=str(p), input_field='text', label_field='label', n_pool=4, n_eval=3,
           input_template='Review: {x}\nSentiment:', output_template=' {y}', separator='\n\n')
  pool, evals, labels, t = sweep.jsonl_task(c)
  assert [e['x'] for e in pool] == [f'review {i}' for i in range(4)]
  assert [e['x'] for e in evals] == ['review 4', 'review 5', 'review 6'] and labels == ['neg', 'pos']
  assert icl_prompts.Prompt('', t, (pool[1],), evals[0]).context() == \
      'Review: review 1\nSentiment: pos\n\nReview: review 4\nSentiment:'
  c.n_pool = 10
  with pytest.raises(ConfigError, match='non-empty'):
    sweep.jsonl_task(c)
