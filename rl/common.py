"""What every RL objective shares: log-probs and entropy from logits (at a sampling
temperature), masked reductions and whitening, per-token KL estimators, and the small
per-sequence helpers of a rollout (last real token, missing-EOS penalty). Pure functions."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from lm.objectives import token_nll

KL_ESTIMATORS = ('k1', 'k3')


# Log-probs and entropy ------------------------------------------------------------------------
def scale_logits(logits: jax.Array, temperature: float = 1.0) -> jax.Array:
  """float32 logits / temperature: the policy sampled from softmax(logits / T), so every
  log-prob used for ratios and KL must see the same T (Huang et al. 2024, detail 'temperature')."""
  return logits.astype(jnp.float32) / temperature


def logprobs_from_logits(logits: jax.Array, tokens: jax.Array, temperature: float = 1.0) -> jax.Array:
  """log pi(token_t | context) at temperature T: [B, T, V], [B, T] -> [B, T] float32."""
  return -token_nll(scale_logits(logits, temperature), tokens)


def entropy_from_logits(logits: jax.Array, temperature: float = 1.0) -> jax.Array:
  """Entropy of softmax(logits / T) per position: [B, T, V] -> [B, T] float32."""
  z = scale_logits(logits, temperature)
  logp = jax.nn.log_softmax(z, axis=-1)
  return -jnp.sum(jnp.exp(logp) * logp, axis=-1)


# Masked statistics ----------------------------------------------------------------------------
def masked_sum(x: jax.Array, mask: jax.Array, axis=None) -> jax.Array:
  return jnp.sum(x * mask, axis=axis)


def masked_mean(x: jax.Array, mask: jax.Array, axis=None) -> jax.Array:
  """Mean of x over mask > 0 (padding ignored); 0 where the mask is empty."""
  mask = mask.astype(jnp.float32)
  return masked_sum(x, mask, axis) / jnp.maximum(jnp.sum(mask, axis=axis), 1e-8)


def masked_var(x: jax.Array, mask: jax.Array, unbiased: bool = True) -> jax.Array:
  """Variance of x over mask > 0, with Bessel's correction by default (as TRL/trlx)."""
  mask = mask.astype(jnp.float32)
  mean = masked_mean(x, mask)
  var = masked_mean(jnp.square(x - mean), mask)
  if unbiased:
    n = jnp.sum(mask)
    var = var * n / jnp.maximum(n - 1, 1)
  return var


def masked_whiten(x: jax.Array, mask: jax.Array, shift_mean: bool = True, eps: float = 1e-8) -> jax.Array:
  """(x - mean) / std over the masked-in entries; shift_mean=False keeps the mean (only
  rescales), which is how rewards are whitened without changing their sign."""
  mean, var = masked_mean(x, mask), masked_var(x, mask)
  out = (x - mean) * jax.lax.rsqrt(var + eps)
  return out if shift_mean else out + mean


# KL estimators and per-token rewards ----------------------------------------------------------
def kl_estimate(logp: jax.Array, ref_logp: jax.Array, kind: str = 'k1') -> jax.Array:
  """Per-token estimate of KL(pi || pi_ref) from tokens sampled from pi (Schulman 2020).

  k1 = log p - log p_ref (unbiased, can be negative);
  k3 = (r - 1) - log r with r = p_ref / p (unbiased, always >= 0, lower variance).
  """
  log_r = ref_logp - logp
  if kind == 'k1':
    return -log_r
  if kind == 'k3':
    return jnp.expm1(log_r) - log_r
  raise ValueError(f'unknown KL estimator {kind!r}; choose one of {KL_ESTIMATORS}')


def last_token_index(mask: jax.Array) -> jax.Array:
  """Index of the last masked-in token per row ([B, T] -> [B]); 0 for an empty row."""
  t = mask.shape[-1]
  return jnp.max(jnp.where(mask > 0, jnp.arange(t), 0), axis=-1)


def apply_missing_eos_penalty(scores: jax.Array, has_eos: jax.Array, penalty: float) -> jax.Array:
  """Subtract `penalty` from the score of responses that ran out of length without EOS
  (TRL's missing_eos_penalty; Huang et al. 2024 detail on truncated responses)."""
  return jnp.where(has_eos, scores, scores - penalty)
