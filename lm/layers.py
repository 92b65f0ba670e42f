"""Transformer layers as pure functions of (params, x).

Each layer has two halves: `*_specs(cfg)` describes its parameters (shape, logical
axis names, initialiser) and `*(params, x, ...)` applies it. The specs are the single
source of truth from which `lm.model` builds real params, abstract shapes and the
logical-axis tree that `lm.sharding` turns into shardings.

Precision: params are stored in `cfg.param_dtype` and cast to `cfg.dtype` where they
are used; norms, softmax and logits are computed in float32.
"""
from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from lm import sharding
from lm.config import ModelConfig


@dataclasses.dataclass(frozen=True)
class Spec:
  """One parameter: its shape, a logical name per dimension, and how to initialise it."""
  shape: tuple[int, ...]
  axes: tuple[str | None, ...]
  init: str = 'normal'           # 'normal' | 'zeros' | 'ones'
  std: float = 0.02

  def stacked(self, n: int, axis_name: str = 'layers') -> 'Spec':
    return dataclasses.replace(self, shape=(n, *self.shape), axes=(axis_name, *self.axes))


def init_from_specs(specs, key: jax.Array, param_dtype) -> dict:
  """Materialise a tree of Specs; leaf i gets fold_in(key, i), so init is deterministic."""
  is_spec = lambda x: isinstance(x, Spec)
  leaves, treedef = jax.tree.flatten(specs, is_leaf=is_spec)
  out = []
  for i, s in enumerate(leaves):
    if s.init == 'zeros':
      out.append(jnp.zeros(s.shape, param_dtype))
    elif s.init == 'ones':
      out.append(jnp.ones(s.shape, param_dtype))
    else:
      k = jax.random.fold_in(key, i)
      out.append((s.std * jax.random.normal(k, s.shape, jnp.float32)).astype(param_dtype))
  return jax.tree.unflatten(treedef, out)


def dtype_of(name: str):
  return jnp.dtype(name)


@functools.partial(jax.tree_util.register_dataclass, data_fields=['w', 'a', 'b'],
                   meta_fields=['scale'])
@dataclasses.dataclass(frozen=True)
class LoRAWeight:
  """A frozen weight w plus a low-rank update scale * a @ b (Hu et al. 2021; see lm.peft).

  A pytree whose leaves are w, a, b (scale is static), so lax.scan slices stacked layers
  of it like any array. `dense` computes x w + scale (x a) b and never forms w + scale a b:
  w is then a constant of the backward pass, which skips its weight gradient.
  """
  w: jax.Array   # [in..., out...]
  a: jax.Array   # [in..., r]
  b: jax.Array   # [r, out...]
  scale: float


def _lora_dense(x: jax.Array, w: LoRAWeight, spec: str, dtype) -> jax.Array:
  ins, out = spec.split('->')
  xs, ws = ins.split(',')
  contracted = ''.join(a for a in xs if a in ws)
  if not ws.startswith(contracted):
    raise ValueError(f'LoRA needs a weight laid out [in..., out...]; einsum {spec!r} is not.')
  r = next(c for c in 'rzyxwuv' if c not in spec)        # a letter free for the rank
  free = ''.join(a for a in xs if a not in contracted)
  low = dense(dense(x, w.a, f'{xs},{contracted}{r}->{free}{r}', dtype),
              w.b, f'{free}{r},{r}{ws[len(contracted):]}->{out}', dtype)
  return dense(x, w.w, spec, dtype) + (w.scale * low).astype(dtype)


def dense(x: jax.Array, w: jax.Array, spec: str, dtype) -> jax.Array:
  """An einsum with the weight cast to the compute dtype (params may be float32).

  When x's contracted dims are its trailing ones (every projection here), it runs as one
  2D matmul [tokens, in] @ [in, out]: XLA:CPU then picks row-major layouts for the
  backward matmuls instead of transposing activations to feed them. A LoRAWeight adds
  its low-rank path.
  """
  if isinstance(w, LoRAWeight):
    return _lora_dense(x, w, spec, dtype)
  x, w = x.astype(dtype), w.astype(dtype)
  ins, out = spec.split('->')
  xs, ws = ins.split(',')
  contracted = ''.join(a for a in xs if a in ws)   # e.g. 'd' or 'hk'
  n, kept = len(contracted), ws.replace(contracted, '')
  if n and xs.endswith(contracted) and out == xs[:-n] + kept:
    k = math.prod(x.shape[-n:])
    if ws.startswith(contracted):    # w: [in..., out...]
      w2 = w.reshape(k, -1)
    elif ws.endswith(contracted):    # w: [out..., in...] (tied embedding)
      w2 = w.reshape(-1, k).T
    else:
      return jnp.einsum(spec, x, w)
    y = x.reshape(-1, k) @ w2
    return y.reshape(*x.shape[:-n], *(w.shape[ws.index(a)] for a in kept))
  return jnp.einsum(spec, x, w)


