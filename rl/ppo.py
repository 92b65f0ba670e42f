"""PPO for language models: per-token rewards, GAE, clipped policy and value losses, KL
penalties and the adaptive KL controller, PPO-ptx (pure functions; no I/O, no loops).

Conventions. Arrays are [B, T] over the *response* tokens: position t holds the token the
policy emitted there, its log-prob, the value of the state before it, and its reward.
`mask` is 1 on real response tokens and 0 on padding after the end (EOS is real).
Losses follow lm/objectives.py: they return (loss_sum, weight, metric_sums), weight being
the number of masked-in tokens, so lm.train divides once and microbatches accumulate exactly.

References: Schulman et al. 2017 (PPO); Schulman et al. 2016 (GAE); Ziegler et al. 2019
(KL-penalised rewards, adaptive KL controller); Ouyang et al. 2022 (InstructGPT, PPO-ptx);
Huang et al. 2024 ("The N implementation details of RLHF with PPO"); Schulman 2020,
"Approximating KL divergence" (k1, k3 estimators).
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from rl import common


def per_token_rewards(scores: jax.Array, logp: jax.Array, ref_logp: jax.Array, mask: jax.Array,
                      beta, kl: str = 'k1', has_eos: jax.Array | None = None,
                      missing_eos_penalty: float | None = None):
  """Ziegler et al. 2019 eq. 2: R_t = -beta * KL_t, plus the reward model's score at the last
  real token (the EOS), so the return from any step is score - beta * KL(rest).

  scores [B], logp/ref_logp/mask [B, T]. Returns (rewards [B, T], kl [B, T]), both 0 on padding.
  """
  mask = mask.astype(jnp.float32)
  if missing_eos_penalty is not None:
    if has_eos is None:
      raise ValueError('missing_eos_penalty needs has_eos (which rows ended with EOS)')
    scores = common.apply_missing_eos_penalty(scores, has_eos, missing_eos_penalty)
  kl_t = common.kl_estimate(logp, ref_logp, kl) * mask
  last = jax.nn.one_hot(common.last_token_index(mask), mask.shape[-1], dtype=jnp.float32)
  return (-beta * kl_t + scores[:, None].astype(jnp.float32) * last) * mask, kl_t


def normalize_scores(scores: jax.Array, mean, std, eps: float = 1e-8) -> jax.Array:
  """(scores - mean) / std with fixed statistics (e.g. of the reward model on SFT samples)."""
  return (scores - mean) / (std + eps)


def clip_scores(scores: jax.Array, limit: float) -> jax.Array:
  """Clip to [-limit, limit] (trlx's cliprange_reward) so one outlier cannot dominate."""
  return jnp.clip(scores, -limit, limit)


class RunningMoments(NamedTuple):
  """Running mean / variance of scores (trlx's reward scaling by a running std)."""
  count: jax.Array
  mean: jax.Array
  var: jax.Array


def running_moments() -> RunningMoments:
  return RunningMoments(jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32), jnp.ones((), jnp.float32))


def update_moments(state: RunningMoments, x: jax.Array) -> RunningMoments:
  """Merge a batch into the running moments (Chan et al. parallel variance; population var)."""
  x = x.astype(jnp.float32).reshape(-1)
  n = jnp.float32(x.size)
  bmean, bvar = jnp.mean(x), jnp.var(x)
  total = state.count + n
  delta = bmean - state.mean
  mean = state.mean + delta * n / total
  m2 = state.var * state.count + bvar * n + jnp.square(delta) * state.count * n / total
  return RunningMoments(total, mean, m2 / total)


