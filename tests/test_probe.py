"""lm.probe: recomputed attention equals the model; scores on hand-built patterns and losses."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments.stages import bursty
from lm import layers, model, probe
from lm.config import ModelConfig

VARIANTS = {
    'learned_sandwich_q_blocks': dict(attention_q_block=4, norm_position='sandwich'),
    'rope_gqa_rmsnorm': dict(positions='rope', n_kv_heads=2, norm='rmsnorm', use_bias=False,
                             activation='swiglu', tie_embeddings=False),
    'alibi_parallel': dict(positions='alibi', parallel_block=True),
    'relative_post': dict(positions='relative', rel_buckets=8, rel_max_distance=12,
                          norm_position='post', scale_attention=False),
}


def init(cfg, seed):
  """Params from the model's specs with numpy (no init program to compile)."""
  rng = np.random.default_rng(seed)
  def leaf(spec):
    if spec.init == 'zeros':
      return np.zeros(spec.shape, np.float32)
    if spec.init == 'ones':
      return np.ones(spec.shape, np.float32)
    return (spec.std * rng.normal(size=spec.shape)).astype(np.float32)
  return jax.tree.map(leaf, model.param_specs(cfg), is_leaf=lambda x: isinstance(x, layers.Spec))


@functools.lru_cache(maxsize=None)
def compiled(cfg):
  """One program per config: the probe's attention, rebuilt hidden states and token losses
  beside the model's own hidden states and logits."""
  def f(params, tokens):
    probs, h = probe.attention_probs(params, tokens, cfg, return_hidden=True)
    want, _ = model.hidden_states(params, tokens, cfg)
    logits, _ = model.forward(params, tokens, cfg)
    return probs, h, want, probe.token_losses(params, tokens, cfg), logits
  return jax.jit(f)


def small(**kw):
  base = dict(vocab_size=50, d_model=32, n_layers=2, n_heads=4, max_seq_len=16, init_std=0.2)
  return ModelConfig(**{**base, **kw})


@pytest.mark.parametrize('name', sorted(VARIANTS))
def test_recomputed_attention_rebuilds_the_models_hidden_states(name):
  cfg = small(**VARIANTS[name])
  params = init(cfg, 1)
  tokens = jax.random.randint(jax.random.key(2), (2, 11), 0, cfg.vocab_size)
  probs, h, want, _, _ = compiled(cfg)(params, tokens)
  np.testing.assert_allclose(np.asarray(h), np.asarray(want), atol=2e-5, rtol=1e-5)
  assert probs.shape == (2, 2, 4, 11, 11)
  np.testing.assert_allclose(np.asarray(probs.sum(-1)), 1.0, atol=1e-5)
  assert float(jnp.abs(jnp.triu(probs, 1)).max()) == 0.0     # causal


def test_recomputed_attention_differs_from_a_wrong_layer():
  """The equality above has teeth: dropping one layer's attention changes the hidden states."""
  cfg = small(**VARIANTS['learned_sandwich_q_blocks'])
  params = init(cfg, 1)
  tokens = jax.random.randint(jax.random.key(2), (2, 11), 0, cfg.vocab_size)
  broken = jax.tree.map(np.copy, params)
  broken['layers']['attn']['wo'][1] = 0.0
  _, h, _, _, _ = compiled(cfg)(broken, tokens)
  _, _, want, _, _ = compiled(cfg)(params, tokens)
  assert np.abs(np.asarray(h) - np.asarray(want)).max() > 1e-3


def _pattern(t, fill):
  """[1 layer, 1 batch, H heads, T, T] built row by row by fill(t) -> row."""
  return jnp.asarray(np.stack([fill(q) for q in range(t)]))[None, None, None]


def test_induction_score_perfect_and_uniform():
  period, t = 5, 10
  def induction(q):
    row = np.zeros(t)
    row[q - period + 1 if q >= period else q] = 1.0
    return row
  def uniform(q):
    row = np.zeros(t)
    row[:q + 1] = 1.0 / (q + 1)
    return row
  assert float(probe.induction_scores(_pattern(t, induction), period)[0, 0]) == pytest.approx(1.0)
  want = np.mean([1 / (q + 1) for q in range(period, t)])   # hand computed: ~0.1455
  assert float(probe.induction_scores(_pattern(t, uniform), period)[0, 0]) == pytest.approx(want)
  # a previous-token head is no induction head, and vice versa
  def prev(q):
    row = np.zeros(t)
    row[max(q - 1, 0)] = 1.0
    return row
  assert float(probe.induction_scores(_pattern(t, prev), period)[0, 0]) == 0.0
  assert float(probe.previous_token_scores(_pattern(t, prev))[0, 0]) == pytest.approx(1.0)


def test_induction_score_on_a_hand_built_two_layer_model():
  """An induction head in a real recomputed pattern: tokens repeated with period P give high
  scores only where attention points at t - P + 1 (sanity of indices on random params)."""
  cfg = small(**VARIANTS['learned_sandwich_q_blocks'])
  params = init(cfg, 0)
  toks = probe.repeated_tokens(jax.random.key(3), 2, 6, cfg.vocab_size)
  assert toks.shape == (2, 12) and bool((toks[:, :6] == toks[:, 6:]).all())
  s = probe.induction_scores(compiled(cfg)(params, toks[:, :11])[0], 6)
  assert s.shape == (2, 4) and 0.0 < float(s.max()) < 0.6    # untrained: far from 1


