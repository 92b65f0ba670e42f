"""Reward-model ensembles (M members in one vmapped step) and the reward eval's calibration:
member m of an M=2 ensemble equals the single model of seed + m step for step; per-member
normalisers are applied by load_reward_model; start-up errors; K-wise counted skips."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments.stages import reward_model
from data import sources
from experiments import reward
from experiments.stages import reward_data, reward_eval
from lm.config import ConfigError
from rl import reward as reward_lib
from tests.test_pretrain import losses
from tests.test_reward import rm_config, source  # noqa: F401  (session fixture: tiny model + pairs)

STEPS = 3


def _run(src, pairs, wd, seed=0, mesh=None, **ensemble):
  c = rm_config(src, pairs, steps=STEPS, checkpoint_every=STEPS, log_every=1)
  c.eval.norm_groups = 16
  c.seed = seed
  c.ensemble.update(ensemble)
  c.mesh.update(mesh or {})
  state = reward.run(c, wd)
  return wd, {str(x.sharding.spec) for x in jax.tree.leaves(state.params)}


@pytest.fixture(scope='module')
def runs(source, tmp_path_factory):  # noqa: F811
  src, pairs = source
  d = tmp_path_factory.mktemp('ens')
  # The ensemble on a data x fsdp mesh, the single models data-parallel: the member axis is
  # replicated, the rules table shards the rest, and the numbers do not depend on it.
  ens, specs = _run(src, pairs, str(d / 'ens'), mesh={'data': 4, 'fsdp': 2}, members=2, combine='min')
  assert all(spec.startswith('P(None') for spec in specs) and any('fsdp' in x for x in specs), specs
  singles = [_run(src, pairs, str(d / f'seed{s}'), seed=s)[0] for s in (0, 1)]
  return ens, singles, pairs


def test_vmapped_members_equal_single_models_of_seed_plus_m(runs):
  ens, singles, _ = runs
  _, rows = losses(ens)
  for i, wd in enumerate(singles):
    single = losses(wd)[0]
    got = {r['step']: r[f'loss_m{i}'] for r in rows}
    assert sorted(got) == list(range(1, STEPS + 1))
    np.testing.assert_allclose([got[s] for s in got], [single[s] for s in got], rtol=1e-5)
  # The logged objective is the sum of the members' losses.
  np.testing.assert_allclose([r['loss'] for r in rows], [r['loss_m0'] + r['loss_m1'] for r in rows],
                             rtol=1e-6)
  rm = reward_model.load_reward_model(ens)
  for i, wd in enumerate(singles):
    one = reward_model.load_reward_model(wd)
    member = jax.tree.map(lambda x: x[i], rm.params)
    for a, b in zip(jax.tree.leaves(member), jax.tree.leaves(one.params)):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=1e-5)
  # The members are different models (own head init and data order).
  h = np.asarray(rm.params['head']['w'])
  assert np.abs(h[0] - h[1]).max() > 1e-3


def test_eval_and_normaliser_per_member(runs):
  ens, singles, _ = runs
  ev = json.load(open(os.path.join(ens, 'eval.json')))
  norm = json.load(open(os.path.join(ens, reward_model.NORM_FILE)))
  assert norm['members'] == 2 and norm['combine'] == 'min' and len(norm['gain']) == 2
  for i, wd in enumerate(singles):
    one = json.load(open(os.path.join(wd, 'eval.json')))
    np.testing.assert_allclose(ev['members'][i]['accuracy'], one['reward_model']['accuracy'], atol=1e-6)
    np.testing.assert_allclose(norm['gain'][i], one['norm']['gain'], rtol=1e-4)
    np.testing.assert_allclose(norm['bias'][i], one['norm']['bias'], rtol=1e-4, atol=1e-5)
  assert set(ev['combined']) == set(reward_lib.ENSEMBLES)
  assert ev['reward_model'] == ev['combined']['min']
  text = open(os.path.join(ens, 'eval.txt')).read()
  assert 'member 1' in text and 'combined uwo' in text and 'quantile' in text


def test_load_reward_model_scores_members_normalised_and_combined(runs):
  ens, _, pairs = runs
  rm = reward_model.load_reward_model(ens)
  assert rm.members == 2 and rm.combine == 'min'
  recs = reward_data.read(pairs, 2, 0.25)[0]['train'][:16]   # the groups the normaliser saw
  arr, _ = reward_data.encode(recs, rm.tokenizer, 2, rm.seq_len)
  t = jnp.asarray(arr['tokens'].reshape(-1, rm.seq_len))
  m = jnp.asarray(arr['mask'].reshape(-1, rm.seq_len))
  per = np.asarray(rm.score_members(rm.params, t, m))
  assert per.shape == (2, t.shape[0])
  np.testing.assert_allclose(per.mean(1), 0, atol=1e-4)
  np.testing.assert_allclose(per.std(1), 1, atol=1e-3)
  np.testing.assert_allclose(np.asarray(rm.score(rm.params, t, m)), per.min(0), rtol=1e-6)
  lcb = reward_model.load_reward_model(ens, combine='mean_minus_std', lam=2.0)
  np.testing.assert_allclose(np.asarray(lcb.score(lcb.params, t, m)),
                             per.mean(0) - 2.0 * per.std(0), rtol=1e-5, atol=1e-5)
  with pytest.raises(ConfigError, match='not a known combination'):
    reward_model.load_reward_model(ens, combine='median')


def test_bad_ensemble_config_is_one_sentence_before_any_work(source, tmp_path):  # noqa: F811
  src, pairs = source
  cases = [({'members': 0}, 'at least one reward model'),
           ({'members': 2, 'combine': 'median'}, 'not a known combination'),
           ({'members': 2, 'lam': -1.0}, 'lam >= 0')]
  for i, (over, match) in enumerate(cases):
    c = rm_config(src, pairs)
    c.ensemble.update(over)
    wd = tmp_path / f'bad{i}'
    with pytest.raises(ConfigError, match=match):
      reward.run(c, str(wd))
    assert not (wd / 'checkpoints').exists(), over


def test_quantile_calibration_by_hand():
  diff = np.asarray([-2.0, 0.5, 0.0, 3.0, -0.25, 1.0])
  out = reward_eval.pair_metrics(diff)
  q = out['calibration_quantiles']
  # |diff| sorted: 0 (tie, 1/2), 0.25 (wrong), 0.5, 1, 2 (wrong), 3 -> 5 buckets of 2,1,1,1,1.
  assert [c['pairs'] for c in q] == [2, 1, 1, 1, 1]
  assert [c['accuracy'] for c in q] == [0.25, 1.0, 1.0, 0.0, 1.0]
  sig = lambda x: 1 / (1 + np.exp(-x))
  pred = [(sig(0) + sig(0.25)) / 2, sig(0.5), sig(1.0), sig(2.0), sig(3.0)]
  np.testing.assert_allclose([c['predicted'] for c in q], pred)
  ece = sum(n / 6 * abs(a - p) for n, a, p in zip([2, 1, 1, 1, 1], [0.25, 1, 1, 0, 1], pred))
  np.testing.assert_allclose(out['ece'], ece)
  assert q[0]['abs_margin'] == [0.0, 0.25] and out['accuracy'] == pytest.approx(3.5 / 6)


def test_kwise_bad_records_are_counted_skips(tmp_path):
  good = {'prompt': 'p', 'responses': ['a', 'b', 'c'], 'ranks': [0, 1, 2]}
  bad = {
      'tie': {'prompt': 'p', 'responses': ['a', 'b'], 'ranks': [1, 1]},
      'empty_response': {'prompt': 'p', 'responses': ['a', '  '], 'ranks': [0, 1]},
      'missing_field': {'prompt': 'p', 'ranks': [0, 1]},
      'identical_responses': {'prompt': 'p', 'responses': ['a', 'a'], 'ranks': [0, 1]},
      'bad_ranks': {'prompt': 'p', 'responses': ['a', 'b'], 'ranks': [0]},
      'too_few_responses': {'prompt': 'p', 'responses': ['a'], 'ranks': [0]},
      'more_than_k_responses': {'prompt': 'p', 'responses': list('abcde'), 'ranks': [0, 1, 2, 3, 4]},
  }
  for why, rec in bad.items():
    if why != 'more_than_k_responses':
      with pytest.raises(sources.Skip, match=why):
        reward_data.parse_record(rec)
  assert reward_data.parse_record(good)['ranks'] == [0, 1, 2]
  path = tmp_path / 'k.jsonl'
  path.write_text('\n'.join(json.dumps(r) for r in [good, *bad.values()]) + '\n')
  split, report = reward_data.read(str(path), 4, 0.0)
  assert report['skipped'] == {why: 1 for why in bad}
  assert len(split['train']) == 1


def test_ensemble_rows_are_independent_member_streams():
  n, k, t = 10, 2, 3
  train = {'tokens': np.arange(n * k * t).reshape(n, k, t).astype(np.int32),
           'mask': np.ones((n, k, t), np.int32), 'ranks': np.tile([0, 1], (n, 1)).astype(np.int32),
           'valid': np.ones((n, k), np.float32)}
  data = reward_data.RewardData(train, train, [], [], {}, seed=5)
  rows = data.ensemble_rows(2, 3)
  assert rows['tokens'].shape == (n, 3, k, t)
  for m in range(3):
    np.testing.assert_array_equal(rows['tokens'][:, m], data.train_rows(2, m)['tokens'])
  np.testing.assert_array_equal(data.train_rows(2, 1)['tokens'],
                                reward_data.RewardData(train, train, [], [], {}, seed=6).train_rows(2)['tokens'])
  assert not np.array_equal(rows['tokens'][:, 0], rows['tokens'][:, 1])


@pytest.mark.slow
def test_ensemble_resume_equals_uninterrupted(source, tmp_path):  # noqa: F811
  src, pairs = source

  def cfg(**train):
    c = rm_config(src, pairs, steps=4, checkpoint_every=2, log_every=1, **train)
    c.eval.norm_groups = 16
    c.ensemble.members = 2
    return c
  full, part = str(tmp_path / 'full'), str(tmp_path / 'part')
  reward.run(cfg(), full)
  reward.run(cfg(stop_after=2), part)
  assert not os.path.exists(os.path.join(part, 'eval.json'))
  reward.run(cfg(), part)
  a, b = losses(full)[1], losses(part)[1]
  for key in ('loss_m0', 'loss_m1'):
    got = {r['step']: r[key] for r in b}
    np.testing.assert_allclose([r[key] for r in a if r['step'] > 2], [got[s] for s in (3, 4)], rtol=1e-6)
