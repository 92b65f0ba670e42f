"""Mixture-of-experts feed-forward: top-k routing with a capacity limit (GShard / Switch).

Each token picks its k highest-probability experts. Every expert takes at most
C = ceil(k * tokens / experts * capacity_factor) tokens; choices beyond that are
dropped (the token's MLP output is then just the other experts', or zero, and the
residual carries it), and the dropped fraction is reported. Dispatch and combine are
dense one-hot einsums, so the expert dimension shards over the 'expert' mesh axis
through the same rules table as everything else.

Auxiliary losses: Switch's load-balancing loss E * sum_e f_e * P_e (Fedus et al. 2021)
and the router z-loss mean(logsumexp(logits)^2) (Zoph et al. 2022).
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from lm import layers, sharding
from lm.config import ModelConfig
from lm.layers import Spec


def moe_specs(cfg: ModelConfig, out_std: float) -> dict[str, Spec]:
  e, d, f = cfg.moe_experts, cfg.d_model, cfg.ff_dim
  specs = {'router': Spec((d, e), ('embed', None), std=cfg.init_std),
           'wi': Spec((e, d, f), ('expert', 'embed', 'mlp'), std=cfg.init_std),
           'wo': Spec((e, f, d), ('expert', 'mlp', 'embed'), std=out_std)}
  if cfg.gated:
    specs['wg'] = Spec((e, d, f), ('expert', 'embed', 'mlp'), std=cfg.init_std)
  return specs


def capacity(cfg: ModelConfig, n_tokens: int) -> int:
  return max(1, math.ceil(cfg.moe_top_k * n_tokens / cfg.moe_experts * cfg.moe_capacity_factor))


def route(logits: jax.Array, k: int, cap: int):
  """Top-k routing with capacity. logits [N, E] float32 ->
  (dispatch [N, E, C] bool, combine [N, E, C] float32, aux metrics)."""
  n, e = logits.shape
  probs = jax.nn.softmax(logits, axis=-1)
  gates, experts = jax.lax.top_k(probs, k)                       # [N, k]
  onehot = jax.nn.one_hot(experts, e, dtype=jnp.int32)           # [N, k, E]
  # Queue position of each (token, choice) in its expert: first choices of all tokens
  # come before second choices (GShard's priority), then token order.
  flat = onehot.transpose(1, 0, 2).reshape(k * n, e)
  position = (jnp.cumsum(flat, axis=0) - 1).reshape(k, n, e).transpose(1, 0, 2)
  position = jnp.sum(position * onehot, axis=-1)                 # [N, k]
  keep = position < cap
  slot = jax.nn.one_hot(jnp.where(keep, position, cap), cap + 1, dtype=jnp.float32)[..., :cap]
  dispatch = jnp.einsum('nke,nkc->nec', onehot.astype(jnp.float32), slot)
  combine = jnp.einsum('nke,nkc,nk->nec', onehot.astype(jnp.float32), slot, gates)
  top1 = jax.nn.one_hot(experts[:, 0], e, dtype=jnp.float32)
  balance = e * jnp.sum(top1.mean(0) * probs.mean(0))
  z = jnp.mean(jax.nn.logsumexp(logits, axis=-1) ** 2)
  aux = {'moe_balance_loss': balance, 'moe_z_loss': z,
         'moe_dropped_fraction': 1.0 - keep.astype(jnp.float32).mean()}
  return dispatch > 0, combine, aux


def moe_mlp(p: dict, x: jax.Array, cfg: ModelConfig):
  """x [B, T, D] -> (y [B, T, D], aux metrics)."""
  dt = layers.dtype_of(cfg.dtype)
  b, t, d = x.shape
  tokens = x.reshape(b * t, d)
  logits = jnp.einsum('nd,de->ne', tokens.astype(jnp.float32), p['router'].astype(jnp.float32))
  dispatch, combine, aux = route(logits, cfg.moe_top_k, capacity(cfg, b * t))
  xe = jnp.einsum('nec,nd->ecd', dispatch.astype(dt), tokens.astype(dt))
  xe = sharding.constrain(xe, ('expert', None, 'embed'))
  h = jnp.einsum('ecd,edf->ecf', xe, p['wi'].astype(dt))
  if cfg.gated:
    g = jnp.einsum('ecd,edf->ecf', xe, p['wg'].astype(dt))
    h = layers.activation(cfg.activation, g) * h
  else:
    h = layers.activation(cfg.activation, h)
  ye = jnp.einsum('ecf,efd->ecd', h, p['wo'].astype(dt))
  y = jnp.einsum('nec,ecd->nd', combine.astype(dt), ye)
  return y.reshape(b, t, d), aux
