"""experiments/stages/rollouts.py: the online-RL loop's generation through the static batch and
through the continuous-batching engine give the same rows (greedy: token for token, in the
layout the scoring jit reads: prompts left-padded to the width, responses right-padded);
sampled engine rows are a pure function of the iteration key."""
import jax
import numpy as np
import pytest

from experiments.stages import rollouts
from lm import model, sharding
from lm.config import ModelConfig

CFG = ModelConfig(vocab_size=50, d_model=32, n_layers=2, n_heads=4, max_seq_len=64, init_std=0.3)
K = 2                                               # samples per prompt, adjacent (GRPO's group)


def prompts(seed=0, lengths=(7, 2, 12, 5)):
  rng = np.random.default_rng(seed)
  return [np.array(p) for n in lengths for p in [rng.integers(1, 50, size=n)] * K]


@pytest.fixture(scope='module')
def params():
  return model.init(CFG, jax.random.key(0))


def gen(params, ps, engine, temperature=0.0, key=1, eos=9, mesh=None, slots=0):
  return rollouts.generate(params, ps, jax.random.key(key), cfg=CFG, width=12, max_new_tokens=10,
                           temperature=temperature, eos=eos, use_engine=engine, mesh=mesh, slots=slots)


def test_engine_rollouts_equal_the_static_path_greedy(params):
  ps = prompts()
  static, eng = gen(params, ps, False), gen(params, ps, True)
  n = np.asarray(static.lengths)
  assert 0 < n.min() < 10 == n.max()                  # some rows ended with eos, some ran out
  np.testing.assert_array_equal(eng.tokens, static.tokens)
  np.testing.assert_array_equal(eng.mask, static.mask)
  np.testing.assert_array_equal(eng.lengths, static.lengths)
  # a pool of 3 slots (rows join as others end, at other columns): the same rows
  np.testing.assert_array_equal(gen(params, ps, True, slots=3).tokens, static.tokens)
  # the layout, by hand: row 1 (a 7-token prompt) sits at columns 5..11, its response from 12
  assert eng.mask[0, :5].sum() == 0 and eng.mask[0, 5:12].all()
  np.testing.assert_array_equal(eng.tokens[0, 5:12], ps[0])
  assert eng.mask[0, 12:12 + n[0]].all() and not eng.mask[0, 12 + n[0]:].any()
  assert (eng.tokens[0, 12 + n[0]:] == 0).all()
  # and on the 8-device mesh the static path gives the same rows (the engine takes the params
  # as they lie: sharded)
  mesh = sharding.make_mesh({'data': -1})
  sharded = jax.device_put(params, sharding.tree_shardings(model.logical_axes(CFG), params, mesh))
  np.testing.assert_array_equal(gen(sharded, ps, False, mesh=mesh).tokens, static.tokens)
  np.testing.assert_array_equal(gen(sharded, ps, True).tokens, static.tokens)


def test_engine_rollouts_sampled_are_a_function_of_the_key(params):
  ps = prompts(1)
  a, b, c = (gen(params, ps, True, 1.0, key=k) for k in (5, 5, 6))
  np.testing.assert_array_equal(a.tokens, b.tokens)
  np.testing.assert_array_equal(gen(params, ps, True, 1.0, key=5, slots=3).tokens, a.tokens)
  assert (a.tokens != c.tokens).any()
  resp = a.tokens[:, 12:]
  assert any((resp[i] != resp[i + 1]).any() for i in range(0, len(ps), K))   # a group's samples differ
  seeds = rollouts.request_seeds(jax.random.key(5), 8)
  assert len(set(seeds.tolist())) == 8 and (seeds == rollouts.request_seeds(jax.random.key(5), 8)).all()


def test_texts_and_eos_flags_of_rows():
  class Tok:
    decode = staticmethod(lambda ids: ','.join(map(str, ids)))

  class Pol:
    tok, eos = Tok(), 3
  tokens = np.array([[0, 5, 7, 3, 0], [9, 5, 8, 8, 8], [0, 5, 0, 0, 0]], np.int32)
  ro = rollouts.Rollout(tokens, (tokens > 0).astype(np.int32), np.array([2, 3, 0], np.int32))
  assert rollouts.texts(Pol, ro, 2) == ['7', '8,8,8', '']
  np.testing.assert_array_equal(rollouts.has_eos(ro, 2, 3), [True, False, False])
  both = rollouts.Rollout.concat([ro.take([2]), ro.take([0])])
  np.testing.assert_array_equal(both.lengths, [0, 2])


def test_stop_strings_end_rows_after_the_first_occurrence(params):
  """rollout.stop: an engine row ends with the token that completes its first stop string (kept,
  masked in), nothing after; checked against the static greedy rows cut by hand."""
  ps = prompts()
  static = gen(params, ps, False, eos=None)
  detok = lambda ids: ''.join(chr(97 + int(t) % 26) for t in ids)   # a made-up text per token
  resp = [list(static.tokens[i, 12:12 + static.lengths[i]]) for i in range(len(ps))]
  # a two-character stop string that some rows contain mid-response and some never do
  stop = next(detok(r[j:j + 2]) for r in resp for j in range(2, 6))
  cut = []
  for r in resp:
    j = next((j for j in range(1, len(r) + 1) if stop in detok(r[:j])), len(r))
    cut.append(r[:j])
  assert any(len(c) < 10 for c in cut) and any(len(c) == 10 for c in cut)
  eng = rollouts.generate(params, ps, jax.random.key(1), cfg=CFG, width=12, max_new_tokens=10,
                          temperature=0.0, eos=None, use_engine=True, stop=(stop,), detokenize=detok)
  for i, c in enumerate(cut):
    assert eng.lengths[i] == len(c)
    np.testing.assert_array_equal(eng.tokens[i, 12:12 + len(c)], c)
    assert eng.mask[i, 12:12 + len(c)].all() and not eng.mask[i, 12 + len(c):].any()
  assert rollouts.through_stop('ab\n\ncd\n\n', ('\n\n',)) == 'ab\n\n'
  assert rollouts.through_stop('abc', ('\n\n', 'x')) == 'abc'
  assert rollouts.through_stop('a#b\n\n', ('\n\n', '#')) == 'a#'
  with pytest.raises(ValueError, match='stop strings need use_engine=True'):
    rollouts.generate(params, ps, jax.random.key(1), cfg=CFG, width=12, max_new_tokens=10,
                      temperature=0.0, eos=None, stop=(stop,))
