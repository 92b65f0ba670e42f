"""lm.peft: LoRA, prefix tuning, prompt tuning and adapters against a numpy reference."""
import functools
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import erf

from lm import layers, model, peft, sharding
from lm.config import PRESETS, ConfigError, ModelConfig
from tests import naive

CONFIGS = {'gpt2': dict(PRESETS['gpt2']),                 # learned positions, biases, tied, MHA
           'llama_gqa': dict(PRESETS['llama'], n_kv_heads=2)}   # RoPE, gated MLP, GQA, untied


def small(name, **kw):
  return ModelConfig(vocab_size=50, d_model=32, n_layers=2, n_heads=4, max_seq_len=24,
                     init_std=0.2, **CONFIGS[name], **kw)


TOKENS = np.random.default_rng(1).integers(0, 50, (2, 6)).astype(np.int32)
forward = jax.jit(lambda p, t, cfg: model.forward(p, t, cfg)[0][..., :50], static_argnums=2)


KEY = jax.random.key(1, impl='rbg')   # threefry init compiles a hash per leaf shape: slow on CPU


@functools.lru_cache
def base_params(cfg):
  """Base model params drawn with numpy from the model's specs (fast; no compile)."""
  rng = np.random.default_rng(0)
  draw = {'zeros': lambda s: np.zeros(s.shape), 'ones': lambda s: np.ones(s.shape),
          'normal': lambda s: s.std * rng.standard_normal(s.shape)}
  return jax.tree.map(lambda s: draw[s.init](s).astype(np.float32), model.param_specs(cfg),
                      is_leaf=lambda x: isinstance(x, layers.Spec))


