"""The decoder-only transformer as pure functions over a nested dict of params.

  params = init(cfg, key)                  # plain dict of arrays
  axes   = logical_axes(cfg)               # same tree, a tuple of logical names per leaf
  logits, _ = forward(params, tokens, cfg) # [B, T, padded_vocab] float32

Layers are stacked on a leading 'layers' axis and run with `lax.scan` (remat applies per
layer); cfg.scan_unroll trades compile time for step time. Where layers differ (Mistral's and
Gemma's sliding-window layers, Gemma-3's local RoPE base), a [n_layers] flag array is scanned
beside the params (layer_flags): one body, never unrolled copies.
"""
from __future__ import annotations


import jax
import jax.numpy as jnp
import numpy as np

from lm import encdec, layers
# The shared layer stack, re-exported: model.embed, model.block, ... are the public names.
from lm.blocks import (REMAT_POLICIES, block, embed, layer_specs, logits_from_hidden,  # noqa: F401
                       scan_unroll)
from lm.config import ModelConfig
from lm.layers import Spec


# Parameters ---------------------------------------------------------------------------
def param_specs(cfg: ModelConfig) -> dict:
  if cfg.arch == 'encoder_decoder':
    return encdec.param_specs(cfg)
  specs = {
      'embed': Spec((cfg.padded_vocab, cfg.d_model), ('vocab', 'embed'), std=cfg.init_std),
      'layers': jax.tree.map(lambda s: s.stacked(cfg.n_layers), layer_specs(cfg),
                             is_leaf=lambda x: isinstance(x, Spec)),
  }
  if cfg.has_final_norm:
    specs['final_norm'] = layers.norm_specs(cfg)
  if cfg.embed_norm:
    specs['embed_norm'] = layers.norm_specs(cfg)
  if cfg.positions == 'learned':
    specs['pos_embed'] = Spec((cfg.max_seq_len, cfg.d_model), (None, 'embed'), std=cfg.init_std)
  if cfg.positions == 'relative':  # one T5 bias table shared by all layers
    specs['rel_bias'] = layers.relative_bias_spec(cfg)
  if not cfg.tie_embeddings:
    specs['lm_head'] = Spec((cfg.d_model, cfg.padded_vocab), ('embed', 'vocab'), std=cfg.init_std)
  return specs


def _is_spec(x):
  return isinstance(x, Spec)


def logical_axes(cfg: ModelConfig) -> dict:
  return jax.tree.map(lambda s: s.axes, param_specs(cfg), is_leaf=_is_spec)


init_from_specs = layers.init_from_specs


def init(cfg: ModelConfig, key: jax.Array) -> dict:
  return init_from_specs(param_specs(cfg), key, jnp.dtype(cfg.param_dtype))


# Forward ------------------------------------------------------------------------------
def _soft_prompt_inputs(soft, b, t, positions, segment_ids, cache, cache_index, prefix_len,
                        kv_positions, kv_mask):
  """Prompt tuning (Lester et al. 2021): params['soft_prompt'] [L, d] goes before the token
  embeddings, so real tokens sit at positions L, L+1, ... and see the prompt.

  With a KV cache the prompt fills slots 0..L-1 on the prefill call, recognised by a
  concrete cache_index of 0 (pass the Python int 0 under jit); any other call, including
  one with a traced cache_index, is a decode step writing token slot cache_index + L. So
  the cache needs L extra slots (kv_positions / kv_mask describe the token slots only).
  Returns (prompt, or None when it is already cached, positions, cache_index, prefix_len,
  kv_positions, kv_mask) in the prompt-shifted coordinates.
  """
  if segment_ids is not None:
    raise ValueError('A soft prompt (prompt tuning) does not support packed segment_ids; '
                     'feed one sequence per row.')
  n = soft.shape[0]
  shift = lambda a: None if a is None else a + n
  if kv_positions is not None:
    if cache['k'].shape[2] != n + kv_positions.shape[1]:
      raise ValueError(f'The KV cache has {cache["k"].shape[2]} slots but the soft prompt needs '
                       f'{n} besides the {kv_positions.shape[1]} token slots; allocate {n} more.')
    kv_positions = jnp.concatenate([jnp.broadcast_to(jnp.arange(n), (b, n)), kv_positions + n], 1)
    if kv_mask is not None:
      kv_mask = jnp.concatenate([jnp.ones((b, n), bool), kv_mask.astype(bool)], 1)
  prefill = cache is None or (not isinstance(cache_index, jax.core.Tracer)
                              and bool(np.all(np.asarray(cache_index) == 0)))
  if not prefill:
    return None, shift(positions), cache_index + n, shift(prefix_len), kv_positions, kv_mask
  if positions is None:
    start = 0 if cache_index is None else cache_index
    positions = jnp.broadcast_to(start + jnp.arange(t), (b, t))
  positions = jnp.concatenate([jnp.broadcast_to(jnp.arange(n), (b, n)), positions + n], 1)
  return soft, positions, cache_index, shift(prefix_len), kv_positions, kv_mask


