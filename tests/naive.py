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


def forward(params, tokens, cfg, segment_ids=None):
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
  x = P['embed'][tokens]
  if cfg.positions == 'learned':
    x = x + P['pos_embed'][pos]
  for l in range(cfg.n_layers):
    L = {k: {n: v[l] for n, v in d.items()} for k, d in P['layers'].items()}
    h = norm(L['ln1'], x, cfg.norm, cfg.norm_eps)
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
          allowed = [s for s in range(t + 1) if seg[b, s] == seg[b, t]]
          keys = [k[b, s, kvh] if cfg.positions != 'rope' else rope_one(k[b, s, kvh], pos[b, s], cfg.rope_theta)
                  for s in allowed]
          scores = np.array([qv @ kk for kk in keys]) / math.sqrt(hd)
          w = np.exp(scores - scores.max())
          w /= w.sum()
          out[b, t, head] = sum(wi * v[b, s, kvh] for wi, s in zip(w, allowed))
    x = x + np.einsum('bthk,hkd->btd', out, a['wo']) + (a['bo'] if 'bo' in a else 0)
    h = norm(L['ln2'], x, cfg.norm, cfg.norm_eps)
    m = L['mlp']
    u = h @ m['wi'] + (m['bi'] if 'bi' in m else 0)
    if 'wg' in m:
      g = h @ m['wg'] + (m['bg'] if 'bg' in m else 0)
      u = act(cfg.activation, g) * u
    else:
      u = act(cfg.activation, u)
    x = x + u @ m['wo'] + (m['bo'] if 'bo' in m else 0)
  x = norm(P['final_norm'], x, cfg.norm, cfg.norm_eps)
  W = P['embed'].T if cfg.tie_embeddings else P['lm_head']
  return (x @ W)[..., :cfg.vocab_size]
