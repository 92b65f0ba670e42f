"""The reward stage end to end: a tiny char model learns a planted preference, counted bad
records, exact resume, the normaliser, the baselines by hand, and start-up errors."""
import contextlib
import io
import json
import os

import jax.numpy as jnp
import numpy as np
import pytest

from experiments.stages import reward_model
from experiments import pretrain, reward
from experiments.stages import reward_data, reward_eval
from experiments.configs import reward_base
from lm.config import ConfigError
from rl import reward as reward_lib
from tests.test_pretrain import losses, tiny_config

WORDS = ['romeo', 'juliet', 'king', 'queen', 'lord', 'lady', 'night', 'day', 'love', 'death']


def hh(prompt, response):
  return f'\n\nHuman: {prompt}\n\nAssistant: {response}'


_SOURCE = {}   # one pretrain run per session: test_reward_ensemble imports this fixture, and
               # pytest would otherwise run an imported fixture again for that module


@pytest.fixture(scope='session')
def source(tmp_path_factory):
  """A tiny char model pretrained a few steps, and an hh-format file where the chosen response
  always ends with the word 'kind' (plus four bad records)."""
  if not _SOURCE:
    _SOURCE['run'] = _pretrain_and_pairs(tmp_path_factory)
  return _SOURCE['run']


def _pretrain_and_pairs(tmp_path_factory):
  from tests.conftest import TINY_SHAKESPEARE
  d = tmp_path_factory.mktemp('rm_src')
  corpus = d / 'corpus.txt'
  corpus.write_text(TINY_SHAKESPEARE.read_text(encoding='utf-8')[:30000], encoding='utf-8')
  c = tiny_config(str(corpus), steps=4, eval_every=0, checkpoint_every=4, samples=0)
  c.model.max_seq_len = 64
  pretrain.run(c, str(d / 'pt'))
  rng = np.random.default_rng(0)
  lines = []
  for i in range(120):
    a, b, x, y = rng.choice(WORDS, 4, replace=False)
    p = f'tell me of {a} ' + ''.join('abcdefghij'[int(d)] for d in str(i))   # char vocab: no digits
    lines.append(json.dumps({'chosen': hh(p, f'{b} {x} kind'), 'rejected': hh(p, f'{b} {x} {y}')}))
  lines += [json.dumps({'chosen': hh('hi', 'day'), 'rejected': hh('hi', 'night'), 'tie': True}),
            json.dumps({'chosen': hh('hi', 'day'), 'rejected': hh('hi', 'day')}),
            json.dumps({'chosen': hh('hi', 'day')}),
            json.dumps({'chosen': hh('yo', ' '), 'rejected': hh('yo', 'night')})]
  (d / 'pairs.jsonl').write_text('\n'.join(lines) + '\n', encoding='utf-8')
  return str(d / 'pt'), str(d / 'pairs.jsonl')


def rm_config(src, pairs, **train):
  c = reward_base.reward()
  c.init_from = src
  c.data.update(path=pairs, val_fraction=0.25)
  c.train.update(steps=60, batch_size=8, log_every=1, checkpoint_every=20)
  c.eval.every = 0
  c.train.update(train)
  c.optim.update(lr=3e-3, warmup_steps=0)
  return c


@pytest.fixture(scope='module')
def trained(source, tmp_path_factory):
  src, pairs = source
  wd = str(tmp_path_factory.mktemp('rm') / 'run')
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    reward.run(rm_config(src, pairs), wd)
  return wd, out.getvalue()


def test_reward_model_learns_the_planted_preference(trained):
  wd, printed = trained
  ev = json.load(open(os.path.join(wd, 'eval.json')))
  rm = ev['reward_model']
  assert rm['pairs'] >= 15
  assert rm['accuracy'] > 0.8 and rm['mean_margin'] > 0, rm
  assert sum(c['pairs'] for c in rm['calibration']) == rm['pairs']
  assert {'accuracy', 'loss'} <= set(ev['bag_of_words']) and ev['longer_wins']['pairs'] == rm['pairs']
  assert 'held-out pairs' in printed and 'longer response wins' in printed


def test_bad_records_are_counted_skips(trained):
  wd, printed = trained
  report = json.load(open(os.path.join(wd, 'config.json')))['resolved']['data']
  assert report['skipped'] == {'tie': 1, 'identical_pair': 1, 'missing_field': 1, 'empty_response': 1}
  assert sum(report['records'].values()) == 120
  assert "'tie': 1" in printed


