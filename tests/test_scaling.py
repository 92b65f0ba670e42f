"""Scaling-law fitters recover known parameters from synthetic data drawn from the laws."""
import numpy as np
import pytest

from lm import scaling

TRUE = dict(E=1.69, A=406.4, B=410.7, alpha=0.34, beta=0.28)   # Hoffmann et al. 2022, eq. 10


def chinchilla_points(noise=0.003, seed=0):
  rng = np.random.default_rng(seed)
  n = np.repeat(np.logspace(7, 10, 10), 8)
  d = np.tile(np.logspace(9, 12, 8), 10)
  loss = scaling.parametric_loss(TRUE, n, d) * np.exp(rng.normal(0, noise, n.size))
  return n, d, loss


def test_flops_by_hand():
  assert scaling.kaplan_flops(1e6, 2e9) == 6 * 1e6 * 2e9
  # L=2, d=8, d_ff=32, V=10, T=4: per layer 2*3*64 + 2*4*8 + 2*4*8 + 2*64 + 4*8*32 = 384+64+64+128+1024
  per_layer = 1664
  forward = 2 * per_layer + 2 * 8 * 10 + 2 * 8 * 10
  assert scaling.chinchilla_flops_per_token(2, 8, 32, 10, 4) == 3 * forward == 10944


def test_km_single_law_recovers_exponent_and_constant():
  rng = np.random.default_rng(1)
  n = np.logspace(5, 9, 12)
  loss = (8.8e13 / n) ** 0.076 * np.exp(rng.normal(0, 0.002, n.size))   # Kaplan's L(N)
  fit = scaling.fit_km(n, loss, 'N')
  assert fit.params['alpha_N'] == pytest.approx(0.076, rel=0.05)
  assert np.log10(fit.params['N_c']) == pytest.approx(np.log10(8.8e13), rel=0.05)
  lo, hi = fit.intervals['alpha_N']
  assert lo <= 0.076 <= hi


def test_km_joint_law_recovers_parameters():
  rng = np.random.default_rng(2)
  n = np.repeat(np.logspace(6, 9, 6), 6)
  d = np.tile(np.logspace(8, 11, 6), 6)
  a_n, a_d, n_c, d_c = 0.076, 0.095, 8.8e13, 5.4e13
  loss = ((n_c / n) ** (a_n / a_d) + d_c / d) ** a_d * np.exp(rng.normal(0, 0.001, n.size))
  fit = scaling.fit_km_joint(n, d, loss, n_boot=0)
  assert fit.params['alpha_N'] == pytest.approx(a_n, rel=0.05)
  assert fit.params['alpha_D'] == pytest.approx(a_d, rel=0.05)


def test_approach3_recovers_parameters_and_ignores_the_init_grid():
  n, d, loss = chinchilla_points()
  coarse = dict(alpha=[0.5, 1.5], beta=[0.5, 1.5], e=[0.0, 1.0], a=[5.0, 15.0], b=[5.0, 15.0])
  other = dict(alpha=[0.2, 1.0], beta=[0.3, 1.0], e=[-0.5, 0.5], a=[2.0, 10.0, 20.0], b=[3.0, 12.0])
  f1 = scaling.fit_chinchilla_parametric(n, d, loss, grid=coarse, n_boot=0)
  f2 = scaling.fit_chinchilla_parametric(n, d, loss, grid=other, n_boot=0)
  for k in ('E', 'alpha', 'beta'):
    assert f1.params[k] == pytest.approx(TRUE[k], rel=0.05), k
    assert f1.params[k] == pytest.approx(f2.params[k], rel=1e-3), k
  for k in ('A', 'B'):
    assert np.log(f1.params[k]) == pytest.approx(np.log(TRUE[k]), rel=0.05), k
  # compute-optimal allocation: a = beta / (alpha + beta)
  assert f1.params['a'] == pytest.approx(0.28 / 0.62, rel=0.05)
  opt = scaling.compute_optimal(f1, 5.76e23)
  true_g = (TRUE['alpha'] * TRUE['A'] / (TRUE['beta'] * TRUE['B'])) ** (1 / 0.62)
  assert np.log(opt['N_opt']) == pytest.approx(np.log(true_g * (5.76e23 / 6) ** (0.28 / 0.62)), rel=0.02)


def test_approach2_isoflop_recovers_optimal_exponent():
  budgets = np.logspace(18, 21, 4)
  ns, cs = [], []
  for c in budgets:
    n_opt = 0.1 * c ** 0.5   # put the sizes around the optimum of this law
    for f in np.logspace(-0.8, 0.8, 9):
      ns.append(n_opt * f)
      cs.append(c)
  n, c = np.array(ns), np.array(cs)
  d = c / (6 * n)
  loss = scaling.parametric_loss(TRUE, n, d) * np.exp(np.random.default_rng(3).normal(0, 0.001, n.size))
  fit = scaling.fit_chinchilla_isoflop(n, c, loss, n_boot=50)
  expected_a = TRUE['beta'] / (TRUE['alpha'] + TRUE['beta'])
  assert fit.params['a'] == pytest.approx(expected_a, abs=0.03)
  assert fit.params['a'] + fit.params['b'] == pytest.approx(1.0, abs=1e-6)   # C = 6ND exactly
  lo, hi = fit.intervals['a']
  assert lo - 0.03 <= expected_a <= hi + 0.03
  assert len(fit.extra['minima']) == 4


def test_approach1_envelope_recovers_optimal_exponent():
  # loss curves: each size is observed at many token counts; the envelope traces the optimum
  ns = np.logspace(7, 10, 25)
  ds = np.logspace(9, 12.5, 40)
  n, d = np.meshgrid(ns, ds)
  n, d = n.ravel(), d.ravel()
  c = 6 * n * d
  loss = scaling.parametric_loss(TRUE, n, d)
  fit = scaling.fit_chinchilla_envelope(n, d, c, loss, n_boot=20)
  assert fit.params['a'] == pytest.approx(TRUE['beta'] / (TRUE['alpha'] + TRUE['beta']), abs=0.05)


def test_csv_loader(tmp_path):
  p = tmp_path / 'points.csv'
  p.write_text('params,tokens,loss\n1e6,2e9,3.1\n2e6,4e9,2.9\n')
  pts = scaling.load_points_csv(str(p))
  np.testing.assert_allclose(pts['C'], [6 * 1e6 * 2e9, 6 * 2e6 * 4e9])
  q = tmp_path / 'flops.csv'
  q.write_text('N,FLOPs,loss\n1e6,1.2e16,3.1\n')
  assert scaling.load_points_csv(str(q))['D'][0] == pytest.approx(2e9)
  bad = tmp_path / 'bad.csv'
  bad.write_text('N,loss\n1e6,3.0\n')
  with pytest.raises(ValueError, match='needs N'):
    scaling.load_points_csv(str(bad))
  neg = tmp_path / 'neg.csv'
  neg.write_text('N,D,loss\n-1,2,3\n')
  with pytest.raises(ValueError, match='non-positive'):
    scaling.load_points_csv(str(neg))
