"""The decoder-only transformer as pure functions over a nested dict of params.

  params = init(cfg, key)                  # plain dict of arrays
  axes   = logical_axes(cfg)               # same tree, a tuple of logical names per leaf
  logits, _ = forward(params, tokens, cfg) # [B, T, padded_vocab] float32

Layers are stacked on a leading 'layers' axis and run with `lax.scan` (remat applies per
layer); cfg.scan_unroll trades compile time for step time.
"""
from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp

from lm import layers, moe, sharding
from lm.config import ModelConfig
from lm.layers import Spec

REMAT_POLICIES = {
    'full': jax.checkpoint_policies.nothing_saveable,
    'dots': jax.checkpoint_policies.checkpoint_dots,
    'dots_no_batch': jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


# Parameters ---------------------------------------------------------------------------
def layer_specs(cfg: ModelConfig) -> dict:
  # GPT-2's scaled init of the residual projections: std / sqrt(2 * n_layers).
  out_std = cfg.init_std / math.sqrt(2 * cfg.n_layers)
  specs = {'ln1': layers.norm_specs(cfg),
           'attn': layers.attention_specs(cfg, out_std),
           'ln2': layers.norm_specs(cfg),
           'mlp': moe.moe_specs(cfg, out_std) if cfg.moe_experts else layers.mlp_specs(cfg, out_std)}
  if cfg.parallel_block:
    del specs['ln2']          # one norm feeds both branches
  if cfg.norm_position == 'sandwich':
    specs['ln1_out'] = layers.norm_specs(cfg)
    specs['ln2_out'] = layers.norm_specs(cfg)
  if cfg.norm_position == 'deepnorm':
    # DeepNet init: the value, output and MLP weights scaled by beta = (8N)^(-1/4).
    beta = (8 * cfg.n_layers) ** -0.25
    for group, names in (('attn', ('wv', 'wo')), ('mlp', ('wi', 'wg', 'wo'))):
      for n in names:
        if n in specs[group]:
          specs[group][n] = dataclasses.replace(specs[group][n], std=cfg.init_std * beta)
  return specs


def param_specs(cfg: ModelConfig) -> dict:
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
  if not cfg.tie_embeddings:
    specs['lm_head'] = Spec((cfg.d_model, cfg.padded_vocab), ('embed', 'vocab'), std=cfg.init_std)
  return specs


def _is_spec(x):
  return isinstance(x, Spec)


def logical_axes(cfg: ModelConfig) -> dict:
  return jax.tree.map(lambda s: s.axes, param_specs(cfg), is_leaf=_is_spec)


def init_from_specs(specs, key: jax.Array, param_dtype) -> dict:
  """Materialise a tree of Specs; leaf i gets fold_in(key, i), so init is deterministic."""
  leaves, treedef = jax.tree.flatten(specs, is_leaf=_is_spec)
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


def init(cfg: ModelConfig, key: jax.Array) -> dict:
  return init_from_specs(param_specs(cfg), key, jnp.dtype(cfg.param_dtype))


# Forward ------------------------------------------------------------------------------
def embed(params: dict, tokens: jax.Array, positions: jax.Array, cfg: ModelConfig) -> jax.Array:
  # Gather from a table split only along 'embed' (vocab all-gathered): XLA cannot gather
  # efficiently from a vocab-split table.
  table = sharding.constrain(params['embed'], (None, 'embed'))
  x = table.astype(cfg.dtype)[tokens]
  if cfg.positions == 'learned':
    x = x + params['pos_embed'].astype(cfg.dtype)[positions]
  elif cfg.positions == 'sinusoidal':
    x = x + layers.sinusoidal(positions, cfg.d_model).astype(cfg.dtype)
  if cfg.embed_norm:
    x = layers.norm(params['embed_norm'], x, cfg)
  return sharding.constrain(x, ('batch', 'length', 'embed'))


def block(p: dict, x: jax.Array, cfg: ModelConfig, positions, segment_ids, cache, cache_index,
          prefix_len=None):
  """One residual block; where the norms sit is cfg.norm_position:

    pre       x + f(norm(x))                 (GPT-2, LLaMA)
    post      norm(x + f(x))                 (original Transformer, BERT)
    sandwich  x + norm_out(f(norm(x)))       (CogView)
    deepnorm  norm(alpha * x + f(x))         (DeepNet; alpha = (2N)^(1/4))
  and with cfg.parallel_block: x + attn(norm(x)) + mlp(norm(x)) (GPT-J, PaLM).
  """
  norm = functools.partial(layers.norm, cfg=cfg)
  attn = lambda h: layers.attention(p['attn'], h, cfg, positions, segment_ids, cache, cache_index,
                                    prefix_len)
  aux = {}

  def mlp(h):
    nonlocal aux
    if cfg.moe_experts:
      y, aux = moe.moe_mlp(p['mlp'], h, cfg)
      return y
    return layers.mlp(p['mlp'], h, cfg)

  where = cfg.norm_position
  if cfg.parallel_block:
    h = norm(p['ln1'], x)
    a, cache = attn(h)
    x = x + a + mlp(h)
  elif where in ('pre', 'sandwich'):
    a, cache = attn(norm(p['ln1'], x))
    x = x + (norm(p['ln1_out'], a) if where == 'sandwich' else a)
    m = mlp(norm(p['ln2'], x))
    x = x + (norm(p['ln2_out'], m) if where == 'sandwich' else m)
  else:  # post / deepnorm
    alpha = cfg.deepnorm_alpha if where == 'deepnorm' else 1.0
    a, cache = attn(x)
    x = norm(p['ln1'], alpha * x + a)
    x = norm(p['ln2'], alpha * x + mlp(x))
  return sharding.constrain(x, ('batch', 'length', 'embed')), cache, aux


def hidden_states(params: dict, tokens: jax.Array, cfg: ModelConfig, *,
                  positions: jax.Array | None = None, segment_ids: jax.Array | None = None,
                  cache: dict | None = None, cache_index: jax.Array | None = None,
                  prefix_len: jax.Array | None = None, return_aux: bool = False):
  """Final-normed hidden states [B, T, d_model] (and the updated KV cache, if given).

  positions default to 0..T-1 (offset by cache_index when decoding); segment_ids, if
  given, keep packed documents from attending across each other.
  """
  b, t = tokens.shape
  if positions is None:
    start = 0 if cache_index is None else cache_index
    positions = jnp.broadcast_to(start + jnp.arange(t), (b, t))
  x = embed(params, tokens, positions, cfg)

  def body(carry, layer):
    x, aux_sum = carry
    p, c = layer
    x, c, aux = block(p, x, cfg, positions, segment_ids, c, cache_index, prefix_len)
    return (x, jax.tree.map(jnp.add, aux_sum, aux)), c

  if cfg.remat != 'none':
    body = jax.checkpoint(body, policy=REMAT_POLICIES[cfg.remat], prevent_cse=False)
  # MoE layers report auxiliary losses; they are summed over layers in the scan carry.
  zero_aux = ({k: jnp.zeros((), jnp.float32) for k in
               ('moe_balance_loss', 'moe_z_loss', 'moe_dropped_fraction')} if cfg.moe_experts else {})
  # Unrolling lets XLA drop the loop's stacked-residual buffers and their dynamic slices
  # (~10% of a CPU step); scan_unroll=1 keeps compile time flat in depth.
  (x, aux), cache = jax.lax.scan(body, (x, zero_aux), (params['layers'], cache),
                                 unroll=cfg.scan_unroll or True)
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
  if cfg.padded_vocab != cfg.vocab_size:
    valid = jnp.arange(cfg.padded_vocab) < cfg.vocab_size
    logits = jnp.where(valid, logits, jnp.finfo(jnp.float32).min)
  return logits


def forward(params: dict, tokens: jax.Array, cfg: ModelConfig, **kwargs):
  """tokens [B, T] -> (logits [B, T, padded_vocab] float32, cache[, aux if return_aux])."""
  h, *rest = hidden_states(params, tokens, cfg, **kwargs)
  return (logits_from_hidden(params, h, cfg), *rest)
