"""The over-optimisation study's chain (experiments/overopt_study.py) end to end at a tiny size:
every stage runs, the proxies are labelled by the learned gold, and study.json's figures are
recomputed here from the stages' own outputs."""
import json
import math
import os

import numpy as np
import pytest
from ml_collections import ConfigDict

from experiments import registry
from experiments.configs import overopt_study as study_config
from experiments import overopt_study
from experiments.overopt_study import resolve
from lm.config import ConfigError


def tiny():
  c = study_config.get_config()
  c.pretrain.steps, c.policy.sft_steps = 10, 10
  c.gold.update(prompts=240, steps=10, batch_size=8, size=(32, 1, 2))
  c.proxy.update(sizes=((8, 1, 1), (16, 1, 2)), size=(16, 1, 2), data=(40, 80), n_data=80, steps=5)
  c.ensemble.update(members=2, combines=('mean',))
  c.bon.update(prompts=4, samples=8)
  c.ppo.update(betas=(0.0,), iterations=2, every=1, prompts=8, minibatches=1, epochs=1, eval_prompts=8)
  return c


def test_bad_study_config_is_one_sentence():
  for field, value, match in (('gold.size', (16, 1, 2), 'larger'), ('proxy.n_data', 5000, 'gold must see more'),
                              ('ensemble.combines', ('median',), 'choose from'),
                              ('proxy.size', (30, 1, 4), 'n_heads dividing'), ('preset', 'huge', 'reduced or full'),
                              ('rerun', 'bon,gold_rm', 'name only bon or ppo')):
    c = tiny()
    section, _, key = field.rpartition('.')
    (c[section] if section else c)[key] = value
    with pytest.raises(ConfigError, match=match):
      resolve(c)


def test_rerun_runs_only_the_named_finished_stages_afresh(tmp_path, monkeypatch):
  calls = []

  def fake_stage(config, wd):    # a stage that leaves a checkpoint it would resume from
    calls.append(os.path.relpath(wd, tmp_path))
    os.makedirs(wd, exist_ok=True)
    assert not os.path.exists(os.path.join(wd, 'old_checkpoint'))
    open(os.path.join(wd, 'old_checkpoint'), 'w').close()

  monkeypatch.setattr(registry, 'get', lambda name: fake_stage)
  stages = ['rm/a', 'bon', 'ppo/a_b0', 'ppo/a_b0.1']
  cfg = ConfigDict({'experiment': 'fake'})
  first = overopt_study.Chain(str(tmp_path))
  for s in stages:
    first(s, cfg)
  assert calls == stages
  c = tiny()
  for rerun, again in (('', []), ('bon', ['bon']), (' ppo, bon ', ['bon', 'ppo/a_b0', 'ppo/a_b0.1'])):
    c.rerun = rerun
    calls.clear()
    chain = overopt_study.Chain(str(tmp_path), overopt_study.rerun_stages(c))
    for s in stages:
      chain(s, cfg)
    assert calls == again, rerun
    assert all(os.path.exists(os.path.join(tmp_path, s, overopt_study.DONE)) for s in stages)


@pytest.mark.slow
def test_study_chain_runs_end_to_end(tmp_path):
  wd = str(tmp_path / 'study')
  out = registry.get('overopt_study')(tiny(), wd)
  names = set(out['proxies'])
  assert names == {'d8_L1_n80', 'd16_L1_n40', 'd16_L1_n80', 'd8_L1_n80_ens_mean'}
  # the proxies' labels are the gold RM's rankings (25% permuted, counted)
  prefs = os.path.join(wd, 'prefs_gold')
  with open(os.path.join(prefs, 'config.json')) as f:
    assert json.load(f)['eval']['gold'] == 'model:' + os.path.join(wd, 'gold_rm')
  with open(os.path.join(prefs, 'report.json')) as f:
    counts = json.load(f)['counts']
  with open(os.path.join(prefs, 'n40.jsonl')) as f:
    assert len(f.readlines()) == 40
  assert counts['noisy'] > 0
  # figures recomputed from the stages' own files
  with open(os.path.join(wd, 'bon', 'results.json')) as f:
    bon = json.load(f)
  assert bon['gold_kind'] == 'model:' + os.path.join(wd, 'gold_rm') and bon['n_samples'] == 8
  small = out['proxies']['d8_L1_n80']
  pts = small['series']['bon']['points']
  series = next(s for s in bon['series'].values()
                if os.path.abspath(s['reward_from']) == os.path.abspath(small['dir']))
  assert [p['gold'] for p in pts] == [p['gold'] for p in series['points']]
  gain = np.array([p['gold'] - pts[0]['gold'] for p in pts])
  assert small['series']['bon']['gold_peak_gain'] == pytest.approx(max(gain.max(), 0.0))
  with open(os.path.join(wd, 'ppo', 'd8_L1_n80_b0', 'results.json')) as f:
    evals = json.load(f)['evals']
  ppo = small['series']['ppo_b0']
  assert [p['iteration'] for p in ppo['points']] == [0, 1, 2]
  assert [p['d'] for p in ppo['points']] == pytest.approx([math.sqrt(max(r['kl'], 0)) for r in evals])
  assert out['axes']['size']['x'][0] < out['axes']['size']['x'][1]
  assert out['axes']['data']['x'] == [40, 80]
  for f in ('study.json', 'study_bon.png', 'study_ppo_b0.png', 'study_coefficients.png', 'study_ensembles.png'):
    assert os.path.exists(os.path.join(wd, f))
  # a rerun skips every finished stage
  again = registry.get('overopt_study')(tiny(), wd)
  assert again['stage_seconds'] == out['stage_seconds']