def layer_flags(cfg: ModelConfig) -> jax.Array | None:
  """[n_layers] bool scanned beside the stacked params: which layers are sliding-window
  (local) ones. None when no layer differs from the plain model, so the scan is unchanged."""
  if not (cfg.sliding_window or cfg.rope_local_theta):
    return None
  return jnp.asarray(cfg.local_layers, bool)


def hidden_states(params: dict, tokens: jax.Array, cfg: ModelConfig, *,
                  positions: jax.Array | None = None, segment_ids: jax.Array | None = None,
                  cache: dict | None = None, cache_index: jax.Array | None = None,
                  prefix_len: jax.Array | None = None, return_aux: bool = False,
                  kv_positions: jax.Array | None = None, kv_mask: jax.Array | None = None):
  """Final-normed hidden states [B, T, d_model] (and the updated KV cache, if given).

  positions default to 0..T-1 (offset by cache_index when decoding); segment_ids, if
  given, keep packed documents from attending across each other. With a cache,
  kv_positions / kv_mask [B, S] give every cache slot's position and whether it holds a
  real token (left-padded batches, lm.decode); by default slot s is position s. The cache
  {'k','v'} [layers, B, S, kv_heads, head_dim] is carried through the layer scan and updated
  in place (only the new rows are written), so jit callers may donate it.
  """
  if cfg.arch != 'decoder':
    raise ValueError('lm.model runs decoder-only models; use lm.encdec for an encoder-decoder.')
  b, t = tokens.shape
  soft = params.get('soft_prompt')
  if soft is not None:   # prompt tuning (lm.peft)
    soft, positions, cache_index, prefix_len, kv_positions, kv_mask = _soft_prompt_inputs(
        soft, b, t, positions, segment_ids, cache, cache_index, prefix_len, kv_positions, kv_mask)
  if positions is None:
    start = 0 if cache_index is None else cache_index
    positions = jnp.broadcast_to(start + jnp.arange(t), (b, t))
  x = embed(params, tokens, positions, cfg, soft)

  def body(carry, layer):
    x, aux_sum = carry
    p, c, local = layer
    if kv_positions is not None:  # per-row slot positions ride along with each layer's cache
      c = {**c, 'kv_pos': kv_positions, 'kv_mask': kv_mask}
    x, c, aux = block(p, x, cfg, positions, segment_ids, c, cache_index, prefix_len,
                      params.get('rel_bias'), local)
    return (x, jax.tree.map(jnp.add, aux_sum, aux)), c

  def cached_body(carry, layer):
    # The stacked cache rides in the carry: each layer writes its new K/V rows in place at
    # (layer, :, cache_index) and reads its own slice (layers._write_cache), so a decode step
    # costs the rows it writes, not a copy of the whole [L, B, S, ...] stack through xs / ys.
    (x, aux_sum), stack = carry
    p, i, local = layer
    c = {**stack, 'layer': i}
    if kv_positions is not None:
      c.update(kv_pos=kv_positions, kv_mask=kv_mask)
    x, stack, aux = block(p, x, cfg, positions, segment_ids, c, cache_index, prefix_len,
                          params.get('rel_bias'), local)
    return ((x, jax.tree.map(jnp.add, aux_sum, aux)), stack), None

  if cfg.remat != 'none':
    body = jax.checkpoint(body, policy=REMAT_POLICIES[cfg.remat], prevent_cse=False)
    cached_body = jax.checkpoint(cached_body, policy=REMAT_POLICIES[cfg.remat], prevent_cse=False)
  # MoE layers report auxiliary losses; they are summed over layers in the scan carry.
  zero_aux = ({k: jnp.zeros((), jnp.float32) for k in
               ('moe_balance_loss', 'moe_z_loss', 'moe_dropped_fraction')} if cfg.moe_experts else {})
  # Unrolling lets XLA drop the loop's stacked-residual buffers and their dynamic slices
  # (~10% of a CPU step); scan_unroll=1 keeps compile time flat in depth.
  if cache is None:
    (x, aux), cache = jax.lax.scan(body, (x, zero_aux), (params['layers'], None, layer_flags(cfg)),
                                   unroll=scan_unroll(cfg))
  else:
    ((x, aux), cache), _ = jax.lax.scan(
        cached_body, ((x, zero_aux), {'k': cache['k'], 'v': cache['v']}),
        (params['layers'], jnp.arange(cfg.n_layers, dtype=jnp.int32), layer_flags(cfg)),
        unroll=scan_unroll(cfg))
  if soft is not None:
    x = x[:, soft.shape[0]:]   # drop the prompt positions: outputs stay [B, T, ...]
  if cfg.has_final_norm:
    x = layers.norm(params['final_norm'], x, cfg)
  if return_aux:
    return x, cache, {k: v / cfg.n_layers for k, v in aux.items()}
  return x, cache


def forward(params: dict, tokens: jax.Array, cfg: ModelConfig, **kwargs):
  """tokens [B, T] -> (logits [B, T, padded_vocab] float32, cache[, aux if return_aux])."""
  h, *rest = hidden_states(params, tokens, cfg, **kwargs)
  return (logits_from_hidden(params, h, cfg), *rest)
