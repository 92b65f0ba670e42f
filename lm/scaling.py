"""Scaling laws: FLOPs accounting, Kaplan (KM) and Chinchilla fits, compute-optimal sizes.

Pure numpy/scipy, no I/O beyond `load_points_csv`. Every fitter takes arrays of
observations and returns a `Fit`: the fitted parameters, bootstrap confidence intervals
(the points resampled with replacement, a seeded numpy Generator, 5th-95th percentiles by
default) and whatever the plots need (`extra`).

  KM          Kaplan et al. 2020, "Scaling Laws for Neural Language Models", eqs. 1.1-1.5.
  Chinchilla  Hoffmann et al. 2022, "Training Compute-Optimal Large Language Models",
              section 3 (approaches 1-3) and appendices D.2 and F.

Conventions: N is the parameter count the law is written in (KM: non-embedding), D the
number of training tokens, C the training FLOPs, by default C = 6 N D, and losses are in
nats per token.
"""
from __future__ import annotations

import csv
import dataclasses
import itertools
import warnings
from typing import Callable

import numpy as np
from scipy import optimize


# FLOPs ---------------------------------------------------------------------------------------
def kaplan_flops(n_non_embedding_params: float, tokens: float) -> float:
  """Training compute C = 6 N D (Kaplan et al. 2020, section 2.1).

  A forward pass costs 2 FLOPs (a multiply and an add) per non-embedding parameter per
  token, the backward pass twice that. KM drop the embeddings and the context-dependent
  attention term 2 n_layers n_ctx d_model, which is small while d_model >> n_ctx / 12.
  """
  return 6.0 * n_non_embedding_params * tokens


def non_embedding_params(n_layers: int, d_model: int, d_ff: int | None = None) -> int:
  """KM's N = 2 d_model n_layers (2 d_attn + d_ff) with d_attn = d_model (Kaplan eq. 2.1):
  per layer the four attention projections (4 d^2) and the two MLP matrices (2 d d_ff).
  With d_ff = 4 d_model this is the familiar 12 n_layers d_model^2. Biases and norms are
  left out, as in the paper."""
  d_ff = 4 * d_model if d_ff is None else d_ff
  return 2 * d_model * n_layers * (2 * d_model + d_ff)