# Norms ------------------------------------------------------------------------
def norm_specs(cfg: ModelConfig) -> dict[str, Spec]:
  # Gemma stores w of a (1 + w) scale: zero is the identity.
  specs = {'scale': Spec((cfg.d_model,), ('embed',), 'zeros' if cfg.norm_unit_offset else 'ones')}
  if cfg.norm == 'layernorm' and cfg.use_bias:   # nanoGPT's bias=False drops LayerNorm biases too
    specs['bias'] = Spec((cfg.d_model,), ('embed',), 'zeros')
  return specs


def norm(p: dict, x: jax.Array, cfg: ModelConfig) -> jax.Array:
  """LayerNorm or RMSNorm, computed in float32 for stability, returned in x's dtype."""
  h = x.astype(jnp.float32)
  if cfg.norm == 'layernorm':
    h = h - h.mean(-1, keepdims=True)
  h = h * jax.lax.rsqrt(jnp.mean(h * h, -1, keepdims=True) + cfg.norm_eps)
  scale = p['scale'].astype(jnp.float32)
  h = h * (1.0 + scale if cfg.norm_unit_offset else scale)
  if 'bias' in p:
    h = h + p['bias'].astype(jnp.float32)
  return h.astype(x.dtype)


# MLP --------------------------------------------------------------------------
@jax.custom_vjp
def gelu_exact(x: jax.Array) -> jax.Array:
  """x * Phi(x) (Hendrycks & Gimpel 2016), exact, with a hand-written derivative.

  The forward pass stores Phi(x) + x * phi(x) (the derivative) so the backward pass is
  one multiply; autodiff through erf instead makes XLA:CPU recompute erfc inside the
  transposes that feed the weight gradients, which is several times slower.
  """
  return 0.5 * x * (1 + jax.lax.erf(x * (1 / math.sqrt(2))))


def _gelu_fwd(x):
  cdf = 0.5 * (1 + jax.lax.erf(x * (1 / math.sqrt(2))))
  pdf = jnp.exp(-0.5 * x * x) * (1 / math.sqrt(2 * math.pi))
  return x * cdf, cdf + x * pdf


def _gelu_bwd(grad_x, g):
  return (g * grad_x,)


gelu_exact.defvjp(_gelu_fwd, _gelu_bwd)


def activation(name: str, x: jax.Array) -> jax.Array:
  if name in ('gelu', 'geglu'):
    return gelu_exact(x)
  if name in ('gelu_tanh', 'geglu_tanh'):
    return jax.nn.gelu(x, approximate=True)
  if name == 'relu':
    return jax.nn.relu(x)
  if name == 'swiglu':
    return jax.nn.silu(x)
  raise ValueError(f'unknown activation {name}')


def mlp_specs(cfg: ModelConfig, out_std: float) -> dict[str, Spec]:
  d, f = cfg.d_model, cfg.ff_dim
  specs = {'wi': Spec((d, f), ('embed', 'mlp'), std=cfg.init_std),
           'wo': Spec((f, d), ('mlp', 'embed'), std=out_std)}
  if cfg.gated:
    specs['wg'] = Spec((d, f), ('embed', 'mlp'), std=cfg.init_std)
  if cfg.use_bias:
    specs['bi'] = Spec((f,), ('mlp',), 'zeros')
    specs['bo'] = Spec((d,), ('embed',), 'zeros')
    if cfg.gated:
      specs['bg'] = Spec((f,), ('mlp',), 'zeros')
  return specs


