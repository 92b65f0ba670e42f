"""Figures for scaling sweeps (matplotlib, PNG). Each function writes one file and returns its path."""
from __future__ import annotations

import matplotlib

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from lm import scaling  # noqa: E402


def _save(fig, path):
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return path


def _budget_colors(c):
  budgets = np.unique(c)
  cmap = plt.get_cmap('viridis')
  return {b: cmap(i / max(len(budgets) - 1, 1)) for i, b in enumerate(budgets)}


def loss_vs_n(pts: dict, km: scaling.Fit, path: str) -> str:
  """KM style: log-log loss vs non-embedding parameters, with L(N) = (N_c/N)^alpha_N."""
  fig, ax = plt.subplots(figsize=(6, 4))
  colors = _budget_colors(pts['C'])
  for b, col in colors.items():
    sel = pts['C'] == b
    ax.scatter(pts['N'][sel], pts['loss'][sel], color=col, label=f'C = {b:.1e}', s=18)
  ns = np.logspace(np.log10(pts['N'].min()) - 0.2, np.log10(pts['N'].max()) + 0.2, 100)
  p = km.params
  ax.plot(ns, (p['N_c'] / ns) ** p['alpha_N'], 'k--',
          label=f"KM fit on best per N: alpha_N = {p['alpha_N']:.3f}")
  ax.set(xscale='log', yscale='log', xlabel='non-embedding parameters N', ylabel='validation loss')
  ax.legend(fontsize=7)
  ax.grid(alpha=0.3, which='both')
  return _save(fig, path)


def isoflop(pts: dict, fit: scaling.Fit, path: str) -> str:
  """IsoFLOP profiles: loss vs N per budget, the fitted parabola in log N, and its minimum."""
  fig, ax = plt.subplots(figsize=(6, 4))
  colors = _budget_colors(pts['C'])
  minima = {m['flops']: m for m in fit.extra['minima']}
  for b, col in colors.items():
    sel = pts['C'] == b
    ax.scatter(pts['N'][sel], pts['loss'][sel], color=col, s=18, label=f'C = {b:.1e}')
    if b in minima:
      m = minima[b]
      fitted = np.log(m.get('fitted_N', pts['N'][sel]))
      xs = np.linspace(fitted.min() - 0.2, fitted.max() + 0.2, 100)
      ax.plot(np.exp(xs), np.polyval(m['coeffs'], xs), color=col, lw=1)
      ax.plot(m['N_opt'], m['loss_opt'], '*', color=col, ms=12, mec='k')
  ax.set(xscale='log', xlabel='non-embedding parameters N', ylabel='validation loss',
         title='IsoFLOP profiles (stars: fitted minima)')
  ax.legend(fontsize=7)
  ax.grid(alpha=0.3)
  return _save(fig, path)


def loss_vs_flops(pts: dict, env: scaling.Fit, path: str, ylabel: str = 'loss') -> str:
  """Loss vs FLOPs for every point (final points, or points along each run's loss curve),
  with the lower envelope (Chinchilla approach 1)."""
  fig, ax = plt.subplots(figsize=(6, 4))
  sc = ax.scatter(pts['C'], pts['loss'], c=np.log10(pts['N']), cmap='plasma', s=18)
  fig.colorbar(sc, ax=ax, label='log10 N')
  ax.plot(env.extra['envelope_flops'], env.extra['envelope_loss'], 'k-', lw=1, label='lower envelope')
  ax.set(xscale='log', yscale='log', xlabel='training FLOPs C = 6ND', ylabel=ylabel)
  ax.legend(fontsize=7)
  ax.grid(alpha=0.3, which='both')
  return _save(fig, path)


def optimal_allocation(fits: dict[str, scaling.Fit], iso: scaling.Fit, c_range, path: str) -> str:
  """N_opt(C) and D_opt(C) from each approach; the IsoFLOP fit with its bootstrap 5-95% band."""
  cs = np.logspace(np.log10(c_range[0]) - 0.5, np.log10(c_range[1]) + 1, 100)
  fig, axes = plt.subplots(1, 2, figsize=(10, 4))
  for ax, key, exp_key, ik in ((axes[0], 'N_opt', 'a', 'log_k_n'), (axes[1], 'D_opt', 'b', 'log_k_d')):
    for name, f in fits.items():
      opt = scaling.compute_optimal(f, cs)
      ax.plot(cs, opt[key], label=f"{name}: {exp_key} = {f.params[exp_key]:.2f}")
    s = iso.extra.get('bootstrap_samples', {})
    if s.get(exp_key):
      curves = np.exp(np.array(s[ik])[:, None]) * cs[None, :] ** np.array(s[exp_key])[:, None]
      ax.fill_between(cs, np.percentile(curves, 5, 0), np.percentile(curves, 95, 0), alpha=0.2,
                      label='IsoFLOP 5-95% bootstrap')
    for m in iso.extra['minima']:
      ax.plot(m['flops'], m[key], 'k*', ms=10)
    ax.set(xscale='log', yscale='log', xlabel='FLOPs C', ylabel=key)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3, which='both')
  return _save(fig, path)
