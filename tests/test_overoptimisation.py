"""The over-optimisation study: Gao et al.'s forms recover known coefficients; the experiment
reads bon / PPO / GRPO / DPO workdirs written here by hand, skips missing ones with a note,
and with no series at all stops with one sentence."""
import json
import math
import os

import numpy as np
import pytest

from experiments import overoptimisation
from experiments.stages import overopt_fit
from experiments.configs import overoptimisation as overopt_config
from lm.config import ConfigError
from rl import bon as bon_lib


@pytest.mark.parametrize('form,alpha,beta', [('bon', 0.8, 0.3), ('rl', 0.5, 0.2), ('rl', 1.2, -0.1)])
def test_fits_recover_known_coefficients(form, alpha, beta):
  d = np.linspace(0.05, 3.0, 25)
  r = overopt_fit.predict(d, alpha, beta, form)
  f = overopt_fit.fit(d, r, form)
  assert f['alpha'] == pytest.approx(alpha, abs=1e-9) and f['beta'] == pytest.approx(beta, abs=1e-9)
  assert f['r2'] == pytest.approx(1.0)
  # With noise: close, and R^2 < 1.
  rng = np.random.default_rng(0)
  noisy = overopt_fit.fit(d, r + rng.normal(0, 0.01, d.size), form)
  assert noisy['alpha'] == pytest.approx(alpha, abs=0.03) and noisy['beta'] == pytest.approx(beta, abs=0.03)
  assert 0.9 < noisy['r2'] < 1.0


def test_fit_forms_by_hand_and_peak():
  # R_bon(2) with alpha=1, beta=0.25: 2 (1 - 0.5) = 1; R_RL(e) with alpha=1, beta=0.5: e (1 - 0.5).
  assert overopt_fit.predict([2.0], 1.0, 0.25, 'bon')[0] == pytest.approx(1.0)
  assert overopt_fit.predict([math.e], 1.0, 0.5, 'rl')[0] == pytest.approx(math.e / 2)
  assert overopt_fit.predict([0.0], 1.0, 0.5, 'rl')[0] == 0.0
  d = np.linspace(0.1, 4, 20)
  f = overopt_fit.fit(d, overopt_fit.predict(d, 1.0, 0.25, 'bon'), 'bon')
  assert f['d_peak'] == pytest.approx(2.0)
  with pytest.raises(ValueError, match='at least 3'):
    overopt_fit.fit([0.0, 1.0, 2.0], [0, 1, 2], 'bon')


def _write(path, obj, lines=False):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, 'w') as f:
    if lines:
      f.writelines(json.dumps(o) + '\n' for o in obj)
    else:
      json.dump(obj, f)


@pytest.fixture
def runs(tmp_path):
  """bon over two RMs (gold from a known R_bon), a PPO run and a GRPO run on the main RM
  (gold from a known R_RL), two DPO runs; offsets 0.1 (the SFT policy's gold)."""
  rm, small = str(tmp_path / 'rm'), str(tmp_path / 'rm_small')
  ns = [1, 2, 4, 8, 16, 32, 64, 128, 256]
  def bon_pts(a, b):
    out = []
    for n in ns:
      kl = bon_lib.kl_bon(n)
      d = math.sqrt(kl)
      out.append({'n': n, 'kl': kl, 'd': d, 'gold': 0.1 + d * (a - b * d), 'proxy': 1.5 * d})
    return out
  _write(str(tmp_path / 'bon' / 'results.json'), {'series': {
      'rm': {'reward_from': rm, 'points': bon_pts(0.4, 0.1)},
      'rm_small': {'reward_from': small, 'points': bon_pts(0.3, 0.2)}}})
  def rl_rows(a, b, beta):
    rows = []
    for it, kl in enumerate([0.0, 0.5, 1.5, 3.0, 6.0, 10.0]):
      d = math.sqrt(kl)
      g = 0.1 + (d * (a - b * math.log(d)) if d > 0 else 0.0)
      rows.append({'iteration': it * 10, 'gold': g, 'proxy': 0.7 * d, 'kl': kl, 'beta': beta})
    return rows
  _write(str(tmp_path / 'ppo_b0' / 'results.json'), {'stage': 'ppo', 'evals': rl_rows(0.2, 0.05, 0.0)})
  _write(str(tmp_path / 'ppo_b0' / 'config.json'), {'reward_from': rm, 'reward_source': rm})
  grpo_rows = [{k: v for k, v in r.items() if k != 'beta'} for r in rl_rows(0.3, 0.1, 0.05)]
  _write(str(tmp_path / 'grpo' / 'results.json'), {'stage': 'grpo', 'evals': grpo_rows})
  _write(str(tmp_path / 'grpo' / 'config.json'), {'reward_from': rm, 'kl': {'coef': 0.05}})
  for beta, kl, g in ((0.1, 2.0, 0.25), (0.3, 0.8, 0.2)):
    wd = str(tmp_path / f'dpo_b{beta}')
    _write(os.path.join(wd, 'results.json'), {'stage': 'dpo', 'after': {'gold': g, 'proxy': 0.5, 'kl': kl},
                                              'before': {'gold': 0.1, 'proxy': 0.0, 'kl': 0.0}})
    _write(os.path.join(wd, 'config.json'), {'reward_from': rm, 'kl': {'coef': beta}})
  os.makedirs(tmp_path / 'ppo_unfinished')          # exists but holds no results.json
  return tmp_path