def mlp(p: dict, x: jax.Array, cfg: ModelConfig) -> jax.Array:
  dt = dtype_of(cfg.dtype)
  h = dense(x, p['wi'], 'btd,df->btf', dt)
  if 'bi' in p:
    h = h + p['bi'].astype(dt)
  if cfg.gated:  # act(x W_g) * (x W_i), Shazeer 2020
    g = dense(x, p['wg'], 'btd,df->btf', dt)
    if 'bg' in p:
      g = g + p['bg'].astype(dt)
    h = activation(cfg.activation, g) * h
  else:
    h = activation(cfg.activation, h)
  h = sharding.constrain(h, ('batch', 'length', 'mlp'))
  out = dense(h, p['wo'], 'btf,fd->btd', dt)
  if 'bo' in p:
    out = out + p['bo'].astype(dt)
  return out


# Rotary position embedding ------------------------------------------------------
def rope(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
  """Rotary embedding (Su et al. 2021) in the rotate-half layout used by LLaMA/HF.

  x: [B, T, heads, head_dim]; positions: [B, T] integer positions.
  """
  half = x.shape[-1] // 2
  return apply_rope(x, positions, theta ** (-jnp.arange(half, dtype=jnp.float32) / half))


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: jax.Array,
               attention_factor=None) -> jax.Array:
  """Rotate x [B, T, heads, head_dim] by positions [B, T] times inv_freq [head_dim / 2];
  YaRN multiplies cos and sin by its attention_factor (as transformers does)."""
  angles = positions[..., None].astype(jnp.float32) * inv_freq      # [B, T, half]
  cos = jnp.cos(angles)[:, :, None, :]
  sin = jnp.sin(angles)[:, :, None, :]
  if attention_factor is not None:
    cos, sin = cos * attention_factor, sin * attention_factor
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x.dtype)


def _yarn(inv: np.ndarray, cfg: ModelConfig, dim: int, base: float):
  """YaRN (Peng et al. 2023) as transformers' _compute_yarn_parameters: interpolate the
  low frequencies by the factor, keep the high ones, ramp between; scale cos/sin."""
  factor, orig = cfg.rope_factor, cfg.rope_original_max_len

  def correction_dim(rotations):
    return dim * math.log(orig / (rotations * 2 * math.pi)) / (2 * math.log(base))
  low, high = correction_dim(cfg.rope_beta_fast), correction_dim(cfg.rope_beta_slow)
  if cfg.rope_truncate:
    low, high = math.floor(low), math.ceil(high)
  low, high = max(low, 0), min(high, dim - 1)
  if low == high:
    high += 0.001   # transformers' guard against a zero-width ramp
  ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0, 1).astype(np.float32)
  extrapolation = 1 - ramp
  inv = (inv / factor) * (1 - extrapolation) + inv * extrapolation
  af = cfg.rope_attention_factor or (0.1 * math.log(factor) + 1.0 if factor > 1 else 1.0)
  return inv.astype(np.float32), af


def _llama3(inv: np.ndarray, cfg: ModelConfig):
  """LLaMA-3.1's frequency-dependent rescaling (transformers' _compute_llama3_parameters)."""
  factor, old = cfg.rope_factor, cfg.rope_original_max_len
  lo, hi = cfg.rope_low_freq_factor, cfg.rope_high_freq_factor
  wavelen = 2 * math.pi / inv
  scaled = np.where(wavelen > old / lo, inv / factor, inv)
  smooth = (old / wavelen - lo) / (hi - lo)
  smoothed = (1 - smooth) * scaled / factor + smooth * scaled
  medium = ~(wavelen < old / hi) & ~(wavelen > old / lo)
  return np.where(medium, smoothed, scaled).astype(np.float32)


