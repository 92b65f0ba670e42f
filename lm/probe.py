"""Mechanistic probes of in-context learning (Olsson et al. 2022): attention patterns, induction /
prefix-matching, previous-token and copying scores per head, and the in-context-learning score.

  probs = attention_probs(params, tokens, cfg)      # [layers, B, heads, T, S] (T == S)
  induction_scores(probs, period)                   # [layers, heads], on repeated sequences
  copying_scores(params, cfg)                       # [layers, heads], OV-circuit eigenvalues
  icl_score(token_losses(params, tokens, cfg))      # loss late in the context minus early

`attention_probs` recomputes the softmax the model's attention takes, layer by layer, from the
same pieces lm.model runs (embed, layers.residual, layers.mlp, the attention mask / position
biases); the block output it rebuilds from these probabilities equals lm.model.hidden_states
(tests/test_probe.py), so the probes cannot drift from the model. Decoder-only models without
PEFT parameters (LoRA'd weights: merge them first, lm.peft).
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from lm import layers, model, moe
from lm.config import ModelConfig


def _check(params: dict, cfg: ModelConfig) -> None:
  if cfg.arch != 'decoder':
    raise ValueError('lm.probe reads decoder-only models.')
  if 'soft_prompt' in params or any(k in params['layers'] for k in ('adapter_attn', 'adapter_mlp')) \
      or 'prefix_k' in params['layers']['attn']:
    raise ValueError('lm.probe reads plain models; merge or drop PEFT parameters first (lm.peft).')


def _attention_with_probs(p: dict, x: jax.Array, cfg: ModelConfig, positions: jax.Array,
                          rel_table):
  """layers.attention without a cache, returning (output [B, T, d], probs [B, H, T, T] f32)."""
  dt = layers.dtype_of(cfg.dtype)
  q = layers.dense(x, p['wq'], 'btd,dhk->bthk', dt)
  k = layers.dense(x, p['wk'], 'btd,dhk->bthk', dt)
  v = layers.dense(x, p['wv'], 'btd,dhk->bthk', dt)
  if 'bq' in p:
    q, k, v = q + p['bq'].astype(dt), k + p['bk'].astype(dt), v + p['bv'].astype(dt)
  if cfg.positions == 'rope':
    q = layers.rope(q, positions, cfg.rope_theta)
    k = layers.rope(k, positions, cfg.rope_theta)
  mask = layers.attention_mask(positions, positions, causal=cfg.causal)
  bias = None
  if cfg.positions == 'alibi':
    dist = jnp.abs(positions[:, :, None] - positions[:, None, :]).astype(jnp.float32)
    bias = -layers.alibi_slopes(cfg.n_heads)[None, :, None, None] * dist[:, None]
  elif cfg.positions == 'relative':
    bias = layers.relative_bias(rel_table, positions, positions, not cfg.causal, cfg)
  b, t, h, hd = q.shape
  group = h // k.shape[2]                  # grouped-query: head i reads kv head i // group
  k, v = jnp.repeat(k, group, axis=2), jnp.repeat(v, group, axis=2)
  scores = jnp.einsum('bthd,bshd->bhts', q, k, preferred_element_type=jnp.float32)
  if cfg.scale_attention:
    scores = scores / math.sqrt(hd)
  if bias is not None:
    scores = scores + bias
  scores = jnp.where(mask[:, None], scores, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(scores, axis=-1)
  out = jnp.einsum('bhts,bshd->bthd', probs.astype(v.dtype), v)
  y = layers.dense(out, p['wo'], 'bthk,hkd->btd', dt)
  if 'bo' in p:
    y = y + p['bo'].astype(dt)
  return y, probs


def attention_probs(params: dict, tokens: jax.Array, cfg: ModelConfig, *,
                    return_hidden: bool = False):
  """Every layer's attention probabilities [L, B, H, T, T] (float32) for tokens [B, T].

  With return_hidden, also the final-normed hidden states rebuilt from them (they equal
  lm.model.hidden_states: the check that these are the probabilities the model uses)."""
  _check(params, cfg)
  b, t = tokens.shape
  positions = jnp.broadcast_to(jnp.arange(t), (b, t))
  x = model.embed(params, tokens, positions, cfg)
  rel = params.get('rel_bias')
  out = []
  for i in range(cfg.n_layers):
    p = jax.tree.map(lambda a: a[i], params['layers'])
    got = {}

    def attn(h):
      y, got['probs'] = _attention_with_probs(p['attn'], h, cfg, positions, rel)
      return y

    def mlp(h):
      return moe.moe_mlp(p['mlp'], h, cfg)[0] if cfg.moe_experts else layers.mlp(p['mlp'], h, cfg)

    if cfg.parallel_block:
      h = layers.norm(p['ln1'], x, cfg)
      x = x + attn(h) + mlp(h)
    else:
      x = layers.residual(p, 'ln1', x, attn, cfg)
      x = layers.residual(p, 'ln2', x, mlp, cfg)
    out.append(got['probs'])
  probs = jnp.stack(out)
  if not return_hidden:
    return probs
  if cfg.has_final_norm:
    x = layers.norm(params['final_norm'], x, cfg)
  return probs, x


# Repeated random tokens ----------------------------------------------------------------------
def repeated_tokens(key: jax.Array, batch: int, period: int, vocab: int, repeats: int = 2,
                    low: int = 0) -> jax.Array:
  """[batch, period * repeats] rows of `period` uniform tokens in [low, vocab), repeated."""
  r = jax.random.randint(key, (batch, period), low, vocab)
  return jnp.tile(r, (1, repeats)).astype(jnp.int32)


def _diagonal_mean(probs: jax.Array, offset: int, start: int) -> jax.Array:
  """Mean over queries t >= start of probs[..., t, t - offset]: [L, H] (averaged over B)."""
  t = probs.shape[-1]
  q = np.arange(start, t)
  q = q[(q - offset >= 0) & (q - offset < t)]
  vals = probs[..., q, q - offset]               # [L, B, H, n]
  return vals.mean(axis=(1, -1))


def induction_scores(probs: jax.Array, period: int) -> jax.Array:
  """Prefix-matching score per head [L, H] on tokens that repeat with `period`: the attention
  a query in a repeat pays to the token right after the previous occurrence of itself
  (key t - period + 1), averaged over queries t >= period. A perfect induction head scores 1;
  uniform causal attention scores mean_t 1 / (t + 1)."""
  return _diagonal_mean(probs, period - 1, period)


def previous_token_scores(probs: jax.Array) -> jax.Array:
  """Attention to the previous token (key t - 1) averaged over queries t >= 1: [L, H]."""
  return _diagonal_mean(probs, 1, 1)


def copying_scores(params: dict, cfg: ModelConfig) -> jax.Array:
  """Per-head copying score [L, H] (Elhage et al. 2021): of the OV circuit read from token
  embeddings to output logits, M_h = W_E W_V^h W_O^h W_U, the share of positive eigenvalues,
  sum(Re lambda) / sum(|lambda|), in [-1, 1]; 1: the head raises the logit of the token it
  attends to. Norms and positions are left out (a linear reading). The non-zero eigenvalues
  of M_h [V, V] are those of W_O W_U W_E W_V [head_dim, head_dim], so any vocabulary is cheap."""
  _check(params, cfg)
  emb = np.asarray(params['embed'], np.float64)[:cfg.vocab_size]            # [V, d]
  unemb = emb.T if cfg.tie_embeddings else np.asarray(params['lm_head'], np.float64)[:, :cfg.vocab_size]
  ue = unemb @ emb                                                             # [d, d]
  attn = params['layers']['attn']
  wv = np.asarray(attn['wv'], np.float64)        # [L, d, kv, hd]
  wo = np.asarray(attn['wo'], np.float64)        # [L, H, hd, d]
  group = cfg.n_heads // cfg.kv_heads
  out = np.zeros((cfg.n_layers, cfg.n_heads))
  for layer in range(cfg.n_layers):
    for h in range(cfg.n_heads):
      m = wo[layer, h] @ ue @ wv[layer, :, h // group]                         # [hd, hd]
      lam = np.linalg.eigvals(m)
      out[layer, h] = lam.real.sum() / max(np.abs(lam).sum(), 1e-30)
  return jnp.asarray(out, jnp.float32)


# In-context-learning score ---------------------------------------------------------------------
def token_losses(params: dict, tokens: jax.Array, cfg: ModelConfig) -> jax.Array:
  """Per-token next-token loss [B, T - 1]: entry t is -log p(tokens[t + 1] | tokens[:t + 1])."""
  logits, _ = model.forward(params, tokens[:, :-1], cfg)
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), -1)
  return -jnp.take_along_axis(logp, tokens[:, 1:, None], -1)[..., 0]


def icl_indices(length: int, early: int = 50, late: int = 500, reference: int = 512) -> tuple[int, int]:
  """Olsson et al.'s token indices 50 and 500 of a 512-token context, scaled to `length`."""
  scale = length / reference
  e = max(1, int(round(early * scale)))
  lt = min(length - 1, max(e + 1, int(round(late * scale))))
  return e, lt


def icl_score(losses, early: int | None = None, late: int | None = None, window: int = 0) -> float:
  """Mean loss at token index `late` minus mean loss at index `early` (Olsson et al. 2022): the
  more negative, the more the model gains from context. losses [B, T]; indices default to
  icl_indices(T); `window` > 0 averages indices within +-window of each (less noise)."""
  losses = np.asarray(losses, np.float64)
  t = losses.shape[-1]
  if early is None or late is None:
    early, late = icl_indices(t)
  if not 0 <= early < late < t:
    raise ValueError(f'icl_score needs 0 <= early < late < {t}, got {early}, {late}.')
  at = lambda i: losses[..., max(0, i - window):min(t, i + window + 1)].mean()
  return float(at(late) - at(early))
