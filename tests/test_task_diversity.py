"""The task-diversity study (experiments/task_diversity.py): seed-determinism of a tiny run end
to end, the statistics against published values, the held-out bookkeeping, start-up errors."""
import json
import os

import pytest
from ml_collections import ConfigDict

from data import composed_tasks as ct
from experiments import registry, task_diversity as td
from experiments.configs import task_diversity as td_config
from experiments.stages import composed_eval
from lm.config import ConfigError


def test_wilson_matches_published_intervals():
  # Newcombe (1998), Statistics in Medicine 17:857, Table I (method 3): 81/263 and 0/10
  assert composed_eval.wilson(81, 263) == pytest.approx((0.2553, 0.3662), abs=1e-4)
  assert composed_eval.wilson(0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4)
  # 0 of n: upper bound z^2 / (n + z^2) by hand
  assert composed_eval.wilson(0, 400)[1] == pytest.approx(1.96 ** 2 / (400 + 1.96 ** 2))


def test_newcombe_difference_matches_published_interval():
  # Newcombe (1998), Statistics in Medicine 17:873, Table II example (a), method 10
  d, lo, hi = td.newcombe(56, 70, 48, 80)
  assert (d, lo, hi) == pytest.approx((0.2, 0.0524, 0.3339), abs=1e-4)


def test_score_counts_by_hand():
  exs = [{'family': 'upper-spell', 'input': 'moon', 'output': 'M O O N', 'options': ['moon', 'M O O N', 'MOON', 'm o o n']},
         {'family': 'upper-spell', 'input': 'ab', 'output': 'A B', 'options': ['A B', 'ab', 'AB', 'a b']},
         {'family': 'lower-double', 'input': 'a', 'output': 'a a', 'options': ['a', 'a a', 'A', 'A A']}]
  s = composed_eval.score(exs, ['M  O O N', ' A B ', 'a'], [1, 2, 1])
  assert s['families']['upper-spell']['exact'] == 2 and s['families']['upper-spell']['choice'] == 1
  assert s['families']['lower-double']['exact'] == 0 and s['families']['lower-double']['choice'] == 1
  assert (s['pooled']['n'], s['pooled']['exact'], s['pooled']['choice']) == (3, 2, 2)
  assert s['pooled']['chance'] == 0.25
  assert s['pooled']['diagnosis'] == {'exact': 2, 'layout_only': 0, 'case_only': 1, 'other_family': 0, 'other': 0}


def test_pool_sums_counts_and_forms_by_hand():
  form = lambda b, l, c, n: dict(zip(ct.FORMS, (b, l, c, n)))
  a = {'n': 2, 'exact': 1, 'choice': 2, 'form': form(1, 1, 0, 0), 'diagnosis': dict.fromkeys(ct.DIAGNOSES, 0)}
  b = {'n': 3, 'exact': 0, 'choice': 1, 'form': form(0, 0, 1, 2)}
  p = td._pool([a, b])
  assert (p['n'], p['exact'], p['choice']) == (5, 1, 3) and p['exact_rate'] == 0.2 and p['choice_rate'] == 0.6
  assert p['form'] == form(1, 1, 1, 2) and 'diagnosis' not in p   # only pooled where every run has it


def test_error_bars_never_negative():
  # Wilson's upper bound of 300/300 is 0.9999999999999999, under the rate itself
  lo, hi = td._bars([1.0, 0.5], [composed_eval.wilson(300, 300), (0.4, 0.7)])
  assert hi == [0.0, pytest.approx(0.2)] and lo == [pytest.approx(1 - 0.98736, abs=1e-5), pytest.approx(0.1)]


def test_bad_config_is_one_sentence_before_anything_runs(tmp_path):
  for key, value, match in (('families', '1,10', 'between 1 and 9'), ('families', 'a', 'comma-separated'),
                            ('seeds', '', 'comma-separated'), ('base_from', str(tmp_path), 'pretraining workdir')):
    c = td_config.get_config()
    c.study[key] = value
    with pytest.raises(ConfigError, match=match):
      td.run(c, str(tmp_path / 'w'))
  assert not os.path.exists(tmp_path / 'w')