def test_copying_score_of_identity_and_negated_ov():
  cfg = small(n_layers=1, n_heads=2, d_model=8, vocab_size=20, vocab_multiple=4)
  params = {'embed': np.random.default_rng(0).normal(size=(20, 8)), 'layers': {'attn': {}}}
  hd = cfg.head_dim
  eye = np.zeros((8, 2, hd))
  eye[np.arange(hd), 0, np.arange(hd)] = 1.0               # head 0 reads dims 0..3
  eye[hd + np.arange(hd), 1, np.arange(hd)] = 1.0           # head 1 reads dims 4..7
  wo = np.transpose(eye, (1, 2, 0)).copy()                  # writes them back: W_V W_O = projection
  wo[1] *= -1.0                                             # head 1 writes them negated
  params['layers']['attn']['wv'] = jnp.asarray(eye)[None]
  params['layers']['attn']['wo'] = jnp.asarray(wo)[None]
  s = np.asarray(probe.copying_scores(params, cfg))
  # M = E P E^T (tied): positive semi-definite -> 1; its negation -> -1
  np.testing.assert_allclose(s[0], [1.0, -1.0], atol=1e-6)


def test_icl_score_on_hand_built_losses():
  losses = np.tile(np.linspace(4.0, 1.0, 100), (3, 1))       # loss falls along the context
  assert probe.icl_indices(512) == (50, 500)
  assert probe.icl_indices(100) == (10, 98)
  assert probe.icl_score(losses, 10, 90) == pytest.approx(losses[0, 90] - losses[0, 10])
  assert probe.icl_score(losses) == pytest.approx(losses[0, 98] - losses[0, 10])
  assert probe.icl_score(np.ones((2, 64))) == 0.0
  w = probe.icl_score(losses, 10, 90, window=2)
  assert w == pytest.approx(losses[0, 88:93].mean() - losses[0, 8:13].mean())
  with pytest.raises(ValueError):
    probe.icl_score(losses, 50, 20)


def test_token_losses_match_the_model():
  cfg = small(**VARIANTS['learned_sandwich_q_blocks'])
  params = init(cfg, 0)
  toks = jax.random.randint(jax.random.key(1), (2, 11), 0, cfg.vocab_size)
  _, _, _, got, logits = compiled(cfg)(params, toks)
  lp = jax.nn.log_softmax(logits, -1)
  assert got.shape == (2, 10)
  np.testing.assert_allclose(np.asarray(got[1, 3]), -float(lp[1, 3, toks[1, 4]]), rtol=1e-5)


# The mechanism lab's synthetic data (experiments/induction.py) ---------------------------------
def test_bursty_rows_follow_the_item_layout_and_mark_labels():
  import re
  from experiments import induction
  from experiments.configs import icl_induction
  s = icl_induction.get_config().synthetic
  tok = bursty.tokenizer()
  toks, kinds, marks = bursty.batch(np.random.default_rng(0), tok, 16, 64, s)
  assert toks.shape == (16, 65) and marks.shape == (16, 64)
  assert 0 < kinds.sum() < 16
  for row, kind, mark in zip(toks, kinds, marks):
    text = tok.decode(row)
    if not kind:                     # a repeated segment: some period p <= 32 divides it
      assert any(text[p:] == text[:-p] for p in range(s.min_period, 33))
      assert not mark.any()
      continue
    items = re.findall(r'([a-z]{2}) ([a-z]{2})([0-3]) ', text)
    assert ''.join(f'{d} {e}{y} ' for d, e, y in items) == text[:len(items) * 7]
    label_of, seen = {}, set()
    for j, (_, e, y) in enumerate(items):
      assert label_of.setdefault(e, y) == y              # an entity keeps its label in a row
      assert mark[j * 7 + 4] == (1 if e in seen else 2)  # label char j*7+5 is target j*7+4
      seen.add(e)
    assert len({e[-1] for e in label_of}) == len(label_of)   # distinct last letters
    assert set(np.flatnonzero(mark)) <= {j * 7 + 4 for j in range(10)}


def test_induction_config_errors_and_rise_step():
  from experiments import induction
  from experiments.configs import icl_induction
  from lm.config import ConfigError
  c = icl_induction.get_config()
  c.synthetic.repeat_fraction = 1.5
  with pytest.raises(ConfigError, match='repeat_fraction'):
    bursty.check(c)
  rows = [{'step': 0, 'x': 0.1}, {'step': 50, 'x': 0.2}, {'step': 100, 'x': 0.6}, {'step': 150, 'x': 0.9}]
  assert bursty.rise_step(rows, 'x', 0.5) == 100
  assert bursty.rise_step(rows, 'x', 0.95) is None


@pytest.mark.slow
def test_icl_induction_trains_probes_and_its_workdir_can_be_probed(tmp_path):
  """A few steps of the mechanism lab, then the probe-only mode on the workdir it wrote."""
  import json
  from experiments import induction
  from experiments.configs import icl_induction
  c = icl_induction.get_config()
  c.train.update(steps=4, batch_size=8)
  c.probe.update(every=2, batch=8)
  res = induction.run(c, str(tmp_path / 'run'))
  rows = [json.loads(line) for line in open(tmp_path / 'run' / 'metrics.jsonl')]
  assert [r['step'] for r in rows] == [0, 2, 4] and res['rows'] == 3
  assert np.asarray(rows[-1]['induction']).shape == (2, 4)
  assert (tmp_path / 'run' / 'bursty.png').exists()
  c2 = icl_induction.get_config()
  c2.init_from = str(tmp_path / 'run')
  c2.probe.batch = 8
  out = induction.run(c2, str(tmp_path / 'probe'))
  assert np.asarray(out['copying']).shape == (2, 4) and np.isfinite(out['icl_score'])
