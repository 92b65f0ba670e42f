"""rl/preference.py, rl/pg.py, rl/bon.py, rl/reward.py against hand arithmetic."""
import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rl import bon, pg, preference, reward


def _logsig(x):
  return -np.log1p(np.exp(-x))


# Preference losses ------------------------------------------------------------------------------
PI_W, PI_L = np.array([-10.0, -4.0]), np.array([-12.0, -3.0])
REF_W, REF_L = np.array([-11.0, -5.0]), np.array([-11.0, -5.0])


def _pref_args():
  return tuple(jnp.asarray(a, jnp.float32) for a in (PI_W, PI_L, REF_W, REF_L))


def test_dpo_by_hand():
  # h = (1) - (-1) = 2 for pair 0; (1) - (2) = -1 for pair 1
  s, n, met = preference.dpo_loss(*_pref_args(), beta=0.5)
  assert float(n) == 2
  assert float(s) == pytest.approx(-_logsig(1.0) - _logsig(-0.5), rel=1e-5)
  assert float(met['rewards/chosen']) == pytest.approx(0.5 * 1 + 0.5 * 1)
  assert float(met['rewards/rejected']) == pytest.approx(0.5 * -1 + 0.5 * 2)
  assert float(met['rewards/margin']) == pytest.approx(1.0 - 0.5)
  assert float(met['rewards/accuracy']) == 1.0
  # only pair 0 is ranked correctly (its chosen reward .5 > -.5); pair 1 is not (.5 < 1)
  _, _, met0 = preference.dpo_loss(*[a[:1] for a in _pref_args()], beta=0.5)
  assert float(met0['rewards/accuracy']) == 1.0


def test_cdpo_label_smoothing_by_hand():
  s, _, _ = preference.dpo_loss(*_pref_args(), beta=0.5, label_smoothing=0.1)
  exp = sum(-0.9 * _logsig(z) - 0.1 * _logsig(-z) for z in (1.0, -0.5))
  assert float(s) == pytest.approx(exp, rel=1e-5)
  s2, _, _ = preference.preference_loss('dpo', *_pref_args(), beta=0.5, label_smoothing=0.1)
  assert float(s2) == pytest.approx(exp, rel=1e-5)


def test_ipo_by_hand():
  s, _, _ = preference.ipo_loss(*_pref_args(), beta=0.25)  # 1 / (2 beta) = 2
  assert float(s) == pytest.approx((2 - 2) ** 2 + (-1 - 2) ** 2, rel=1e-6)
  with pytest.raises(ValueError, match='kto'):
    preference.preference_loss('kto', *_pref_args())


def test_sequence_logprob_sums_masked_tokens():
  logits = jnp.array([[[0.0, 1.0], [2.0, 0.0], [5.0, -5.0]]])
  tokens = jnp.array([[1, 0, 1]])
  mask = jnp.array([[1, 1, 0]])
  lp = lambda a, b: a - np.log(np.exp(a) + np.exp(b))
  exp = lp(1.0, 0.0) + lp(2.0, 0.0)
  assert float(preference.sequence_logprob(logits, tokens, mask)[0]) == pytest.approx(exp, rel=1e-5)
  exp_t = lp(0.5, 0.0) + lp(1.0, 0.0)  # temperature 2 halves the logits
  assert float(preference.sequence_logprob(logits, tokens, mask, 2.0)[0]) == pytest.approx(exp_t, rel=1e-5)


# RLOO / GRPO --------------------------------------------------------------------------------------
def test_rloo_advantages_by_hand():
  r = jnp.array([[1.0, 2.0, 6.0], [0.0, 0.0, 3.0]])
  # 1 - (2+6)/2 = -3; 2 - 7/2 = -1.5; 6 - 3/2 = 4.5; 0 - 1.5; 0 - 1.5; 3 - 0
  np.testing.assert_allclose(pg.rloo_advantages(r), [[-3.0, -1.5, 4.5], [-1.5, -1.5, 3.0]])
  with pytest.raises(ValueError, match='k >= 2'):
    pg.rloo_advantages(jnp.ones((2, 1)))


def test_rloo_loss_by_hand():
  logp = jnp.array([[-1.0, -2.0, -9.0], [-0.5, -0.5, -0.5]])
  mask = jnp.array([[1, 1, 0], [1, 1, 1]])
  s, n, _ = pg.rloo_loss(logp, jnp.array([2.0, -1.0]), mask)
  assert float(n) == 2 and float(s) == pytest.approx(-2 * -3.0 + 1 * -1.5)


