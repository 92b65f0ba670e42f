"""The encoder-decoder transformer (T5, Raffel et al. 2020) from the decoder's layers.

  params = init(cfg, key)         # cfg.arch == 'encoder_decoder'
  logits, aux = forward(params, inputs, decoder_inputs, cfg)

An encoder stack (bidirectional self-attention + MLP) reads `inputs`; a decoder stack
(causal self-attention, cross-attention to the encoder output, MLP) reads
`decoder_inputs`, the targets shifted right behind a start token. Both stacks share the
token embedding and use the same `layers.attention` / `layers.mlp` / `layers.residual`
as the decoder-only model, so every norm placement, activation and attention kind
carries over. With positions='relative' each stack owns one T5 bias table
([buckets, heads], bidirectional buckets in the encoder, causal ones in the decoder)
shared by its layers; cross-attention has no position term. Like T5, a tied output
layer sees the decoder output scaled by d_model^-0.5.

Padding: `input_segment_ids` (0 = padding) keep encoder queries and the decoder's
cross-attention away from padded encoder slots; packed examples use ids 1, 2, ... and
`decoder_segment_ids` to match each decoder token with its own encoder segment.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from lm import blocks, layers, sharding
from lm.config import ModelConfig
from lm.layers import Spec


def param_specs(cfg: ModelConfig) -> dict:
  def stack(n, cross):
    s = {'layers': jax.tree.map(lambda x: x.stacked(n), blocks.layer_specs(cfg, cross),
                                is_leaf=lambda x: isinstance(x, Spec))}
    if cfg.has_final_norm:
      s['final_norm'] = layers.norm_specs(cfg)
    if cfg.positions == 'relative':
      s['rel_bias'] = layers.relative_bias_spec(cfg)
    return s

  specs = {'embed': Spec((cfg.padded_vocab, cfg.d_model), ('vocab', 'embed'), std=cfg.init_std),
           'encoder': stack(cfg.encoder_layers, False), 'decoder': stack(cfg.n_layers, True)}
  if cfg.embed_norm:
    specs['embed_norm'] = layers.norm_specs(cfg)
  if cfg.positions == 'learned':
    specs['pos_embed'] = Spec((cfg.max_seq_len, cfg.d_model), (None, 'embed'), std=cfg.init_std)
  if not cfg.tie_embeddings:
    specs['lm_head'] = Spec((cfg.d_model, cfg.padded_vocab), ('embed', 'vocab'), std=cfg.init_std)
  return specs


def _positions(tokens):
  return jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)


def _run_stack(body, x, stacked, cfg: ModelConfig):
  if cfg.remat != 'none':
    body = jax.checkpoint(body, policy=blocks.REMAT_POLICIES[cfg.remat], prevent_cse=False)
  x, _ = jax.lax.scan(lambda h, p: (body(h, p), None), x, stacked, unroll=blocks.scan_unroll(cfg))
  return x


def _finish(stack: dict, x, cfg: ModelConfig):
  return layers.norm(stack['final_norm'], x, cfg) if cfg.has_final_norm else x


def encode(params: dict, inputs: jax.Array, cfg: ModelConfig,
           segment_ids: jax.Array | None = None) -> jax.Array:
  """Encoder output [B, S, d_model]."""
  pos = _positions(inputs)
  enc = params['encoder']

  def body(x, p):
    attn = lambda h: layers.attention(p['attn'], h, cfg, pos, segment_ids, causal=False,
                                      rel_table=enc.get('rel_bias'))[0]
    x = layers.residual(p, 'ln1', x, attn, cfg)
    x = layers.residual(p, 'ln2', x, lambda h: layers.mlp(p['mlp'], h, cfg), cfg)
    return sharding.constrain(x, ('batch', 'length', 'embed'))

  x = blocks.embed(params, inputs, pos, cfg)
  return _finish(enc, _run_stack(body, x, enc['layers'], cfg), cfg)


def decode_hidden(params: dict, decoder_inputs: jax.Array, memory: jax.Array, cfg: ModelConfig,
                  memory_segment_ids: jax.Array | None = None,
                  segment_ids: jax.Array | None = None) -> jax.Array:
  """Decoder output [B, T, d_model] given the encoder output `memory`."""
  pos = _positions(decoder_inputs)
  dec = params['decoder']

  def body(x, p):
    self_attn = lambda h: layers.attention(p['attn'], h, cfg, pos, segment_ids, causal=True,
                                           rel_table=dec.get('rel_bias'))[0]
    cross = lambda h: layers.attention(p['cross'], h, cfg, pos, segment_ids, memory=memory,
                                       memory_segment_ids=memory_segment_ids)[0]
    x = layers.residual(p, 'ln1', x, self_attn, cfg)
    x = layers.residual(p, 'ln_cross', x, cross, cfg)
    x = layers.residual(p, 'ln2', x, lambda h: layers.mlp(p['mlp'], h, cfg), cfg)
    return sharding.constrain(x, ('batch', 'length', 'embed'))

  x = blocks.embed(params, decoder_inputs, pos, cfg)
  return _finish(dec, _run_stack(body, x, dec['layers'], cfg), cfg)


def logits_from_hidden(params: dict, h: jax.Array, cfg: ModelConfig) -> jax.Array:
  if cfg.tie_embeddings:  # T5: rescale before reusing the embedding as the output layer
    h = h * cfg.d_model ** -0.5
  return blocks.logits_from_hidden(params, h, cfg)


def forward(params: dict, inputs: jax.Array, decoder_inputs: jax.Array, cfg: ModelConfig, *,
            input_segment_ids: jax.Array | None = None,
            decoder_segment_ids: jax.Array | None = None):
  """(inputs [B, S], decoder_inputs [B, T]) -> (logits [B, T, padded_vocab] float32, aux {})."""
  memory = encode(params, inputs, cfg, input_segment_ids)
  h = decode_hidden(params, decoder_inputs, memory, cfg, input_segment_ids, decoder_segment_ids)
  return logits_from_hidden(params, h, cfg), {}


def generate(params: dict, inputs: jax.Array, cfg: ModelConfig, max_new_tokens: int, start_id: int,
             rng: jax.Array | None = None, temperature: float = 0.0,
             input_segment_ids: jax.Array | None = None) -> jax.Array:
  """Greedy (temperature 0) or sampled decoding, [B, max_new_tokens]; the encoder runs once.

  The decoder is re-run over a fixed-length buffer each step (no KV cache: causal masking
  makes the unfilled tail irrelevant); fine for samples, not for serving.
  """
  memory = encode(params, inputs, cfg, input_segment_ids)
  b = inputs.shape[0]
  buf = jnp.full((b, max_new_tokens + 1), start_id, jnp.int32)
  rng = jax.random.key(0) if rng is None else rng

  def step(i, buf):
    h = decode_hidden(params, buf, memory, cfg, input_segment_ids)
    logits = logits_from_hidden(params, jax.lax.dynamic_slice_in_dim(h, i, 1, 1), cfg)[:, 0]
    if temperature > 0:
      tok = jax.random.categorical(jax.random.fold_in(rng, i), logits / temperature)
    else:
      tok = jnp.argmax(logits, -1)
    return buf.at[:, i + 1].set(tok.astype(jnp.int32))

  return jax.lax.fori_loop(0, max_new_tokens, step, buf)[:, 1:]
