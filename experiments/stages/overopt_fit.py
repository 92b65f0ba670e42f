"""Gao et al. (2022)'s functional forms for reward against d = sqrt(KL) from the initial policy,
both zero at d = 0 and linear in (alpha, beta), so each fit is one least-squares solve:

  best-of-n   R_bon(d) = d (alpha - beta d)
  RL (PPO...) R_RL(d)  = d (alpha - beta log d)

R is the reward *gained* over the initial policy: callers subtract the value at d = 0.
"""
from __future__ import annotations

import numpy as np

FORMS = ('bon', 'rl')


def features(d: np.ndarray, form: str) -> np.ndarray:
  """[len(d), 2] columns multiplying alpha and beta."""
  d = np.asarray(d, np.float64)
  if form == 'bon':
    return np.stack([d, -d * d], 1)
  if form == 'rl':
    safe = np.where(d > 0, d, 1.0)
    return np.stack([d, -d * np.log(safe)], 1)        # d log d -> 0 as d -> 0
  raise ValueError(f'form={form!r}; choose one of {FORMS}.')


def predict(d, alpha: float, beta: float, form: str) -> np.ndarray:
  return features(d, form) @ np.array([alpha, beta])


def fit(d, r, form: str) -> dict:
  """Least-squares (alpha, beta) of r ~ R_form(d), with R^2 = 1 - SS_res / SS_tot (SS_tot about
  the mean of r). Needs >= 3 points with d > 0 (two parameters, one residual at least)."""
  d, r = np.asarray(d, np.float64), np.asarray(r, np.float64)
  if int(np.sum(d > 0)) < 3:
    raise ValueError(f'{int(np.sum(d > 0))} points with d > 0; a fit needs at least 3.')
  X = features(d, form)
  (alpha, beta), *_ = np.linalg.lstsq(X, r, rcond=None)
  res = r - X @ np.array([alpha, beta])
  ss_tot = float(np.sum((r - r.mean()) ** 2))
  r2 = 1.0 - float(np.sum(res ** 2)) / ss_tot if ss_tot > 0 else float('nan')
  out = {'form': form, 'alpha': float(alpha), 'beta': float(beta), 'r2': r2, 'points': int(d.size)}
  if form == 'bon' and beta > 0:
    out['d_peak'] = float(alpha / (2 * beta))        # where the fitted gold turns down
  if form == 'rl' and beta > 0:
    out['d_peak'] = float(np.exp(alpha / beta - 1))  # d/dd [d (a - b log d)] = a - b - b log d
  return out
