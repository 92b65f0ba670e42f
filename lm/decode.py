"""Autoregressive decoding with a KV cache: prefill the prompt once, then one token per step.

The whole loop (prefill + lax.scan over new tokens) is one jitted function. Samplers
are pure functions of (logits, key), so new ones (nucleus, beam search...) slot in.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from lm import model
from lm.config import ConfigError, ModelConfig


def init_cache(cfg: ModelConfig, batch: int, max_len: int) -> dict:
  """Per-layer keys/values, stacked like the params: [layers, B, max_len, kv_heads, head_dim]."""
  shape = (cfg.n_layers, batch, max_len, cfg.kv_heads, cfg.head_dim)
  return {'k': jnp.zeros(shape, cfg.dtype), 'v': jnp.zeros(shape, cfg.dtype)}


def sample_logits(logits: jax.Array, key: jax.Array, temperature: float = 1.0,
                  top_k: int = 0) -> jax.Array:
  """Greedy (temperature 0), or sampling from softmax(logits / T) restricted to the top k."""
  if temperature == 0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits / temperature
  if top_k:
    kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
    logits = jnp.where(logits < kth, jnp.finfo(logits.dtype).min, logits)
  return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=('cfg', 'max_new_tokens', 'temperature', 'top_k'))
def generate(params: dict, prompt: jax.Array, key: jax.Array, *, cfg: ModelConfig,
             max_new_tokens: int, temperature: float = 1.0, top_k: int = 0) -> jax.Array:
  """prompt [B, P] int32 -> [B, P + max_new_tokens]: the prompt followed by sampled tokens.

  Within the context (P + max_new_tokens <= max_seq_len) it decodes with a KV cache.
  Beyond it, like nanoGPT's sampler, each token is predicted from the last max_seq_len
  tokens by a full forward pass (a sliding window; slower, but any length works).
  """
  b, p = prompt.shape
  if p + max_new_tokens > cfg.max_seq_len:
    return _generate_sliding(params, prompt, key, cfg, max_new_tokens, temperature, top_k)
  total = p + max_new_tokens
  cache = init_cache(cfg, b, total)
  logits, cache = model.forward(params, prompt, cfg, cache=cache, cache_index=jnp.int32(0))
  first = sample_logits(logits[:, -1], jax.random.fold_in(key, 0), temperature, top_k)

  def step(carry, i):
    cache, tok = carry
    logits, cache = model.forward(params, tok[:, None], cfg, cache=cache, cache_index=p + i)
    nxt = sample_logits(logits[:, -1], jax.random.fold_in(key, i + 1), temperature, top_k)
    return (cache, nxt), tok

  (_, last), toks = jax.lax.scan(step, (cache, first), jnp.arange(max_new_tokens - 1))
  new = jnp.concatenate([toks.T, last[:, None]], axis=1) if max_new_tokens > 1 else first[:, None]
  return jnp.concatenate([prompt, new], axis=1)


def _generate_sliding(params, prompt, key, cfg, max_new_tokens, temperature, top_k):
  b, p = prompt.shape
  w = cfg.max_seq_len
  # Left-pad into a window buffer; `filled` counts real tokens so padding is never attended.
  buf = jnp.zeros((b, w), prompt.dtype)
  keep = min(p, w)
  buf = buf.at[:, w - keep:].set(prompt[:, p - keep:])

  def step(carry, i):
    buf, filled = carry
    start = w - filled
    pos = jnp.broadcast_to(jnp.maximum(jnp.arange(w) - start, 0), (b, w))
    seg = jnp.broadcast_to((jnp.arange(w) >= start).astype(jnp.int32), (b, w))
    logits, _ = model.forward(params, buf, cfg, positions=pos, segment_ids=seg)
    nxt = sample_logits(logits[:, -1], jax.random.fold_in(key, i), temperature, top_k)
    buf = jnp.concatenate([buf[:, 1:], nxt[:, None]], axis=1)
    return (buf, jnp.minimum(filled + 1, w)), nxt

  _, new = jax.lax.scan(step, (buf, jnp.int32(keep)), jnp.arange(max_new_tokens))
  return jnp.concatenate([prompt, new.T], axis=1)


def check_length(cfg: ModelConfig, prompt_len: int, max_new_tokens: int) -> None:
  if prompt_len > cfg.max_seq_len:
    raise ConfigError(f'The prompt has {prompt_len} tokens, more than the model context '
                      f'model.max_seq_len={cfg.max_seq_len}; shorten it.')
