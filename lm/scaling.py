"""Scaling laws: FLOPs accounting, Kaplan (KM) and Chinchilla fits, compute-optimal sizes.

Pure numpy/scipy. Every fitter takes arrays of observations and returns a `Fit`: the
fitted parameters and bootstrap confidence intervals (resampling the points with
replacement; 5th-95th percentiles by default).

References: Kaplan et al. 2020, "Scaling Laws for Neural Language Models" (KM);
Hoffmann et al. 2022, "Training Compute-Optimal Large Language Models" (Chinchilla).
"""
from __future__ import annotations

import dataclasses
import itertools
import warnings
from typing import Callable

import numpy as np
from scipy import optimize
from scipy.special import logsumexp


# FLOPs --------------------------------------------------------------------------------------
def kaplan_flops(n_non_embedding: float, tokens: float) -> float:
  """C = 6 N D: forward (2 N) + backward (4 N) FLOPs per token, N without embeddings (KM)."""
  return 6.0 * n_non_embedding * tokens


def chinchilla_flops_per_token(n_layers: int, d_model: int, d_ff: int, vocab_size: int,
                               seq_len: int, n_heads: int | None = None) -> float:
  """Training FLOPs per token counting every matmul, as in Hoffmann et al. 2022 (App. F).

  Forward, per layer: QKV projections 2*3*d^2; attention scores QK^T 2*T*d; the
  weighted sum of values 2*T*d; output projection 2*d^2; MLP 2*2*d*d_ff. Plus the
  embedding-as-matmul 2*d*V and the logits 2*d*V. Backward is twice the forward.
  (Softmax and norms are ignored: they are a fraction of a percent.)
  """
  del n_heads  # the count does not depend on how d is split into heads
  d = d_model
  per_layer = 2 * 3 * d * d + 2 * seq_len * d + 2 * seq_len * d + 2 * d * d + 2 * 2 * d * d_ff
  forward = n_layers * per_layer + 2 * d * vocab_size + 2 * d * vocab_size
  return 3.0 * forward


# Fits -----------------------------------------------------------------------------------------
@dataclasses.dataclass
class Fit:
  """Fitted parameters, their bootstrap intervals (name -> (lo, hi)) and the fit's inputs."""
  params: dict[str, float]
  intervals: dict[str, tuple[float, float]] = dataclasses.field(default_factory=dict)
  extra: dict = dataclasses.field(default_factory=dict)

  def to_json(self) -> dict:
    return {'params': self.params, 'intervals': {k: list(v) for k, v in self.intervals.items()},
            **self.extra}


def bootstrap(fit_fn: Callable[..., dict], arrays: tuple[np.ndarray, ...], n_boot: int = 200,
              seed: int = 0, q: tuple[float, float] = (5, 95)) -> dict[str, tuple[float, float]]:
  """Percentile intervals of fit_fn's parameters over resamples of the points."""
  rng = np.random.default_rng(seed)
  n = len(arrays[0])
  samples: dict[str, list[float]] = {}
  for _ in range(n_boot):
    idx = rng.integers(0, n, n)
    if len(np.unique(idx)) < 3:
      continue
    try:
      with warnings.catch_warnings():  # resamples with repeated points are often ill-conditioned
        warnings.simplefilter('ignore')
        p = fit_fn(*(a[idx] for a in arrays))
    except (ValueError, np.linalg.LinAlgError, RuntimeError):
      continue  # a degenerate resample (e.g. one budget only); skip it
    for k, v in p.items():
      samples.setdefault(k, []).append(v)
  return {k: (float(np.percentile(v, q[0])), float(np.percentile(v, q[1]))) for k, v in samples.items()}