def test_grid_and_families_axis(tmp_path, monkeypatch):
  c = td_config.get_config()
  assert c.study.grid == 'small' and td.check(c)[0] == [1, 3, 9]
  c.study.families = 'all'
  assert td.check(c)[0] == [9]
  w = td_config.get_config()
  w.study.update(grid='wide', families='1, 4,16,all')
  assert td.check(w)[0] == [1, 4, 16, 30]
  for key, value, match in (('grid', 'huge', 'study.grid'), ('families', '1,31', 'between 1 and 30'),
                            ('families', 'al', 'comma-separated')):
    bad = td_config.get_config()
    bad.study.update(grid='wide')
    bad.study[key] = value
    with pytest.raises(ConfigError, match=match):
      td.run(bad, str(tmp_path / 'w'))
  assert not os.path.exists(tmp_path / 'w')
  # the wide study's held-out sets: its five diagonal families, each phrasing condition
  w.study.eval_per_family = 3
  sets = td.held_out_sets(w)
  wide_held = {'lower-space', 'upper-dash', 'title-dot', 'last-comma', 'alternate-underscore'}
  for cond, phrasing in (('phrasing_train', 'train'), ('phrasing_test', 'test')):
    assert len(sets[cond]) == 15 and {e['family'] for e in sets[cond]} == wide_held
    assert all(e['grid'] == 'wide' for e in sets[cond])
    table = ct.GRIDS['wide'].phrasings[phrasing]
    assert all(any(e['instruction'] == p.format(c=q) for p in table[e['family'].split('-')[1]]
                   for q in table[e['family'].split('-')[0]]) for e in sets[cond])
  # a workdir holds one grid: a wide study refuses a small study's workdir before anything runs
  def never(*a):
    raise AssertionError('the study went past its start-up checks')
  monkeypatch.setattr(td, 'pretrain_base', never)   # a broken check fails here, not after a study
  os.makedirs(tmp_path / 'small')
  json.dump({'grid': 'small'}, open(tmp_path / 'small' / 'grid.json', 'w'))
  with pytest.raises(ConfigError, match="'small' grid"):
    td.run(w, str(tmp_path / 'small'))
  assert os.listdir(tmp_path / 'small') == ['grid.json']


def test_registered():
  assert registry.get('task_diversity') is td.run


def tiny(seeds: str, base_from: str = '') -> ConfigDict:
  c = td_config.get_config()
  c.study.update(families='1', seeds=seeds, train_examples=64, eval_per_family=4,
                 seen_eval_per_family=1, base_from=base_from)
  c.pretrain.model.update(d_model=16, n_heads=2, n_layers=1, max_seq_len=96)
  c.pretrain.train.update(steps=2, batch_size=8, eval_batches=1, checkpoint_every=2, log_every=1)
  c.pretrain.eval.every = 2
  c.sft.train.update(steps=3, batch_size=8, log_every=1)
  c.sft.optim.warmup_steps = 1
  c.eval.update(max_new_tokens=4, batch_size=16)
  return c


def figures(path):
  out = json.load(open(os.path.join(path, 'results.json')))
  out.pop('timing')
  return out


