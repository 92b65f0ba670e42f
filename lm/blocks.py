"""The pieces of the layer stack that the decoder-only model (lm/model.py) and the
encoder-decoder (lm/encdec.py) share: one block's params, the residual block, token
embeddings, the output logits, and how the stacked layers are scanned (remat, unroll).
Both import this module; neither imports the other's internals."""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from lm import layers, moe, sharding
from lm.config import ModelConfig

REMAT_POLICIES = {
    'full': jax.checkpoint_policies.nothing_saveable,
    'dots': jax.checkpoint_policies.checkpoint_dots,
    'dots_no_batch': jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


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


def scan_unroll(cfg: ModelConfig):
  """Layers per scan iteration: cfg.scan_unroll, or by default all of them on CPU for <= 8
  layers (fastest step there) and 1 elsewhere (compile time flat in depth)."""
  if cfg.scan_unroll:
    return cfg.scan_unroll
  return True if cfg.n_layers <= 8 and jax.default_backend() == 'cpu' else 1


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