def _power_law(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
  """log y = intercept + slope * log x, least squares."""
  lx, ly = np.log(x), np.log(y)
  if not (np.isfinite(lx).all() and np.isfinite(ly).all()):
    raise ValueError('power-law fit needs finite, positive values')
  slope, intercept = np.polyfit(lx, ly, 1)
  return slope, intercept


def _km_single(x, loss, name):
  slope, intercept = _power_law(x, loss)
  alpha = -slope                      # L = (X_c / X)^alpha  =>  log L = alpha log X_c - alpha log X
  return {f'alpha_{name}': alpha, f'{name}_c': float(np.exp(intercept / alpha))}


def fit_km(x: np.ndarray, loss: np.ndarray, name: str = 'N', n_boot: int = 200, seed: int = 0) -> Fit:
  """KM single-variable law L(X) = (X_c / X)^alpha_X, for X = N, D or C_min (Kaplan eqs. 1.1-1.3)."""
  x, loss = np.asarray(x, float), np.asarray(loss, float)
  fn = lambda a, b: _km_single(a, b, name)
  return Fit(fn(x, loss), bootstrap(fn, (x, loss), n_boot, seed), {'law': f'L({name}) = ({name}_c/{name})^alpha_{name}'})


def _km_joint(n, d, loss):
  """L(N, D) = [(N_c/N)^(a_N/a_D) + D_c/D]^a_D, fitted in log space from a grid of starts."""
  ln, ld, ll = np.log(n), np.log(d), np.log(loss)

  def pred(p):
    a_n, a_d, log_nc, log_dc = p
    inner = np.logaddexp((a_n / a_d) * (log_nc - ln), log_dc - ld)
    return a_d * inner

  best = None
  for a_n0, a_d0 in itertools.product((0.05, 0.1, 0.3), (0.05, 0.1, 0.3)):
    x0 = (a_n0, a_d0, np.log(n).mean() + 2, np.log(d).mean() + 2)
    r = optimize.least_squares(lambda p: pred(p) - ll, x0,
                               bounds=([1e-4, 1e-4, -50, -50], [5, 5, 100, 100]))
    if best is None or r.cost < best.cost:
      best = r
  a_n, a_d, log_nc, log_dc = best.x
  return {'alpha_N': a_n, 'alpha_D': a_d, 'N_c': float(np.exp(log_nc)), 'D_c': float(np.exp(log_dc))}


def fit_km_joint(n, d, loss, n_boot: int = 100, seed: int = 0) -> Fit:
  """Kaplan eq. 1.5: L(N, D) = [(N_c/N)^(alpha_N/alpha_D) + D_c/D]^alpha_D."""
  arrays = tuple(np.asarray(a, float) for a in (n, d, loss))
  return Fit(_km_joint(*arrays), bootstrap(_km_joint, arrays, n_boot, seed),
             {'law': 'L(N,D) = [(N_c/N)^(alpha_N/alpha_D) + D_c/D]^alpha_D'})


def _envelope(c, loss) -> np.ndarray:
  """Indices (in increasing C) of points whose loss is lower than every point with less compute."""
  order = np.argsort(c, kind='stable')
  best, keep = np.inf, []
  for i in order:
    if loss[i] < best:
      best = loss[i]
      keep.append(i)
  return np.array(keep, int)


def _approach1(n, d, c, loss):
  """Lower envelope of loss vs FLOPs, then N_opt ∝ C^a and D_opt ∝ C^b on the envelope."""
  keep = _envelope(c, loss)
  if len(keep) < 2 or np.ptp(np.log(c[keep])) == 0:
    raise ValueError('the loss-vs-FLOPs envelope has fewer than two distinct points')
  a, ia = _power_law(c[keep], n[keep])
  b, ib = _power_law(c[keep], d[keep])
  return {'a': a, 'b': b, 'log_k_n': ia, 'log_k_d': ib}


def fit_chinchilla_envelope(n, d, c, loss, n_boot: int = 200, seed: int = 0) -> Fit:
  """Chinchilla approach 1: from the lower envelope of loss vs C, N_opt = k_N C^a, D_opt = k_D C^b.

  Points are (N, D, C, loss) — e.g. several checkpoints along each run's loss curve.
  """
  arrays = tuple(np.asarray(x, float) for x in (n, d, c, loss))
  p = _approach1(*arrays)
  env = _envelope(arrays[2], arrays[3])
  return Fit(p, bootstrap(_approach1, arrays, n_boot, seed),
             {'envelope_flops': arrays[2][env].tolist(), 'envelope_loss': arrays[3][env].tolist()})


def isoflop_minima(n, c, loss, window: int = 2) -> list[dict]:
  """For each FLOP budget: a parabola of loss in log N around the profile's lowest point,
  and the parabola's minimum (Chinchilla approach 2).

  Only the lowest run and up to `window` neighbours on each side are fitted: far from
  the optimum a profile is not parabolic. A budget whose lowest run is the smallest or
  largest model has no bracketed minimum and is skipped.
  """
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
    m = x.mean()  # centre log N so the quadratic fit is well conditioned
    c2, u1, u0 = np.polyfit(x - m, y, 2)
    if c2 <= 0:
      continue
    c1, c0 = u1 - 2 * c2 * m, c2 * m * m - u1 * m + u0
    log_n_opt = -c1 / (2 * c2)
    out.append({'flops': float(budget), 'N_opt': float(np.exp(log_n_opt)),
                'D_opt': float(budget / (6 * np.exp(log_n_opt))),
                'loss_opt': float(c0 - c1 ** 2 / (4 * c2)), 'coeffs': [float(c2), float(c1), float(c0)],
                'fitted_N': n[near].tolist()})
  return out


def _approach2(n, c, loss):
  minima = isoflop_minima(n, c, loss)
  if len(minima) < 2:
    raise ValueError('need at least two FLOP budgets with an interior minimum')
  cs = np.array([m['flops'] for m in minima])
  a, ia = _power_law(cs, np.array([m['N_opt'] for m in minima]))
  b, ib = _power_law(cs, np.array([m['D_opt'] for m in minima]))
  return {'a': a, 'b': b, 'log_k_n': ia, 'log_k_d': ib}


def fit_chinchilla_isoflop(n, c, loss, n_boot: int = 200, seed: int = 0) -> Fit:
  """Chinchilla approach 2: IsoFLOP parabolas -> N_opt(C) per budget -> N_opt ∝ C^a, D_opt ∝ C^b.

  The bootstrap resamples runs within each budget, so every resample keeps all budgets.
  """
  n, c, loss = (np.asarray(x, float) for x in (n, c, loss))
  rng = np.random.default_rng(seed)
  samples: dict[str, list[float]] = {}
  groups = [np.flatnonzero(c == b) for b in np.unique(c)]
  for _ in range(n_boot):
    idx = np.concatenate([rng.choice(g, len(g)) for g in groups])
    try:
      with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        fitted = _approach2(n[idx], c[idx], loss[idx])
      for k, v in fitted.items():
        samples.setdefault(k, []).append(v)
    except (ValueError, np.linalg.LinAlgError):
      continue
  intervals = {k: (float(np.percentile(v, 5)), float(np.percentile(v, 95))) for k, v in samples.items()}
  return Fit(_approach2(n, c, loss), intervals, {'minima': isoflop_minima(n, c, loss),
                                                 'bootstrap_samples': samples})


# Approach 3 ----------------------------------------------------------------------------------------
def _huber(r: np.ndarray, delta: float) -> np.ndarray:
  a = np.abs(r)
  return np.where(a <= delta, 0.5 * r * r, delta * (a - 0.5 * delta))


def _lse_objective(p, ln, ld, ll, delta):
  """Huber(log L_hat - log L), with log L_hat = LSE(a - alpha log N, b - beta log D, e)."""
  a, b, e, alpha, beta = p
  terms = np.stack([a - alpha * ln, b - beta * ld, np.full_like(ln, e)])
  r = logsumexp(terms, axis=0) - ll
  w = np.exp(terms - logsumexp(terms, axis=0))   # softmax weights: d LSE / d term
  g_r = np.where(np.abs(r) <= delta, r, delta * np.sign(r))
  grad = np.array([np.sum(g_r * w[0]), np.sum(g_r * w[1]), np.sum(g_r * w[2]),
                   np.sum(g_r * w[0] * -ln), np.sum(g_r * w[1] * -ld)])
  return float(np.sum(_huber(r, delta))), grad


DEFAULT_GRID = dict(alpha=np.arange(0, 2.01, 0.5), beta=np.arange(0, 2.01, 0.5),
                    e=np.arange(-1, 1.51, 0.5), a=np.arange(0, 25.1, 5), b=np.arange(0, 25.1, 5))


def _approach3(n, d, loss, grid=None, delta=1e-3, refine_top=32):
  """Grid of starts -> objective at each (vectorised) -> L-BFGS from the `refine_top` best.

  Screening the grid first keeps the paper's coverage of initialisations (5,400 starts
  on the default grid) at the cost of a few dozen optimisations.
  """
  grid = grid or DEFAULT_GRID
  ln, ld, ll = np.log(n), np.log(d), np.log(loss)
  starts = np.array(list(itertools.product(grid['a'], grid['b'], grid['e'], grid['alpha'], grid['beta'])), float)
  terms = np.stack([starts[:, :1] - starts[:, 3:4] * ln, starts[:, 1:2] - starts[:, 4:5] * ld,
                    np.broadcast_to(starts[:, 2:3], (len(starts), len(ln)))])
  screen = _huber(logsumexp(terms, axis=0) - ll, delta).sum(1)
  best = None
  for x0 in starts[np.argsort(screen)[:refine_top]]:
    r = optimize.minimize(_lse_objective, x0, args=(ln, ld, ll, delta), jac=True, method='L-BFGS-B',
                          # Huber values are ~1e-4: default tolerances stop far from the optimum
                          options={'ftol': 1e-15, 'gtol': 1e-10, 'maxiter': 2000})
    if best is None or r.fun < best.fun:
      best = r
  a, b, e, alpha, beta = best.x
  return {'E': float(np.exp(e)), 'A': float(np.exp(a)), 'B': float(np.exp(b)),
          'alpha': float(alpha), 'beta': float(beta)}


def fit_chinchilla_parametric(n, d, loss, grid: dict | None = None, delta: float = 1e-3,
                              n_boot: int = 50, seed: int = 0) -> Fit:
  """Chinchilla approach 3: L(N, D) = E + A/N^alpha + B/D^beta.

  Minimises the Huber loss (delta=1e-3) between predicted and observed log loss over
  the log-sum-exp parametrisation with L-BFGS from a grid of initialisations, keeping
  the best (Hoffmann et al. 2022, section 3.3 and appendix D.2).
  """
  arrays = tuple(np.asarray(x, float) for x in (n, d, loss))
  fn = lambda *xs: _approach3(*xs, grid=grid, delta=delta)
  boot = lambda *xs: _approach3(*xs, grid=grid, delta=delta, refine_top=4)  # cost: fewer refinements
  params = fn(*arrays)
  p = params
  g = (p['alpha'] * p['A'] / (p['beta'] * p['B'])) ** (1 / (p['alpha'] + p['beta']))
  params.update(G=g, a=p['beta'] / (p['alpha'] + p['beta']), b=p['alpha'] / (p['alpha'] + p['beta']))
  return Fit(params, bootstrap(boot, arrays, n_boot, seed) if n_boot else {},
             {'law': 'L(N,D) = E + A/N^alpha + B/D^beta'})


def parametric_loss(p: dict, n, d):
  return p['E'] + p['A'] / np.asarray(n, float) ** p['alpha'] + p['B'] / np.asarray(d, float) ** p['beta']


def compute_optimal(fit: Fit, flops) -> dict[str, np.ndarray]:
  """N_opt, D_opt and tokens per parameter at compute C, from any fit that has them."""
  c = np.asarray(flops, float)
  p = fit.params
  if 'G' in p:    # approach 3: N_opt = G (C/6)^a, D_opt = G^-1 (C/6)^b
    n_opt = p['G'] * (c / 6) ** p['a']
    d_opt = (c / 6) ** p['b'] / p['G']
  else:           # approaches 1 and 2: power laws fitted in log space
    n_opt = np.exp(p['log_k_n']) * c ** p['a']
    d_opt = np.exp(p['log_k_d']) * c ** p['b']
  return {'N_opt': n_opt, 'D_opt': d_opt, 'tokens_per_param': d_opt / n_opt}


# External data ---------------------------------------------------------------------------------------
_ALIASES = {'n': 'N', 'params': 'N', 'parameters': 'N', 'd': 'D', 'tokens': 'D', 'c': 'C',
            'flops': 'C', 'compute': 'C', 'loss': 'loss'}


def load_points_csv(path: str) -> dict[str, np.ndarray]:
  """Read (N, D or FLOPs, loss) points; the missing one of D and C follows from C = 6 N D."""
  import csv
  with open(path, newline='') as f:
    rows = list(csv.DictReader(f))
  if not rows:
    raise ValueError(f'{path} has no data rows; it needs a header and columns N, loss and D or FLOPs.')
  cols = {}
  for name in rows[0]:
    key = _ALIASES.get(name.strip().lower())
    if key:
      cols[key] = np.array([float(r[name]) for r in rows])
  if 'N' not in cols or 'loss' not in cols or not ({'D', 'C'} & set(cols)):
    raise ValueError(f'{path} has columns {list(rows[0])}; it needs N (or params), loss, and D '
                     '(or tokens) or C (or FLOPs).')
  if 'D' not in cols:
    cols['D'] = cols['C'] / (6 * cols['N'])
  if 'C' not in cols:
    cols['C'] = 6 * cols['N'] * cols['D']
  for k, v in cols.items():
    if (v <= 0).any() or not np.isfinite(v).all():
      raise ValueError(f'{path}: column {k} has non-positive or non-finite values; all must be > 0.')
  return cols