def chinchilla_flops_per_token(n_layers: int, d_model: int, n_heads: int, d_ff: int, vocab_size: int,
                               seq_len: int, head_dim: int | None = None) -> float:
  """Training FLOPs per token counting every matmul, as in Hoffmann et al. 2022, appendix F.

  The paper counts one sequence of length T; dividing by T gives, per token (forward):

    embeddings            2 V d          (the lookup counted as a one-hot matmul)
    per layer:
      Q, K, V projections 2 * 3 * d * (h k)
      scores Q K^T        2 * T * (h k)
      softmax             3 * h * T
      scores @ V          2 * T * (h k)
      output projection   2 * (h k) * d
      MLP                 2 * 2 * d * d_ff
    logits                2 d V

  with d = d_model, h = n_heads, k = head_dim (d / h by default), V = vocab_size. Attention
  is over the full T x T square (the causal mask is not discounted, as in the paper); norms,
  biases and the nonlinearity are ignored. Training (forward + backward) is 3x the forward.
  """
  d, t = d_model, seq_len
  hk = n_heads * (head_dim if head_dim is not None else d_model // n_heads)
  attention = 2 * 3 * d * hk + 2 * t * hk + 3 * n_heads * t + 2 * t * hk + 2 * hk * d
  mlp = 2 * 2 * d * d_ff
  forward = 2 * vocab_size * d + n_layers * (attention + mlp) + 2 * d * vocab_size
  return 3.0 * forward


# Fit results and the bootstrap -------------------------------------------------------------
@dataclasses.dataclass
class Fit:
  """A fitted law: parameters, their bootstrap intervals (name -> (lo, hi)) and extras
  (the law as text, bootstrap samples, the points a figure needs)."""
  params: dict[str, float]
  intervals: dict[str, tuple[float, float]] = dataclasses.field(default_factory=dict)
  extra: dict = dataclasses.field(default_factory=dict)

  def to_json(self) -> dict:
    return {'params': self.params, 'intervals': {k: list(v) for k, v in self.intervals.items()},
            **self.extra}


_FAILED = (ValueError, np.linalg.LinAlgError, RuntimeError, FloatingPointError, ZeroDivisionError)


def bootstrap(fit_fn: Callable[..., dict], arrays: tuple[np.ndarray, ...], n_boot: int = 200,
              seed: int = 0, groups: np.ndarray | None = None) -> dict[str, list[float]]:
  """Refit on `n_boot` resamples of the points (with replacement); returns name -> samples.

  With `groups`, points are resampled within each group (e.g. FLOP budget), so every
  resample keeps every group. A resample the fitter rejects (ValueError etc., e.g. all
  points in one budget) is skipped, so there may be fewer than n_boot samples.
  """
  rng = np.random.default_rng(seed)
  n = len(arrays[0])
  members = [np.flatnonzero(groups == g) for g in np.unique(groups)] if groups is not None else None
  samples: dict[str, list[float]] = {}
  for _ in range(n_boot):
    if members is None:
      idx = rng.integers(0, n, n)
    else:
      idx = np.concatenate([rng.choice(m, len(m)) for m in members])
    try:
      with warnings.catch_warnings():  # resamples with repeated points are often ill-conditioned
        warnings.simplefilter('ignore')
        p = fit_fn(*(a[idx] for a in arrays))
    except _FAILED:
      continue
    for k, v in p.items():
      samples.setdefault(k, []).append(float(v))
  return samples


def percentile_intervals(samples: dict[str, list[float]], q: tuple[float, float] = (5, 95)):
  """name -> (q[0]th, q[1]th percentile) of the bootstrap samples (non-finite ones dropped)."""
  out = {}
  for k, v in samples.items():
    v = np.asarray(v, float)
    v = v[np.isfinite(v)]
    if v.size:
      out[k] = (float(np.percentile(v, q[0])), float(np.percentile(v, q[1])))
  return out


def _make_fit(fit_fn, arrays, n_boot, seed, q, extra, groups=None) -> Fit:
  params = fit_fn(*arrays)
  samples = bootstrap(fit_fn, arrays, n_boot, seed, groups) if n_boot else {}
  return Fit(params, percentile_intervals(samples, q), {**extra, 'bootstrap_samples': samples})


def _as_arrays(*xs) -> tuple[np.ndarray, ...]:
  arrays = tuple(np.asarray(x, float).ravel() for x in xs)
  if len({a.size for a in arrays}) != 1:
    raise ValueError(f'inputs have different lengths {[a.size for a in arrays]}; give one value per point.')
  return arrays


def _power_law(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
  """(slope, intercept) of log y = intercept + slope log x, by least squares."""
  lx, ly = np.log(x), np.log(y)
  if not (np.isfinite(lx).all() and np.isfinite(ly).all()):
    raise ValueError('a power-law fit needs finite, positive values.')
  if len(x) < 2 or np.ptp(lx) == 0:
    raise ValueError('a power-law fit needs at least two distinct x values.')
  slope, intercept = np.polyfit(lx, ly, 1)
  return float(slope), float(intercept)


# KM (Kaplan et al. 2020) ------------------------------------------------------------------------
def _km_single(x, loss, name):
  slope, intercept = _power_law(x, loss)
  alpha = -slope   # L = (X_c / X)^alpha  <=>  log L = alpha log X_c - alpha log X
  return {f'alpha_{name}': alpha, f'{name}_c': float(np.exp(intercept / alpha))}


def fit_km(x, loss, name: str = 'N', n_boot: int = 200, seed: int = 0, q=(5, 95)) -> Fit:
  """One-variable KM law L(X) = (X_c / X)^alpha_X (Kaplan eqs. 1.1-1.3), a line in log-log.

  X is N (non-embedding parameters, each trained to convergence), D (tokens, early
  stopped) or C (C_min: the compute frontier); `name` names the parameters, e.g.
  alpha_N and N_c.
  """
  fn = lambda a, b: _km_single(a, b, name)
  return _make_fit(fn, _as_arrays(x, loss), n_boot, seed, q,
                   {'law': f'L({name}) = ({name}_c/{name})^alpha_{name}'})


def km_joint_loss(p: dict, n, d):
  """Kaplan eq. 1.5: L(N, D) = [(N_c/N)^(alpha_N/alpha_D) + D_c/D]^alpha_D."""
  n, d = np.asarray(n, float), np.asarray(d, float)
  return ((p['N_c'] / n) ** (p['alpha_N'] / p['alpha_D']) + p['D_c'] / d) ** p['alpha_D']


def _km_joint(n, d, loss):
  """Least squares on log L from a few starting exponents. In log space
  log L = alpha_D * logaddexp(r (log N_c - log N), log D_c - log D), r = alpha_N/alpha_D,
  which never overflows."""
  ln, ld, ll = np.log(n), np.log(d), np.log(loss)

  def residual(p):
    a_n, a_d, log_nc, log_dc = p
    return a_d * np.logaddexp((a_n / a_d) * (log_nc - ln), log_dc - ld) - ll

  best = None
  for a_n0, a_d0 in itertools.product((0.05, 0.1, 0.3), (0.05, 0.1, 0.3)):
    x0 = (a_n0, a_d0, ln.mean() + 2, ld.mean() + 2)
    r = optimize.least_squares(residual, x0, bounds=([1e-4, 1e-4, -50, -50], [5, 5, 100, 100]))
    if best is None or r.cost < best.cost:
      best = r
  a_n, a_d, log_nc, log_dc = best.x
  # compute-optimal exponents of this law (see compute_optimal): N_opt ∝ C^a, D_opt ∝ C^b
  return {'alpha_N': float(a_n), 'alpha_D': float(a_d), 'N_c': float(np.exp(log_nc)),
          'D_c': float(np.exp(log_dc)), 'a': float(a_d / (a_n + a_d)), 'b': float(a_n / (a_n + a_d))}


def fit_km_joint(n, d, loss, n_boot: int = 100, seed: int = 0, q=(5, 95)) -> Fit:
  """Joint KM law L(N, D) = [(N_c/N)^(alpha_N/alpha_D) + D_c/D]^alpha_D (Kaplan eq. 1.5),
  by nonlinear least squares on log L (scipy.optimize.least_squares)."""
  return _make_fit(_km_joint, _as_arrays(n, d, loss), n_boot, seed, q,
                   {'law': 'L(N,D) = [(N_c/N)^(alpha_N/alpha_D) + D_c/D]^alpha_D'})


# Chinchilla approach 1: the lower envelope of loss vs FLOPs ------------------------------------
def lower_envelope(c, loss) -> np.ndarray:
  """Indices, in increasing C, of the points that beat every point with less compute: for
  each point's own budget C, the lowest loss reachable with at most C FLOPs."""
  c, loss = np.asarray(c, float), np.asarray(loss, float)
  order = np.lexsort((loss, c))              # by C; at equal C the lowest loss first
  running_min = np.minimum.accumulate(loss[order])
  new_best = np.r_[True, running_min[1:] < running_min[:-1]]
  return order[new_best]


def _approach1(n, d, c, loss, n_budgets=None):
  env = lower_envelope(c, loss)
  if n_budgets:
    # The paper picks the best run at 1500 log-spaced budgets. The envelope point in force
    # at a budget is the last one at or below it, so this weights envelope points by the
    # span of log C they lead, not by how densely the loss curves were logged.
    budgets = np.geomspace(c[env[0]], c[env[-1]], n_budgets)
    env = env[np.searchsorted(c[env], budgets, side='right') - 1]
  if len(np.unique(c[env])) < 2:
    raise ValueError('the loss-vs-FLOPs envelope has fewer than two distinct points.')
  a, log_k_n = _power_law(c[env], n[env])
  b, log_k_d = _power_law(c[env], d[env])
  return {'a': a, 'b': b, 'log_k_n': log_k_n, 'log_k_d': log_k_d}


def fit_chinchilla_envelope(n, d, c, loss, n_boot: int = 200, seed: int = 0, q=(5, 95),
                            n_budgets: int | None = None) -> Fit:
  """Chinchilla approach 1 (Hoffmann et al. 2022, section 3.1): N_opt = k_N C^a, D_opt = k_D C^b.

  Points are (N, D, C, loss), typically many points along each run's loss curve. For each
  FLOP budget the point with the lowest loss at or below it is compute-optimal (the lower
  envelope of loss vs C); log N and log D of the envelope points are regressed on log C.
  By default every envelope point counts once; with `n_budgets` the envelope is read at
  that many log-spaced budgets, as in the paper (which uses 1500).
  """
  arrays = _as_arrays(n, d, c, loss)
  fn = lambda *xs: _approach1(*xs, n_budgets=n_budgets)
  env = lower_envelope(arrays[2], arrays[3])
  return _make_fit(fn, arrays, n_boot, seed, q,
                   {'envelope_flops': arrays[2][env].tolist(), 'envelope_loss': arrays[3][env].tolist(),
                    'envelope_N': arrays[0][env].tolist(), 'envelope_D': arrays[1][env].tolist()})


# Chinchilla approach 2: IsoFLOP profiles ----------------------------------------------------------
def isoflop_minima(n, c, loss, window: int = 2) -> list[dict]:
  """For each FLOP budget, a parabola of loss in log N and its minimum (Hoffmann section 3.2).

  Only the lowest run and up to `window` neighbours on each side are fitted: far from the
  optimum a profile is not parabolic. A budget whose lowest run is its smallest or largest
  model has no bracketed minimum and is skipped, as is one whose parabola opens downwards.
  Each minimum is a dict: flops, N_opt, D_opt = C / (6 N_opt), loss_opt, the parabola's
  coefficients in log N (highest power first) and the N values it was fitted to.
  """
  n, c, loss = _as_arrays(n, c, loss)
  out = []
  for budget in np.unique(c):
    sel = np.flatnonzero(c == budget)
    sel = sel[np.argsort(n[sel])]
    if len(sel) < 3:
      continue
    best = int(np.argmin(loss[sel]))
    if best in (0, len(sel) - 1):
      continue
    near = sel[max(0, best - window):best + window + 1]
    x, y = np.log(n[near]), loss[near]
    m = x.mean()  # centre log N: a quadratic in raw log N (~20) is badly conditioned
    c2, u1, u0 = np.polyfit(x - m, y, 2)
    if c2 <= 0:
      continue
    c1, c0 = u1 - 2 * c2 * m, c2 * m * m - u1 * m + u0   # back to powers of log N
    log_n_opt = -c1 / (2 * c2)
    out.append({'flops': float(budget), 'N_opt': float(np.exp(log_n_opt)),
                'D_opt': float(budget / (6 * np.exp(log_n_opt))),
                'loss_opt': float(c0 - c1 ** 2 / (4 * c2)), 'coeffs': [float(c2), float(c1), float(c0)],
                'fitted_N': n[near].tolist()})
  return out


def _approach2(n, c, loss, window=2):
  minima = isoflop_minima(n, c, loss, window)
  if len(minima) < 2:
    raise ValueError('approach 2 needs at least two FLOP budgets whose loss has an interior minimum in N.')
  cs = np.array([m['flops'] for m in minima])
  a, log_k_n = _power_law(cs, np.array([m['N_opt'] for m in minima]))
  b, log_k_d = _power_law(cs, np.array([m['D_opt'] for m in minima]))
  return {'a': a, 'b': b, 'log_k_n': log_k_n, 'log_k_d': log_k_d}


def fit_chinchilla_isoflop(n, c, loss, n_boot: int = 200, seed: int = 0, q=(5, 95), window: int = 2) -> Fit:
  """Chinchilla approach 2: IsoFLOP parabolas -> N_opt per budget -> N_opt ∝ C^a, D_opt ∝ C^b.

  `c` labels each run with its FLOP budget (runs of one budget share the exact value).
  The bootstrap resamples runs within each budget, so every resample keeps all budgets.
  """
  arrays = _as_arrays(n, c, loss)
  fn = lambda *xs: _approach2(*xs, window=window)
  fit = _make_fit(fn, arrays, n_boot, seed, q, {}, groups=arrays[1])
  fit.extra['minima'] = isoflop_minima(*arrays, window=window)
  return fit


# Chinchilla approach 3: the parametric loss ---------------------------------------------------------
def parametric_loss(p: dict, n, d):
  """Hoffmann eq. 2: L(N, D) = E + A / N^alpha + B / D^beta."""
  return p['E'] + p['A'] / np.asarray(n, float) ** p['alpha'] + p['B'] / np.asarray(d, float) ** p['beta']


# Hoffmann et al. appendix D.2 (e extended to 1.5): 5 * 5 * 6 * 6 * 6 = 5400 starts.
DEFAULT_GRID = dict(alpha=np.arange(0, 2.01, 0.5), beta=np.arange(0, 2.01, 0.5),
                    e=np.arange(-1, 1.51, 0.5), a=np.arange(0, 25.1, 5), b=np.arange(0, 25.1, 5))


def _huber_objective(ln, ld, ll, delta):
  """f(X) for a batch of parameter rows X = (a', b', e, alpha, beta), shape (S, 5):

    mean_i Huber_delta(LSE(a' - alpha ln_i, b' - beta ld_i, e) - log L_i) / delta,

  and its gradient. ln, ld are log N, log D minus their means (a' = a - alpha mean(log N)):
  the same objective and optimum as the paper's, but with the intercepts decoupled from the
  exponents L-BFGS converges in fewer steps. Dividing by n delta makes f O(|residual| /
  delta), so the optimiser's tolerances mean the same for any number of points.
  """
  scale = 1.0 / (delta * len(ll))

  def fg(x):
    a, b, e, alpha, beta = (x[:, i:i + 1] for i in range(5))
    terms = np.stack([a - alpha * ln, b - beta * ld, np.broadcast_to(e, (len(x), len(ln)))])
    top = terms.max(0)
    ex = np.exp(terms - top)
    total = ex.sum(0)
    r = top + np.log(total) - ll             # log L_hat - log L
    ar = np.abs(r)
    f = np.where(ar <= delta, 0.5 * r * r, delta * (ar - 0.5 * delta)).sum(1) * scale
    w = ex * (np.clip(r, -delta, delta) * scale / total)   # Huber'(r) * softmax(terms)
    g = np.stack([w[0].sum(1), w[1].sum(1), w[2].sum(1), -(w[0] * ln).sum(1), -(w[1] * ld).sum(1)], 1)
    return f, g
  return fg


def _lbfgs_batch(fg, x0, max_iter=100, memory=10, c1=1e-4):
  """L-BFGS on many independent starting points at once (rows of x0), numpy-vectorised.

  fg(X) -> (f, grad) for a batch of rows. Two-loop recursion per row (Nocedal & Wright,
  algorithm 7.4), backtracking line search to the Armijo condition; a row stops when its
  step no longer decreases f or its gradient vanishes. Returns (X, f) after at most
  max_iter iterations.
  """
  x = np.array(x0, float)
  f, g = fg(x)
  s_hist, y_hist = np.zeros((memory,) + x.shape), np.zeros((memory,) + x.shape)
  rho = np.zeros((memory, len(x)))         # 1 / (s.y); 0 marks an empty or rejected pair
  gamma = 1 / np.maximum(np.linalg.norm(g, axis=1), 1e-300)   # first step of unit length
  active = np.ones(len(x), bool)
  dot = lambda u, v: np.einsum('sp,sp->s', u, v)
  with np.errstate(all='ignore'):          # rows that run off to infinity fail Armijo and stop
    for _ in range(max_iter):
      i = np.flatnonzero(active)
      if i.size == 0:
        break
      xi, fi, gi = x[i], f[i], g[i]
      sh, yh, rh = s_hist[:, i], y_hist[:, i], rho[:, i]
      q, alphas = gi.copy(), np.zeros((memory, i.size))
      for j in range(memory):                # newest pair first
        alphas[j] = rh[j] * dot(sh[j], q)
        q -= alphas[j][:, None] * yh[j]
      r = gamma[i, None] * q
      for j in reversed(range(memory)):
        r += sh[j] * (alphas[j] - rh[j] * dot(yh[j], r))[:, None]
      step = -r
      slope = dot(gi, step)
      uphill = ~(slope < 0)                  # a stale curvature pair: fall back to steepest descent
      step[uphill] = -gi[uphill] * gamma[i[uphill], None]
      slope[uphill] = dot(gi[uphill], step[uphill])
      t = np.ones(i.size)
      xn = xi + step
      fn, gn = fg(xn)
      for _ in range(40):                    # halve the step of the rows that fail Armijo
        fail = ~(fn <= fi + c1 * t * slope)
        if not fail.any():
          break
        t[fail] *= 0.5
        xn[fail] = xi[fail] + t[fail, None] * step[fail]
        fn[fail], gn[fail] = fg(xn[fail])
      stuck = ~(fn <= fi + c1 * t * slope)
      s, y = xn - xi, gn - gi
      sy, yy = dot(s, y), dot(y, y)
      # keep only pairs of finite, positive curvature, so the inverse Hessian stays positive
      ok = ~stuck & np.isfinite(sy) & np.isfinite(yy) & (yy > 0) & (sy > 1e-10 * np.sqrt(dot(s, s) * yy))
      s_hist[:, i], y_hist[:, i], rho[:, i] = (np.roll(h, 1, axis=0) for h in (sh, yh, rh))
      s_hist[0, i], y_hist[0, i] = np.where(ok[:, None], s, 0), np.where(ok[:, None], y, 0)
      rho[0, i] = np.where(ok, 1 / np.where(ok, sy, 1), 0)
      gamma[i] = np.where(ok, sy / np.where(ok, yy, 1), gamma[i])
      x[i] = np.where(stuck[:, None], xi, xn)
      f[i] = np.where(stuck, fi, fn)
      g[i] = np.where(stuck[:, None], gi, gn)
      converged = stuck | (np.abs(g[i]).max(1) < 1e-10) | (fi - f[i] <= 1e-15 * np.abs(f[i]))
      active[i[converged]] = False
  return x, f


def _approach3(n, d, loss, starts, delta=1e-3, max_iter=100, n_polish=4):
  """Best of L-BFGS from every start (rows of (a, b, e, alpha, beta)); see fit_chinchilla_parametric."""
  ln, ld, ll = np.log(n), np.log(d), np.log(loss)
  if not (np.isfinite(ln).all() and np.isfinite(ld).all() and np.isfinite(ll).all()):
    raise ValueError('approach 3 needs finite, positive N, D and loss.')
  mn, md = ln.mean(), ld.mean()
  fg = _huber_objective(ln - mn, ld - md, ll, delta)
  centred = np.array(starts, float)
  centred[:, 0] -= centred[:, 3] * mn        # a' = a - alpha mean(log N)
  centred[:, 1] -= centred[:, 4] * md
  # Every start runs a budget of vectorised L-BFGS iterations; the best few endpoints then
  # run scipy's L-BFGS-B to convergence.
  x, f = _lbfgs_batch(fg, centred, max_iter)
  best = None
  for x0 in x[np.argsort(f)[:n_polish]]:
    r = optimize.minimize(lambda p: tuple(v[0] for v in fg(p[None])), x0, jac=True, method='L-BFGS-B',
                          options={'ftol': 1e-15, 'gtol': 1e-12, 'maxiter': 5000})
    if best is None or r.fun < best.fun:
      best = r
  a, b, e, alpha, beta = best.x
  a, b = a + alpha * mn, b + beta * md       # back from centred intercepts
  p = {'E': float(np.exp(e)), 'A': float(np.exp(a)), 'B': float(np.exp(b)),
       'alpha': float(alpha), 'beta': float(beta)}
  p.update(_allocation(p))
  ends = np.vstack([best.x, x[np.argsort(f)]])
  ends[:, 0] += ends[:, 3] * mn
  ends[:, 1] += ends[:, 4] * md
  return p, ends, float(best.fun * delta * len(ll))   # the paper's sum of Huber losses


def _distinct(rows: np.ndarray, k: int, tol: float = 1e-3) -> np.ndarray:
  """The first k rows that differ from every earlier kept row by more than tol somewhere."""
  kept = []
  for row in rows:
    if len(kept) == k:
      break
    if np.isfinite(row).all() and all(np.abs(row - other).max() > tol for other in kept):
      kept.append(row)
  return np.array(kept)


def _allocation(p: dict) -> dict:
  """Hoffmann eq. 4: minimising E + A/N^alpha + B/D^beta subject to 6 N D = C gives
  N_opt = G (C/6)^a, D_opt = G^-1 (C/6)^b with G = (alpha A / (beta B))^(1/(alpha+beta)),
  a = beta/(alpha+beta), b = alpha/(alpha+beta)."""
  s = p['alpha'] + p['beta']
  # np.power: nan (not a complex number) when a bootstrap resample has a negative exponent
  return {'G': float(np.power(p['alpha'] * p['A'] / (p['beta'] * p['B']), 1 / s)),
          'a': float(p['beta'] / s), 'b': float(p['alpha'] / s)}


def grid_starts(grid: dict | None = None) -> np.ndarray:
  """The initialisation grid as rows (a, b, e, alpha, beta); `grid` maps each name to its values."""
  grid = DEFAULT_GRID if grid is None else grid
  axes = (grid['a'], grid['b'], grid['e'], grid['alpha'], grid['beta'])
  return np.array(list(itertools.product(*axes)), float)


def fit_chinchilla_parametric(n, d, loss, grid: dict | None = None, delta: float = 1e-3, n_boot: int = 50,
                              seed: int = 0, q=(5, 95), max_iter: int = 100, n_polish: int = 4,
                              boot_starts: int = 16) -> Fit:
  """Chinchilla approach 3 (Hoffmann et al. 2022, section 3.3, appendix D.2).

  Fits L(N, D) = E + A/N^alpha + B/D^beta by minimising

    sum_i Huber_delta(LSE(a - alpha log N_i, b - beta log D_i, e) - log L_i),   delta = 1e-3,

  over (a, b, e, alpha, beta) = (log A, log B, log E, alpha, beta): the log-sum-exp is
  log(A/N^alpha + B/D^beta + E), so the loss is compared in log space and A, B, E stay
  positive. L-BFGS runs from every point of `grid` (default: the paper's alpha, beta in
  {0, .5, ..., 2}, e in {-1, -.5, ..., 1.5}, a, b in {0, 5, ..., 25}); the best optimum wins.
  All starts run together, vectorised, for `max_iter` iterations, then the `n_polish` best
  go on with scipy's L-BFGS-B to convergence. Bootstrap resamples start from the full
  fit's optimum and its next-best distinct endpoints (`boot_starts` in all) instead of the
  whole grid: a resample's optimum lies near the full data's.

  Params: E, A, B, alpha, beta and the compute-optimal allocation G, a, b (see
  compute_optimal); extra['objective'] is the minimised sum of Huber losses.
  """
  arrays = _as_arrays(n, d, loss)
  params, endpoints, objective = _approach3(*arrays, grid_starts(grid), delta, max_iter, n_polish)
  starts = _distinct(endpoints, boot_starts)   # the optimum, then the next-best distinct endpoints
  boot_fn = lambda *xs: _approach3(*xs, starts, delta, max_iter, n_polish=1)[0]
  samples = bootstrap(boot_fn, arrays, n_boot, seed) if n_boot else {}
  return Fit(params, percentile_intervals(samples, q),
             {'law': 'L(N,D) = E + A/N^alpha + B/D^beta', 'objective': objective,
              'bootstrap_samples': samples})


# Compute-optimal predictions ------------------------------------------------------------------------
def compute_optimal(fit: Fit, flops) -> dict[str, np.ndarray]:
  """N_opt, D_opt and tokens per parameter at compute C (scalar or array) for a fit of
  approach 1, 2 or 3 or the joint KM law.

  approach 3   N_opt = G (C/6)^a, D_opt = (C/6)^b / G  (Hoffmann eq. 4)
  approach 1/2 N_opt = k_N C^a, D_opt = k_D C^b        (the fitted power laws)
  KM joint     minimising [(N_c/N)^r + 6 D_c N / C]^alpha_D over N, r = alpha_N/alpha_D:
               N_opt = (r N_c^r C / (6 D_c))^(1/(1+r)), D_opt = C / (6 N_opt)
  """
  c = np.asarray(flops, float)
  p = fit.params
  if 'G' in p:
    n_opt = p['G'] * (c / 6) ** p['a']
    d_opt = (c / 6) ** p['b'] / p['G']
  elif 'D_c' in p:
    r = p['alpha_N'] / p['alpha_D']
    n_opt = (r * p['N_c'] ** r * c / (6 * p['D_c'])) ** (1 / (1 + r))
    d_opt = c / (6 * n_opt)
  elif 'log_k_n' in p:
    n_opt = np.exp(p['log_k_n']) * c ** p['a']
    d_opt = np.exp(p['log_k_d']) * c ** p['b']
  else:
    raise ValueError(f'a fit with params {sorted(p)} has no compute-optimal allocation; '
                     'use approach 1, 2 or 3 or the joint KM law.')
  return {'N_opt': n_opt, 'D_opt': d_opt, 'tokens_per_param': d_opt / n_opt}


# External data ---------------------------------------------------------------------------------------
_ALIASES = {'n': 'N', 'params': 'N', 'parameters': 'N', 'd': 'D', 'tokens': 'D', 'c': 'C',
            'flops': 'C', 'compute': 'C', 'loss': 'loss'}


def load_points_csv(path) -> dict[str, np.ndarray]:
  """Read (N, D or FLOPs, loss) points from a CSV with a header row.

  Column names are case-insensitive: N (or params, parameters), D (or tokens), C (or
  FLOPs, compute) and loss; others are ignored. Of D and C one suffices: the other
  follows from C = 6 N D. Returns arrays under 'N', 'D', 'C' and 'loss'.
  """
  with open(path, newline='') as f:
    reader = csv.reader(f)
    header = next(reader, None)
    rows = [r for r in reader if any(cell.strip() for cell in r)]
  if not header or not rows:
    raise ValueError(f'{path} has no data rows; it needs a header and columns N, loss and D or FLOPs.')
  where: dict[str, int] = {}
  for j, name in enumerate(header):
    key = _ALIASES.get(name.strip().lower())
    if key in where:
      raise ValueError(f'{path} has two columns for {key} ({header[where[key]]!r} and {name!r}); keep one.')
    if key:
      where[key] = j
  if 'N' not in where or 'loss' not in where or not ({'D', 'C'} & set(where)):
    raise ValueError(f'{path} has columns {header}; it needs N (or params), loss, and D (or tokens) '
                     'or C (or FLOPs).')
  cols = {}
  for key, j in where.items():
    try:
      cols[key] = np.array([float(r[j]) for r in rows])
    except (ValueError, IndexError):
      raise ValueError(f'{path}: column {header[j]!r} has an empty or non-numeric value; '
                       'every row needs a number there.') from None
  if 'D' not in cols:
    cols['D'] = cols['C'] / (6 * cols['N'])
  if 'C' not in cols:
    cols['C'] = 6 * cols['N'] * cols['D']
  for key, v in cols.items():
    if not (np.isfinite(v).all() and (v > 0).all()):
      raise ValueError(f'{path}: column {key} has non-positive or non-finite values; all must be > 0.')
  return cols
