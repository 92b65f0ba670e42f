"""The scaling sweep: its plan, resumability, and the fit step on a sweep and on a CSV."""
import json
import os

import numpy as np
import pytest
from ml_collections import ConfigDict

from experiments.stages import scaling_fits
from experiments import fit, sweep
from experiments.configs import scaling_fit, scaling_isoflop
from lm import scaling
from lm.config import ConfigError


def test_default_plan_spans_enough_sizes():
  runs = sweep.plan(scaling_isoflop.get_config())
  n = [r['N'] for r in runs]
  assert len(runs) >= 12 and np.log10(max(n) / min(n)) >= 1.5
  for r in runs:   # each run's tokens realise its budget up to step rounding
    assert abs(6 * r['N'] * r['D'] / r['flops'] - 1) < 0.01 or r['steps'] < 400


def tiny_sweep(corpus):
  c = scaling_isoflop.get_config()
  c.run.data.path = corpus
  c.run.model.max_seq_len = 16
  c.run.train.update(batch_size=8, eval_batches=2, log_every=5)
  c.sweep.update(sizes=((1, 8, 2), (1, 16, 2)), flop_budgets=(1e8, 2e8),
                 min_tokens=1e3, max_tokens=1e5, fit=False, checkpoint_every=50)
  return c


def test_sweep_runs_resumes_and_feeds_the_fit(tiny_corpus, tmp_path):
  c = tiny_sweep(tiny_corpus)
  wd = str(tmp_path / 'sweep')
  results = sweep.run(c, wd)
  assert len(results) == 4 and all(np.isfinite(r['loss']) for r in results)
  assert json.load(open(os.path.join(wd, 'sweep.json'))) == results
  # finished runs are not rerun; a run without its result is
  first = results[0]['name']
  stamp = {r['name']: os.path.getmtime(os.path.join(wd, 'runs', r['name'], 'result.json')) for r in results}
  os.remove(os.path.join(wd, 'runs', first, 'result.json'))
  again = sweep.run(c, wd)
  assert [r['loss'] for r in again] == [r['loss'] for r in results]
  for r in results[1:]:
    assert os.path.getmtime(os.path.join(wd, 'runs', r['name'], 'result.json')) == stamp[r['name']]
  # the fit step reads the sweep's results (too few points for every law: those are reported)
  out = scaling_fits.fit_and_plot(results, wd, n_boot=5)
  assert 'km_N' in out and os.path.exists(os.path.join(wd, 'fits.json'))


def test_empty_plan_is_a_clear_error():
  c = scaling_isoflop.get_config()
  c.sweep.max_tokens = 1.0
  with pytest.raises(ConfigError, match='plan is empty'):
    sweep.plan(c)


def test_fit_step_on_external_csv(tmp_path):
  truth = dict(E=1.69, A=406.4, B=410.7, alpha=0.34, beta=0.28)
  rows = ['params,FLOPs,loss']
  for c in np.logspace(18, 21, 4):
    for f in np.logspace(-0.8, 0.8, 7):
      n = 0.1 * c ** 0.5 * f
      rows.append(f'{n},{c},{scaling.parametric_loss(truth, n, c / (6 * n))}')
  csv = tmp_path / 'points.csv'
  csv.write_text('\n'.join(rows))
  c = scaling_fit.get_config()
  c.fit.update(csv=str(csv), n_boot=20)
  out = fit.run(c, str(tmp_path / 'fit'))
  assert out['approach2_isoflop']['params']['a'] == pytest.approx(0.28 / 0.62, abs=0.03)
  assert out['approach3_parametric']['params']['alpha'] == pytest.approx(0.34, rel=0.05)
  for name in ('loss_vs_n', 'isoflop', 'loss_vs_flops', 'optimal_allocation'):
    assert os.path.getsize(out['figures'][name]) > 1000
  assert json.load(open(tmp_path / 'fit' / 'fits.json'))['figures'] == out['figures']
  bad = ConfigDict({'fit': {'csv': '', 'sweep_dir': str(tmp_path / 'nowhere'), 'n_boot': 5}})
  with pytest.raises(ConfigError, match='run the sweep first'):
    fit.run(bad, str(tmp_path / 'fit2'))
