"""Reward-model losses (the driver lives in experiments/): pairwise and K-wise ranking,
score normalisation, and ensembles of reward models.

InstructGPT (Ouyang et al. 2022, eq. 1): with K ranked responses to one prompt, every one of
the C(K, 2) pairs is a comparison, and all pairs of a prompt go in one batch:
  loss = -1/C(K,2) * E[ sum_{(w, l)} log sigmoid(r(x, y_w) - r(x, y_l) - m) ],
m a margin (0 there; Touvron et al. 2023 use one by preference strength). K = 2 is the
pairwise chosen/rejected loss. Losses return (loss_sum, n_pairs, metric_sums) like
lm/objectives.py.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

ENSEMBLES = ('mean', 'min', 'mean_minus_std', 'uwo')


def pairwise_loss(chosen: jax.Array, rejected: jax.Array, margin=0.0):
  """-log sigmoid(r_w - r_l - margin) over [B] score pairs; margin scalar or [B]."""
  diff = chosen.astype(jnp.float32) - rejected.astype(jnp.float32)
  loss = -jax.nn.log_sigmoid(diff - margin)
  metrics = {'accuracy': jnp.sum((diff > 0).astype(jnp.float32)),
             'margin': jax.lax.stop_gradient(jnp.sum(diff))}
  return jnp.sum(loss), jnp.float32(loss.shape[0]), metrics


def kwise_loss(scores: jax.Array, ranks: jax.Array, margin=0.0, valid: jax.Array | None = None):
  """K-wise ranking loss over all ordered pairs of each row.

  scores [B, K]; ranks [B, K] integers, lower = better (0 is the best); equal ranks (ties)
  form no pair. valid [B, K] (optional) drops padded responses when rows have fewer than K.
  margin: scalar, or [B] per prompt. Returns (loss_sum, n_pairs, metric sums): accuracy counts
  pairs the model orders like the labels, margin sums the preferred-minus-other score gaps.
  """
  s = scores.astype(jnp.float32)
  diff = s[:, :, None] - s[:, None, :]                        # [B, K(w), K(l)]
  pair = (ranks[:, :, None] < ranks[:, None, :]).astype(jnp.float32)
  if valid is not None:
    v = valid.astype(jnp.float32)
    pair = pair * v[:, :, None] * v[:, None, :]
  m = jnp.asarray(margin, jnp.float32)
  m = m.reshape(m.shape + (1, 1)) if m.ndim == 1 else m
  loss = -jax.nn.log_sigmoid(diff - m) * pair
  metrics = {'accuracy': jnp.sum((diff > 0).astype(jnp.float32) * pair),
             'margin': jax.lax.stop_gradient(jnp.sum(diff * pair))}
  return jnp.sum(loss), jnp.sum(pair), metrics


def normalizer(sft_scores: jax.Array, eps: float = 1e-8) -> tuple[jax.Array, jax.Array]:
  """(gain, bias) so that gain * r + bias has mean 0 and std 1 on samples from the SFT policy
  (Ziegler et al. 2019 / Stiennon et al. 2020 normalise the reward model this way before RL)."""
  s = sft_scores.astype(jnp.float32)
  gain = 1.0 / (jnp.std(s) + eps)
  return gain, -jnp.mean(s) * gain


def normalize(scores: jax.Array, gain, bias) -> jax.Array:
  return gain * scores + bias


def ensemble(scores: jax.Array, how: str = 'mean', lam: float = 0.0) -> jax.Array:
  """Combine M reward models' scores [M, B] -> [B] (Coste et al. 2023):
  'mean'; 'min' (worst-case optimisation); 'mean_minus_std': mean - lam * std (a lower
  confidence bound); 'uwo': mean - lam * variance (the paper's uncertainty-weighted
  optimisation). std/variance are over the M models, population (ddof=0)."""
  s = scores.astype(jnp.float32)
  if how == 'mean':
    return jnp.mean(s, 0)
  if how == 'min':
    return jnp.min(s, 0)
  if how == 'mean_minus_std':
    return jnp.mean(s, 0) - lam * jnp.std(s, 0)
  if how == 'uwo':
    return jnp.mean(s, 0) - lam * jnp.var(s, 0)
  raise ValueError(f'unknown ensemble {how!r}; choose one of {ENSEMBLES}')