def test_grpo_advantages_by_hand():
  r = jnp.array([[1.0, 2.0, 3.0, 6.0]])
  # mean 3, sample std sqrt((4 + 1 + 0 + 9) / 3)
  std = math.sqrt(14 / 3)
  np.testing.assert_allclose(pg.grpo_advantages(r, eps=0.0), [[-2 / std, -1 / std, 0, 3 / std]], rtol=1e-5)
  np.testing.assert_allclose(pg.grpo_advantages(jnp.ones((1, 4))), np.zeros((1, 4)))  # no signal


def test_grpo_loss_by_hand_token_and_sequence():
  old = jnp.zeros((2, 3)) - 1.0
  ratios = np.array([[1.5, 1.0, 0.5], [0.9, 1.0, 1.0]])
  logp = old + jnp.log(jnp.asarray(ratios, jnp.float32))
  ref = logp  # KL 0 first
  adv = jnp.array([1.0, -2.0])
  mask = jnp.array([[1, 1, 1], [1, 1, 0]])
  # per token -min(rA, clip(r)A): row 0 (A=1): -1.2, -1.0, -0.5; row 1 (A=-2): 1.8, 2.0
  s, w, met = pg.grpo_loss(logp, old, ref, adv, mask, 0.2, beta=0.0, level='token')
  assert float(w) == 5 and float(s) == pytest.approx(-1.2 - 1.0 - 0.5 + 1.8 + 2.0, rel=1e-5)
  assert float(met['clipfrac']) == 2.0
  s, w, _ = pg.grpo_loss(logp, old, ref, adv, mask, 0.2, beta=0.0, level='sequence')
  assert float(w) == 2 and float(s) == pytest.approx(-2.7 / 3 + 3.8 / 2, rel=1e-5)
  # KL term: k3 with r = ref / pi
  ref2 = logp - 0.5
  s2, _, met2 = pg.grpo_loss(logp, old, ref2, adv, mask, 0.2, beta=0.1, level='token')
  k3 = math.exp(-0.5) - 1 + 0.5
  assert float(s2) == pytest.approx(-1.2 - 1.0 - 0.5 + 1.8 + 2.0 + 0.1 * 5 * k3, rel=1e-5)
  assert float(met2['kl']) == pytest.approx(5 * k3, rel=1e-5)


# Best-of-n ----------------------------------------------------------------------------------------
def test_best_of_n_selects_argmax_per_group():
  samples = jnp.arange(2 * 3 * 2).reshape(2, 3, 2)
  scores = jnp.array([[0.1, 0.9, 0.3], [5.0, -1.0, 2.0]])
  best, s = bon.best_of_n(samples, scores)
  np.testing.assert_array_equal(best, [[2, 3], [6, 7]])
  np.testing.assert_allclose(s, [0.9, 5.0])


@pytest.mark.parametrize('n', [1, 2, 4, 16])
def test_kl_bon_against_fine_uniform_discretisation(n):
  # base uniform on N points; P(max of n draws = i) = (i/N)^n - ((i-1)/N)^n
  big = 200_000
  c = (np.arange(big + 1) / big) ** n
  p = np.diff(c)
  kl = float(np.sum(p * np.log(np.maximum(p, 1e-300) * big)))
  assert bon.kl_bon(n) == pytest.approx(kl, abs=1e-3)


def test_kl_bon_against_sampling_normals():
  # best-of-n density n F^{n-1} f, so KL = E_bon[log n + (n-1) log F(x)]
  n, trials = 8, 20_000
  x = jax.random.normal(jax.random.key(0), (trials, n))
  best, _ = bon.best_of_n(x[..., None], x)
  est = float(jnp.mean(jnp.log(n) + (n - 1) * jax.scipy.stats.norm.logcdf(best[:, 0])))
  assert est == pytest.approx(bon.kl_bon(n), abs=0.03)


# Reward model -------------------------------------------------------------------------------------
def test_pairwise_loss_by_hand():
  s, n, met = reward.pairwise_loss(jnp.array([2.0, 0.0]), jnp.array([1.0, 0.5]), margin=0.5)
  assert float(s) == pytest.approx(-_logsig(0.5) - _logsig(-1.0), rel=1e-5)
  assert float(n) == 2 and float(met['accuracy']) == 1.0


