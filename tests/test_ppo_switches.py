"""PPO's reward/advantage switches (rl/ppo.token_advantages, through the ppo adapter's
prepare) against a
naive per-row Python computation: k1 KL penalty + score at the last token, optional reward
whitening (TRL's: standardised, mean added back), GAE by a loop, optional advantage whitening."""
import jax.numpy as jnp
import numpy as np
import pytest

import types

from experiments import ppo as ppo_stage
from experiments.configs import rlhf_ppo
from rl import ppo


def _rollout(seed=0, b=3, p=2, n=5):
  rng = np.random.default_rng(seed)
  lengths = np.array([5, 3, 1])[:b]
  mask = np.concatenate([np.ones((b, p)), (np.arange(n)[None] < lengths[:, None])], 1)
  f = lambda *s: jnp.asarray(rng.normal(size=s), jnp.float32)
  rm = jnp.asarray(mask[:, p:], jnp.float32)
  return {'tokens': jnp.zeros((b, p + n), jnp.int32), 'mask': jnp.asarray(mask, jnp.int32),
          'has_eos': jnp.ones(b, bool), 'logp': f(b, n) * rm, 'ref_logp': f(b, n) * rm,
          'values': f(b, n) * rm, 'scores': f(b)}, p


def _naive(ro, p, beta, whiten_rewards, whiten_adv, gamma=1.0, lam=0.95):
  m = np.asarray(ro['mask'][:, p:], np.float64)
  logp, ref, v = (np.asarray(ro[k], np.float64) for k in ('logp', 'ref_logp', 'values'))
  r = -beta * (logp - ref) * m
  for i in range(len(m)):
    r[i, int(m[i].sum()) - 1] += float(ro['scores'][i])
  if whiten_rewards:
    x = r[m > 0]   # TRL's whiten(shift_mean=False): standardised, then the mean added back
    r = ((r - x.mean()) / np.sqrt(x.var(ddof=1) + 1e-8) + x.mean()) * m
  adv = np.zeros_like(r)
  for i in range(len(m)):
    n, nxt_v, nxt_a = int(m[i].sum()), 0.0, 0.0
    for t in reversed(range(n)):
      delta = r[i, t] + gamma * nxt_v - v[i, t]
      nxt_a = delta + gamma * lam * nxt_a
      adv[i, t], nxt_v = nxt_a, v[i, t]
  ret = (adv + v) * m
  if whiten_adv:
    x = adv[m > 0]
    adv = (adv - x.mean()) / np.sqrt(x.var(ddof=1) + 1e-8) * m
  return adv, ret


@pytest.mark.parametrize('whiten_rewards,whiten_adv', [(False, False), (True, False),
                                                      (False, True), (True, True)])
def test_advantages_follow_the_switches(whiten_rewards, whiten_adv):
  ro, p = _rollout()
  c = rlhf_ppo.get_config()
  c.reward.whiten, c.loss.whiten_advantages = whiten_rewards, whiten_adv
  ctx = types.SimpleNamespace(config=c, width=p)
  extras = {'beta': jnp.float32(0.1), 'moments': ppo.running_moments()._asdict()}
  batch, _, _ = ppo_stage.PPO().prepare(ctx, ro, extras)
  adv, ret = _naive(ro, p, 0.1, whiten_rewards, whiten_adv)
  np.testing.assert_allclose(np.asarray(batch['advantages']), adv, atol=1e-5)
  np.testing.assert_allclose(np.asarray(batch['returns']), ret, atol=1e-5)
  if whiten_adv:
    m = np.asarray(ro['mask'][:, p:]) > 0
    a = np.asarray(batch['advantages'])[m]
    assert abs(a.mean()) < 1e-5 and abs(a.std(ddof=1) - 1) < 1e-4