def randomize(tree, seed, scale=0.3):
  """Every leaf replaced by N(0, scale^2): adapters away from their identity init."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda x: jnp.asarray(scale * rng.standard_normal(x.shape), x.dtype), tree)


# A vectorised float64 numpy pre-LN decoder with prefix K/V, adapters and prepended
# embeddings, checked below against tests/naive.py; it shares no code with lm/.
def _norm(p, x, cfg):
  if cfg.norm == 'layernorm':
    x = x - x.mean(-1, keepdims=True)
  y = x / np.sqrt((x ** 2).mean(-1, keepdims=True) + cfg.norm_eps) * p['scale']
  return y + p['bias'] if 'bias' in p else y


def _rope(x, pos, theta):  # x [B, T, H, hd]; rotate pairs (i, i + hd/2) by pos * theta^(-2i/hd)
  half = x.shape[-1] // 2
  ang = pos[:, None] * theta ** (-2 * np.arange(half) / x.shape[-1])     # [T, half]
  c, s = np.cos(ang)[None, :, None], np.sin(ang)[None, :, None]
  a, b = x[..., :half], x[..., half:]
  return np.concatenate([a * c - b * s, b * c + a * s], -1)


def _gelu(x):
  return 0.5 * x * (1 + erf(x / math.sqrt(2)))


def _act(cfg, x):
  if cfg.activation == 'gelu_tanh':
    return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))
  return x / (1 + np.exp(-x))   # swiglu's silu


def ref_forward(params, tokens, cfg, prefix=None, adapters=None, embeds=None):
  """Logits [B, T, vocab]; prefix {'prefix_k','prefix_v'} [layers, P, kv, hd] concatenated
  before every layer's keys; adapters {'adapter_attn','adapter_mlp'} stacked bottlenecks;
  embeds [L, d] prepended to the token embeddings (their logits dropped)."""
  f64 = lambda t: jax.tree.map(lambda a: np.asarray(a, np.float64), jax.device_get(t))
  P, prefix, adapters = f64(params), f64(prefix), f64(adapters)
  x = P['embed'][tokens]
  n_soft = 0 if embeds is None else len(embeds)
  if n_soft:
    x = np.concatenate([np.broadcast_to(np.asarray(embeds, np.float64), (len(x), *embeds.shape)), x], 1)
  b, t = x.shape[:2]
  pos = np.arange(t)
  if cfg.positions == 'learned':
    x = x + P['pos_embed'][pos]
  H, KV, hd = cfg.n_heads, cfg.kv_heads, cfg.head_dim
  for l in range(cfg.n_layers):
    L = jax.tree.map(lambda a: a[l], P['layers'])
    A = jax.tree.map(lambda a: a[l], adapters) if adapters else None
    adapt = lambda name, y: y + _gelu(y @ A[name]['down'] + A[name]['down_b']) @ A[name]['up'] + A[name]['up_b']
    a = L['attn']
    h = _norm(L['ln1'], x, cfg)
    q, k, v = (np.einsum('btd,dhk->bthk', h, a[w]) + a.get('b' + w[1], 0) for w in ('wq', 'wk', 'wv'))
    if cfg.positions == 'rope':
      q, k = _rope(q, pos, cfg.rope_theta), _rope(k, pos, cfg.rope_theta)
    mask = np.tril(np.ones((t, t), bool))
    if prefix:
      pk, pv = (np.broadcast_to(prefix[n][l], (b, *prefix[n][l].shape)) for n in ('prefix_k', 'prefix_v'))
      k, v = np.concatenate([pk, k], 1), np.concatenate([pv, v], 1)
      mask = np.concatenate([np.ones((t, pk.shape[1]), bool), mask], 1)
    k, v = np.repeat(k, H // KV, axis=2), np.repeat(v, H // KV, axis=2)
    s = np.where(mask, np.einsum('bthd,bshd->bhts', q, k) / math.sqrt(hd), -np.inf)
    w = np.exp(s - s.max(-1, keepdims=True))
    o = np.einsum('bhts,bshd->bthd', w / w.sum(-1, keepdims=True), v)
    y = np.einsum('bthk,hkd->btd', o, a['wo']) + a.get('bo', 0)
    x = x + (adapt('adapter_attn', y) if A else y)
    m = L['mlp']
    h = _norm(L['ln2'], x, cfg)
    u = h @ m['wi'] + m.get('bi', 0)
    u = _act(cfg, h @ m['wg']) * u if 'wg' in m else _act(cfg, u)
    y = u @ m['wo'] + m.get('bo', 0)
    x = x + (adapt('adapter_mlp', y) if A else y)
  x = _norm(P['final_norm'], x[:, n_soft:], cfg)
  return (x @ (P['embed'].T if cfg.tie_embeddings else P['lm_head']))[..., :cfg.vocab_size]


@pytest.mark.parametrize('name', sorted(CONFIGS))
def test_reference_agrees_with_naive(name):
  cfg = small(name)
  params = base_params(cfg)
  np.testing.assert_allclose(ref_forward(params, TOKENS, cfg), naive.forward(params, TOKENS, cfg),
                             atol=1e-9, rtol=1e-9)


# LoRA -----------------------------------------------------------------------------------
ALL_TARGETS = ('q', 'k', 'v', 'o', 'mlp')


def merged_by_hand(base, adapters, scale):
  """W + scale * A @ B for every LoRA target, in numpy (A: [layers, in..., r], B: [layers, r, out...])."""
  out = jax.tree.map(np.asarray, jax.device_get(base))
  for group, ws in adapters['layers'].items():
    for name, ab in ws.items():
      a, b = np.asarray(ab['a'], np.float64), np.asarray(ab['b'], np.float64)
      w = out['layers'][group][name]
      delta = np.stack([np.tensordot(a[l], b[l], axes=1) for l in range(len(a))])
      out['layers'][group][name] = (w + scale * delta).astype(w.dtype)
  return out


@pytest.mark.parametrize('name', sorted(CONFIGS))
def test_lora_starts_at_base_and_equals_merged_weights(name):
  cfg = small(name)
  pcfg = peft.PeftConfig(method='lora', lora_rank=4, lora_alpha=8.0, lora_targets=ALL_TARGETS)
  base = base_params(cfg)
  adapters = peft.init(cfg, pcfg, KEY, base)
  # B = 0: the base model's logits (up to float rounding: XLA fuses a different program)
  np.testing.assert_allclose(forward(peft.combine(base, adapters, cfg, pcfg), TOKENS, cfg),
                             forward(base, TOKENS, cfg), atol=1e-6, rtol=0)
  adapters = randomize(adapters, 2)
  combined = peft.combine(base, adapters, cfg, pcfg)
  assert isinstance(combined['layers']['mlp']['wo'], peft.LoRAWeight)
  by_hand = merged_by_hand(base, adapters, 8.0 / 4)   # alpha / rank, written out
  lora = forward(combined, TOKENS, cfg)
  assert not np.allclose(lora, forward(base, TOKENS, cfg), atol=1e-2)
  np.testing.assert_allclose(lora, forward(by_hand, TOKENS, cfg), atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(lora, ref_forward(by_hand, TOKENS, cfg), atol=1e-4, rtol=1e-4)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6),
               peft.merge(base, adapters, cfg, pcfg), by_hand)


def _weight_shaped_matmuls(fn, *args) -> list[tuple[int, ...]]:
  """Outputs of the program's matmuls that have no token dimension (B * T = 10) and no rank
  dimension (4): in this model only weight gradients [in, out] have such shapes."""
  shapes = re.findall(r':f32\[([\d,]+)\] = dot_general', str(jax.make_jaxpr(fn)(*args)))
  shapes = [tuple(int(n) for n in s.split(',')) for s in shapes]
  return [s for s in shapes if len(s) == 2 and 10 not in s and 4 not in s]


def test_lora_gradients_reach_only_the_adapters():
  cfg = small('llama_gqa')
  pcfg = peft.PeftConfig(method='lora', lora_rank=4, lora_targets=ALL_TARGETS)
  base = base_params(cfg)
  adapters = peft.init(cfg, pcfg, KEY, base)

  def loss(adapters, base):
    logits = model.forward(peft.combine(base, adapters, cfg, pcfg), jnp.asarray(TOKENS[:, :-1]), cfg)[0]
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), TOKENS[:, 1:, None], -1))

  grads = jax.jit(jax.grad(loss))(adapters, base)
  assert jax.tree.structure(grads) == jax.tree.structure(adapters)
  for ab in jax.tree.leaves(grads['layers'], is_leaf=lambda x: isinstance(x, dict) and 'a' in x):
    assert np.all(np.isfinite(ab['b'])) and float(jnp.abs(ab['b']).max()) > 0
    assert float(jnp.abs(ab['a']).max()) == 0     # dL/dA = x^T dY B^T scale, and B = 0
  # No weight gradient of the frozen base is ever computed (LoRA's backward saving), which
  # the same check does see when the base is differentiated too.
  assert _weight_shaped_matmuls(jax.grad(loss), adapters, base) == []
  assert (32, 128) in _weight_shaped_matmuls(jax.grad(loss, argnums=(0, 1)), adapters, base)


# Prefix tuning --------------------------------------------------------------------------
@pytest.mark.parametrize('name,hidden', [('llama_gqa', 0), ('gpt2', 8)])
def test_prefix_matches_reference_segments_and_cache(name, hidden):
  """Direct per-layer K/V prefix (RoPE, GQA) and the MLP-reparameterised one (gpt2)."""
  cfg = small(name)
  pcfg = peft.PeftConfig(method='prefix', prefix_length=3, prefix_hidden=hidden)
  base = base_params(cfg)
  adapters = peft.init(cfg, pcfg, KEY, base)
  params = peft.combine(base, adapters, cfg, pcfg)
  kv = peft.prefix_kv(adapters, pcfg)
  assert kv['prefix_k'].shape == (2, 3, cfg.kv_heads, cfg.head_dim)
  full = forward(params, TOKENS, cfg)
  np.testing.assert_allclose(full, ref_forward(base, TOKENS, cfg, prefix=kv), atol=1e-4, rtol=1e-4)
  assert not np.allclose(full, forward(base, TOKENS, cfg), atol=1e-2)
  if hidden:
    return
  # packed documents: each sees the prefix and itself only
  seg = jnp.array([[1, 1, 1, 2, 2, 2]] * 2)
  pos = jnp.array([[0, 1, 2, 0, 1, 2]] * 2)
  packed = jax.jit(lambda p: model.forward(p, jnp.asarray(TOKENS), cfg, positions=pos,
                                           segment_ids=seg)[0][..., :50])(params)
  np.testing.assert_allclose(packed[:, 3:], forward(params, TOKENS[:, 3:], cfg), atol=1e-5)
  # KV cache: the prefix takes no slot; prefill 5 tokens, then decode the 6th
  cache = {k: jnp.zeros((2, 2, 6, cfg.kv_heads, cfg.head_dim)) for k in ('k', 'v')}
  cached = jax.jit(lambda p, t, c, i: model.forward(p, t, cfg, cache=c, cache_index=i))
  pre, cache = cached(params, jnp.asarray(TOKENS[:, :5]), cache, jnp.int32(0))
  step, _ = cached(params, jnp.asarray(TOKENS[:, 5:]), cache, jnp.int32(5))
  np.testing.assert_allclose(pre[..., :50], full[:, :5], atol=1e-5)
  np.testing.assert_allclose(step[:, 0, :50], full[:, 5], atol=1e-5)


# Prompt tuning --------------------------------------------------------------------------
def test_prompt_matches_reference_and_decodes_with_a_cache():
  cfg = small('gpt2')
  pcfg = peft.PeftConfig(method='prompt', prompt_length=3)
  base = base_params(cfg)
  adapters = peft.init(cfg, pcfg, KEY, base)
  # initialised from the embeddings of (seeded) random vocabulary tokens
  rows = np.asarray(adapters['soft_prompt'])
  table = np.asarray(base['embed'])[:cfg.vocab_size]
  assert all(np.any(np.all(table == r, axis=1)) for r in rows)
  np.testing.assert_array_equal(rows, peft.init(cfg, pcfg, KEY, base)['soft_prompt'])
  soft = randomize(adapters, 2)['soft_prompt']
  params = peft.combine(base, {'soft_prompt': soft}, cfg, pcfg)
  full = forward(params, TOKENS, cfg)
  assert full.shape == (2, 6, 50)
  np.testing.assert_allclose(full, ref_forward(base, TOKENS, cfg, embeds=soft), atol=1e-4, rtol=1e-4)
  # KV cache with 3 extra slots for the prompt: a jitted prefill (cache_index the literal 0)
  # then a step with a traced cache_index give the full forward's logits
  cache = {k: jnp.zeros((2, 2, 3 + 6, cfg.kv_heads, cfg.head_dim)) for k in ('k', 'v')}
  prefill = jax.jit(lambda p, t, c: model.forward(p, t, cfg, cache=c, cache_index=0))
  step = jax.jit(lambda p, t, c, i: model.forward(p, t, cfg, cache=c, cache_index=i))
  pre, cache = prefill(params, jnp.asarray(TOKENS[:, :5]), cache)
  last, _ = step(params, jnp.asarray(TOKENS[:, 5:]), cache, jnp.int32(5))
  np.testing.assert_allclose(pre[..., :50], full[:, :5], atol=1e-5)
  np.testing.assert_allclose(last[:, 0, :50], full[:, 5], atol=1e-5)
  # lm.decode's left-padded layout: kv_positions / kv_mask describe the token slots only
  # (row 1 is left-padded by one), the model adds the prompt's; then one new token
  toks = jnp.asarray(np.stack([TOKENS[0, :5], np.r_[0, TOKENS[1, :4]]]))
  mask = jnp.array([[1, 1, 1, 1, 1], [0, 1, 1, 1, 1]])
  pos = jnp.maximum(jnp.cumsum(mask, 1) - 1, 0)
  kv_pos, kv_mask = jnp.concatenate([pos, mask.sum(1, keepdims=True)], 1), jnp.c_[mask, [1, 1]]
  run = lambda p, t, ps, c, i: model.hidden_states(p, t, cfg, positions=ps, cache=c, cache_index=i,
                                                   kv_positions=kv_pos, kv_mask=kv_mask)
  with pytest.raises(ValueError, match='soft prompt needs 3 besides the 6 token slots'):
    run(params, toks, pos, {k: v[:, :, :6] for k, v in cache.items()}, 0)
  h, cache = jax.jit(lambda p, t, ps, c: run(p, t, ps, c, 0))(params, toks, pos, cache)
  nxt = jnp.asarray(TOKENS[[0, 1], [5, 4]])[:, None]           # row 0: token 5, row 1: token 4
  h1, _ = jax.jit(run)(params, nxt, mask.sum(1, keepdims=True), cache, jnp.int32(5))
  logits = model.logits_from_hidden(params, jnp.concatenate([h[:, -1:], h1], 1), cfg)[..., :50]
  np.testing.assert_allclose(logits[:, 0], full[[0, 1], [4, 3]], atol=1e-5)
  np.testing.assert_allclose(logits[:, 1], full[[0, 1], [5, 4]], atol=1e-5)


# Adapters -------------------------------------------------------------------------------
@pytest.mark.parametrize('name', sorted(CONFIGS))
def test_adapters_start_as_identity_and_match_reference(name):
  cfg = small(name)
  pcfg = peft.PeftConfig(method='adapter', adapter_dim=4)
  base = base_params(cfg)
  adapters = peft.init(cfg, pcfg, KEY, base)
  np.testing.assert_allclose(forward(peft.combine(base, adapters, cfg, pcfg), TOKENS, cfg),
                             forward(base, TOKENS, cfg), atol=1e-6, rtol=0)   # up = 0: the base
  adapters = randomize(adapters, 2)
  out = forward(peft.combine(base, adapters, cfg, pcfg), TOKENS, cfg)
  np.testing.assert_allclose(out, ref_forward(base, TOKENS, cfg, adapters=adapters['layers']),
                             atol=1e-4, rtol=1e-4)


# Configs, full fine-tuning, sharding ------------------------------------------------------
@pytest.mark.parametrize('make,match', [
    (lambda: peft.PeftConfig.from_dict({'method': 'ia3'}), "peft.method='ia3' is not supported"),
    (lambda: peft.PeftConfig.from_dict({'method': 'lora', 'lora_targets': ['q', 'qkv']}), 'lora_targets'),
    (lambda: peft.PeftConfig.from_dict({'method': 'lora', 'rank': 4}), "Unknown peft config key"),
    (lambda: peft.specs(small('gpt2', moe_experts=2), peft.PeftConfig(method='lora', lora_targets=('q', 'mlp'))),
     "names 'mlp', which matches no dense weight"),
    (lambda: peft.merge({}, {}, small('gpt2'), peft.PeftConfig(method='prefix')), 'folds only LoRA'),
])
def test_bad_peft_config_is_one_sentence(make, match):
  with pytest.raises(ConfigError, match=match) as e:
    make()
  msg = str(e.value)
  assert msg.endswith('.') and '\n' not in msg and msg.count('. ') == 0


def test_none_is_full_fine_tuning():
  cfg = small('gpt2')
  pcfg = peft.PeftConfig.from_dict({'method': 'none'})
  base = base_params(cfg)
  trainable = peft.init(cfg, pcfg, KEY, base)
  assert trainable is base and peft.combine({}, trainable, cfg, pcfg) is base
  assert peft.num_params(cfg, pcfg) == sum(x.size for x in jax.tree.leaves(base))


def test_sharded_adapters_and_lora_forward_match_one_device():
  cfg = small('llama_gqa')
  mesh = sharding.make_mesh({'data': 2, 'fsdp': 2, 'tensor': 2})
  base = base_params(cfg)
  for method in ('prefix', 'prompt', 'adapter'):   # every method's axes shard on this mesh
    pcfg = peft.PeftConfig(method=method)
    abstract = jax.eval_shape(lambda: peft.init(cfg, pcfg, KEY, base))
    sharding.tree_shardings(peft.logical_axes(cfg, pcfg), abstract, mesh)
  pcfg = peft.PeftConfig(method='lora', lora_rank=4, lora_targets=ALL_TARGETS)
  adapters = randomize(peft.init(cfg, pcfg, KEY, base), 2)
  ad_sh = sharding.tree_shardings(peft.logical_axes(cfg, pcfg), adapters, mesh)
  base_sh = sharding.tree_shardings(model.logical_axes(cfg), base, mesh)
  assert ad_sh['layers']['attn']['wq']['b'].spec[2] == 'tensor'      # B: heads over tensor
  assert ad_sh['layers']['attn']['wq']['a'].spec[1] == 'fsdp'        # A: embed over fsdp
  tokens = jnp.asarray(np.tile(TOKENS, (4, 1)))                     # batch 8 over data x fsdp

  def run(base, adapters, tokens):
    with sharding.activation_sharding(mesh):
      return model.forward(peft.combine(base, adapters, cfg, pcfg), tokens, cfg)[0]

  sharded = jax.jit(run, in_shardings=(base_sh, ad_sh, sharding.batch_sharding(mesh)))(
      jax.device_put(base, base_sh), jax.device_put(adapters, ad_sh), tokens)
  one = forward(peft.combine(base, adapters, cfg, pcfg), tokens, cfg)
  np.testing.assert_allclose(np.asarray(sharded)[..., :50], one, atol=1e-5, rtol=1e-5)


def test_lora_output_is_w_x_plus_alpha_over_r_times_b_a_x_by_hand():
  """Numbers written out: rank 2, alpha 4, so the low-rank path is scaled by 4 / 2 = 2."""
  cfg = small('llama_gqa')
  pcfg = peft.PeftConfig(method='lora', lora_rank=2, lora_alpha=4.0, lora_targets=('v',))
  base = base_params(cfg)
  adapters = peft.init(cfg, pcfg, KEY, base)
  a = np.zeros(adapters['layers']['attn']['wv']['a'].shape, np.float32)   # [layers, 32, 2]
  b = np.zeros(adapters['layers']['attn']['wv']['b'].shape, np.float32)   # [layers, 2, 2, 8]
  a[0, 3] = [1.0, 0.5]              # x = e_3:  x A = [1.0, 0.5]
  b[0, 0, 1, 5], b[0, 1, 1, 5] = 0.25, 1.0   # (x A) B at (head 1, dim 5) = 0.25 + 0.5 = 0.75
  adapters = {'layers': {'attn': {'wv': {'a': jnp.asarray(a), 'b': jnp.asarray(b)}}}}
  x = np.zeros((1, 32), np.float32)
  x[0, 3] = 1.0
  w = np.asarray(base['layers']['attn']['wv'][0])                         # [32, 2, 8]
  want = w[3].copy()
  want[1, 5] += 2.0 * 0.75          # W x + (alpha / r) * (x A) B
  lw = jax.tree.map(lambda t: t[0], peft.combine(base, adapters, cfg, pcfg)['layers']['attn']['wv'])
  got = np.asarray(layers.dense(jnp.asarray(x), lw, 'td,dhk->thk', jnp.float32))[0]
  np.testing.assert_allclose(got, want, atol=1e-6)
  merged = np.asarray(peft.merge(base, adapters, cfg, pcfg)['layers']['attn']['wv'][0])
  np.testing.assert_allclose(merged[3], want, atol=1e-6)
