"""Scaling laws: FLOPs against hand arithmetic; every fitter recovers known parameters from
synthetic data drawn from its law with multiplicative noise; the CSV reader; the figures."""
import numpy as np
import pytest
from scipy import optimize

from lm import scaling

TRUE = dict(E=1.69, A=406.4, B=410.7, alpha=0.34, beta=0.28)   # Hoffmann et al. 2022, eq. 10
TRUE_A = TRUE['beta'] / (TRUE['alpha'] + TRUE['beta'])         # N_opt ∝ C^a, a = 0.4516
TRUE_G = (TRUE['alpha'] * TRUE['A'] / (TRUE['beta'] * TRUE['B'])) ** (1 / (TRUE['alpha'] + TRUE['beta']))
KM = dict(alpha_N=0.076, alpha_D=0.095, N_c=8.8e13, D_c=5.4e13)  # Kaplan et al. 2020, eq. 1.5
COARSE = dict(alpha=[0.5, 1.5], beta=[0.5, 1.5], e=[0.0, 1.0], a=[5.0, 15.0], b=[5.0, 15.0])


def noisy(loss, noise, seed):
  return loss * np.exp(np.random.default_rng(seed).normal(0, noise, np.shape(loss)))


def chinchilla_grid(noise=0.003, seed=0):
  """10 model sizes x 8 token counts, N in [1e7, 1e10], D in [1e9, 1e12]."""
  n = np.repeat(np.logspace(7, 10, 10), 8)
  d = np.tile(np.logspace(9, 12, 8), 10)
  return n, d, noisy(scaling.parametric_loss(TRUE, n, d), noise, seed)


def isoflop_runs(noise=0.001, seed=3):
  """4 budgets 1e18..1e21, 9 sizes each spanning 1.6 decades around the true optimum."""
  n, c = [], []
  for budget in np.logspace(18, 21, 4):
    n_opt = TRUE_G * (budget / 6) ** TRUE_A
    n += list(n_opt * np.logspace(-0.8, 0.8, 9))
    c += [budget] * 9
  n, c = np.array(n), np.array(c)
  return n, c, noisy(scaling.parametric_loss(TRUE, n, c / (6 * n)), noise, seed)


def huber_objective(p, n, d, loss, delta=1e-3):
  """The paper's objective, written out independently of the library."""
  r = np.log(scaling.parametric_loss(p, n, d)) - np.log(loss)
  return np.sum(np.where(np.abs(r) <= delta, 0.5 * r ** 2, delta * (np.abs(r) - 0.5 * delta)))


# FLOPs ---------------------------------------------------------------------------------------
def test_kaplan_flops_and_non_embedding_params_by_hand():
  assert scaling.kaplan_flops(1e6, 2e9) == 1.2e16                      # 6 * 1e6 * 2e9
  # n_layers=2, d=8, d_ff=32: per layer 4 * 8*8 (Q, K, V, O) + 2 * 8*32 (MLP) = 256 + 512 = 768
  assert scaling.non_embedding_params(2, 8, 32) == 1536
  assert scaling.non_embedding_params(3, 16) == 12 * 3 * 16 ** 2        # d_ff = 4d: 12 n_layers d^2


def test_chinchilla_flops_per_token_by_hand():
  # n_layers=2, d=8, n_heads=2 (head_dim 4, h*k = 8), d_ff=32, V=10, T=4. Forward, per layer:
  #   QKV 2*3*8*8 = 384, QK^T 2*4*8 = 64, softmax 3*2*4 = 24, AV 2*4*8 = 64, out 2*8*8 = 128
  #   MLP 2*2*8*32 = 1024                                   -> 384+64+24+64+128+1024 = 1688
  # embeddings 2*10*8 = 160, logits 2*8*10 = 160 -> forward 160 + 2*1688 + 160 = 3696; x3
  assert scaling.chinchilla_flops_per_token(2, 8, 2, 32, 10, 4) == 3 * 3696 == 11088
  # head_dim=8 (h*k = 16): QKV 768, QK^T 128, softmax 24, AV 128, out 256, MLP 1024 = 2328
  assert scaling.chinchilla_flops_per_token(2, 8, 2, 32, 10, 4, head_dim=8) == 3 * (320 + 2 * 2328)
  # Without the context terms the count is 6 N (KM's non-embedding N) + 6 * 2 V d (embed, logits)
  n = scaling.non_embedding_params(4, 64, 256)
  assert scaling.chinchilla_flops_per_token(4, 64, 8, 256, 1000, 0) == 6 * n + 6 * 2 * 1000 * 64
  # ... and the context terms grow linearly in T: 3 * n_layers * (4 T d + 3 h T) per token
  more = scaling.chinchilla_flops_per_token(4, 64, 8, 256, 1000, 128) - 6 * n - 12 * 1000 * 64
  assert more == 3 * 4 * (4 * 128 * 64 + 3 * 8 * 128)


