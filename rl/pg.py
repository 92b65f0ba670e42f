"""Critic-free policy gradients with k samples per prompt: RLOO and GRPO.

Rewards come grouped as [P, k] (k responses to each of P prompts, adjacent in the batch);
per-token arrays are [P * k, T] in the same order, with a response `mask`.

RLOO (Ahmadian et al. 2024; Kool et al. 2019): REINFORCE with the leave-one-out baseline
  A_i = r_i - 1/(k-1) sum_{j != i} r_j,   loss = -A_i * log pi(y_i)   (one action per sequence).
GRPO (Shao et al. 2024, DeepSeekMath eq. 3): group-normalised advantages
  A_i = (r_i - mean(r)) / (std(r) + eps), broadcast to every token, a PPO-clip ratio objective
  and a per-token KL to the reference with the k3 estimator; no value model.

Averaging (`level`): 'sequence' averages each response over its tokens, then over responses
(the GRPO paper: long and short answers weigh the same); 'token' averages over all tokens in
the batch (DAPO, Yu et al. 2025: long answers weigh more, no length bias per token).

The GRPO family's switches (each defaults to GRPO):
  scale      advantage scaling: 'group' (/ group std, GRPO), 'batch' (/ the std of all the
             batch's rewards), 'none' (Dr. GRPO, Liu et al. 2025: centred only)
  length_norm  level='sequence' divides a response's token sum by its length (GRPO); False
             divides by the constant T (the response budget, Dr. GRPO: no length bias)
  clip_low, clip_high  the ratio's clip range [1 - low, 1 + high] (DAPO's clip-higher: high > low)
  ratio      'token' (pi/pi_old per token) or 'sequence' (GSPO, Zheng et al. 2025: the
             length-normalised sequence ratio s_i = exp(mean_t log pi/pi_old), one per response,
             clipped as a whole)
  overlong filtering (DAPO): the adapter zeroes the mask of truncated responses; a row with
             no tokens left counts for nothing at either level
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from rl.common import kl_estimate

LEVELS = ('token', 'sequence')
SCALES = ('group', 'batch', 'none')
RATIOS = ('token', 'sequence')


def rloo_advantages(rewards: jax.Array) -> jax.Array:
  """[P, k] -> [P, k]: r_i minus the mean of the other k - 1 rewards of its group."""
  k = rewards.shape[-1]
  if k < 2:
    raise ValueError('RLOO needs k >= 2 samples per prompt (the baseline leaves one out)')
  others = (jnp.sum(rewards, axis=-1, keepdims=True) - rewards) / (k - 1)
  return rewards - others


def rloo_rewards(scores: jax.Array, kl_seq: jax.Array, kl_coef: float) -> jax.Array:
  """RLOO's KL-regularised sequence reward (Ahmadian et al. 2024): r = score - kl_coef * KL,
  with KL = sum_t (log pi - log pi_ref) over the response (the k1 estimate of the sequence)."""
  return scores - kl_coef * kl_seq


def grpo_advantages(rewards: jax.Array, eps: float = 1e-4, ddof: int = 1, scale: str = 'group') -> jax.Array:
  """[P, k] -> [P, k]: (r - group mean) / (std + eps); ddof=1 (sample std) as TRL. The std is
  the group's (scale='group'), all the batch's rewards' ('batch'), or none: r - group mean."""
  mean = jnp.mean(rewards, axis=-1, keepdims=True)
  if scale == 'group':
    return (rewards - mean) / (jnp.std(rewards, axis=-1, keepdims=True, ddof=ddof) + eps)
  if scale == 'batch':
    return (rewards - mean) / (jnp.std(rewards, ddof=ddof) + eps)
  if scale == 'none':
    return rewards - mean
  raise ValueError(f'unknown advantage scaling {scale!r}; choose one of {SCALES}')


