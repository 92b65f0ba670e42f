"""Best-of-n sampling: draw n responses per prompt, keep the highest-scoring one.

Its KL from the base policy has a closed form for continuous scores (Stiennon et al. 2020,
appendix; Gao et al. 2022, eq. 1): KL_bon = log n - (n - 1) / n, which makes best-of-n a
reference point for the reward/KL frontier of RL methods.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp


def best_index(scores: jax.Array) -> jax.Array:
  """Argmax within each group: scores [P, n] -> [P] (the first on ties)."""
  return jnp.argmax(scores, axis=-1)


def best_of_n(samples: jax.Array, scores: jax.Array) -> tuple[jax.Array, jax.Array]:
  """samples [P, n, ...], scores [P, n] -> (best samples [P, ...], their scores [P])."""
  idx = best_index(scores)
  best = jnp.take_along_axis(samples, idx.reshape(idx.shape + (1,) * (samples.ndim - 1)), axis=1)
  return best[:, 0], jnp.take_along_axis(scores, idx[:, None], axis=1)[:, 0]


def kl_bon(n) -> float:
  """Analytic KL(best-of-n || base) = log n - (n - 1) / n (nats)."""
  return math.log(n) - (n - 1) / n