# KM ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize('name, x_c, alpha, lo, hi', [('N', 8.8e13, 0.076, 5, 9),
                                                      ('D', 5.4e13, 0.095, 7, 11),
                                                      ('C', 3.1e8, 0.050, -3, 1)])
def test_km_single_law_recovers_exponent_and_constant(name, x_c, alpha, lo, hi):
  x = np.logspace(lo, hi, 12)
  loss = noisy((x_c / x) ** alpha, 0.002, seed=1)
  fit = scaling.fit_km(x, loss, name, n_boot=200)
  assert fit.params[f'alpha_{name}'] == pytest.approx(alpha, rel=0.05)
  assert np.log(fit.params[f'{name}_c']) == pytest.approx(np.log(x_c), rel=0.02)
  lo_ci, hi_ci = fit.intervals[f'alpha_{name}']
  assert lo_ci <= alpha <= hi_ci and hi_ci - lo_ci < 0.1 * alpha


def test_bootstrap_intervals_cover_the_truth_at_about_their_level():
  hits = 0
  for seed in range(30):
    x = np.logspace(5, 9, 12)
    fit = scaling.fit_km(x, noisy((8.8e13 / x) ** 0.076, 0.005, seed), n_boot=200, seed=seed)
    lo, hi = fit.intervals['alpha_N']
    hits += lo <= 0.076 <= hi
  # nominal 90% (5-95th percentiles); the percentile bootstrap on 12 points runs a bit narrow
  assert 0.7 * 30 <= hits <= 30


def test_km_joint_law_recovers_parameters_and_its_compute_optimum():
  n = np.repeat(np.logspace(6, 9, 6), 6)
  d = np.tile(np.logspace(8, 11, 6), 6)
  loss = noisy(scaling.km_joint_loss(KM, n, d), 0.001, seed=2)
  fit = scaling.fit_km_joint(n, d, loss, n_boot=10)
  for k in ('alpha_N', 'alpha_D'):
    assert fit.params[k] == pytest.approx(KM[k], rel=0.03), k
  for k in ('N_c', 'D_c'):
    assert np.log(fit.params[k]) == pytest.approx(np.log(KM[k]), rel=0.01), k
  assert set(fit.intervals) >= {'alpha_N', 'alpha_D', 'N_c', 'D_c'}
  # the closed-form optimum agrees with minimising L(N, C / 6N) numerically
  c = 1e21
  opt = scaling.compute_optimal(scaling.Fit(dict(KM)), c)
  numeric = optimize.minimize_scalar(lambda ln: scaling.km_joint_loss(KM, np.exp(ln), c / (6 * np.exp(ln))),
                                     bounds=(10, 40), method='bounded', options={'xatol': 1e-9})
  assert np.log(opt['N_opt']) == pytest.approx(numeric.x, abs=1e-4)
  assert opt['D_opt'] * opt['N_opt'] * 6 == pytest.approx(c)


# Chinchilla approach 1 ----------------------------------------------------------------------------
def test_lower_envelope_by_hand():
  c = np.array([1, 2, 3, 4, 4, 5.])
  loss = np.array([5, 6, 4, 3.5, 3, 3.])
  # C=1 (5) leads; C=2 (6) is worse; C=3 (4) improves; at C=4 only the 3 counts (the 3.5 has
  # as much compute and a higher loss); C=5 merely ties
  np.testing.assert_array_equal(scaling.lower_envelope(c, loss), [0, 2, 4])


