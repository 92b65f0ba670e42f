"""Best-of-n: the unbiased estimator against brute force over all n-subsets, KL_bon against
sampling, and the `bon` stage end to end on tiny random-weight policy / RM workdirs."""
import itertools
import json
import math
import os

import numpy as np
import pytest

from experiments import bon
from experiments.configs import rlhf_bon
from lm.config import ConfigError
from rl import bon as bon_lib
from tests import rl_fixtures


# --- the estimator -----------------------------------------------------------------------------

def _brute(select, values, n):
  """Mean over every n-subset of the value at the subset's argmax (first on ties, as rl.bon)."""
  out = []
  for sub in itertools.combinations(range(len(select)), n):
    sub = np.array(sub)
    out.append(values[sub[int(np.argmax(select[sub]))]])
  return np.mean(out)


@pytest.mark.parametrize('ties', [False, True])
def test_estimator_equals_brute_force_over_subsets(ties):
  rng = np.random.default_rng(0)
  P, N = 3, 9
  select = rng.normal(size=(P, N))
  if ties:                      # few distinct scores: the tie rule matters and must match argmax
    select = np.round(select)
  values = rng.normal(size=(P, N))
  ns = list(range(1, N + 1))
  est = bon_lib.expected_best(select, values, ns)
  for j, n in enumerate(ns):
    for p in range(P):
      assert est[j, p] == pytest.approx(_brute(select[p], values[p], n), abs=1e-12)
  # n = 1 is the plain mean; n = N the value at the overall (first) argmax.
  np.testing.assert_allclose(est[0], values.mean(1), atol=1e-12)
  np.testing.assert_allclose(est[-1], values[np.arange(P), select.argmax(1)], atol=1e-12)


def test_weights_and_ns():
  assert bon_lib.ns_of(256) == [1, 2, 4, 8, 16, 32, 64, 128, 256]
  assert bon_lib.ns_of(12) == [1, 2, 4, 8, 12]
  w = bon_lib.bon_weights(256, 128)            # C(256, 128) ~ 6e75: no overflow, sums to 1
  assert w.sum() == pytest.approx(1.0, abs=1e-12) and np.all(w[:127] == 0)
  assert bon_lib.bon_weights(5, 2)[4] == pytest.approx(4 / 10)    # C(4, 1) / C(5, 2)


def test_curve_is_monotone_in_the_selector_and_has_kl_bon():
  rng = np.random.default_rng(1)
  proxy = rng.normal(size=(20, 64))
  g = 0.5 * proxy + rng.normal(size=(20, 64))
  pts = bon_lib.curve(proxy, g, proxy, bon_lib.ns_of(64))
  assert all(b['proxy'] > a['proxy'] for a, b in zip(pts, pts[1:]))   # E[max of n] grows with n
  assert [p['kl'] for p in pts] == [bon_lib.kl_bon(n) for n in bon_lib.ns_of(64)]
  assert pts[0]['kl'] == 0 and pts[0]['gold'] == pytest.approx(g.mean())


# --- KL_bon against sampling --------------------------------------------------------------------

def _exact_bon_kl(p):
  """KL(best-of-n || base) of a categorical whose outcomes are listed in increasing reward:
  q_k = F_k^n - F_{k-1}^n."""
  F = np.concatenate([[0.0], np.cumsum(p)])
  def kl(n):
    q = F[1:] ** n - F[:-1] ** n
    m = q > 0
    return float(np.sum(q[m] * np.log(q[m] / p[m])))
  return kl


@pytest.mark.parametrize('n', [2, 4, 16])
def test_kl_bon_against_sampling_categorical(n):
  """Sample best-of-n draws from a categorical with distinct rewards; the empirical KL of the
  selected outcomes to the base matches the exact KL, which is at most the formula and equal
  to it as the outcomes become fine (each has small mass)."""
  rng = np.random.default_rng(n)
  K = 40
  p = rng.dirichlet(np.ones(K) * 5)                # outcome k has reward k: all distinct
  draws = rng.choice(K, size=(200_000, n), p=p)
  best = draws.max(1)                               # the highest reward among n draws
  q_hat = np.bincount(best, minlength=K) / len(best)
  m = q_hat > 0
  kl_hat = float(np.sum(q_hat[m] * np.log(q_hat[m] / p[m])))
  exact = _exact_bon_kl(p)(n)
  assert kl_hat == pytest.approx(exact, abs=0.02)
  assert exact <= bon_lib.kl_bon(n) + 1e-12
  fine = _exact_bon_kl(np.full(20_000, 1 / 20_000))(n)   # fine outcomes: the formula is exact
  assert fine == pytest.approx(bon_lib.kl_bon(n), abs=2e-3)