def config_for(root, **kw):
  c = overopt_config.get_config()
  c.bon = str(root / 'bon') + ',' + str(root / 'bon_missing')
  c.ppo = str(root / 'ppo*')
  c.grpo = str(root / 'grpo')
  c.rloo = str(root / 'rloo*')
  c.dpo = str(root / 'dpo*')
  c.update(kw)
  return c


def test_study_reads_series_skips_missing_and_fits(runs, capsys):
  out = overoptimisation.run(config_for(runs), str(runs / 'out'))
  printed = capsys.readouterr().out
  # Missing / unfinished workdirs are listed and skipped, not a crash.
  assert f'note: skipping bon {runs / "bon_missing"}: no such directory' in printed
  assert 'ppo_unfinished: no results.json' in printed
  assert 'rloo*: no such directory' in printed
  assert {s['path'] for s in out['skipped']} == {str(runs / 'bon_missing'), str(runs / 'ppo_unfinished'),
                                                 str(runs / 'rloo*')}
  assert set(out['panels']) == {'rm', 'rm_small'}
  main = {s['name']: s for s in out['panels']['rm']['series']}
  assert set(main) == {'bon rm', 'ppo ppo_b0', 'grpo grpo', 'dpo'}
  # Fits recover the planted coefficients (offset 0.1 read from each series' d = 0 point).
  g = main['bon rm']['fits']['gold']
  assert (g['alpha'], g['beta'], g['offset']) == pytest.approx((0.4, 0.1, 0.1))
  assert g['r2'] == pytest.approx(1.0) and g['offset_from'] == 'own d=0 point'
  small = out['panels']['rm_small']['series'][0]['fits']['gold']
  assert (small['alpha'], small['beta']) == pytest.approx((0.3, 0.2))
  assert (main['ppo ppo_b0']['fits']['gold']['alpha'], main['ppo ppo_b0']['fits']['gold']['beta']) == \
      pytest.approx((0.2, 0.05))
  assert main['ppo ppo_b0']['beta'] == 0.0 and main['grpo grpo']['beta'] == 0.05   # (from kl.coef)
  assert (main['grpo grpo']['fits']['gold']['alpha'], main['grpo grpo']['fits']['gold']['beta']) == \
      pytest.approx((0.3, 0.1))
  # DPO: the two runs are one series of 2 points + the shared d = 0 point: too few to fit.
  dpo = main['dpo']
  assert [p['d'] for p in dpo['points']] == pytest.approx([0.0, math.sqrt(0.8), math.sqrt(2.0)])
  assert 'at least 3' in dpo['fits']['gold']['error']
  for f in ('overoptimisation.json', 'overoptimisation_gold.png', 'overoptimisation_proxy.png', 'config.json'):
    assert os.path.exists(runs / 'out' / f), f
  assert 'bon rm' in printed and '+0.4000' in printed


def test_study_with_only_some_series(runs):
  c = config_for(runs, ppo='', grpo='', rloo='', dpo=str(runs / 'nothing_here'))
  out = overoptimisation.run(c, str(runs / 'out2'))
  assert [s['name'] for p in out['panels'].values() for s in p['series']] == ['bon rm', 'bon rm_small']


def test_no_series_is_one_sentence(tmp_path):
  c = overopt_config.get_config()
  c.update(bon=str(tmp_path / 'a'), ppo=str(tmp_path / 'ppo*'), grpo='', rloo='', dpo='')
  with pytest.raises(ConfigError) as e:
    overoptimisation.run(c, str(tmp_path / 'out'))
  msg = str(e.value)
  assert msg.startswith('overoptimisation found no series') and msg.count('. ') == 0 and '\n' not in msg
  assert not os.path.exists(tmp_path / 'out')
