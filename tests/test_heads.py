"""lm.heads: pooling over padded rows, the linear head's shape and init, and scoring."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lm import heads, model
from lm.config import PRESETS, ConfigError, ModelConfig

# hidden[b, t] = 10 * b + t in every feature: the pooled value names the token it came from
HIDDEN = jnp.broadcast_to((10 * jnp.arange(3)[:, None] + jnp.arange(5))[..., None], (3, 5, 4)).astype(jnp.float32)


def test_last_token_pooling_with_right_and_left_padding():
  right = jnp.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
  left = jnp.array([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 0, 0, 1]])
  np.testing.assert_array_equal(heads.pool(HIDDEN, right)[:, 0], [2, 14, 20])
  np.testing.assert_array_equal(heads.pool(HIDDEN, left)[:, 0], [4, 14, 24])
  np.testing.assert_array_equal(heads.pool(HIDDEN, jnp.array([3, 5, 1]))[:, 0], [2, 14, 20])  # lengths
  np.testing.assert_array_equal(heads.pool(HIDDEN, right, 'mean')[:, 0], [1, 12, 20])
  np.testing.assert_array_equal(heads.pool(HIDDEN, left, 'mean')[:, 0], [3, 12, 24])
  with pytest.raises(ConfigError, match="Pooling 'max' is not supported"):
    heads.pool(HIDDEN, right, 'max')


def test_head_shape_dtype_and_init_std():
  cfg = ModelConfig(vocab_size=50, d_model=32, n_layers=2, n_heads=4)
  head = heads.init(cfg, 4096, jax.random.key(0))
  assert head['w'].shape == (32, 4096) and head['b'].shape == (4096,)
  # InstructGPT's reward head: N(0, 1 / (d_model + 1)); 131k draws pin the std to ~0.2%
  # (1 / sqrt(d_model) would be 1.5% off)
  np.testing.assert_allclose(float(jnp.std(head['w'])), 1 / math.sqrt(33), rtol=0.007)
  assert not np.any(head['b'])
  assert heads.logical_axes(cfg, 1) == {'w': ('embed', None), 'b': (None,)}
  value = heads.init(cfg, 1, jax.random.key(0), init_std=0.0)   # a PPO value head starts at 0
  assert not np.any(value['w'])
  out = heads.apply(head, jnp.ones((3, 32), jnp.bfloat16))
  assert out.shape == (3, 4096) and out.dtype == jnp.float32
  np.testing.assert_allclose(out, jnp.ones((3, 32)) @ head['w'], rtol=1e-5)


def test_score_ignores_padding_on_either_side():
  cfg = ModelConfig(vocab_size=50, d_model=32, n_layers=2, n_heads=4, max_seq_len=16,
                    init_std=0.2, **PRESETS['gpt2'])
  params = model.init(cfg, jax.random.key(0, impl='rbg'))
  head = heads.init(cfg, 2, jax.random.key(1))
  toks = jnp.array([[5, 6, 7]])
  score = jax.jit(lambda t, m: heads.score(params, head, t, m, cfg))
  alone = score(toks, jnp.ones((1, 3), jnp.int32))
  h = model.hidden_states(params, toks, cfg)[0]
  np.testing.assert_allclose(alone, heads.apply(head, h[:, -1]), atol=1e-5)
  padded = jnp.array([[0, 0, 5, 6, 7], [5, 6, 7, 0, 0]])   # left-, then right-padded
  mask = jnp.array([[0, 0, 1, 1, 1], [1, 1, 1, 0, 0]])
  both = score(padded, mask)
  np.testing.assert_allclose(both, jnp.concatenate([alone, alone]), atol=1e-5)