# GAE ------------------------------------------------------------------------------------------
def gae(rewards: jax.Array, values: jax.Array, mask: jax.Array, gamma: float = 1.0,
        lam: float = 0.95):
  """Generalised advantage estimation (Schulman et al. 2016, eq. 16), right to left:

    delta_t = r_t + gamma * V_{t+1} - V_t,   A_t = delta_t + gamma * lam * A_{t+1},

  where V and A past the end of the response are 0 (the episode terminates at EOS; the
  value head's outputs on padding are masked out). Returns (advantages, returns = A + V),
  [B, T], 0 on padding. gamma=1 and lam=0.95 follow Ziegler et al. 2019 / InstructGPT.
  """
  mask = mask.astype(jnp.float32)
  values = values.astype(jnp.float32) * mask
  rewards = rewards.astype(jnp.float32) * mask
  next_values = jnp.concatenate([values[:, 1:], jnp.zeros_like(values[:, :1])], axis=1)
  next_mask = jnp.concatenate([mask[:, 1:], jnp.zeros_like(mask[:, :1])], axis=1)
  deltas = rewards + gamma * next_values - values

  def step(next_adv, xs):
    delta, m_next = xs
    adv = delta + gamma * lam * m_next * next_adv
    return adv, adv

  # scan over time (axis 0 after the transpose), last step first
  _, adv = jax.lax.scan(step, jnp.zeros_like(values[:, 0]), (deltas.T, next_mask.T), reverse=True)
  adv = adv.T * mask
  return adv, (adv + values) * mask


def whiten_advantages(advantages: jax.Array, mask: jax.Array) -> jax.Array:
  """Normalise advantages to mean 0, std 1 over the batch's real tokens (padding stays 0)."""
  return common.masked_whiten(advantages, mask, shift_mean=True) * mask


# Losses (sums convention) ---------------------------------------------------------------------
def policy_loss(logp: jax.Array, old_logp: jax.Array, advantages: jax.Array, mask: jax.Array,
                clip_eps: float = 0.2):
  """PPO-clip (Schulman et al. 2017, eq. 7), per token:

    L_t = max(-A_t * rho_t, -A_t * clip(rho_t, 1 - eps, 1 + eps)),  rho_t = pi / pi_old.

  Returns (loss_sum, n_tokens, metric sums): clipfrac (tokens where the clipped branch is the
  active, strictly larger one) and approx_kl (k3 estimate of KL(pi_old || pi)).
  """
  mask = mask.astype(jnp.float32)
  advantages = jax.lax.stop_gradient(advantages)
  log_ratio = logp - jax.lax.stop_gradient(old_logp)
  ratio = jnp.exp(log_ratio)
  unclipped = -advantages * ratio
  clipped = -advantages * jnp.clip(ratio, 1.0 - clip_eps, 1.0 + clip_eps)
  loss = jnp.maximum(unclipped, clipped)
  clipfrac = (clipped > unclipped).astype(jnp.float32)
  approx_kl = jnp.expm1(log_ratio) - log_ratio
  metrics = {'policy_loss': common.masked_sum(loss, mask), 'clipfrac': common.masked_sum(clipfrac, mask),
             'approx_kl': common.masked_sum(jax.lax.stop_gradient(approx_kl), mask)}
  return common.masked_sum(loss, mask), jnp.sum(mask), metrics


def value_loss(values: jax.Array, old_values: jax.Array, returns: jax.Array, mask: jax.Array,
               clip_eps: float = 0.2):
  """Clipped value loss (Huang et al. 2024; OpenAI lm-human-preferences):

    L_t = 0.5 * max((V - R)^2, (clip(V, V_old - eps, V_old + eps) - R)^2).

  Returns (loss_sum, n_tokens, metric sums) with vf_clipfrac.
  """
  mask = mask.astype(jnp.float32)
  returns, old_values = jax.lax.stop_gradient(returns), jax.lax.stop_gradient(old_values)
  clipped_v = jnp.clip(values, old_values - clip_eps, old_values + clip_eps)
  err, err_clipped = jnp.square(values - returns), jnp.square(clipped_v - returns)
  loss = 0.5 * jnp.maximum(err, err_clipped)
  metrics = {'value_loss': common.masked_sum(loss, mask),
             'vf_clipfrac': common.masked_sum((err_clipped > err).astype(jnp.float32), mask)}
  return common.masked_sum(loss, mask), jnp.sum(mask), metrics