@pytest.mark.parametrize('n_budgets', [None, 300])
def test_approach1_envelope_recovers_optimal_exponents(n_budgets):
  # loss curves: each of 25 sizes observed at 40 token counts; the envelope traces the optimum
  n, d = (x.ravel() for x in np.meshgrid(np.logspace(7, 10, 25), np.logspace(9, 12.5, 40)))
  loss = noisy(scaling.parametric_loss(TRUE, n, d), 0.001, seed=4)
  fit = scaling.fit_chinchilla_envelope(n, d, 6 * n * d, loss, n_boot=100, n_budgets=n_budgets)
  assert fit.params['a'] == pytest.approx(TRUE_A, abs=0.02)
  assert fit.params['a'] + fit.params['b'] == pytest.approx(1.0, abs=1e-9)   # C = 6ND on every point
  lo, hi = fit.intervals['a']
  assert lo <= TRUE_A <= hi and hi - lo < 0.05
  opt = scaling.compute_optimal(fit, 1e21)
  true_n = TRUE_G * (1e21 / 6) ** TRUE_A
  assert opt['N_opt'] == pytest.approx(true_n, rel=0.15)


# Chinchilla approach 2 ----------------------------------------------------------------------------
def test_approach2_isoflop_recovers_optimal_sizes_and_exponents():
  n, c, loss = isoflop_runs()
  fit = scaling.fit_chinchilla_isoflop(n, c, loss, n_boot=100)
  assert len(fit.extra['minima']) == 4
  for m in fit.extra['minima']:   # each parabola's minimum lands on the law's optimum
    assert m['N_opt'] == pytest.approx(TRUE_G * (m['flops'] / 6) ** TRUE_A, rel=0.05)
    assert m['N_opt'] * m['D_opt'] * 6 == pytest.approx(m['flops'])
  assert fit.params['a'] == pytest.approx(TRUE_A, abs=0.02)
  assert fit.params['a'] + fit.params['b'] == pytest.approx(1.0, abs=1e-9)
  lo, hi = fit.intervals['a']
  assert lo <= TRUE_A <= hi and hi - lo < 0.1


def test_approach2_needs_bracketed_minima():
  n, c, loss = isoflop_runs()
  small = n < np.median(n) / 3   # keep only small models: every profile's minimum is its edge
  with pytest.raises(ValueError, match='interior minimum'):
    scaling.fit_chinchilla_isoflop(n[small], c[small], loss[small], n_boot=0)


# Chinchilla approach 3 ----------------------------------------------------------------------------
def test_approach3_recovers_parameters_and_the_allocation():
  n, d, loss = chinchilla_grid()
  fit = scaling.fit_chinchilla_parametric(n, d, loss, grid=COARSE, n_boot=30, q=(1, 99))
  p = fit.params
  for k in ('E', 'alpha', 'beta'):
    assert p[k] == pytest.approx(TRUE[k], rel=0.03), k
  for k in ('A', 'B'):
    assert p[k] == pytest.approx(TRUE[k], rel=0.08), k
  for k in ('E', 'A', 'B', 'alpha', 'beta', 'a'):
    lo, hi = fit.intervals[k]
    assert lo <= (TRUE_A if k == 'a' else TRUE[k]) <= hi, k
  # the optimiser found at least as good a point as the truth, on the paper's objective
  assert huber_objective(p, n, d, loss) <= huber_objective(TRUE, n, d, loss)
  assert fit.extra['objective'] == pytest.approx(huber_objective(p, n, d, loss), rel=1e-9)
  # compute-optimal allocation (Hoffmann eq. 4) against the truth's, at Chinchilla's budget
  c = 5.76e23
  opt = scaling.compute_optimal(fit, c)
  assert p['a'] == pytest.approx(TRUE_A, rel=0.03)
  assert opt['N_opt'] == pytest.approx(TRUE_G * (c / 6) ** TRUE_A, rel=0.1)
  assert opt['N_opt'] * opt['D_opt'] * 6 == pytest.approx(c)
  assert opt['tokens_per_param'] == pytest.approx(opt['D_opt'] / opt['N_opt'])
  # and it is the minimum of the fitted law along C = 6ND
  ns = opt['N_opt'] * np.array([0.9, 1.0, 1.1])
  assert np.argmin(scaling.parametric_loss(p, ns, c / (6 * ns))) == 1


