"""rl/rollout against independent references: the sampler's own log-probs, and each row
scored alone without padding by a plain forward pass."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lm import decode, heads, model
from lm.config import ModelConfig
from rl import gold, rollout

CFG = ModelConfig(vocab_size=50, d_model=32, n_layers=2, n_heads=4, max_seq_len=64, init_std=0.3)
PROMPTS = [np.array([3, 14, 15, 9, 2, 6, 5]), np.array([27, 1]), np.array([8, 4, 40, 2, 33])]
EOS = 7


@pytest.fixture(scope='module')
def rollout_():
  params = model.init(CFG, jax.random.key(0))
  s = decode.SamplingConfig(temperature=0.7, max_new_tokens=12, eos_ids=(EOS,), pad_id=0)
  gen = decode.generate(params, PROMPTS, jax.random.key(3), cfg=CFG, sampling=s)
  return params, gen


def _alone(params, prompt, resp):
  """Log-softmax at T=0.7 of one unpadded row, for its response tokens."""
  toks = np.concatenate([prompt, resp])[None]
  logits = np.asarray(model.forward(params, jnp.asarray(toks), CFG)[0][0], np.float64) / 0.7
  logits = logits - logits.max(-1, keepdims=True)
  lsm = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  p = len(prompt)
  return np.array([lsm[p - 1 + i, t] for i, t in enumerate(resp)]), toks


def test_sampler_logprobs_equal_teacher_forced(rollout_):
  params, gen = rollout_
  tokens, mask = gen.sequences()
  p = gen.prompt_tokens.shape[1]
  logp, ent = rollout.response_logprobs(params, tokens, mask, p, CFG, temperature=0.7,
                                        with_entropy=True)
  np.testing.assert_allclose(np.asarray(logp), np.asarray(gen.logprobs), atol=2e-5)
  for i, prompt in enumerate(PROMPTS):
    n = int(gen.lengths[i])
    resp = np.asarray(gen.tokens[i, :n])
    ref, _ = _alone(params, prompt, resp)
    np.testing.assert_allclose(np.asarray(logp[i, :n]), ref, atol=2e-5)
    assert np.all(np.asarray(logp[i, n:]) == 0) and np.all(np.asarray(ent[i, n:]) == 0)
  # The wrong temperature gives other numbers (the test sees temperature).
  other, _ = rollout.response_logprobs(params, tokens, mask, p, CFG, temperature=1.0)
  assert np.abs(np.asarray(other - logp)).max() > 1e-2


def test_values_and_scores_read_the_right_states(rollout_):
  params, gen = rollout_
  tokens, mask = gen.sequences()
  p = gen.prompt_tokens.shape[1]
  head = heads.init(CFG, 1, jax.random.key(5), init_std=0.5)
  values = np.asarray(rollout.response_values(params, head, tokens, mask, p, CFG))
  scores = np.asarray(rollout.last_token_scores(params, head, tokens, mask, CFG))
  for i, prompt in enumerate(PROMPTS):
    n = int(gen.lengths[i])
    toks = np.concatenate([prompt, np.asarray(gen.tokens[i, :n])])[None]
    h = np.asarray(model.hidden_states(params, jnp.asarray(toks), CFG)[0][0], np.float64)
    v = h @ np.asarray(head['w'], np.float64)[:, 0] + float(head['b'][0])
    np.testing.assert_allclose(values[i, :n], v[len(prompt) - 1:-1], atol=2e-4)
    np.testing.assert_allclose(scores[i], v[-1], atol=2e-4)
    assert np.all(values[i, n:] == 0)


def test_score_rollout_and_has_eos(rollout_):
  params, gen = rollout_
  tokens, mask = gen.sequences()
  p = gen.prompt_tokens.shape[1]
  ref = jax.tree.map(lambda x: x * 0.9, params)
  head = heads.init(CFG, 1, jax.random.key(5))
  out = jax.jit(lambda a, b, t, m: rollout.score_rollout(
      a, b, t, m, p, CFG, temperature=0.7, value=(a, head),
      reward=lambda t, m: rollout.last_token_scores(a, head, t, m, CFG)))(params, ref, tokens, mask)
  np.testing.assert_allclose(out['logp'], gen.logprobs, atol=2e-5)
  ref_logp, _ = rollout.response_logprobs(ref, tokens, mask, p, CFG, temperature=0.7)
  np.testing.assert_allclose(out['ref_logp'], ref_logp, atol=1e-6)
  assert out['values'].shape == gen.tokens.shape and out['scores'].shape == (len(PROMPTS),)
  eos = np.asarray(rollout.has_eos(gen.tokens, gen.mask, EOS))
  want = [EOS in np.asarray(gen.tokens[i, :int(gen.lengths[i])]) for i in range(len(PROMPTS))]
  assert eos.tolist() == want


def test_gold_vader_and_ranks():
  s = gold.score(['I love thee, sweet and fair', 'Die, villain, die!', 'the table'])
  assert s[0] > 0.5 and s[1] < -0.5 and s[2] == 0.0
  np.testing.assert_allclose(gold.score(['good'], 'vader_neg'), -gold.score(['good']))
  assert gold.ranks([0.5, 0.1, 0.5, -1.0]) == [0, 1, 0, 2]
  with pytest.raises(Exception, match='not a gold reward'):
    gold.score(['x'], 'bleu')


def test_has_eos_on_hand_built_rows():
  # Rows 3 and 4 are empty (no response token). Row 4 pads with EOS itself, as a tokenizer whose
  # pad id is its EOS id (GPT-2) does: an empty row must still say False, not read the pad.
  tokens = jnp.array([[5, EOS, 0], [5, 6, 6], [0, 0, 0], [EOS, EOS, EOS], [EOS, 0, 0]])
  mask = jnp.array([[1, 1, 0], [1, 1, 1], [0, 0, 0], [0, 0, 0], [1, 0, 0]])
  assert np.asarray(rollout.has_eos(tokens, mask, EOS)).tolist() == [True, False, False, False, True]
