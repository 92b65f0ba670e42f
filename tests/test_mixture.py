"""Mixtures: examples-proportional with a cap, explicit weights, determinism, resume, reports."""
import json

import numpy as np
import pytest

from data import mixture, sources
from tests.conftest import HH_RLHF as HH
from tests.conftest import TINY_SHAKESPEARE


@pytest.fixture(scope='module')
def datasets(tmp_path_factory):
  """Three real sources of very different sizes: speeches, plays, preference pairs."""
  plays = [sources.read_text(f) for f in sources.resolve_files('shakespeare_works')]
  text = TINY_SHAKESPEARE.read_text(encoding='utf-8')
  out = {'speeches': [s for s in text.split('\n\n') if s.strip()], 'plays': plays}
  prepared = sources.prepare_preferences(str(HH), str(tmp_path_factory.mktemp('data')))
  out['pairs'] = prepared.source('train')   # read by index straight from array_record
  return out


def sizes_of(datasets):
  return {k: len(v) for k, v in datasets.items()}


def test_examples_proportional_rates_with_cap(datasets):
  sizes = sizes_of(datasets)
  assert sizes['speeches'] > 5000 and sizes['plays'] < 100
  n = np.array(list(sizes.values()), float)
  for cap in (None, 1000, 50):
    m = mixture.examples_proportional(sizes, cap=cap)
    expect = np.minimum(n, cap or np.inf)
    np.testing.assert_allclose(m.rates, expect / expect.sum())
  # the cap is what keeps the big source from drowning the small one
  assert mixture.examples_proportional(sizes, cap=100).rates[1] > 5 * mixture.examples_proportional(sizes).rates[1]
  # temperature flattens towards uniform
  hot = mixture.examples_proportional(sizes, temperature=1e6).rates
  np.testing.assert_allclose(hot, np.full(len(sizes), 1 / len(sizes)), rtol=1e-4)


def test_realised_proportions_match_rates_and_report(datasets):
  sizes = sizes_of(datasets)
  m = mixture.examples_proportional(sizes, cap=2000, seed=7)
  n = 3 * mixture.BLOCK + 123
  src = np.array([s for s, _ in m.elements(0, n)])
  counts = np.bincount(src, minlength=len(sizes))
  np.testing.assert_array_equal(m.drawn(n), counts)          # closed form == what was drawn
  np.testing.assert_array_equal(m.drawn(n, 1000), np.bincount(src[1000:], minlength=len(sizes)))
  # systematic sampling: whole blocks hold their exact share
  assert np.abs(counts / n - m.rates).max() < 2 / mixture.BLOCK + 1e-9
  rep = m.report(n)
  assert list(rep) == list(sizes)
  for k, (name, r) in enumerate(rep.items()):
    assert r['drawn'] == counts[k] and r['realised'] == pytest.approx(counts[k] / n)
    assert r['rate'] == pytest.approx(m.rates[k])
  json.dumps(rep)


def test_element_i_is_a_pure_function_of_seed_and_i(datasets):
  sizes = sizes_of(datasets)
  a = mixture.examples_proportional(sizes, cap=500, seed=1)
  seq = a.elements(0, 9000)
  fresh = mixture.examples_proportional(sizes, cap=500, seed=1)
  assert [fresh.element(i) for i in (8999, 17, 4096, 5000)] == [seq[i] for i in (8999, 17, 4096, 5000)]
  other = mixture.examples_proportional(sizes, cap=500, seed=2).elements(0, 9000)
  assert other != seq
  assert all(0 <= j < sizes[list(sizes)[s]] for s, j in seq)


def test_no_example_repeats_before_its_source_is_exhausted(datasets):
  sizes = sizes_of(datasets)
  m = mixture.examples_proportional(sizes, seed=3)
  plays = list(sizes).index('plays')
  n_plays = sizes['plays']
  drawn = [j for s, j in m.elements(0, 40000) if s == plays]
  assert len(drawn) >= 2 * n_plays
  assert sorted(drawn[:n_plays]) == list(range(n_plays))              # epoch 1: each play once
  assert sorted(drawn[n_plays:2 * n_plays]) == list(range(n_plays))   # epoch 2: again, reshuffled
  assert drawn[:n_plays] != drawn[n_plays:2 * n_plays]


def test_max_examples_limits_the_pool(datasets):
  sizes = sizes_of(datasets)
  m = mixture.examples_proportional(sizes, seed=0, max_examples={'speeches': 300})
  sp = list(sizes).index('speeches')
  used = {j for s, j in m.elements(0, 20000) if s == sp}
  assert len(used) == 300 and max(used) > 300   # a random subset, not the first 300
  assert m.report(20000)['speeches']['pool'] == 300


def test_iterator_resumes_exactly_from_a_json_state(datasets):
  sizes = sizes_of(datasets)
  m = mixture.weighted(sizes, {k: w for k, w in zip(sizes, (0.5, 0.2, 0.3))}, seed=11)
  it = mixture.MixtureIterator(m, datasets)
  first = [next(it) for _ in range(700)]
  state = json.loads(json.dumps(it.state()))
  assert state['position'] == 700
  rest = [next(it) for _ in range(300)]
  again = mixture.MixtureIterator(mixture.weighted(sizes, dict(zip(sizes, (0.5, 0.2, 0.3))), seed=11), datasets)
  again.restore(state)
  assert [next(again) for _ in range(300)] == rest
  names = [name for name, _ in first + rest]
  assert {n: names.count(n) / 1000 for n in sizes} == {n: r['realised'] for n, r in it.report().items()}
  # a different mixture cannot take over this position
  changed = mixture.MixtureIterator(mixture.weighted(sizes, dict(zip(sizes, (0.4, 0.3, 0.3))), seed=11), datasets)
  with pytest.raises(mixture.MixtureError, match='different mixture'):
    changed.restore(state)


@pytest.mark.parametrize('kwargs,match', [
    (dict(weights=[1.0, -0.5]), 'non-negative'),
    (dict(weights=[0.0, 0.0]), 'All mixture weights are zero'),
    (dict(weights=[float('nan'), 1.0]), 'finite'),
    (dict(weights=[1.0]), 'one weight per source'),
    (dict(cap=0), 'positive number'),
    (dict(temperature=0.0), 'temperature must be positive'),
])
def test_bad_mixing_rates_are_clear_errors(kwargs, match):
  with pytest.raises(mixture.MixtureError, match=match):
    mixture.mixing_rates([100, 10], **kwargs)


def test_bad_mixtures_are_clear_errors(datasets):
  sizes = {'a': 10, 'b': 0}
  with pytest.raises(mixture.MixtureError, match="positive weight but no examples"):
    mixture.weighted(sizes, {'a': 1, 'b': 1})
  with pytest.raises(mixture.MixtureError, match='differ on'):
    mixture.weighted(sizes, {'a': 1, 'c': 1})
  with pytest.raises(mixture.MixtureError, match='every mixture source or to none'):
    mixture.Mixture([mixture.Source('a', 10, 1.0), mixture.Source('b', 5)])
  with pytest.raises(mixture.MixtureError, match='Every source of the mixture is empty'):
    mixture.examples_proportional({'a': 0})
  # a zero weight on an empty source is fine: it is simply never drawn
  assert {s for s, _ in mixture.weighted(sizes, {'a': 1, 'b': 0}).elements(0, 50)} == {0}
  m = mixture.examples_proportional({'speeches': 10})
  with pytest.raises(mixture.MixtureError, match='declared with 10 examples'):
    mixture.MixtureIterator(m, {'speeches': datasets['speeches']})