def test_approach3_is_insensitive_to_the_initialisation_grid():
  n, d, loss = chinchilla_grid(seed=5)
  other = dict(alpha=[0.2, 1.0], beta=[0.3, 1.0], e=[-0.5, 0.5], a=[2.0, 10.0, 20.0], b=[3.0, 12.0])
  fits = [scaling.fit_chinchilla_parametric(n, d, loss, grid=g, n_boot=0) for g in (COARSE, other, None)]
  for f in fits[1:]:   # None: the paper's full 5,400-point grid
    for k in ('E', 'A', 'B', 'alpha', 'beta'):
      assert f.params[k] == pytest.approx(fits[0].params[k], rel=1e-4), k
  assert scaling.grid_starts().shape == (5400, 5)


# compute_optimal and the CSV reader -----------------------------------------------------------------
def test_compute_optimal_refuses_a_one_variable_fit():
  fit = scaling.fit_km(np.logspace(5, 9, 5), np.linspace(4, 3, 5), n_boot=0)
  with pytest.raises(ValueError, match='no compute-optimal allocation'):
    scaling.compute_optimal(fit, 1e20)


def test_csv_loader_reads_either_tokens_or_flops(tmp_path):
  p = tmp_path / 'points.csv'
  p.write_text('Params,Tokens,LOSS,notes\n1e6,2e9,3.1,a\n2e6,4e9,2.9,b\n')
  pts = scaling.load_points_csv(p)
  np.testing.assert_allclose(pts['N'], [1e6, 2e6])
  np.testing.assert_allclose(pts['loss'], [3.1, 2.9])
  np.testing.assert_allclose(pts['C'], [6 * 1e6 * 2e9, 6 * 2e6 * 4e9])
  q = tmp_path / 'flops.csv'
  q.write_text('n,FLOPs,loss\n1e6,1.2e16,3.1\n\n')
  pts = scaling.load_points_csv(str(q))
  assert pts['D'][0] == pytest.approx(2e9)        # 1.2e16 / (6 * 1e6)


@pytest.mark.parametrize('text, message', [
    ('N,loss\n1e6,3.0\n', 'needs N'),
    ('tokens,flops,loss\n1,2,3\n', 'needs N'),
    ('N,D,loss\n-1,2,3\n', 'non-positive'),
    ('N,D,loss\n1e6,2e9,0\n', 'non-positive'),
    ('N,D,loss\n1e6,,3\n', 'non-numeric'),
    ('N,D,loss\n', 'no data rows'),
    ('', 'no data rows'),
    ('N,params,D,loss\n1,1,1,1\n', 'two columns'),
])
def test_csv_loader_errors_are_one_clear_sentence(tmp_path, text, message):
  p = tmp_path / 'bad.csv'
  p.write_text(text)
  with pytest.raises(ValueError, match=message):
    scaling.load_points_csv(p)


# Figures (drawn by experiments/stages/scaling_plots.py from these fits) ------------------------------------
def test_figures_are_written(tmp_path):
  plots = pytest.importorskip('experiments.stages.scaling_plots')
  n, c, loss = isoflop_runs()
  pts = {'N': n, 'D': c / (6 * n), 'C': c, 'loss': loss}
  km = scaling.fit_km(n, loss, n_boot=0)
  iso = scaling.fit_chinchilla_isoflop(n, c, loss, n_boot=20)
  env = scaling.fit_chinchilla_envelope(n, pts['D'], c, loss, n_boot=20)
  par = scaling.fit_chinchilla_parametric(n, pts['D'], loss, grid=COARSE, n_boot=0)
  paths = [plots.loss_vs_n(pts, km, str(tmp_path / 'n.png')),
           plots.isoflop(pts, iso, str(tmp_path / 'iso.png')),
           plots.loss_vs_flops(pts, env, str(tmp_path / 'env.png')),
           plots.optimal_allocation({'approach 1': env, 'approach 2': iso, 'approach 3': par}, iso,
                                    (c.min(), c.max()), str(tmp_path / 'opt.png'))]
  for path in paths:
    with open(path, 'rb') as f:
      data = f.read()
    assert data[:8] == b'\x89PNG\r\n\x1a\n' and len(data) > 5000, path
