"""Pretraining on a mixture of sources: batches as a pure function of (seed, i), per-process
rows, the mixture position in checkpoints (exact resume), per-source validation, reports."""
import json
import os

import numpy as np
import pytest
from ml_collections import ConfigDict

from data import mixture, pipeline
from experiments import pretrain
from lm.config import ConfigError
from tests.test_pretrain import losses, tiny_config


def streams():
  rng = np.random.default_rng(0)
  return {'a': pipeline.TokenStream(rng.integers(0, 50, 4000).astype(np.int32)),
          'b': pipeline.TokenStream(rng.integers(50, 100, 1500).astype(np.int32),
                                    np.repeat(np.arange(3), 500).astype(np.int32))}


def test_mixture_batches_are_pure_shardable_and_hit_their_rates():
  s = streams()
  sizes = {n: pipeline.num_windows(v, 16) for n, v in s.items()}
  mix = mixture.weighted(sizes, {'a': 0.25, 'b': 0.75}, seed=3)
  it = pipeline.MixtureBatches(s, mix, 16, 8)
  batches = [next(it) for _ in range(mixture.BLOCK // 8)]
  # every row comes from the source its tokens say; over a whole block the share is exact
  src_b = np.concatenate([b['inputs'].min(1) >= 50 for b in batches])
  assert abs(src_b.mean() - 0.75) <= 1 / mixture.BLOCK
  assert all(set(b) == {'inputs', 'targets', 'weights', 'segment_ids', 'positions'} for b in batches)
  rep = it.report()
  assert rep['b']['drawn'] == int(src_b.sum()) and rep['a']['drawn'] + rep['b']['drawn'] == mixture.BLOCK
  # targets are next tokens; rows from 'b' never predict across its documents
  for b in batches:
    assert (b['inputs'][:, 1:] == b['targets'][:, :-1]).all()
  # batch 10 rebuilt from scratch, and from two processes' halves
  fresh = pipeline.MixtureBatches(s, mix, 16, 8, start=10)
  lo = pipeline.MixtureBatches(s, mix, 16, 8, rows=(0, 4), start=10)
  hi = pipeline.MixtureBatches(s, mix, 16, 8, rows=(4, 8), start=10)
  b10, l, h = next(fresh), next(lo), next(hi)
  for k in b10:
    np.testing.assert_array_equal(b10[k], batches[10][k])
    np.testing.assert_array_equal(np.concatenate([l[k], h[k]]), b10[k])
  # a checkpointed position only restores into the same mixture
  state = it.state()
  other = pipeline.MixtureBatches(s, mixture.weighted(sizes, {'a': 0.5, 'b': 0.5}, seed=3), 16, 8)
  with pytest.raises(pipeline.DataError, match='different mixture'):
    other.restore(state)
  again = pipeline.MixtureBatches(s, mix, 16, 8)
  again.restore(state)
  assert again.batches_drawn == mixture.BLOCK // 8


@pytest.fixture
def two_sources(tiny_corpus, tmp_path):
  text = open(tiny_corpus, encoding='utf-8').read()
  plain = tmp_path / 'plays.txt'
  plain.write_text(text[:30000], encoding='utf-8')
  docs = tmp_path / 'speeches.jsonl'
  paras = [p for p in text[30000:].split('\n\n') if p.strip()]
  docs.write_text('\n'.join(json.dumps({'speech': p}) for p in paras) + '\n', encoding='utf-8')
  return str(plain), str(docs)


def mixture_config(sources, **train):
  c = tiny_config('', **train)
  c.data.mixture = ConfigDict({
      'plays': ConfigDict(dict(path=sources[0], weight=0.0, max_windows=0)),
      'speeches': ConfigDict(dict(path=sources[1], weight=0.0, max_windows=0, field='speech')),
  })
  c.data.val_fraction = 0.2
  return c


def test_mixture_run_resumes_exactly_and_reports_per_source(two_sources, tmp_path):
  full, part = str(tmp_path / 'full'), str(tmp_path / 'part')
  pretrain.run(mixture_config(two_sources, samples=0), full)
  pretrain.run(mixture_config(two_sources, samples=0, stop_after=7), part)
  pretrain.run(mixture_config(two_sources, samples=0), part)
  a, rows = losses(full)
  b, _ = losses(part)
  assert a == b and len(a) == 20
  last = rows[-1]
  for k in ('val_loss', 'val_loss_plays', 'val_loss_speeches'):
    assert np.isfinite(last[k])
  lo, hi = sorted([last['val_loss_plays'], last['val_loss_speeches']])
  assert lo <= last['val_loss'] <= hi   # the overall loss is a token-weighted mean of the two
  report = json.load(open(os.path.join(full, 'mixture.json')))
  assert report['plays']['drawn'] + report['speeches']['drawn'] == 20 * 8
  # proportional to size: each source's rate is its share of the windows
  assert abs(report['plays']['rate'] - report['plays']['pool'] /
             (report['plays']['pool'] + report['speeches']['pool'])) < 1e-9


def test_bad_mixture_configs_fail_at_start_up(two_sources, tmp_path):
  c = mixture_config(two_sources)
  c.data.mixture.plays.weight = -1.0
  c.data.mixture.speeches.weight = 1.0
  with pytest.raises(ConfigError, match='non-negative'):
    pretrain.run(c, str(tmp_path / 'a'))
  c = mixture_config(two_sources)
  c.data.mixture.plays.weight = 1.0   # the other left at 0
  with pytest.raises(ConfigError, match='would never be drawn'):
    pretrain.run(c, str(tmp_path / 'b'))
  c = mixture_config(two_sources)
  del c.data.mixture.plays['max_windows']
  with pytest.raises(ConfigError, match='lacks'):
    pretrain.run(c, str(tmp_path / 'c'))
