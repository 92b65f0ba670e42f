"""Best-of-n sampling: draw n responses per prompt, keep the highest-scoring one.

Its KL from the base policy has a closed form for continuous scores (Stiennon et al. 2020,
appendix; Gao et al. 2022, eq. 1): KL_bon = log n - (n - 1) / n, which makes best-of-n a
reference point for the reward/KL frontier of RL methods.

The estimator of best-of-n from N >= n samples (Gao et al. 2022, appendix; Nakano et al. 2021):
sort a prompt's N samples by the selecting score, ascending; the best of a uniformly random
n-subset is the i-th (1-based) with probability C(i - 1, n - 1) / C(N, n), so E[value of the
best of n] = sum_i value_(i) * C(i - 1, n - 1) / C(N, n). It uses all N samples for every n
(lower variance than drawing disjoint groups of n) and is exact for the empirical distribution.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np


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


# The estimator (numpy, on the host) ------------------------------------------------------
def ns_of(n_samples: int) -> list[int]:
  """1, 2, 4, ... up to n_samples, and n_samples itself if it is not a power of 2."""
  ns, n = [], 1
  while n <= n_samples:
    ns.append(n)
    n *= 2
  return ns if ns[-1] == n_samples else ns + [n_samples]


def bon_weights(N: int, n: int) -> np.ndarray:
  """[N] probability that the i-th smallest of N (0-based i) is the best of a random n-subset:
  C(i, n - 1) / C(N, n) (exact integer arithmetic, then one rounding)."""
  if not 1 <= n <= N:
    raise ValueError(f'n={n} must be in [1, N={N}].')
  total = math.comb(N, n)
  return np.array([math.comb(i, n - 1) / total for i in range(N)], np.float64)


def rank_order(select: np.ndarray) -> np.ndarray:
  """[..., N] indices sorting each row by `select`, ascending; among equal scores the lower
  index ranks higher, so the winner is the first of the tied (as argmax / rl.bon picks)."""
  idx = np.broadcast_to(np.arange(select.shape[-1]), select.shape)
  return np.lexsort((-idx, select), axis=-1)


def expected_best(select: np.ndarray, values: np.ndarray, ns) -> np.ndarray:
  """Unbiased E[values of the best-of-n by `select`] per row.

  select, values [P, N] -> [len(ns), P]: for each n, over all n-subsets of a row's N samples
  (uniformly), the mean of `values` at the subset's argmax of `select`."""
  select, values = np.asarray(select, np.float64), np.asarray(values, np.float64)
  order = rank_order(select)
  ranked = np.take_along_axis(values, order, axis=-1)
  N = select.shape[-1]
  return np.stack([ranked @ bon_weights(N, n) for n in ns])


def curve(select: np.ndarray, gold_scores: np.ndarray, proxy: np.ndarray | None, ns) -> list[dict]:
  """One series' points: n, KL_bon, d = sqrt(KL), expected gold (+ stderr over prompts) and proxy."""
  g = expected_best(select, gold_scores, ns)
  p = expected_best(select, proxy, ns) if proxy is not None else None
  pts = []
  for j, n in enumerate(ns):
    kl = kl_bon(n)
    pt = {'n': int(n), 'kl': kl, 'd': math.sqrt(kl), 'gold': float(g[j].mean()),
          'gold_stderr': float(g[j].std() / math.sqrt(g.shape[1]))}
    if p is not None:
      pt['proxy'] = float(p[j].mean())
    pts.append(pt)
  return pts
