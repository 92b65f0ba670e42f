"""Pooled heads on the transformer's hidden states: sequence classification and scalar
(reward, value) outputs.

  head = heads.init(cfg, 1, key)                        # reward head, std 1/sqrt(d_model + 1)
  scores = heads.score(params, head, tokens, mask, cfg)  # [B, 1] float32, last real token

InstructGPT's reward model reads the final token's hidden state through a linear head
initialised N(0, 1/(d_model + 1)); a PPO value head starts at zero (init_std=0).
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from lm import layers, model
from lm.config import ConfigError, ModelConfig
from lm.layers import Spec

POOLINGS = ('last', 'mean')


def specs(cfg: ModelConfig, num_outputs: int, init_std: float | None = None) -> dict:
  std = 1 / math.sqrt(cfg.d_model + 1) if init_std is None else init_std
  return {'w': Spec((cfg.d_model, num_outputs), ('embed', None), std=std),
          'b': Spec((num_outputs,), (None,), 'zeros')}


def logical_axes(cfg: ModelConfig, num_outputs: int) -> dict:
  return jax.tree.map(lambda s: s.axes, specs(cfg, num_outputs),
                      is_leaf=lambda x: isinstance(x, Spec))


def init(cfg: ModelConfig, num_outputs: int, key: jax.Array, init_std: float | None = None) -> dict:
  return layers.init_from_specs(specs(cfg, num_outputs, init_std), key, jnp.dtype(cfg.param_dtype))


def _mask(mask_or_lengths: jax.Array, t: int) -> jax.Array:
  m = jnp.asarray(mask_or_lengths)
  if m.ndim == 1:   # lengths of right-padded rows
    return jnp.arange(t)[None, :] < m[:, None]
  return m.astype(bool)


def pool(hidden: jax.Array, mask_or_lengths: jax.Array, how: str = 'last') -> jax.Array:
  """[B, T, d] -> [B, d]: the last real token, or the mean over real tokens.

  mask_or_lengths: a [B, T] mask (1 = real token; any padding, left or right) or [B]
  lengths of right-padded rows. A row with no real token pools position T-1 (or zeros)."""
  mask = _mask(mask_or_lengths, hidden.shape[1])
  if how == 'last':
    last = hidden.shape[1] - 1 - jnp.argmax(mask[:, ::-1], axis=1)   # last True per row
    return jnp.take_along_axis(hidden, last[:, None, None], axis=1)[:, 0]
  if how == 'mean':
    w = mask.astype(jnp.float32)[..., None]
    return (hidden.astype(jnp.float32) * w).sum(1) / jnp.maximum(w.sum(1), 1.0)
  raise ConfigError(f'Pooling {how!r} is not supported; choose one of {POOLINGS}.')


def apply(head_params: dict, pooled: jax.Array) -> jax.Array:
  """[B, d] -> [B, num_outputs] in float32."""
  w = head_params['w'].astype(jnp.float32)
  return pooled.astype(jnp.float32) @ w + head_params['b'].astype(jnp.float32)


def score(params: dict, head_params: dict, tokens: jax.Array, mask_or_lengths: jax.Array,
          cfg: ModelConfig, how: str = 'last', **kwargs) -> jax.Array:
  """model.hidden_states -> pool -> head: [B, num_outputs] float32.

  Given a [B, T] mask and no positions/segment_ids in kwargs, real tokens are numbered
  from 0 and padding is kept out of their attention (segment 0), so a left-padded row
  scores as if unpadded. Prompt-tuned params (a soft prompt) take no segment ids: pass
  lengths of right-padded rows instead.
  """
  m = jnp.asarray(mask_or_lengths)
  if m.ndim == 2 and 'positions' not in kwargs and 'segment_ids' not in kwargs:
    m = m.astype(jnp.int32)
    kwargs['positions'] = jnp.maximum(jnp.cumsum(m, axis=1) - 1, 0)
    kwargs['segment_ids'] = m
  h = model.hidden_states(params, tokens, cfg, **kwargs)[0]
  return apply(head_params, pool(h, mask_or_lengths, how))
