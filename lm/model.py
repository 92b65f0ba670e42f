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

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from lm import layers, moe, sharding
from lm.config import ModelConfig
from lm.layers import Spec

REMAT_POLICIES = {
    'full': jax.checkpoint_policies.nothing_saveable,
    'dots': jax.checkpoint_policies.checkpoint_dots,
    'dots_no_batch': jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


# Parameters ---------------------------------------------------------------------------
def layer_specs(cfg: ModelConfig, cross_attention: bool = False) -> dict:
  """One block's params; cross_attention adds an encoder-decoder's decoder sublayer."""
  # GPT-2's scaled init of the residual projections: std / sqrt(2 * n_layers).
  out_std = cfg.init_std / math.sqrt(2 * cfg.n_layers)
  specs = {'attn': layers.attention_specs(cfg, out_std),
           'mlp': moe.moe_specs(cfg, out_std) if cfg.moe_experts else layers.mlp_specs(cfg, out_std),
           **layers.sublayer_norm_specs(cfg, 'ln1'), **layers.sublayer_norm_specs(cfg, 'ln2')}
  if cross_attention:
    specs['cross'] = layers.attention_specs(cfg, out_std)
    specs.update(layers.sublayer_norm_specs(cfg, 'ln_cross'))
  if cfg.parallel_block:
    del specs['ln2']          # one norm feeds both branches
  if cfg.norm_position == 'deepnorm':
    # DeepNet init: the value, output and MLP weights scaled by beta = (8N)^(-1/4).
    beta = (8 * cfg.n_layers) ** -0.25
    for group, names in (('attn', ('wv', 'wo')), ('mlp', ('wi', 'wg', 'wo'))):
      for n in names:
        if n in specs[group]:
          specs[group][n] = dataclasses.replace(specs[group][n], std=cfg.init_std * beta)
  return specs


def param_specs(cfg: ModelConfig) -> dict:
  if cfg.arch == 'encoder_decoder':
    from lm import encdec  # encdec builds on this module; import late to avoid a cycle
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
def embed(params: dict, tokens: jax.Array, positions: jax.Array, cfg: ModelConfig,
          soft_prompt: jax.Array | None = None) -> jax.Array:
  """Token embeddings (+ positions); a soft prompt [L, d] goes before them (positions
  must then cover L + T) and is treated like embedded tokens."""
  # Gather from a table split only along 'embed' (vocab all-gathered): XLA cannot gather
  # efficiently from a vocab-split table.
  table = sharding.constrain(params['embed'], (None, 'embed'))
  x = table.astype(cfg.dtype)[tokens]
  if soft_prompt is not None:
    rows = jnp.broadcast_to(soft_prompt.astype(x.dtype), (x.shape[0], *soft_prompt.shape))
    x = jnp.concatenate([rows, x], 1)
  if cfg.scale_embeddings:
    x = x * math.sqrt(cfg.d_model)
  if cfg.positions == 'learned':
    x = x + params['pos_embed'].astype(cfg.dtype)[positions]
  elif cfg.positions == 'sinusoidal':
    x = x + layers.sinusoidal(positions, cfg.d_model).astype(cfg.dtype)
  if cfg.embed_norm:
    x = layers.norm(params['embed_norm'], x, cfg)
  return sharding.constrain(x, ('batch', 'length', 'embed'))


def block(p: dict, x: jax.Array, cfg: ModelConfig, positions, segment_ids, cache, cache_index,
          prefix_len=None, rel_table=None, local=None):
  """One residual block: attention then MLP, each wrapped by layers.residual (the norm
  placement), or with cfg.parallel_block x + attn(norm(x)) + mlp(norm(x)) (GPT-J, PaLM).
  Bottleneck adapters (lm.peft), when p has them, adapt each sublayer's output. `local`
  (this layer's entry of the scanned flags) marks a sliding-window layer."""
  aux = {}

  def attn(h):
    nonlocal cache
    y, cache = layers.attention(p['attn'], h, cfg, positions, segment_ids, cache, cache_index,
                                prefix_len, rel_table=rel_table, local=local)
    return layers.bottleneck_adapter(p['adapter_attn'], y, cfg) if 'adapter_attn' in p else y

  def mlp(h):
    nonlocal aux
    if cfg.moe_experts:
      y, aux = moe.moe_mlp(p['mlp'], h, cfg)
    else:
      y = layers.mlp(p['mlp'], h, cfg)
    return layers.bottleneck_adapter(p['adapter_mlp'], y, cfg) if 'adapter_mlp' in p else y

  if cfg.parallel_block:
    h = layers.norm(p['ln1'], x, cfg)
    x = x + attn(h) + mlp(h)
  else:
    x = layers.residual(p, 'ln1', x, attn, cfg)
    x = layers.residual(p, 'ln2', x, mlp, cfg)
  return sharding.constrain(x, ('batch', 'length', 'embed')), cache, aux


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


def scan_unroll(cfg: ModelConfig):
  """Layers per scan iteration: cfg.scan_unroll, or by default all of them on CPU for <= 8
  layers (fastest step there) and 1 elsewhere (compile time flat in depth)."""
  if cfg.scan_unroll:
    return cfg.scan_unroll
  return True if cfg.n_layers <= 8 and jax.default_backend() == 'cpu' else 1


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
  real token (left-padded batches, lm.decode); by default slot s is position s.
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

  if cfg.remat != 'none':
    body = jax.checkpoint(body, policy=REMAT_POLICIES[cfg.remat], prevent_cse=False)
  # MoE layers report auxiliary losses; they are summed over layers in the scan carry.
  zero_aux = ({k: jnp.zeros((), jnp.float32) for k in
               ('moe_balance_loss', 'moe_z_loss', 'moe_dropped_fraction')} if cfg.moe_experts else {})
  # Unrolling lets XLA drop the loop's stacked-residual buffers and their dynamic slices
  # (~10% of a CPU step); scan_unroll=1 keeps compile time flat in depth.
  (x, aux), cache = jax.lax.scan(body, (x, zero_aux), (params['layers'], cache, layer_flags(cfg)),
                                 unroll=scan_unroll(cfg))
  if soft is not None:
    x = x[:, soft.shape[0]:]   # drop the prompt positions: outputs stay [B, T, ...]
  if cfg.has_final_norm:
    x = layers.norm(params['final_norm'], x, cfg)
  if return_aux:
    return x, cache, {k: v / cfg.n_layers for k, v in aux.items()}
  return x, cache


def logits_from_hidden(params: dict, h: jax.Array, cfg: ModelConfig) -> jax.Array:
  """Output logits in float32; padded vocabulary entries are masked to -inf-ish."""
  dt = jnp.dtype(cfg.dtype)
  if cfg.tie_embeddings:
    logits = layers.dense(h, params['embed'], 'btd,vd->btv', dt)
  else:
    logits = layers.dense(h, params['lm_head'], 'btd,dv->btv', dt)
  logits = logits.astype(jnp.float32)
  if cfg.final_softcap:   # Gemma-2
    logits = jnp.tanh(logits / cfg.final_softcap) * cfg.final_softcap
  if cfg.padded_vocab != cfg.vocab_size:
    valid = jnp.arange(cfg.padded_vocab) < cfg.vocab_size
    logits = jnp.where(valid, logits, jnp.finfo(jnp.float32).min)
  return logits


def forward(params: dict, tokens: jax.Array, cfg: ModelConfig, **kwargs):
  """tokens [B, T] -> (logits [B, T, padded_vocab] float32, cache[, aux if return_aux])."""
  h, *rest = hidden_states(params, tokens, cfg, **kwargs)
  return (logits_from_hidden(params, h, cfg), *rest)
