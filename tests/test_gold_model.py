"""A learned gold (gold='model:DIR', experiments/stages/gold_model.py): its scores are the
frozen reward model's forward on prompt + continuation + eos, recomputed here by hand from
the fixture's seeds; the labeller with a model gold ranks exactly by those scores; label
noise permutes the counted share of rankings."""
import json
import os

import jax
import numpy as np
import pytest

from data import tokenizers
from experiments import preferences
from experiments.configs import rlhf_preferences
from experiments.stages import gold_model
from lm import heads, model
from lm.config import ConfigError, ModelConfig
from rl import gold
from tests import rl_fixtures

SEED, GAIN, BIAS = 3, 2.0, -0.5


@pytest.fixture(scope='module')
def dirs(tmp_path_factory):
  d = tmp_path_factory.mktemp('gold')
  pol = rl_fixtures.policy_run(d / 'sft', n_layers=1, text=rl_fixtures.works_text())
  rm = rl_fixtures.reward_run(d / 'gold_rm', pol, seed=SEED, gain=GAIN, bias=BIAS)
  return d, pol, rm


def by_hand(rm_dir, prompts, continuations):
  """The gold RM rebuilt from reward_run's seeds; each text alone (no padding, no batch):
  the head on the last token's final hidden state, then gain * raw + bias."""
  with open(os.path.join(rm_dir, 'config.json')) as f:
    saved = json.load(f)
  cfg = ModelConfig.from_dict(saved['model'])
  trunk = model.init(cfg, jax.random.key(SEED))
  head = heads.init(cfg, 1, jax.random.key(SEED + 1), init_std=0.5)
  tok = tokenizers.load(tokenizers.run_file(rm_dir))
  seq_len = saved['resolved']['seq_len']
  out = []
  for p, c in zip(prompts, continuations):
    ids = (list(tok.encode(p + c)) + [tok.eos_id])[-seq_len:]      # the end is kept
    h = np.asarray(model.hidden_states(trunk, np.asarray([ids], np.int32), cfg)[0])[0, -1]
    raw = float(h.astype(np.float64) @ np.asarray(head['w'], np.float64)[:, 0] + float(head['b'][0]))
    out.append(GAIN * raw + BIAS)
  return np.asarray(out)


def test_model_gold_equals_forward_by_hand(dirs, monkeypatch):
  _, _, rm = dirs
  monkeypatch.setattr(gold_model, 'BATCH', 3)        # 7 texts: chunks of 3, the last padded
  prompts = ['To be', 'O ', 'My lord', 'Now is the', 'A', 'What', 'Good']
  conts = [' or not to be', ' Romeo!', '', ' winter of our discontent' * 4, ' horse',
           ' light through yonder window breaks', ' night']   # the 4th is cut from the left
  got = gold_model.scorer('model:' + rm)(prompts, conts)
  want = by_hand(rm, prompts, conts)
  assert got.dtype == np.float64 and got.shape == (7,)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
  assert np.ptp(want) > 0.1                            # the texts are told apart
  # the prompt is read: the same continuation after another prompt scores differently
  assert abs(gold_model.scorer('model:' + rm)(['Hark'], [' Romeo!'])[0] - got[1]) > 1e-4
  # VADER stays the default kind and reads the continuation alone
  np.testing.assert_allclose(gold_model.scorer('vader')(prompts, conts), gold.score(conts))


def test_bad_gold_is_one_sentence(dirs, tmp_path):
  _, pol, _ = dirs
  for kind, match in (('bleu', 'not a gold reward'), ('model:', 'no directory'),
                      (f'model:{tmp_path}/nowhere', 'holds no config.json'),
                      (f'model:{pol}', 'holds no reward_norm.json')):
    with pytest.raises(ConfigError, match=match):
      gold_model.scorer(kind)
  c = rlhf_preferences.get_config()
  c.eval.gold = f'model:{tmp_path}/nowhere'
  with pytest.raises(ConfigError, match='finished `reward` run'):
    preferences.check(c)
  c.eval.gold, c.label_noise = 'vader', 1.5
  with pytest.raises(ConfigError, match='label_noise'):
    preferences.check(c)


def test_labeller_with_model_gold_ranks_by_its_scores_and_counts_noise(dirs):
  d, pol, rm = dirs
  c = rlhf_preferences.get_config()
  c.init_from = pol
  c.eval.gold = 'model:' + rm
  c.prompts.n_train, c.prompts.n_eval = 12, 4
  c.rollout.update(samples=3, max_new_tokens=6, batch_size=16)
  c.label_noise = 0.5
  report = preferences.run(c, str(d / 'prefs'))
  with open(d / 'prefs' / preferences.FILE) as f:
    rows = [json.loads(l) for l in f]
  assert len(rows) == report['counts']['written'] >= 8
  noisy = 0
  for r in rows:
    want = by_hand(rm, [r['prompt']] * len(r['responses']), r['responses'])
    np.testing.assert_allclose(r['gold'], want, rtol=1e-4, atol=1e-4)
    true_order = [int(i) for i in np.argsort(np.argsort(-want))]   # 0 = best, by hand
    if r.get('noisy'):
      noisy += 1
      assert r['ranks'] != true_order and sorted(r['ranks']) == sorted(true_order)
    else:
      assert r['ranks'] == true_order
  eligible = sum(len(set(r['ranks'])) > 1 for r in rows)
  assert noisy == report['counts']['noisy'] == round(0.5 * eligible) >= 4


def test_label_noise_is_seeded_and_exact():
  def recs():
    rng = np.random.default_rng(0)
    out = [{'ranks': [int(x) for x in rng.permutation(4)]} for _ in range(40)]
    return out + [{'ranks': [0, 0, 0]} for _ in range(5)]          # all tied: never chosen
  a, b, c = recs(), recs(), recs()
  orig = recs()
  assert preferences.add_label_noise(a, 0.25, seed=0) == 10
  preferences.add_label_noise(b, 0.25, seed=0)
  preferences.add_label_noise(c, 0.25, seed=1)
  changed = [i for i in range(45) if a[i]['ranks'] != orig[i]['ranks']]
  assert len(changed) == 10 and max(changed) < 40
  assert all(a[i].get('noisy', False) == (i in changed) for i in range(45))
  assert all(sorted(a[i]['ranks']) == sorted(orig[i]['ranks']) for i in changed)
  assert a == b and a != c
  assert preferences.add_label_noise(recs(), 0.0, seed=0) == 0


def test_bon_scores_each_response_after_its_own_prompt(dirs):
  from experiments import bon
  from experiments.configs import rlhf_bon
  d, pol, rm = dirs
  c = rlhf_bon.get_config()
  c.init_from, c.reward_from, c.eval.gold = pol, rm, 'model:' + rm
  c.prompts.n_eval = 4
  c.rollout.update(samples=4, max_new_tokens=6, batch_size=16)
  res = bon.run(c, str(d / 'bon'))
  best = next(iter(res['series'].values()))['best_samples']
  assert len({b['prompt'] for b in best}) == 3
  want = by_hand(rm, [b['prompt'] for b in best], [b['response'] for b in best])
  np.testing.assert_allclose([b['gold'] for b in best], want, rtol=1e-4, atol=1e-4)
