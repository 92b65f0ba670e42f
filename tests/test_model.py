"""The functional decoder against a naive numpy reference, and its invariants."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lm import decode, model
from lm.config import PRESETS, ConfigError, ModelConfig
from tests import naive

VARIANTS = {
    'gpt2': dict(PRESETS['gpt2']),
    'llama_gqa': dict(PRESETS['llama'], n_kv_heads=2),
    'mqa_relu_rmsnorm': dict(norm='rmsnorm', activation='relu', positions='learned', n_kv_heads=1,
                             use_bias=True, tie_embeddings=False),
    'geglu_rope_bias': dict(norm='layernorm', activation='geglu', positions='rope', use_bias=True),
    'decoupled_head_dim': dict(PRESETS['llama'], n_kv_heads=2, d_head=16),   # H * d_head != d_model
    'post_ln_sinusoidal': dict(norm_position='post', positions='sinusoidal'),
    'sinusoidal_scaled_embeddings': dict(positions='sinusoidal', scale_embeddings=True, init_std=0.02),
    'sandwich_alibi_embed_norm': dict(norm_position='sandwich', positions='alibi', embed_norm=True,
                                      n_heads=2),
    'alibi_6_heads_parallel': dict(positions='alibi', parallel_block=True, d_model=48, n_heads=6),
    'deepnorm_rmsnorm': dict(norm_position='deepnorm', norm='rmsnorm', activation='relu'),
    'bidirectional_encoder': dict(causal=False, positions='sinusoidal'),
    'no_positions_gelu_tanh': dict(positions='none', activation='gelu_tanh'),
    # T5 relative bias; 16 positions > max_distance 12 exercise the log-spaced and last buckets
    'relative_unscaled_rmsnorm': dict(positions='relative', rel_buckets=8, rel_max_distance=12,
                                      scale_attention=False, norm='rmsnorm', use_bias=False),
    'relative_bidirectional': dict(causal=False, positions='relative', rel_buckets=8, rel_max_distance=12),
    # causal attention in query blocks of 4 over T=9 / 10 (an uneven last block); biases sliced
    'gpt2_q_blocks': dict(PRESETS['gpt2'], attention_q_block=4),
    'alibi_q_blocks': dict(positions='alibi', attention_q_block=4),
    'relative_gqa_q_blocks': dict(positions='relative', rel_buckets=8, rel_max_distance=12,
                                  n_kv_heads=2, attention_q_block=3),
}


def small(**kw):
  base = dict(vocab_size=50, d_model=32, n_layers=2, n_heads=4, max_seq_len=16, init_std=0.2)
  base.update(kw)
  return ModelConfig(**base)


@pytest.mark.parametrize('name', sorted(VARIANTS))
def test_forward_matches_naive_reference(name):
  cfg = small(**VARIANTS[name])
  params = model.init(cfg, jax.random.key(0))
  tokens = np.asarray(jax.random.randint(jax.random.key(1), (2, 9), 0, cfg.vocab_size))
  logits, _ = model.forward(params, jnp.asarray(tokens), cfg)
  ref = naive.forward(jax.device_get(params), tokens, cfg)
  np.testing.assert_allclose(np.asarray(logits)[..., :cfg.vocab_size], ref, atol=2e-4, rtol=2e-4)
  # padded vocabulary entries can never be predicted
  assert logits.shape[-1] == 128
  assert float(jnp.max(logits[..., cfg.vocab_size:])) < -1e30


@pytest.mark.parametrize('name', ['gpt2', 'llama_gqa', 'gpt2_q_blocks'])
def test_segments_match_naive_and_isolate_documents(name):
  cfg = small(**VARIANTS[name])
  params = model.init(cfg, jax.random.key(0))
  tokens = np.asarray(jax.random.randint(jax.random.key(2), (1, 10), 0, cfg.vocab_size))
  seg = np.array([[1, 1, 1, 1, 2, 2, 2, 2, 2, 2]])
  pos = np.array([[0, 1, 2, 3, 0, 1, 2, 3, 4, 5]])
  packed, _ = model.forward(params, jnp.asarray(tokens), cfg, segment_ids=jnp.asarray(seg),
                            positions=jnp.asarray(pos))
  np.testing.assert_allclose(np.asarray(packed)[..., :50], naive.forward(jax.device_get(params), tokens, cfg, seg),
                             atol=2e-4, rtol=2e-4)
  # the second document alone gives the same logits as inside the pack
  alone, _ = model.forward(params, jnp.asarray(tokens[:, 4:]), cfg)
  np.testing.assert_allclose(np.asarray(packed[:, 4:]), np.asarray(alone), atol=1e-5, rtol=1e-5)


def test_causality_future_tokens_do_not_change_past_logits():
  cfg = small(**VARIANTS['llama_gqa'])
  params = model.init(cfg, jax.random.key(0))
  a = jnp.array([[1, 2, 3, 4, 5, 6]])
  b = a.at[0, 4:].set(jnp.array([40, 41]))
  la, _ = model.forward(params, a, cfg)
  lb, _ = model.forward(params, b, cfg)
  np.testing.assert_allclose(la[:, :4], lb[:, :4], atol=1e-6)
  assert not np.allclose(la[:, 4:], lb[:, 4:])


def test_prefix_lm_mask_matches_naive_and_sees_the_whole_prefix():
  cfg = small(**VARIANTS['llama_gqa'])
  params = model.init(cfg, jax.random.key(0))
  tokens = np.asarray(jax.random.randint(jax.random.key(4), (2, 8), 0, cfg.vocab_size))
  prefix = np.array([3, 5])
  logits, _ = model.forward(params, jnp.asarray(tokens), cfg, prefix_len=jnp.asarray(prefix))
  ref = naive.forward(jax.device_get(params), tokens, cfg, prefix_len=prefix)
  np.testing.assert_allclose(np.asarray(logits)[..., :50], ref, atol=2e-4, rtol=2e-4)
  # position 0 now depends on token 2 (inside the prefix) but not on token 5 (after it)
  changed_in, changed_out = tokens.copy(), tokens.copy()
  changed_in[0, 2] = (tokens[0, 2] + 1) % 50
  changed_out[0, 5] = (tokens[0, 5] + 1) % 50
  la, _ = model.forward(params, jnp.asarray(changed_in), cfg, prefix_len=jnp.asarray(prefix))
  lb, _ = model.forward(params, jnp.asarray(changed_out), cfg, prefix_len=jnp.asarray(prefix))
  assert not np.allclose(la[0, 0], logits[0, 0])
  np.testing.assert_allclose(lb[0, :5], logits[0, :5], atol=1e-6)


@pytest.mark.parametrize('name', sorted(VARIANTS))
def test_param_count_matches_leaves(name):
  cfg = small(**VARIANTS[name])
  params = model.init(cfg, jax.random.key(0))
  n_leaves = sum(x.size for x in jax.tree.leaves(params))
  padding = (cfg.padded_vocab - cfg.vocab_size) * cfg.d_model * (1 if cfg.tie_embeddings else 2)
  assert cfg.num_params() == n_leaves - padding
  axes = model.logical_axes(cfg)
  for p, ax in zip(jax.tree.leaves(params), jax.tree.leaves(axes, is_leaf=lambda x: isinstance(x, tuple))):
    assert p.ndim == len(ax)


def test_gpt2_124m_param_count_and_flops():
  # GPT-2 small: 124,439,808 params with tied embeddings (HF GPT2LMHeadModel.num_parameters()).
  cfg = ModelConfig(vocab_size=50257, d_model=768, n_layers=12, n_heads=12, max_seq_len=1024,
                    **PRESETS['gpt2'])
  assert cfg.num_params() == 124_439_808
  # 6 * (layers + unembedding) + attention term 6 * L * T * d, written out by hand:
  layers = 12 * (4 * 768 * 768 + 4 * 768 + 2 * 768 * 3072 + 3072 + 768 + 4 * 768)
  expected = 6 * (layers + 50257 * 768) + 6 * 12 * 1024 * 768
  assert cfg.flops_per_token(1024) == expected


@pytest.mark.parametrize('name', ['gpt2', 'llama_gqa', 'relative_unscaled_rmsnorm'])
def test_kv_cache_decode_equals_recomputation(name):
  cfg = small(**VARIANTS[name])
  params = model.init(cfg, jax.random.key(0))
  prompt = jax.random.randint(jax.random.key(3), (2, 4), 0, cfg.vocab_size)
  out = decode.generate(params, prompt, jax.random.key(0), cfg=cfg, max_new_tokens=8, temperature=0.0)
  ref = prompt
  fwd = jax.jit(lambda p, r: model.forward(p, r, cfg)[0])   # one compile per length, not per eager op
  for _ in range(8):
    logits = fwd(params, ref)
    ref = jnp.concatenate([ref, jnp.argmax(logits[:, -1], -1)[:, None].astype(ref.dtype)], 1)
  np.testing.assert_array_equal(out, ref)


def test_sampling_top_k_and_temperature():
  logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
  draws = jax.vmap(lambda k: decode.sample_logits(logits, k, 1.0, top_k=2))(
      jax.random.split(jax.random.key(0), 4000))
  freq = np.bincount(np.asarray(draws).ravel(), minlength=4) / 4000
  assert freq[2] == 0 and freq[3] == 0                     # outside the top 2
  np.testing.assert_allclose(freq[:2], [0.5 / 0.8, 0.3 / 0.8], atol=0.03)
  assert int(decode.sample_logits(logits, jax.random.key(0), 0.0)[0]) == 0


def test_query_blocks_give_the_same_loss_and_gradients():
  toks = jax.random.randint(jax.random.key(1), (2, 16), 0, 50)
  loss = lambda p, c: jnp.mean(model.forward(p, toks, c)[0][..., :50] ** 2)
  value_and_grad = jax.jit(jax.value_and_grad(loss), static_argnums=1)   # one compile per config
  for kw in (VARIANTS['gpt2'], VARIANTS['llama_gqa']):
    cfg = small(**kw)
    params = model.init(cfg, jax.random.key(0))
    l0, g0 = value_and_grad(params, cfg)
    l1, g1 = value_and_grad(params, small(**kw, attention_q_block=5))
    np.testing.assert_allclose(l0, l1, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5), g0, g1)


def test_remat_gives_same_gradients():
  cfg = small(**VARIANTS['gpt2'])
  params = model.init(cfg, jax.random.key(0))
  toks = jax.random.randint(jax.random.key(1), (2, 8), 0, 50)
  loss = lambda p, c: jnp.mean(model.forward(p, toks, c)[0][..., :50] ** 2)
  grad = jax.jit(jax.grad(loss), static_argnums=1)   # one compile per config, not per eager op
  g0 = grad(params, cfg)
  g1 = grad(params, small(**VARIANTS['gpt2'], remat='full'))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5), g0, g1)


@pytest.mark.parametrize('bad,match', [
    (dict(n_heads=3), 'not divisible by model.n_heads'),
    (dict(n_kv_heads=3), 'n_kv_heads'),
    (dict(norm='batchnorm'), 'model.norm'),
])
def test_bad_model_config_is_one_clear_error(bad, match):
  with pytest.raises(ConfigError, match=match):
    small(**bad)