def _reduce(per_token: jax.Array, mask: jax.Array, level: str, length_norm: bool = True):
  """(sum, weight) under the chosen averaging: token -> (sum over tokens, #tokens);
  sequence -> (sum over rows of the row's token mean, #rows), the mean's divisor the row's
  length (length_norm) or the constant T = mask.shape[-1] (Dr. GRPO)."""
  if level == 'token':
    return jnp.sum(per_token * mask), jnp.sum(mask)
  if level == 'sequence':
    n = jnp.maximum(jnp.sum(mask, -1), 1.0) if length_norm else jnp.float32(mask.shape[-1])
    per_row = jnp.sum(per_token * mask, -1) / n
    return jnp.sum(per_row), jnp.sum(jnp.any(mask > 0, -1).astype(jnp.float32))   # rows with tokens
  raise ValueError(f'unknown level {level!r}; choose one of {LEVELS}')


def rloo_loss(logp: jax.Array, advantages: jax.Array, mask: jax.Array, keep: jax.Array | None = None):
  """REINFORCE on whole sequences: -A_i * sum_t log pi(y_i,t). logp/mask [N, T], advantages
  [N] (rloo_advantages(...).reshape(-1)); keep [N] (optional) 0 takes a row out of the loss and
  its weight. Returns (loss_sum, n_sequences kept, metric sums)."""
  mask = mask.astype(jnp.float32)
  keep = jnp.ones(mask.shape[:1], jnp.float32) if keep is None else keep.astype(jnp.float32)
  seq_logp = jnp.sum(logp * mask, -1)
  loss = -jax.lax.stop_gradient(advantages) * seq_logp * keep
  return jnp.sum(loss), jnp.sum(keep), {'advantage': jnp.sum(advantages * keep)}


def grpo_loss(logp: jax.Array, old_logp: jax.Array, ref_logp: jax.Array, advantages: jax.Array,
              mask: jax.Array, clip_eps: float = 0.2, beta: float = 0.04, level: str = 'sequence',
              kl: str = 'k3', *, clip_low: float | None = None, clip_high: float | None = None,
              ratio: str = 'token', length_norm: bool = True):
  """GRPO per token: -min(rho A, clip(rho, 1 - low, 1 + high) A) + beta * KL_t(pi || pi_ref),
  rho = pi / pi_old per token (ratio='token') or GSPO's exp(mean_t log pi/pi_old) of the whole
  response ('sequence'); low and high default to clip_eps; KL_t by the estimator `kl` (k3 in
  the paper); beta = 0 leaves the KL out of the loss (still logged).
  advantages [N] (grpo_advantages(...).reshape(-1)) are shared by all tokens of a response.
  Returns (loss_sum, weight, metric sums) with the weight set by `level` and `length_norm`."""
  low = clip_eps if clip_low is None else clip_low
  high = clip_eps if clip_high is None else clip_high
  mask = mask.astype(jnp.float32)
  adv = jax.lax.stop_gradient(advantages)[:, None]
  log_ratio = logp - jax.lax.stop_gradient(old_logp)
  if ratio == 'sequence':
    log_ratio = (jnp.sum(log_ratio * mask, -1) / jnp.maximum(jnp.sum(mask, -1), 1.0))[:, None]
    log_ratio = jnp.broadcast_to(log_ratio, mask.shape)
  elif ratio != 'token':
    raise ValueError(f'unknown ratio {ratio!r}; choose one of {RATIOS}')
  rho = jnp.exp(log_ratio)
  surrogate = jnp.minimum(rho * adv, jnp.clip(rho, 1.0 - low, 1.0 + high) * adv)
  kl_t = kl_estimate(logp, jax.lax.stop_gradient(ref_logp), kl)
  per_token = -surrogate + beta * kl_t if beta else -surrogate
  metrics = {'kl': _reduce(jax.lax.stop_gradient(kl_t), mask, level, length_norm)[0]}
  total, weight = _reduce(per_token, mask, level, length_norm)
  clipped = ((rho < 1.0 - low) | (rho > 1.0 + high)).astype(jnp.float32)
  metrics['clipfrac'] = _reduce(clipped, mask, level, length_norm)[0]
  return total, weight, metrics
