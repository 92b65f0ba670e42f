"""rl/ppo.py against hand arithmetic, plain Python loops and direct KL computations."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rl import common, ppo


def _np(x):
  return np.asarray(x, np.float64)


def test_logprobs_and_entropy_apply_temperature():
  logits = jnp.array([[[1.0, 2.0, 0.5], [0.0, 0.0, 3.0]]])
  tokens = jnp.array([[1, 0]])
  t = 0.7
  z = _np(logits)[0] / t
  logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
  np.testing.assert_allclose(common.logprobs_from_logits(logits, tokens, t)[0], [logp[0, 1], logp[1, 0]],
                             rtol=1e-5)
  ent = -(np.exp(logp) * logp).sum(-1)
  np.testing.assert_allclose(common.entropy_from_logits(logits, t)[0], ent, rtol=1e-5)


def test_masked_mean_var_whiten_ignore_padding():
  x = jnp.array([[1.0, 2.0, 3.0, 100.0], [4.0, -50.0, -50.0, -50.0]])
  m = jnp.array([[1, 1, 1, 0], [1, 0, 0, 0]])
  real = np.array([1.0, 2.0, 3.0, 4.0])
  assert float(common.masked_mean(x, m)) == pytest.approx(2.5)
  assert float(common.masked_var(x, m)) == pytest.approx(real.var(ddof=1), rel=1e-5)
  np.testing.assert_allclose(common.masked_mean(x, m, axis=1), [2.0, 4.0])
  w = _np(common.masked_whiten(x, m))[np.asarray(m) > 0]
  np.testing.assert_allclose(w, (real - 2.5) / real.std(ddof=1), rtol=1e-5)
  w2 = _np(common.masked_whiten(x, m, shift_mean=False))[np.asarray(m) > 0]
  np.testing.assert_allclose(w2, (real - 2.5) / real.std(ddof=1) + 2.5, rtol=1e-5)


def test_kl_estimators_k1_k3_against_categoricals():
  p = np.array([0.5, 0.3, 0.15, 0.05])
  q = np.array([0.25, 0.25, 0.25, 0.25])  # reference
  true_kl = float(np.sum(p * np.log(p / q)))
  logp, logq = jnp.log(jnp.asarray(p, jnp.float32)), jnp.log(jnp.asarray(q, jnp.float32))
  k1, k3 = common.kl_estimate(logp, logq, 'k1'), common.kl_estimate(logp, logq, 'k3')
  np.testing.assert_allclose(k1, np.log(p) - np.log(q), rtol=1e-5)
  r = q / p
  np.testing.assert_allclose(k3, (r - 1) - np.log(r), rtol=1e-4, atol=1e-6)
  assert np.all(_np(k3) >= 0)
  # exact expectations under p both equal KL(p || q)
  assert float(np.sum(p * _np(k1))) == pytest.approx(true_kl, rel=1e-4)
  assert float(np.sum(p * _np(k3))) == pytest.approx(true_kl, rel=1e-4)
  # sample-based: unbiased within Monte-Carlo error (fixed seed)
  idx = jax.random.categorical(jax.random.key(0), logp, shape=(200_000,))
  est = float(jnp.mean(common.kl_estimate(logp[idx], logq[idx], 'k3')))
  assert est == pytest.approx(true_kl, abs=0.005)
  with pytest.raises(ValueError, match='k2'):
    common.kl_estimate(logp, logq, 'k2')


def test_per_token_rewards_score_at_eos_and_kl_penalty():
  logp = jnp.array([[-1.0, -2.0, -0.5, -3.0], [-1.0, -1.0, -1.0, -1.0]])
  ref = jnp.array([[-1.5, -1.0, -0.5, -9.0], [-2.0, -0.5, -1.0, -1.0]])
  mask = jnp.array([[1, 1, 1, 0], [1, 1, 1, 1]])
  scores = jnp.array([2.0, -1.0])
  beta = 0.1
  rew, kl = ppo.per_token_rewards(scores, logp, ref, mask, beta, 'k1')
  k1 = np.array([[0.5, -1.0, 0.0, 0.0], [1.0, -0.5, 0.0, 0.0]])
  expected = -beta * k1
  expected[0, 2] += 2.0
  expected[1, 3] += -1.0
  np.testing.assert_allclose(kl, k1, atol=1e-6)
  np.testing.assert_allclose(rew, expected, atol=1e-6)
  # k3 with r = p_ref / p
  _, kl3 = ppo.per_token_rewards(scores, logp, ref, mask, beta, 'k3')
  lr = np.array([[-0.5, 1.0, 0.0], [-1.0, 0.5, 0.0]])
  np.testing.assert_allclose(_np(kl3)[:, :3], np.exp(lr) - 1 - lr, rtol=1e-5)
  # missing-EOS penalty: row 1 ran out of length
  rew_p, _ = ppo.per_token_rewards(scores, logp, ref, mask, beta, 'k1',
                                   has_eos=jnp.array([True, False]), missing_eos_penalty=1.5)
  np.testing.assert_allclose(_np(rew_p)[1, 3], expected[1, 3] - 1.5, atol=1e-6)
  np.testing.assert_allclose(_np(rew_p)[0], expected[0], atol=1e-6)


def test_score_scaling_helpers():
  np.testing.assert_allclose(ppo.normalize_scores(jnp.array([1.0, 3.0]), 2.0, 0.5), [-2.0, 2.0], rtol=1e-6)
  np.testing.assert_allclose(ppo.clip_scores(jnp.array([-9.0, 0.3, 9.0]), 5.0), [-5.0, 0.3, 5.0])
  rng = np.random.default_rng(0)
  a, b = rng.normal(size=7), rng.normal(size=11) * 3 + 1
  st = ppo.update_moments(ppo.update_moments(ppo.running_moments(), jnp.asarray(a)), jnp.asarray(b))
  both = np.concatenate([a, b])
  assert float(st.count) == 18
  assert float(st.mean) == pytest.approx(both.mean(), rel=1e-5)
  assert float(st.var) == pytest.approx(both.var(), rel=1e-5)


def _gae_loop(rewards, values, mask, gamma, lam):
  """Plain per-row loop: run only over the real tokens of each row (episode ends at EOS)."""
  b, t = rewards.shape
  adv = np.zeros((b, t))
  for i in range(b):
    n = int(mask[i].sum())
    last = 0.0
    for s in reversed(range(n)):
      next_v = values[i, s + 1] if s + 1 < n else 0.0
      delta = rewards[i, s] + gamma * next_v - values[i, s]
      last = delta + gamma * lam * last
      adv[i, s] = last
  ret = (adv + values) * mask
  return adv, ret


@pytest.mark.parametrize('t,gamma,lam', [(1, 1.0, 0.95), (5, 1.0, 0.95), (9, 0.9, 0.8), (16, 0.99, 1.0)])
def test_gae_matches_python_loop(t, gamma, lam):
  rng = np.random.default_rng(t)
  b = 4
  rewards = rng.normal(size=(b, t))
  values = rng.normal(size=(b, t))
  lengths = rng.integers(1, t + 1, size=b)
  lengths[0] = t
  mask = (np.arange(t)[None] < lengths[:, None]).astype(np.float64)
  # padding holds garbage that must not leak in
  rewards_p = np.where(mask > 0, rewards, 7.0)
  values_p = np.where(mask > 0, values, -5.0)
  adv, ret = ppo.gae(jnp.asarray(rewards_p), jnp.asarray(values_p), jnp.asarray(mask), gamma, lam)
  exp_adv, exp_ret = _gae_loop(rewards, values * mask, mask, gamma, lam)
  np.testing.assert_allclose(adv, exp_adv, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(ret, exp_ret, rtol=1e-4, atol=1e-5)


def test_whiten_advantages_zero_padding():
  adv = jnp.array([[1.0, 3.0, 9.0], [5.0, 9.0, 9.0]])
  m = jnp.array([[1, 1, 0], [1, 0, 0]])
  out = _np(ppo.whiten_advantages(adv, m))
  real = np.array([1.0, 3.0, 5.0])
  np.testing.assert_allclose(out[np.asarray(m) > 0], (real - 3.0) / real.std(ddof=1), rtol=1e-5)
  assert out[0, 2] == 0 and out[1, 1] == 0


def test_policy_loss_and_clipfrac_by_hand():
  ratios = np.array([[1.5, 0.5, 1.1, 0.7], [0.9, 1.3, 2.0, 1.0]])
  adv = np.array([[1.0, 1.0, -2.0, -1.0], [2.0, -1.0, 5.0, 3.0]])
  mask = np.array([[1, 1, 1, 1], [1, 1, 0, 0]], np.float32)
  old = np.full_like(ratios, -1.0)
  logp = old + np.log(ratios)
  loss, n, met = ppo.policy_loss(jnp.asarray(logp, jnp.float32), jnp.asarray(old, jnp.float32),
                                 jnp.asarray(adv, jnp.float32), jnp.asarray(mask), 0.2)
  # by hand, per token: max(-A r, -A clip(r, .8, 1.2))
  #  r=1.5,A=1: max(-1.5,-1.2) = -1.2 (clipped)   r=0.5,A=1: max(-.5,-.8) = -.5
  #  r=1.1,A=-2: max(2.2, 2.2) = 2.2              r=0.7,A=-1: max(.7,.8) = .8 (clipped)
  #  r=0.9,A=2: -1.8                              r=1.3,A=-1: max(1.3,1.2) = 1.3
  assert float(n) == 6
  assert float(loss) == pytest.approx(-1.2 - 0.5 + 2.2 + 0.8 - 1.8 + 1.3, rel=1e-5)
  assert float(met['clipfrac']) == pytest.approx(2.0)
  lr = np.log(ratios)
  assert float(met['approx_kl']) == pytest.approx(float(np.sum(((ratios - 1) - lr) * mask)), rel=1e-4)


def test_value_loss_by_hand():
  v = jnp.array([[1.0, 0.0, 2.0]])
  old = jnp.array([[0.5, 0.0, 1.0]])
  ret = jnp.array([[2.0, 1.0, 0.0]])
  m = jnp.array([[1, 1, 1]])
  loss, n, met = ppo.value_loss(v, old, ret, m, 0.2)
  # token 0: clip(1, .3, .7)=.7 -> max((1-2)^2, (.7-2)^2) = 1.69
  # token 1: clip(0, -.2, .2)=0 -> max(1, 1) = 1
  # token 2: clip(2, .8, 1.2)=1.2 -> max(4, 1.44) = 4
  assert float(loss) == pytest.approx(0.5 * (1.69 + 1.0 + 4.0), rel=1e-5)
  assert float(met['vf_clipfrac']) == 1.0 and float(n) == 3


def test_ppo_loss_and_ptx_combination():
  z = jnp.zeros((1, 2))
  m = jnp.ones((1, 2))
  adv = jnp.array([[1.0, -1.0]])
  ret = jnp.array([[1.0, 2.0]])
  ent = jnp.array([[0.5, 0.25]])
  total, n, met = ppo.ppo_loss(z, z, z, z, adv, ret, m, vf_coef=0.5, entropy=ent, entropy_coef=0.1)
  # ratio 1: policy sum = -1 + 1 = 0; value sum = 0.5 * (1 + 4) = 2.5; entropy sum .75
  assert float(total) == pytest.approx(0.5 * 2.5 - 0.1 * 0.75)
  s, w, met2 = ppo.ppo_ptx_loss((total, n, met), (jnp.float32(6.0), jnp.float32(3.0), {}), 2.0)
  assert float(s / w) == pytest.approx(float(total) / 2 + 2.0 * 2.0)
  assert float(met2['ptx_loss'] / w) == pytest.approx(2.0)


def test_kl_controller_formula():
  ctl = ppo.adaptive_kl_controller(0.2, target=6.0, horizon=10000)
  beta = 0.2
  for kl, n in [(9.0, 256), (6.6, 512), (3.0, 256), (5.4, 128)]:
    ctl = ppo.update_kl_controller(ctl, kl, n)
    error = min(max(kl / 6.0 - 1, -0.2), 0.2)
    beta *= 1 + error * n / 10000
    assert float(ctl.beta) == pytest.approx(beta, rel=1e-6)
  fixed = ppo.fixed_kl_controller(0.05)
  assert float(ppo.update_kl_controller(fixed, 100.0, 256).beta) == pytest.approx(0.05)
  jitted = jax.jit(ppo.update_kl_controller)(ctl, 12.0, 256)  # a pytree: jit-able
  assert float(jitted.beta) == pytest.approx(beta * (1 + 0.2 * 256 / 10000), rel=1e-6)


def test_losses_differentiable_and_jittable():
  # the whole pipeline (rewards -> GAE -> whitening -> loss) in one compiled grad
  rng = np.random.default_rng(1)
  b, t, v = 2, 5, 7
  logits = jnp.asarray(rng.normal(size=(b, t, v)), jnp.float32)
  tokens = jnp.asarray(rng.integers(0, v, size=(b, t)))
  mask = jnp.array([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], jnp.float32)
  vals = jnp.asarray(rng.normal(size=(b, t)), jnp.float32)

  def f(lg, vv):
    logp = common.logprobs_from_logits(lg, tokens, 0.8)
    old = jax.lax.stop_gradient(logp) - 0.1
    rewards, _ = ppo.per_token_rewards(jnp.array([1.0, -1.0]), old, old + 0.2, mask, 0.1, 'k3')
    adv, ret = ppo.gae(rewards, vals, mask)
    s, n, _ = ppo.ppo_loss(logp, old, vv, vals, ppo.whiten_advantages(adv, mask), ret, mask,
                           entropy=common.entropy_from_logits(lg, 0.8), entropy_coef=0.01)
    return s / n

  g_l, g_v = jax.jit(jax.grad(f, argnums=(0, 1)))(logits, vals + 0.05)
  assert np.all(np.isfinite(g_l)) and np.all(np.isfinite(g_v))
  assert float(jnp.abs(g_l).sum()) > 0 and float(jnp.abs(g_v).sum()) > 0
  assert float(jnp.abs(g_l[1, 3:]).sum()) == 0  # padding gets no gradient