@pytest.mark.slow   # three studies end to end (pretraining, tuning, evaluation): ~1-3 min of compiling
def test_study_is_seed_deterministic(tmp_path):
  a, b, c = (str(tmp_path / n) for n in 'abc')
  td.run(tiny('0'), a)
  td.run(tiny('0', base_from=os.path.join(a, 'base')), b)
  td.run(tiny('1', base_from=os.path.join(a, 'base')), c)
  fa, fb, fc = figures(a), figures(b), figures(c)
  assert fa == fb
  assert fa['runs'] != fc['runs']
  assert [r['final_train_loss'] for r in fa['runs']] != [r['final_train_loss'] for r in fc['runs']]
  assert [r['k'] for r in fa['curve']] == [0, 1] and os.path.exists(os.path.join(a, 'diversity.png'))
  # the tuned models never saw a held-out family: their train.jsonl holds only trained instructions
  for run in fa['runs']:
    assert not set(run['families']) & set(ct.HELD_OUT)
    trained = [json.loads(l) for l in open(os.path.join(a, 'runs', f"k{run['k']}_s0", 'train.jsonl'))]
    expected = {(e['instruction'], e['input'], e['output']) for e in ct.training_set(run['families'], 64, 0)}
    assert {(e['instruction'], e['input'], e['output']) for e in trained} == expected
  # held-out evaluation: 3 families x 4 examples per condition, each answer's form counted once
  assert all(fa['curve'][1][c]['n'] == 12 == sum(fa['curve'][1][c]['form'].values()) for c in td.CONDITIONS)
  said = json.load(open(os.path.join(a, 'runs', 'k1_s0', 'answers.json')))
  assert [len(said[c]) for c in (*td.CONDITIONS, 'seen')] == [12, 12, 1]
  run = json.load(open(os.path.join(a, 'runs', 'k1_s0', 'result.json')))
  held = td.held_out_sets(tiny('0'))['phrasing_train']
  assert run['scores']['phrasing_train']['pooled']['form'] == {
      f: sum(ct.form(e, x) == f for e, x in zip(held, said['phrasing_train'])) for f in ct.FORMS}


def test_rank_classification_and_greedy_answers_against_a_naive_reference():
  """picks: the option whose tokens (+ the end token) have the highest mean log-prob after the
  prompt, recomputed one option at a time with a plain forward; answers: token-by-token argmax."""
  import jax
  import numpy as np
  from data import formats, tokenizers
  from lm import model, sharding
  from lm.config import ModelConfig
  exs = ct.examples(ct.HELD_OUT, 2, 'eval', seed=0)
  template = formats.get_template('chat')
  text = '\n'.join(e['instruction'] + e['input'] + ''.join(e['options']) for e in exs)
  tok = tokenizers.add_special_tokens(tokenizers.CharTokenizer.from_texts([text]), template.special_names())
  cfg = ModelConfig(vocab_size=tok.vocab_size, d_model=16, n_heads=2, n_layers=1, d_ff=32, max_seq_len=96)
  params = model.init(cfg, jax.random.key(3))
  end = tok.special_ids['end']

  forward = jax.jit(lambda x: jax.nn.log_softmax(model.forward(params, x, cfg)[0].astype(np.float32), -1))

  def logprobs(seq):   # next-token log-probs of one sequence (right-padded: causal, so unchanged)
    row = np.zeros((1, cfg.max_seq_len), np.int32)
    row[0, :len(seq) - 1] = seq[:-1]
    return np.asarray(forward(row)[0])

  expected = []
  for e in exs:
    prompt = list(formats.prompt_tokens(e, template, tok))
    means = []
    for opt in e['options']:
      cont = list(tok.encode(opt)) + [end]
      lp = logprobs(prompt + cont)
      means.append(np.mean([lp[len(prompt) - 1 + i, t] for i, t in enumerate(cont)]))
    expected.append(int(np.argmax(means)))
  assert composed_eval.picks(params, cfg, tok, template, exs, batch=8) == expected
  mesh = sharding.make_mesh({'data': -1})
  got = composed_eval.answers(params, cfg, tok, template, exs[:2], mesh, max_new_tokens=3, batch=8)
  for e, a in zip(exs[:2], got):
    seq = list(formats.prompt_tokens(e, template, tok))
    out = []
    for _ in range(3):
      t = int(np.argmax(logprobs(seq + [0])[len(seq) - 1]))
      if t == end:
        break
      out.append(t)
      seq.append(t)
    assert a == tok.decode(np.asarray(out, np.int32))