def test_kwise_loss_equals_mean_over_pairs_double_loop():
  rng = np.random.default_rng(0)
  b, k = 3, 4
  scores = rng.normal(size=(b, k))
  ranks = np.stack([rng.permutation(k) for _ in range(b)])
  margin = np.array([0.0, 0.3, 1.0])
  total, pairs, correct, gap = 0.0, 0, 0, 0.0
  for i in range(b):
    for w in range(k):
      for l in range(k):
        if ranks[i, w] < ranks[i, l]:
          total += -_logsig(scores[i, w] - scores[i, l] - margin[i])
          pairs += 1
          correct += scores[i, w] > scores[i, l]
          gap += scores[i, w] - scores[i, l]
  assert pairs == b * math.comb(k, 2)
  s, n, met = reward.kwise_loss(jnp.asarray(scores, jnp.float32), jnp.asarray(ranks), jnp.asarray(margin))
  assert float(n) == pairs
  assert float(s / n) == pytest.approx(total / pairs, rel=1e-5)
  assert float(met['accuracy']) == correct
  assert float(met['margin']) == pytest.approx(gap, rel=1e-5)
  # K = 2 with ranks (0, 1) is the pairwise loss
  s2, _, _ = reward.kwise_loss(jnp.asarray(scores[:, :2], jnp.float32), jnp.array([[0, 1]] * b))
  s3, _, _ = reward.pairwise_loss(jnp.asarray(scores[:, 0], jnp.float32), jnp.asarray(scores[:, 1], jnp.float32))
  assert float(s2) == pytest.approx(float(s3), rel=1e-5)


def test_kwise_loss_skips_padding_and_ties():
  scores = jnp.array([[1.0, 0.0, 50.0]])
  s, n, _ = reward.kwise_loss(scores, jnp.array([[0, 1, 2]]), valid=jnp.array([[1, 1, 0]]))
  assert float(n) == 1 and float(s) == pytest.approx(-_logsig(1.0), rel=1e-5)
  _, n_tie, _ = reward.kwise_loss(scores, jnp.array([[0, 0, 1]]))
  assert float(n_tie) == 2


def test_reward_normalizer_and_ensembles():
  sft = jnp.array([1.0, 2.0, 3.0, 6.0])
  gain, bias = reward.normalizer(sft)
  out = np.asarray(reward.normalize(sft, gain, bias), np.float64)
  assert out.mean() == pytest.approx(0.0, abs=1e-6) and out.std() == pytest.approx(1.0, rel=1e-5)
  sc = jnp.array([[1.0, 4.0], [3.0, 0.0], [2.0, 2.0]])  # M = 3 models, B = 2
  np.testing.assert_allclose(reward.ensemble(sc, 'mean'), [2.0, 2.0])
  np.testing.assert_allclose(reward.ensemble(sc, 'min'), [1.0, 0.0])
  std = np.array([math.sqrt(2 / 3), math.sqrt(8 / 3)])
  np.testing.assert_allclose(reward.ensemble(sc, 'mean_minus_std', 0.5), 2.0 - 0.5 * std, rtol=1e-5)
  np.testing.assert_allclose(reward.ensemble(sc, 'uwo', 0.5), 2.0 - 0.5 * std ** 2, rtol=1e-5)
  with pytest.raises(ValueError, match='median'):
    reward.ensemble(sc, 'median')


# Differentiable and jit-able ---------------------------------------------------------------------
def test_losses_differentiable_and_jittable():
  x = jax.random.normal(jax.random.key(3), (4,))
  lp = jax.random.normal(jax.random.key(4), (4, 3))
  mask = jnp.array([[1, 1, 1], [1, 1, 0], [1, 0, 0], [1, 1, 1]], jnp.float32)
  cases = {
      'dpo': lambda v: preference.dpo_loss(v, v * 0.5, x, x + 1, 0.1, 0.1)[0],
      'ipo': lambda v: preference.ipo_loss(v, v * 0.5, x, x + 1, 0.1)[0],
      'pairwise': lambda v: reward.pairwise_loss(v, x)[0],
      'kwise': lambda v: reward.kwise_loss(jnp.stack([v, x]).T, jnp.array([[0, 1]] * 4))[0],
      'rloo': lambda v: pg.rloo_loss(lp * v[:, None], x, mask)[0],
      'grpo': lambda v: pg.grpo_loss(lp * v[:, None], lp, lp + 0.1, x, mask)[0],
  }
  for name, f in cases.items():
    g = jax.jit(jax.grad(f))(x + 0.3)
    assert np.all(np.isfinite(g)) and float(jnp.abs(g).sum()) > 0, name
