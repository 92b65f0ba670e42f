"""Objectives: BERT masking rates, no loss where there should be none, and launcher smoke runs."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import pretrain
from lm import model, objectives
from lm.config import ConfigError, ModelConfig
from tests.test_pretrain import losses, tiny_config


def test_bert_masking_rates():
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 1000, (400, 512)))
  weights = jnp.ones(tokens.shape).at[:, 500:].set(0)
  corrupted, chosen = objectives.bert_masking(jax.random.key(0), tokens, 1000, 1000, 0.15, weights)
  chosen, corrupted, tokens = map(np.asarray, (chosen, corrupted, tokens))
  assert not chosen[:, 500:].any()                               # padding is never chosen
  assert chosen[:, :500].mean() == pytest.approx(0.15, abs=0.003)
  c = chosen
  masked = (corrupted == 1000)[c].mean()
  unchanged = (corrupted == tokens)[c].mean()
  randomised = ((corrupted != 1000) & (corrupted != tokens))[c].mean()
  assert masked == pytest.approx(0.8, abs=0.01)
  assert unchanged == pytest.approx(0.1 + 0.1 / 1000, abs=0.01)  # kept, or random that hit itself
  assert randomised == pytest.approx(0.1, abs=0.01)
  assert (corrupted[~c] == tokens[~c]).all()


CFG = ModelConfig(vocab_size=50, d_model=32, n_layers=1, n_heads=2, max_seq_len=16)


def _batch(seed=0):
  toks = np.random.default_rng(seed).integers(0, 50, (4, 17)).astype(np.int32)
  return {'inputs': jnp.asarray(toks[:, :-1]), 'targets': jnp.asarray(toks[:, 1:]),
          'weights': jnp.ones((4, 16), jnp.float32)}


def test_prefix_lm_takes_no_loss_inside_the_prefix():
  params = model.init(CFG, jax.random.key(0))
  rng = jax.random.key(7)
  b = _batch()
  loss, weight, _ = objectives.prefix_lm_loss(params, b, rng, CFG)
  prefix = np.asarray(jax.random.randint(rng, (4,), 1, 16))
  assert float(weight) == sum(16 - (p - 1) for p in prefix)
  # a target inside the prefix does not move the loss; one after it does
  row = 0
  inside = dict(b, targets=b['targets'].at[row, prefix[row] - 2].set((b['targets'][row, prefix[row] - 2] + 1) % 50)) \
      if prefix[row] >= 2 else None
  after = dict(b, targets=b['targets'].at[row, 15].set((b['targets'][row, 15] + 1) % 50))
  if inside is not None:
    assert float(objectives.prefix_lm_loss(params, inside, rng, CFG)[0]) == pytest.approx(float(loss), rel=1e-6)
  assert float(objectives.prefix_lm_loss(params, after, rng, CFG)[0]) != pytest.approx(float(loss), rel=1e-6)


def _changed(tokens, row, col):
  return tokens.at[row, col].set((tokens[row, col] + 1) % 50)


def test_prefix_lm_attention_is_bidirectional_over_the_prefix_only():
  params = model.init(CFG, jax.random.key(0))
  tokens = _batch()['inputs'][:2]
  prefix_len = jnp.asarray([6, 11], jnp.int32)
  jfwd = jax.jit(lambda toks, pl: model.forward(params, toks, CFG, prefix_len=pl)[0])
  fwd = lambda toks, pl=prefix_len: np.asarray(jfwd(toks, pl))
  base = fwd(tokens)
  causal = fwd(tokens, None)
  for row, p in enumerate(np.asarray(prefix_len)):
    # the last prefix token is seen by every earlier prefix position (not so without a prefix)
    diff = np.abs(fwd(_changed(tokens, row, p - 1)) - base)[row].max(-1)
    assert (diff[:p - 1] > 1e-4).all(), diff
    assert np.array_equal(fwd(_changed(tokens, row, p - 1), None)[row, :p - 1], causal[row, :p - 1])
    # after the prefix attention is causal: a token never reaches positions before it
    for q in (p, p + 2):
      diff = np.abs(fwd(_changed(tokens, row, q)) - base)[row].max(-1)
      assert (diff[:q] == 0).all() and (diff[q:] > 1e-4).all(), (q, diff)
    other = 1 - row   # rows are independent
    assert np.array_equal(fwd(_changed(tokens, row, p - 1))[other], base[other])


def test_prefix_lm_loss_counts_exactly_the_targets_after_the_prefix():
  params = model.init(CFG, jax.random.key(0))
  rng = jax.random.key(11)
  b = _batch(2)
  loss, weight, _ = objectives.prefix_lm_loss(params, b, rng, CFG)
  prefix = jax.random.randint(rng, (4,), 1, 16)   # the draw prefix_lm_loss makes
  logits = model.forward(params, b['inputs'], CFG, prefix_len=prefix)[0]
  nll = np.asarray(objectives.token_nll(logits, b['targets']))
  scored = np.arange(16)[None] >= np.asarray(prefix)[:, None] - 1
  assert float(weight) == scored.sum() and float(loss) == pytest.approx(nll[scored].sum(), rel=1e-5)
  # every target inside the prefix changed at once: the loss does not move
  noise = np.random.default_rng(0).integers(1, 50, (4, 16))
  targets = np.where(scored, np.asarray(b['targets']), (np.asarray(b['targets']) + noise) % 50)
  moved = objectives.prefix_lm_loss(params, dict(b, targets=jnp.asarray(targets)), rng, CFG)[0]
  assert float(moved) == pytest.approx(float(loss), rel=1e-6)


def test_masked_lm_scores_only_the_chosen_tokens():
  cfg = ModelConfig(vocab_size=50, d_model=32, n_layers=1, n_heads=2, max_seq_len=16, causal=False)
  params = model.init(cfg, jax.random.key(0))
  rng = jax.random.key(3)
  b = _batch(1)
  loss, weight, _ = objectives.masked_lm_loss(params, b, rng, cfg)
  corrupted, chosen = objectives.bert_masking(rng, b['inputs'], 50, 50, 0.15, b['weights'])
  logits, _ = model.forward(params, corrupted, cfg)
  logp = np.asarray(jax.nn.log_softmax(logits, -1))
  ref = -sum(logp[i, j, int(b['inputs'][i, j])] for i, j in zip(*np.nonzero(np.asarray(chosen))))
  assert float(weight) == float(np.asarray(chosen).sum()) > 0
  assert float(loss) == pytest.approx(ref, rel=1e-5)


# ~50-60 s each on 2 cores: their losses have fast tests above, and span corruption keeps the
# launcher's objective switch covered by default.
@pytest.mark.parametrize('objective,causal', [pytest.param('prefix_lm', True, marks=pytest.mark.slow),
                                              pytest.param('masked_lm', False, marks=pytest.mark.slow),
                                              ('span_corruption', True)])
def test_objectives_train_from_the_launcher(tiny_corpus, tmp_path, objective, causal):
  c = tiny_config(tiny_corpus, steps=2, eval_every=2, checkpoint_every=2, objective=objective)
  c.model.causal = causal
  pretrain.run(c, str(tmp_path / objective))
  rows = losses(str(tmp_path / objective))[1]
  assert np.isfinite(rows[-1]['loss']) and np.isfinite(rows[-1]['val_loss'])


def test_mismatched_objective_and_mask_fail_at_startup(tiny_corpus, tmp_path):
  c = tiny_config(tiny_corpus, objective='masked_lm')
  with pytest.raises(ConfigError, match='causal=False'):
    pretrain.run(c, str(tmp_path / 'a'))
  c = tiny_config(tiny_corpus, objective='denoise')
  with pytest.raises(ConfigError, match='not supported'):
    pretrain.run(c, str(tmp_path / 'b'))
  c = tiny_config(tiny_corpus, objective='next_token')
  c.model.update(arch='encoder_decoder', positions='relative')
  with pytest.raises(ConfigError, match='span_corruption'):
    pretrain.run(c, str(tmp_path / 'c'))


# Span corruption -------------------------------------------------------------------------------
def test_span_corruption_rates_and_exact_reconstruction():
  length, first = 100, 1000
  tokens = jnp.tile(jnp.arange(length, dtype=jnp.int32)[None] + 10, (64, 1))
  c = objectives.span_corrupt(jax.random.key(0), tokens, first)
  noise, spans = objectives.span_counts(length)
  assert (noise, spans) == (15, 5)                                  # round(0.15 * 100), round(15 / 3)
  assert c['inputs'].shape == (64, 90) and c['targets'].shape == (64, 20)
  masks = np.asarray(c['noise_mask'])
  assert (masks.sum(1) == 15).all()
  assert not masks[:, 0].any()                                      # T5 starts with a non-noise run
  runs = [np.sum(np.diff(m.astype(int)) == 1) for m in masks]
  assert all(r == 5 for r in runs)                                  # exactly 5 noise spans per row
  sentinels = first + 1 + np.arange(5)
  for i in range(64):
    inp, tgt = np.asarray(c['inputs'][i]), np.asarray(c['targets'][i])
    # each sentinel appears once in each, in order; filling them back gives the original
    assert list(inp[inp > first]) == list(sentinels) == list(tgt[tgt > first])
    spans_of = np.split(tgt, np.nonzero(tgt > first)[0][1:])
    fill = {s[0]: list(s[1:]) for s in spans_of}
    rebuilt = [t for x in inp for t in (fill[x] if x > first else [x])]
    assert rebuilt == list(range(10, 110))
    assert np.asarray(c['decoder_inputs'][i, 0]) == first
    np.testing.assert_array_equal(c['decoder_inputs'][i, 1:], tgt[:-1])
  # spans start at varied places across rows (random, not fixed)
  assert len({tuple(np.nonzero(m)[0][:3]) for m in masks}) > 32


def test_span_corruption_mean_span_length():
  tokens = jnp.zeros((256, 512), jnp.int32)
  masks = np.asarray(objectives.span_corrupt(jax.random.key(1), tokens, 1000)['noise_mask'])
  noise, spans = objectives.span_counts(512)
  assert masks.sum() == 256 * noise
  assert masks.sum() / (256 * spans) == pytest.approx(3.0, rel=0.03)   # T5's mean span length 3


def test_decoder_span_corruption_scores_only_the_targets():
  """Decoder-only span corruption: one prefix-LM sequence [inputs, start, targets]; the loss
  equals the hand-gathered NLL of exactly the target tokens."""
  cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, max_seq_len=32, init_std=0.2)
  params = model.init(cfg, jax.random.key(0))
  tokens = jax.random.randint(jax.random.key(2), (2, 32), 0, 40)
  rng = jax.random.key(5)
  loss, weight, _ = objectives.span_corruption_loss(params, {'inputs': tokens}, rng, cfg)
  raw = objectives.decoder_span_length(32)
  first = cfg.vocab_size - objectives.num_special_ids(raw)
  c = objectives.span_corrupt(rng, tokens[:, :raw], first)
  le, ld = objectives.span_lengths(raw)
  assert le + ld <= 32 and float(weight) == 2 * ld
  seq = jnp.concatenate([c['inputs'], c['decoder_inputs']], 1)
  logits, _ = model.forward(params, seq, cfg, prefix_len=jnp.full((2,), le + 1))
  logp = np.asarray(jax.nn.log_softmax(logits, -1))
  ref = -sum(logp[b, le + j, int(c['targets'][b, j])] for b in range(2) for j in range(ld))
  assert float(loss) == pytest.approx(ref, rel=1e-5)


@pytest.mark.parametrize('bad,match', [
    (lambda b: dict(b, weights=b['weights'][:, :1]), 'assert_equal_shape'),   # would broadcast
    (lambda b: dict(b, targets=b['targets'][:, 1:]), 'assert_equal_shape'),
    (lambda b: dict(b, inputs=b['inputs'].astype(jnp.float32)), 'assert_type'),
    (lambda b: dict(b, inputs=b['inputs'][0]), 'assert_rank'),
])
@pytest.mark.parametrize('loss', ['next_token', 'prefix_lm', 'masked_lm'])
def test_losses_refuse_malformed_batches_while_tracing(loss, bad, match):
  cfg = dataclasses.replace(CFG, causal=loss != 'masked_lm')
  params = jax.eval_shape(lambda k: model.init(cfg, k), jax.random.key(0))
  fn = jax.jit(lambda p, b: objectives.OBJECTIVES[loss](p, b, jax.random.key(0), cfg))
  jax.eval_shape(fn, params, _batch())
  with pytest.raises(AssertionError, match=match):
    jax.eval_shape(fn, params, bad(_batch()))   # shapes only: nothing is compiled or run