def rope_frequencies(cfg: ModelConfig, positions: jax.Array, local: bool = False):
  """(inv_freq [head_dim / 2] float32, attention factor or None) of cfg's RoPE; `local`
  asks for the sliding layers' unscaled RoPE at rope_local_theta (Gemma-3)."""
  dim = cfg.head_dim
  if local and cfg.rope_local_theta:
    kind, base = 'none', cfg.rope_local_theta
  else:
    kind, base = cfg.rope_scaling, cfg.rope_theta
  if kind == 'none':
    return base ** (-jnp.arange(dim // 2, dtype=jnp.float32) / (dim // 2)), None   # = rope()
  if kind == 'dynamic':  # NTK: the base grows with the longest position in this call
    orig = cfg.rope_original_max_len or cfg.max_seq_len
    seq = jnp.maximum(jnp.max(positions) + 1, orig).astype(jnp.float32)
    grown = base * ((cfg.rope_factor * seq / orig) - (cfg.rope_factor - 1)) ** (dim / (dim - 2))
    return 1.0 / (grown ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim)), None
  inv = (1.0 / (base ** (np.arange(0, dim, 2, dtype=np.float32) / dim))).astype(np.float32)
  if kind == 'linear':
    return jnp.asarray(inv / np.float32(cfg.rope_factor)), None
  if kind == 'llama3':
    return jnp.asarray(_llama3(inv, cfg)), None
  inv, af = _yarn(inv, cfg, dim, base)
  return jnp.asarray(inv), af


def sinusoidal(positions: jax.Array, d: int) -> jax.Array:
  """Fixed sine/cosine positions (Vaswani et al. 2017): even dims sin, odd dims cos."""
  i = jnp.arange(d // 2, dtype=jnp.float32)
  angles = positions[..., None].astype(jnp.float32) / (10000.0 ** (2 * i / d))
  return jnp.stack([jnp.sin(angles), jnp.cos(angles)], axis=-1).reshape(*positions.shape, d)


def alibi_slopes(n_heads: int) -> jax.Array:
  """Per-head ALiBi slopes (Press et al. 2022): a geometric sequence starting at 2^(-8/n).

  For a head count that is not a power of two, the paper's recipe: the slopes of the
  closest smaller power of two, then every other slope of the next power of two.
  """
  def pow2(n):
    start = 2.0 ** (-8.0 / n)
    return [start ** (i + 1) for i in range(n)]
  p = 2 ** math.floor(math.log2(n_heads))
  slopes = pow2(p)
  if p < n_heads:
    slopes += pow2(2 * p)[0::2][:n_heads - p]
  return jnp.asarray(slopes, jnp.float32)


def relative_bucket(rel: jax.Array, bidirectional: bool, num_buckets: int,
                    max_distance: int) -> jax.Array:
  """T5's bucket of a relative position rel = key_pos - query_pos (Raffel et al. 2020).

  Half the buckets hold exact small distances, the other half log-spaced distances up to
  max_distance (beyond it, the last bucket). Bidirectional attention spends half the
  buckets on keys after the query; causal attention sees only keys at or before it.
  """
  out = jnp.zeros_like(rel)
  if bidirectional:
    num_buckets //= 2
    out = out + (rel > 0).astype(rel.dtype) * num_buckets
    n = jnp.abs(rel)
  else:
    n = jnp.maximum(-rel, 0)
  exact = num_buckets // 2
  # log-spaced buckets; the max() only guards log(0) in lanes that take the exact branch
  far = exact + (jnp.log(jnp.maximum(n, 1).astype(jnp.float32) / exact)
                 / math.log(max_distance / exact) * (num_buckets - exact)).astype(rel.dtype)
  far = jnp.minimum(far, num_buckets - 1)
  return out + jnp.where(n < exact, n, far)


def relative_bias(table: jax.Array, q_pos: jax.Array, kv_pos: jax.Array, bidirectional: bool,
                  cfg: ModelConfig) -> jax.Array:
  """[B, heads, T, S] additive attention bias from a [buckets, heads] table."""
  rel = kv_pos[:, None, :] - q_pos[:, :, None]
  buckets = relative_bucket(rel, bidirectional, cfg.rel_buckets, cfg.rel_max_distance)
  return jnp.moveaxis(jnp.asarray(table, jnp.float32)[buckets], -1, 1)


def relative_bias_spec(cfg: ModelConfig) -> Spec:
  return Spec((cfg.rel_buckets, cfg.n_heads), (None, 'heads'), std=cfg.init_std)


# Residual sublayers ---------------------------------------------------------------
def residual(p: dict, name: str, x: jax.Array, f, cfg: ModelConfig) -> jax.Array:
  """x combined with sublayer f, with the norm(s) where cfg.norm_position puts them:

    pre       x + f(norm(x))                 (GPT-2, LLaMA, T5)
    post      norm(x + f(x))                 (original Transformer, BERT)
    sandwich  x + norm_out(f(norm(x)))       (CogView)
    deepnorm  norm(alpha * x + f(x))         (DeepNet; alpha = (2N)^(1/4))

  p[name] is the sublayer's norm, p[name + '_out'] the sandwich's second norm.
  """
  where = cfg.norm_position
  if where == 'pre':
    return x + f(norm(p[name], x, cfg))
  if where == 'sandwich':
    return x + norm(p[name + '_out'], f(norm(p[name], x, cfg)), cfg)
  alpha = cfg.deepnorm_alpha if where == 'deepnorm' else 1.0
  return norm(p[name], alpha * x + f(x), cfg)


def bottleneck_adapter(p: dict, y: jax.Array, cfg: ModelConfig) -> jax.Array:
  """Houlsby et al. (2019): y + up(gelu(down(y))) on a sublayer's output (see lm.peft).
  With `up` zero-initialised it starts as the identity."""
  dt = dtype_of(cfg.dtype)
  h = gelu_exact(dense(y, p['down'], 'btd,dm->btm', dt) + p['down_b'].astype(dt))
  return y + dense(h, p['up'], 'btm,md->btd', dt) + p['up_b'].astype(dt)


def sublayer_norm_specs(cfg: ModelConfig, name: str) -> dict[str, dict]:
  specs = {name: norm_specs(cfg)}
  if cfg.norm_position == 'sandwich':
    specs[name + '_out'] = norm_specs(cfg)
  return specs


# Attention ----------------------------------------------------------------------
def attention_specs(cfg: ModelConfig, out_std: float) -> dict[str, Spec]:
  d, h, kv, hd = cfg.d_model, cfg.n_heads, cfg.kv_heads, cfg.head_dim
  specs = {'wq': Spec((d, h, hd), ('embed', 'heads', 'head_dim'), std=cfg.init_std),
           'wk': Spec((d, kv, hd), ('embed', 'kv_heads', 'head_dim'), std=cfg.init_std),
           'wv': Spec((d, kv, hd), ('embed', 'kv_heads', 'head_dim'), std=cfg.init_std),
           'wo': Spec((h, hd, d), ('heads', 'head_dim', 'embed'), std=out_std)}
  if cfg.use_bias:
    specs['bq'] = Spec((h, hd), ('heads', 'head_dim'), 'zeros')
    specs['bk'] = Spec((kv, hd), ('kv_heads', 'head_dim'), 'zeros')
    specs['bv'] = Spec((kv, hd), ('kv_heads', 'head_dim'), 'zeros')
    specs['bo'] = Spec((d,), ('embed',), 'zeros')
  elif cfg.qkv_bias:   # Qwen2: q/k/v biased, the output projection not
    specs['bq'] = Spec((h, hd), ('heads', 'head_dim'), 'zeros')
    specs['bk'] = Spec((kv, hd), ('kv_heads', 'head_dim'), 'zeros')
    specs['bv'] = Spec((kv, hd), ('kv_heads', 'head_dim'), 'zeros')
  if cfg.qk_norm:      # one RMSNorm scale over head_dim, shared by the heads
    init = 'zeros' if cfg.norm_unit_offset else 'ones'
    specs['q_norm'] = Spec((hd,), ('head_dim',), init)
    specs['k_norm'] = Spec((hd,), ('head_dim',), init)
  return specs


def attention_mask(q_pos, kv_pos, q_seg=None, kv_seg=None, causal: bool = True,
                   prefix_len: jax.Array | None = None) -> jax.Array:
  """Boolean [B, T, S] mask: True where query t may attend to key s.

  Causality is decided by positions, so the same rule covers training (S == T) and a
  KV cache (keys are cache slots whose position is their index). `prefix_len` [B]
  makes a prefix LM: keys inside the prefix are visible to every query (bidirectional
  over the prefix, causal after it). Segment ids keep packed documents apart.
  """
  mask = jnp.ones((q_pos.shape[0], q_pos.shape[1], kv_pos.shape[1]), bool)
  if causal:
    mask = kv_pos[:, None, :] <= q_pos[:, :, None]
    if prefix_len is not None:
      mask = mask | (kv_pos[:, None, :] < prefix_len[:, None, None])
  if q_seg is not None and kv_seg is not None:
    mask = mask & (q_seg[:, :, None] == kv_seg[:, None, :])
  return mask


def _prepend_prefix(p, k, v, mask, bias):
  """Prefix tuning (Li & Liang 2021): learned keys/values p['prefix_k'], p['prefix_v']
  [P, kv_heads, head_dim] go before the keys. Every query sees them, across packed
  segments too; with a KV cache they take no slot (they are prepended on every call).
  They carry no position: no RoPE rotation, zero ALiBi / T5 bias."""
  b, t = mask.shape[:2]
  pk, pv = (jnp.broadcast_to(p[n], (b, *p[n].shape)) for n in ('prefix_k', 'prefix_v'))
  n = pk.shape[1]
  k = jnp.concatenate([pk.astype(k.dtype), k], 1)
  v = jnp.concatenate([pv.astype(v.dtype), v], 1)
  mask = jnp.concatenate([jnp.ones((b, t, n), bool), mask], -1)
  if bias is not None:
    bias = jnp.concatenate([jnp.zeros((*bias.shape[:3], n), bias.dtype), bias], -1)
  return k, v, mask, bias


def _xla_attention(q, k, v, mask, bias=None, scale=True, softcap=0.0):
  """Plain softmax(QK^T/sqrt(d) + bias)V with grouped-query heads; softmax in float32.

  scale: True divides the scores by sqrt(head_dim), False leaves them, a float multiplies
  (Gemma's query_pre_attn_scalar ** -0.5); softcap > 0 squashes them to cap * tanh(s / cap)."""
  b, t, h, hd = q.shape
  kv = k.shape[2]
  q = q.reshape(b, t, kv, h // kv, hd)
  scores = jnp.einsum('btkgd,bskd->bkgts', q, k, preferred_element_type=jnp.float32)
  if scale is True:
    scores = scores / math.sqrt(hd)
  elif scale is not False:
    scores = scores * scale
  if softcap:
    scores = jnp.tanh(scores / softcap) * softcap
  if bias is not None:  # [B, H, T, S] -> grouped like the scores
    scores = scores + bias.reshape(b, kv, h // kv, t, -1)
  scores = jnp.where(mask[:, None, None], scores, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
  out = jnp.einsum('bkgts,bskd->btkgd', probs, v)
  return out.reshape(b, t, h, hd)


def _causal_blocks(q, k, v, mask, bias, scale, block: int, softcap=0.0):
  """Causal self-attention one block of `block` queries at a time, each against only the keys
  up to its last query: keys after that are masked anyway, so the result is the same while
  the scores above the diagonal blocks are never computed (T=256, block 64: 5/8 of the work).
  Every query sees at least its own key, so no row is cut down to a different mask."""
  t = q.shape[1]
  outs = []
  for s in range(0, t, block):
    e = min(s + block, t)
    outs.append(_xla_attention(q[:, s:e], k[:, :e], v[:, :e], mask[:, s:e, :e],
                               None if bias is None else bias[:, :, s:e, :e], scale, softcap))
  return jnp.concatenate(outs, axis=1)


def score_scale(cfg: ModelConfig):
  """What multiplies QK^T: True = 1/sqrt(head_dim), False = 1, or a float (Gemma)."""
  if not cfg.scale_attention:
    return False
  return cfg.query_pre_attn_scalar ** -0.5 if cfg.query_pre_attn_scalar else True


def _rotate(q, k, positions, cfg: ModelConfig, local):
  """RoPE on q and k; with a per-kind base (Gemma-3) the scanned `local` flag picks it."""
  inv, af = rope_frequencies(cfg, positions)
  if local is not None and cfg.rope_local_theta:
    inv_l, af_l = rope_frequencies(cfg, positions, local=True)
    inv = jnp.where(local, inv_l, inv)
    if af is not None:
      af = jnp.where(local, 1.0 if af_l is None else af_l, af)
  return apply_rope(q, positions, inv, af), apply_rope(k, positions, inv, af)


def _fused_attention(q, k, v, mask, bias, scale, cfg: ModelConfig):
  """jax.nn.dot_product_attention through cuDNN (flash); mask None means plain causal."""
  dt = dtype_of(cfg.dtype)
  fused = functools.partial(jax.nn.dot_product_attention, q, k, v,
                            bias=None if bias is None else bias.astype(dt),
                            mask=None if mask is None else mask[:, None], is_causal=mask is None,
                            scale=None if scale is True else (1.0 if scale is False else scale))
  try:  # implementation=None would mean XLA; name cuDNN explicitly
    return fused(implementation='cudnn')
  except (ValueError, NotImplementedError, RuntimeError):
    if cfg.attention_impl == 'cudnn':
      raise
    return fused(implementation='xla')   # 'auto': shapes/dtypes cuDNN rejects


def _use_fused(cfg: ModelConfig) -> bool:
  if cfg.attn_softcap:   # no soft-capping in jax.nn.dot_product_attention
    return False
  if cfg.attention_impl == 'cudnn':
    return True
  return (cfg.attention_impl == 'auto' and jax.default_backend() == 'gpu'
          and cfg.dtype in ('bfloat16', 'float16'))


def _qkv(p: dict, x: jax.Array, kv_in: jax.Array, cfg: ModelConfig, dt):
  """Queries from x, keys and values from kv_in (x itself, or an encoder's memory), with the
  optional biases (Qwen2) and per-head q/k RMSNorm (Qwen3 / Gemma-3, before RoPE)."""
  q = dense(x, p['wq'], 'btd,dhk->bthk', dt)
  k = dense(kv_in, p['wk'], 'btd,dhk->bthk', dt)
  v = dense(kv_in, p['wv'], 'btd,dhk->bthk', dt)
  if 'bq' in p:
    q, k, v = q + p['bq'].astype(dt), k + p['bk'].astype(dt), v + p['bv'].astype(dt)
  if 'q_norm' in p:
    q, k = norm({'scale': p['q_norm']}, q, cfg), norm({'scale': p['k_norm']}, k, cfg)
  return q, k, v


def _cross_attention(p: dict, q, k, v, positions, segment_ids, memory, memory_segment_ids,
                     cfg: ModelConfig, dt) -> jax.Array:
  """An encoder-decoder's cross-attention: every query sees every (same-segment) memory slot,
  no positions apply."""
  b, s = memory.shape[:2]
  mem_seg = memory_segment_ids
  q_seg = None if mem_seg is None else (
      segment_ids if segment_ids is not None else jnp.ones(q.shape[:2], mem_seg.dtype))
  mask = attention_mask(positions, jnp.zeros((b, s), jnp.int32), q_seg, mem_seg, causal=False)
  out = _xla_attention(q, k.astype(dt), v.astype(dt), mask, None, cfg.scale_attention)
  y = dense(out, p['wo'], 'bthk,hkd->btd', dt)
  return y + p['bo'].astype(dt) if 'bo' in p else y


def _position_bias(cfg: ModelConfig, positions, kv_pos, rel_table, bidirectional: bool):
  """The additive score bias of ALiBi (-slope_h * distance) or T5's relative buckets; None
  for the other position schemes."""
  if cfg.positions == 'alibi':
    dist = jnp.abs(positions[:, :, None] - kv_pos[:, None, :]).astype(jnp.float32)
    return -alibi_slopes(cfg.n_heads)[None, :, None, None] * dist[:, None]
  if cfg.positions == 'relative':
    return relative_bias(rel_table, positions, kv_pos, bidirectional, cfg)
  return None


def _write_cache(cache: dict, k, v, cache_index):
  """Write the new keys/values [B, T, kv_heads, head_dim] at slot `cache_index`; returns (this
  layer's keys, values [B, S, ...] for attention, the updated cache {'k','v'}).

  A per-layer cache holds [B, S, ...]. With cache['layer'] (an index, lm.model's scan) the
  cache is the whole stack [layers, B, S, ...] carried through the layers: only the T new rows
  are written, in place at (layer, :, cache_index), and the layer's slice is read for
  attention, so a decode step never copies the stack."""
  if 'layer' not in cache:
    k = jax.lax.dynamic_update_slice_in_dim(cache['k'], k.astype(cache['k'].dtype), cache_index, 1)
    v = jax.lax.dynamic_update_slice_in_dim(cache['v'], v.astype(cache['v'].dtype), cache_index, 1)
    return k, v, {'k': k, 'v': v}
  layer = jnp.asarray(cache['layer'], jnp.int32)
  start = (layer, jnp.int32(0), jnp.asarray(cache_index, jnp.int32), jnp.int32(0), jnp.int32(0))
  out = {n: jax.lax.dynamic_update_slice(cache[n], new[None].astype(cache[n].dtype), start)
         for n, new in (('k', k), ('v', v))}
  k, v = (jax.lax.dynamic_index_in_dim(out[n], layer, 0, keepdims=False) for n in ('k', 'v'))
  return k, v, out


def attention(p: dict, x: jax.Array, cfg: ModelConfig, positions: jax.Array,
              segment_ids: jax.Array | None = None, cache: dict | None = None,
              cache_index: jax.Array | None = None, prefix_len: jax.Array | None = None, *,
              causal: bool | None = None, rel_table: jax.Array | None = None,
              memory: jax.Array | None = None, memory_segment_ids: jax.Array | None = None,
              local: jax.Array | None = None):
  """Multi-head / grouped-query / multi-query attention.

  Without a cache, keys are the T inputs themselves. With a cache ({'k','v'} of shape
  [B, S, kv_heads, head_dim}), the new keys are written at `cache_index` and queries
  attend over all S slots (masked by position). Optional cache entries 'kv_pos' and
  'kv_mask' [B, S] give each slot's position and validity (left-padded batches); they
  are inputs only. Returns (output, updated {'k','v'} cache).

  `causal` overrides cfg.causal (an encoder-decoder's encoder is bidirectional);
  `rel_table` is a [buckets, heads] T5 relative-bias table shared by the stack's layers;
  `memory` [B, S, d] makes this cross-attention: keys and values come from the encoder
  output, every query sees every (same-segment) memory slot, and no positions apply.
  `local` (a bool scalar, one per scanned layer) marks a sliding-window layer: its keys are
  limited to cfg.sliding_window positions back and its RoPE may have its own base.
  """
  dt = dtype_of(cfg.dtype)
  causal = cfg.causal if causal is None else causal
  q, k, v = _qkv(p, x, x if memory is None else memory, cfg, dt)
  if memory is not None:
    return _cross_attention(p, q, k, v, positions, segment_ids, memory, memory_segment_ids, cfg,
                            dt), cache
  if cfg.positions == 'rope':
    q, k = _rotate(q, k, positions, cfg, local)
  q = sharding.constrain(q, ('batch', 'length', 'heads', 'head_dim'))

  if cache is None:
    kv_pos, kv_seg, kv_valid = positions, segment_ids, None
  else:
    k, v, new_cache = _write_cache(cache, k, v, cache_index)
    # Left-padded decoding (lm.decode) gives each slot's per-row position and which slots
    # hold real tokens; otherwise a slot's position is its index and every slot is real.
    kv_pos, kv_valid = cache.get('kv_pos'), cache.get('kv_mask')
    cache = new_cache
    if kv_pos is None:
      kv_pos = jnp.broadcast_to(jnp.arange(k.shape[1])[None, :], (x.shape[0], k.shape[1]))
    kv_seg = None
  mask = attention_mask(positions, kv_pos, segment_ids if cache is None else None, kv_seg,
                        causal, prefix_len)
  if kv_valid is not None:
    mask = mask & kv_valid[:, None, :]
  if local is not None and cfg.sliding_window:   # HF: kv_idx > q_idx - sliding_window
    near = kv_pos[:, None, :] > positions[:, :, None] - cfg.sliding_window
    mask = mask & (near | ~local)
  bias = _position_bias(cfg, positions, kv_pos, rel_table, not causal or prefix_len is not None)
  prefixed = 'prefix_k' in p     # prefix tuning (lm.peft)
  if prefixed:
    k, v, mask, bias = _prepend_prefix(p, k, v, mask, bias)

  scale = score_scale(cfg)
  if _use_fused(cfg) and cache is None:
    # A plain causal mask goes in as is_causal (flash attention never builds [T, S]);
    # packed segments, prefixes and sliding windows need the explicit boolean mask.
    plain = (causal and segment_ids is None and prefix_len is None and not prefixed
             and not (local is not None and cfg.sliding_window))
    out = _fused_attention(q, k, v, None if plain else mask, bias, scale, cfg)
  elif cfg.attention_q_block and cache is None and causal and prefix_len is None and not prefixed:
    out = _causal_blocks(q, k.astype(dt), v.astype(dt), mask, bias, scale,
                         cfg.attention_q_block, cfg.attn_softcap)
  else:
    out = _xla_attention(q, k.astype(dt), v.astype(dt), mask, bias, scale, cfg.attn_softcap)
  y = dense(out, p['wo'], 'bthk,hkd->btd', dt)
  if 'bo' in p:
    y = y + p['bo'].astype(dt)
  return y, cache