def test_normaliser_gives_mean_0_std_1_on_training_responses(source, trained):
  wd, _ = trained
  _, pairs = source
  rm = reward_model.load_reward_model(wd)
  norm = json.load(open(os.path.join(wd, reward_model.NORM_FILE)))   # stored with the model ...
  assert (rm.gain, rm.bias, rm.members) == (norm['gain'], norm['bias'], 1) and norm['gain'] != 1.0
  recs = reward_data.read(pairs, 2, 0.25)[0]['train']
  arr, _ = reward_data.encode(recs, rm.tokenizer, 2, rm.seq_len)
  t = arr['tokens'].reshape(-1, rm.seq_len)
  m = arr['mask'].reshape(-1, rm.seq_len)
  s = np.asarray(rm.score(rm.params, jnp.asarray(t), jnp.asarray(m)))
  assert abs(s.mean()) < 1e-3 and abs(s.std() - 1) < 1e-3, (s.mean(), s.std())   # ... and applied
  np.testing.assert_array_equal(np.asarray(rm.score_members(rm.params, jnp.asarray(t), jnp.asarray(m)))[0], s)
  # The normalised scores still rank the training pairs: chosen (slot 0) above rejected.
  assert np.mean(s.reshape(-1, 2)[:, 0] > s.reshape(-1, 2)[:, 1]) > 0.8


def test_resume_equals_uninterrupted(source, tmp_path):
  src, pairs = source
  full, part = str(tmp_path / 'full'), str(tmp_path / 'part')
  reward.run(rm_config(src, pairs, steps=6, checkpoint_every=3), full)
  reward.run(rm_config(src, pairs, steps=6, checkpoint_every=3, stop_after=3), part)
  assert max(losses(part)[0]) == 3
  assert not os.path.exists(os.path.join(part, 'eval.json'))
  reward.run(rm_config(src, pairs, steps=6, checkpoint_every=3), part)
  a, b = losses(full)[0], losses(part)[0]
  assert sorted(a) == sorted(b) == list(range(1, 7))
  np.testing.assert_allclose([a[s] for s in range(4, 7)], [b[s] for s in range(4, 7)], rtol=1e-6)


def test_longer_wins_by_hand():
  pairs = [('aaaa', 'bb'), ('aaa', 'b'), ('a', 'bbb'), ('cc', 'dd')]   # 1, 1, 0, tie = 1/2
  assert reward_eval.longer_wins(pairs) == {'pairs': 4, 'accuracy': 2.5 / 4}


def test_bag_of_words_learns_a_word_and_generalises():
  train = [(f'yes {w}', f'no {v}') for w, v in zip(WORDS, WORDS[::-1])]
  bow = reward_eval.BagOfWords(l2=0.1).fit(train)
  held = [('well yes', 'well no'), ('no doubt yes', 'no doubt no')]
  out = bow.evaluate(held)
  assert out['accuracy'] == 1.0 and out['loss'] < np.log(2)


def test_kwise_layout_and_loss_match_pairwise():
  recs = [reward_data.parse_record({'prompt': 'p', 'responses': ['a', 'bb', 'ccc'], 'ranks': [2, 0, 1]}),
          reward_data.parse_record({'chosen': hh('q', 'x'), 'rejected': hh('q', 'y')})]
  from data import tokenizers
  tok = tokenizers.CharTokenizer('pabcqxy:HumnAsit \n')
  arr, _ = reward_data.encode(recs, tok, 3, 8)
  assert arr['tokens'].shape == (2, 3, 8) and arr['valid'].tolist() == [[1, 1, 1], [1, 1, 0]]
  assert arr['mask'][0].sum(-1).tolist() == [2, 3, 4]       # prompt + response (no eos in this vocab)
  scores = jnp.asarray([[0.1, 0.5, 0.3], [1.0, -1.0, 7.0]])
  batch = {k: jnp.asarray(v) for k, v in arr.items()}
  loss, n, m = reward_lib.kwise_loss(scores, batch['ranks'], 0.0, batch['valid'])
  assert float(n) == 3 + 1                                   # C(3, 2) pairs + one pair
  # By hand: the pairs (0.5 > 0.3), (0.5 > 0.1), (0.3 > 0.1), (1.0 > -1.0).
  w, l = jnp.asarray([0.5, 0.5, 0.3, 1.0]), jnp.asarray([0.3, 0.1, 0.1, -1.0])
  ref = reward_lib.pairwise_loss(w, l)
  np.testing.assert_allclose(float(loss), float(ref[0]), rtol=1e-6)
  np.testing.assert_allclose(float(m['margin']), float(ref[2]['margin']), rtol=1e-6)
  g, wi, li = reward_eval.pair_index(arr['ranks'], arr['valid'])
  assert len(g) == 4


def test_bad_reward_input_is_one_sentence_before_any_work(source, tmp_path):
  src, pairs = source
  cases = [
      (dict(init_from=''), 'needs --config.init_from'),
      (dict(data={'k': 1}), 'at least 2 responses'),
      (dict(data={'path': str(tmp_path / 'missing.jsonl')}), 'does not exist'),
      (dict(data={'seq_len': 4096}), 'longer than the model context'),
      (dict(train={'batch_size': 512}), 'fewer than one batch'),
  ]
  for i, (overrides, match) in enumerate(cases):
    c = rm_config(src, pairs)
    for k, v in overrides.items():
      if isinstance(v, dict):
        c[k].update(v)
      else:
        c[k] = v
    wd = tmp_path / f'bad{i}'
    with pytest.raises(ConfigError, match=match):
      reward.run(c, str(wd))
    assert not (wd / 'checkpoints').exists(), overrides
