"""A deliberately naive numpy decoder (loops over heads and positions): the reference the
jitted model is checked against. It reads our params dict but shares no code with lm/."""
import math

import numpy as np
from scipy.special import erf


def norm(p, x, kind, eps):
  if kind == 'layernorm':
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    y = (x - mu) / np.sqrt(var + eps)
  else:
    y = x / np.sqrt((x ** 2).mean(-1, keepdims=True) + eps)
  y = y * p['scale']
  return y + p['bias'] if 'bias' in p else y


def act(name, x):
  if name in ('gelu', 'geglu'):
    return 0.5 * x * (1 + erf(x / math.sqrt(2)))
  if name == 'gelu_tanh':
    return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))
  if name == 'relu':
    return np.maximum(x, 0)
  if name == 'swiglu':
    return x / (1 + np.exp(-x))
  raise ValueError(name)


def rope_one(v, pos, theta):
  """Rotate one head vector at one position: pairs (i, i + d/2) rotated by pos * theta^(-2i/d)."""
  d = v.shape[-1]
  out = np.empty_like(v)
  for i in range(d // 2):
    ang = pos * theta ** (-2 * i / d)
    a, b = v[i], v[i + d // 2]
    out[i] = a * math.cos(ang) - b * math.sin(ang)
    out[i + d // 2] = b * math.cos(ang) + a * math.sin(ang)
  return out


def alibi_slopes(n):
  """Press et al. 2022, written out for powers of two and the interleaving rule otherwise."""
  def pow2(m):
    return [2 ** (-8 * (i + 1) / m) for i in range(m)]
  p = 2 ** int(math.floor(math.log2(n)))
  return pow2(p) + pow2(2 * p)[0::2][:n - p]


def t5_bucket(rel, bidirectional, num_buckets, max_distance):
  """Mesh-TensorFlow's relative_position_bucket for one key - query offset, in plain Python."""
  ret, n = 0, -rel
  if bidirectional:
    num_buckets //= 2
    if n < 0:
      ret += num_buckets
    n = abs(n)
  else:
    n = max(n, 0)
  max_exact = num_buckets // 2
  if n < max_exact:
    return ret + n
  val = max_exact + int(math.log(n / max_exact) / math.log(max_distance / max_exact)
                        * (num_buckets - max_exact))
  return ret + min(val, num_buckets - 1)


def forward(params, tokens, cfg, segment_ids=None, prefix_len=None):
  """tokens [B, T] -> logits [B, T, vocab_size] (unpadded)."""
  P = {k: (np.asarray(v, np.float64) if not isinstance(v, dict) else v) for k, v in params.items()}
  to64 = lambda t: {k: (to64(v) if isinstance(v, dict) else np.asarray(v, np.float64)) for k, v in t.items()}
  P = to64(params)
  B, T = tokens.shape
  H, KV, hd = cfg.n_heads, cfg.kv_heads, cfg.head_dim
  seg = np.ones((B, T), int) if segment_ids is None else np.asarray(segment_ids)
  # positions restart at each segment
  pos = np.zeros((B, T), int)
  for b in range(B):
    for t in range(1, T):
      pos[b, t] = pos[b, t - 1] + 1 if seg[b, t] == seg[b, t - 1] else 0
  x = P['embed'][tokens] * (math.sqrt(cfg.d_model) if cfg.scale_embeddings else 1.0)
  if cfg.positions == 'learned':
    x = x + P['pos_embed'][pos]
  if cfg.positions == 'sinusoidal':
    pe = np.zeros((B, T, cfg.d_model))
    for b in range(B):
      for t in range(T):
        for i in range(cfg.d_model // 2):
          pe[b, t, 2 * i] = math.sin(pos[b, t] / 10000 ** (2 * i / cfg.d_model))
          pe[b, t, 2 * i + 1] = math.cos(pos[b, t] / 10000 ** (2 * i / cfg.d_model))
    x = x + pe
  if cfg.embed_norm:
    x = norm(P['embed_norm'], x, cfg.norm, cfg.norm_eps)
  slopes = alibi_slopes(H)
  alpha = (2 * cfg.n_layers) ** 0.25 if cfg.norm_position == 'deepnorm' else 1.0
  for l in range(cfg.n_layers):
    L = {k: {n: v[l] for n, v in d.items()} for k, d in P['layers'].items()}
    h = norm(L['ln1'], x, cfg.norm, cfg.norm_eps) if cfg.norm_position in ('pre', 'sandwich') else x
    a = L['attn']
    q = np.einsum('btd,dhk->bthk', h, a['wq']) + (a['bq'] if 'bq' in a else 0)
    k = np.einsum('btd,dhk->bthk', h, a['wk']) + (a['bk'] if 'bk' in a else 0)
    v = np.einsum('btd,dhk->bthk', h, a['wv']) + (a['bv'] if 'bv' in a else 0)
    out = np.zeros((B, T, H, hd))
    for b in range(B):
      for head in range(H):
        kvh = head // (H // KV)
        for t in range(T):
          qv = q[b, t, head]
          if cfg.positions == 'rope':
            qv = rope_one(qv, pos[b, t], cfg.rope_theta)
          visible = range(T) if not cfg.causal else [
              s for s in range(T) if s <= t or (prefix_len is not None and s < prefix_len[b])]
          allowed = [s for s in visible if seg[b, s] == seg[b, t]]
          keys = [k[b, s, kvh] if cfg.positions != 'rope' else rope_one(k[b, s, kvh], pos[b, s], cfg.rope_theta)
                  for s in allowed]
          scores = np.array([qv @ kk for kk in keys]) / (math.sqrt(hd) if cfg.scale_attention else 1.0)
          if cfg.positions == 'relative':
            bidi = not cfg.causal or prefix_len is not None
            scores = scores + np.array([P['rel_bias'][t5_bucket(pos[b, s] - pos[b, t], bidi, cfg.rel_buckets,
                                                                  cfg.rel_max_distance), head] for s in allowed])
          if cfg.positions == 'alibi':
            scores = scores - slopes[head] * np.array([abs(pos[b, t] - pos[b, s]) for s in allowed])
          w = np.exp(scores - scores.max())
          w /= w.sum()
          out[b, t, head] = sum(wi * v[b, s, kvh] for wi, s in zip(w, allowed))
    attn_out = np.einsum('bthk,hkd->btd', out, a['wo']) + (a['bo'] if 'bo' in a else 0)
    m = L['mlp']

    def mlp(h):
      u = h @ m['wi'] + (m['bi'] if 'bi' in m else 0)
      if 'wg' in m:
        g = h @ m['wg'] + (m['bg'] if 'bg' in m else 0)
        u = act(cfg.activation, g) * u
      else:
        u = act(cfg.activation, u)
      return u @ m['wo'] + (m['bo'] if 'bo' in m else 0)

    n = lambda key, v: norm(L[key], v, cfg.norm, cfg.norm_eps)
    if cfg.parallel_block:
      x = x + attn_out + mlp(h)
    elif cfg.norm_position == 'pre':
      x = x + attn_out
      x = x + mlp(n('ln2', x))
    elif cfg.norm_position == 'sandwich':
      x = x + n('ln1_out', attn_out)
      x = x + n('ln2_out', mlp(n('ln2', x)))
    else:  # post-LN and DeepNorm
      x = n('ln1', alpha * x + attn_out)
      x = n('ln2', alpha * x + mlp(x))
  if 'final_norm' in P:
    x = norm(P['final_norm'], x, cfg.norm, cfg.norm_eps)
  W = P['embed'].T if cfg.tie_embeddings else P['lm_head']
  return (x @ W)[..., :cfg.vocab_size]