def ppo_loss(logp, old_logp, values, old_values, advantages, returns, mask, *, clip_eps=0.2,
             vf_clip_eps=0.2, vf_coef=0.1, entropy=None, entropy_coef=0.0):
  """Policy + vf_coef * value - entropy_coef * entropy, all per token (sums convention).
  `entropy` [B, T] (common.entropy_from_logits) is optional; vf_coef=0.1 as Ziegler et al. 2019."""
  p_sum, n, metrics = policy_loss(logp, old_logp, advantages, mask, clip_eps)
  v_sum, _, v_metrics = value_loss(values, old_values, returns, mask, vf_clip_eps)
  total = p_sum + vf_coef * v_sum
  metrics = {**metrics, **v_metrics}
  if entropy is not None:
    ent = common.masked_sum(entropy, mask.astype(jnp.float32))
    total = total - entropy_coef * ent
    metrics['entropy'] = jax.lax.stop_gradient(ent)
  return total, n, metrics


def ppo_ptx_loss(ppo, ptx, gamma_ptx: float):
  """PPO-ptx (Ouyang et al. 2022, eq. 2): L = L_ppo + gamma * L_pretrain, each a mean.

  ppo, ptx: (loss_sum, weight, metric_sums) triples, e.g. ppo_loss(...) and
  lm.objectives.next_token_loss(...). The result is in the PPO triple's units (divide by its
  weight): ppo_mean + gamma * ptx_mean. Under gradient accumulation each microbatch's
  pretraining mean is weighted by its PPO token count (exact when those are equal).
  """
  p_sum, p_w, p_metrics = ppo
  x_sum, x_w, _ = ptx
  ptx_mean = x_sum / jnp.maximum(x_w, 1e-8)
  return p_sum + gamma_ptx * ptx_mean * p_w, p_w, {**p_metrics, 'ptx_loss': ptx_mean * p_w}


# KL controller --------------------------------------------------------------------------------
class KLController(NamedTuple):
  """beta and the controller's settings; target=None makes it a fixed controller."""
  beta: jax.Array
  target: jax.Array | None = None
  horizon: jax.Array | None = None


def fixed_kl_controller(beta: float) -> KLController:
  return KLController(jnp.float32(beta))


def adaptive_kl_controller(init_beta: float, target: float, horizon: float) -> KLController:
  return KLController(jnp.float32(init_beta), jnp.float32(target), jnp.float32(horizon))


def update_kl_controller(ctl: KLController, current_kl, n_steps) -> KLController:
  """Ziegler et al. 2019, eq. 3: e = clip(KL / KL_target - 1, -0.2, 0.2);
  beta <- beta * (1 + e * n_steps / horizon). A fixed controller returns itself.
  `n_steps` is the number of samples (episodes) since the last update, as in their code."""
  if ctl.target is None:
    return ctl
  error = jnp.clip(current_kl / ctl.target - 1.0, -0.2, 0.2)
  return ctl._replace(beta=ctl.beta * (1.0 + error * n_steps / ctl.horizon))


def token_advantages(scores, logp, ref_logp, values, mask, has_eos, *, beta, moments: RunningMoments,
                     kl_estimator: str = 'k1', missing_eos_penalty: float = 0.0,
                     score_clip: float = 0.0, score_scale: str = 'none', whiten_rewards: bool = False,
                     whiten_advantages_: bool = True, gamma: float = 1.0, lam: float = 0.95):
  """A rollout's scores -> per-token rewards (KL penalty + the score at the EOS) -> GAE.

  scores/has_eos [B]; logp/ref_logp/values/mask [B, T] over the response. score_scale
  'running' divides the scores by the running std of every score seen (trlx; moments is
  updated), score_clip > 0 clips them, missing_eos_penalty > 0 is subtracted from rows that
  never ended. Returns (advantages, returns, rewards, kl [B, T], new moments)."""
  mask = mask.astype(jnp.float32)
  if score_scale == 'running':
    moments = update_moments(moments, scores)
    scores = scores / jnp.sqrt(moments.var + 1e-8)
  if score_clip > 0:
    scores = clip_scores(scores, score_clip)
  rewards, kl = per_token_rewards(scores, logp, ref_logp, mask, beta, kl_estimator, has_eos=has_eos,
                                  missing_eos_penalty=missing_eos_penalty or None)
  if whiten_rewards:
    rewards = common.masked_whiten(rewards, mask, shift_mean=False) * mask
  adv, returns = gae(rewards, values, mask, gamma, lam)
  if whiten_advantages_:
    adv = whiten_advantages(adv, mask)
  return adv, returns, rewards, kl, moments