@pytest.mark.parametrize('n', [1, 2, 8, 64])
def test_kl_bon_against_sampling_continuous(n):
  """Continuous rewards (uniform base): best-of-n has density n u^(n-1), so the sampled KL is
  the mean of log n + (n - 1) log u over sampled maxima."""
  rng = np.random.default_rng(7)
  u = rng.uniform(size=(50_000, n)).max(1)
  kl_hat = float(np.mean(math.log(n) + (n - 1) * np.log(u)))
  assert kl_hat == pytest.approx(bon_lib.kl_bon(n), abs=0.02)


# --- the stage ----------------------------------------------------------------------------------

@pytest.fixture(scope='module')
def dirs(tmp_path_factory):
  d = tmp_path_factory.mktemp('bon')
  pol = rl_fixtures.policy_run(d / 'sft', n_layers=1)   # compile-bound: one layer (as test_ppo_stage)
  rm_a = rl_fixtures.reward_run(d / 'rm', pol, seed=1)
  rm_b = rl_fixtures.reward_run(d / 'rm_small', pol, seed=5, gain=1.0, bias=0.0)
  return d, pol, rm_a, rm_b


def tiny(pol, reward_from):
  c = rlhf_bon.get_config()
  c.init_from = pol
  c.reward_from = reward_from
  c.prompts.n_eval = 4
  c.rollout.update(samples=8, max_new_tokens=6, batch_size=16)
  return c


def test_bon_stage_two_rms(dirs, capsys):
  d, pol, rm_a, rm_b = dirs
  wd = str(d / 'run')
  res = bon.run(tiny(pol, f'{rm_a},{rm_b}'), wd)
  out = capsys.readouterr().out
  assert 'best-of-n on 4 held-out prompts x 8 samples' in out
  for f in ('config.json', 'results.json', 'scores.npz', 'bon.png'):
    assert os.path.exists(os.path.join(wd, f)), f
  with open(os.path.join(wd, 'results.json')) as f:
    saved = json.load(f)
  assert list(saved['series']) == ['rm', 'rm_small'] and saved['ns'] == [1, 2, 4, 8]
  sc = np.load(os.path.join(wd, 'scores.npz'))
  assert sc['gold'].shape == (4, 8) and sc['proxy_0'].shape == (4, 8)
  # The saved curves are the estimator on the saved scores; proxy at n = N is the mean max.
  for i, name in enumerate(['rm', 'rm_small']):
    pts = saved['series'][name]['points']
    p, g = sc[f'proxy_{i}'], sc['gold']
    assert pts[-1]['proxy'] == pytest.approx(p.max(1).astype(np.float64).mean(), abs=1e-9)
    assert pts[0]['gold'] == pytest.approx(g.mean(), abs=1e-9)
    assert pts[-1]['gold'] == pytest.approx(g[np.arange(4), p.argmax(1)].mean(), abs=1e-9)
    assert pts[-1]['kl'] == pytest.approx(math.log(8) - 7 / 8)
  # Two RMs with different weights select differently (the proxies differ).
  assert not np.allclose(sc['proxy_0'], sc['proxy_1'])
  assert res['oracle']['points'][-1]['gold'] == pytest.approx(sc['gold'].max(1).mean())


def test_bon_start_up_errors(dirs, tmp_path):
  d, pol, rm_a, _ = dirs
  with pytest.raises(ConfigError, match='reward_from'):
    bon.run(tiny(pol, ''), str(tmp_path / 'a'))
  with pytest.raises(ConfigError, match='no config.json'):
    bon.run(tiny(pol, str(tmp_path / 'missing')), str(tmp_path / 'b'))
  c = tiny(pol, rm_a)
  c.rollout.samples = 0
  with pytest.raises(ConfigError, match='rollout.samples'):
    bon.run(c, str(tmp_path / 'c'))
  # An RM whose tokenizer differs from the policy's (another char vocabulary) is refused.
  other_pol = rl_fixtures.policy_run(tmp_path / 'other_sft')
  from data import tokenizers
  tok = tokenizers.add_special_tokens(tokenizers.CharTokenizer.from_texts(['xyz abc']), ['eos'])
  other_rm = rl_fixtures.reward_run(tmp_path / 'other_rm', other_pol)
  tok.save(tokenizers.run_file(other_rm))
  with pytest.raises(ConfigError, match='different tokenizer'):
    bon.run(tiny(pol, other_rm), str(tmp_path / 'd'))
