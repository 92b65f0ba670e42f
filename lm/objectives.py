"""Losses. Each returns (weighted loss sum, total weight, metric sums).

Returning sums rather than means lets `lm.train` accumulate gradients over
microbatches exactly: the step divides by the total weight once, so k microbatches
of b rows give the same update as one batch of k*b rows, however the valid tokens
are spread among them.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from lm import model
from lm.config import ModelConfig


def token_nll(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """Per-token negative log-likelihood, in float32."""
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  return -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]


def _forward(params, tokens, batch, cfg, **kw):
  """Logits plus the auxiliary loss (MoE balance and z-losses; 0 for dense models)."""
  logits, _, aux = model.forward(params, tokens, cfg, positions=batch.get('positions'),
                                 segment_ids=batch.get('segment_ids'), return_aux=True, **kw)
  extra = 0.0
  if aux:
    extra = cfg.moe_balance_weight * aux['moe_balance_loss'] + cfg.moe_z_weight * aux['moe_z_loss']
  return logits, extra, aux


def _sums(nll, logits, targets, w, extra, aux):
  """(loss sum, weight, metric sums); per-batch aux terms are scaled by the weight so that
  dividing by the total weight (lm.train) gives their mean."""
  total = jnp.sum(w)
  correct = (jnp.argmax(logits, -1) == targets).astype(jnp.float32)
  metrics = {'accuracy': jnp.sum(correct * w), **{k: v * total for k, v in aux.items()}}
  return jnp.sum(nll * w) + extra * total, total, metrics


def next_token_loss(params: dict, batch: dict, rng: jax.Array, cfg: ModelConfig):
  """Causal language modelling: predict batch['targets'] from batch['inputs'].

  batch: inputs, targets [B, T] int32; weights [B, T] float32 (0 = no loss there);
  optional segment_ids / positions [B, T] for packed sequences.
  """
  del rng  # deterministic objective (no dropout)
  logits, extra, aux = _forward(params, batch['inputs'], batch, cfg)
  nll = token_nll(logits, batch['targets'])
  return _sums(nll, logits, batch['targets'], batch['weights'].astype(jnp.float32), extra, aux)


def prefix_lm_loss(params: dict, batch: dict, rng: jax.Array, cfg: ModelConfig):
  """Prefix LM (Raffel et al. 2020; UniLM): each row gets a random prefix length p in
  [1, T-1]; attention is bidirectional over the prefix and causal after it, and only
  tokens after the prefix are predicted. The prefix is drawn from the step's rng, so
  any next-token batch serves.
  """
  b, t = batch['inputs'].shape
  prefix_len = jax.random.randint(rng, (b,), 1, t)
  logits, extra, aux = _forward(params, batch['inputs'], batch, cfg, prefix_len=prefix_len)
  # input position i predicts token i+1; tokens 1..p-1 are inside the prefix (seen), so
  # the first predicted token is p, from position p-1.
  after = jnp.arange(t)[None, :] >= prefix_len[:, None] - 1
  w = batch['weights'].astype(jnp.float32) * after
  nll = token_nll(logits, batch['targets'])
  return _sums(nll, logits, batch['targets'], w, extra, aux)


def bert_masking(rng: jax.Array, tokens: jax.Array, vocab_size: int, mask_id: int,
                 rate: float = 0.15, weights: jax.Array | None = None):
  """BERT's recipe (Devlin et al. 2019): choose `rate` of the tokens; of those, 80% become
  [MASK], 10% a random token, 10% stay. Returns (corrupted tokens, chosen mask)."""
  k1, k2, k3 = jax.random.split(rng, 3)
  chosen = jax.random.uniform(k1, tokens.shape) < rate
  if weights is not None:
    chosen = chosen & (weights > 0)
  action = jax.random.uniform(k2, tokens.shape)
  random_tokens = jax.random.randint(k3, tokens.shape, 0, vocab_size)
  corrupted = jnp.where(chosen & (action < 0.8), mask_id, tokens)
  corrupted = jnp.where(chosen & (action >= 0.8) & (action < 0.9), random_tokens, corrupted)
  return corrupted.astype(tokens.dtype), chosen


def masked_lm_loss(params: dict, batch: dict, rng: jax.Array, cfg: ModelConfig, rate: float = 0.15):
  """Masked LM on a bidirectional model: predict the original tokens at the chosen positions.

  [MASK] is the first id past the tokenizer's vocabulary (a padding row of the embedding,
  never predicted: padded logits are masked).
  """
  tokens = batch['inputs']
  corrupted, chosen = bert_masking(rng, tokens, cfg.vocab_size, cfg.vocab_size, rate, batch['weights'])
  logits, extra, aux = _forward(params, corrupted, batch, cfg)
  nll = token_nll(logits, tokens)
  return _sums(nll, logits, tokens, chosen.astype(jnp.float32), extra, aux)


OBJECTIVES = {'next_token': next_token_loss, 'prefix_lm': prefix_lm_loss, 'masked_lm': masked_lm_loss}
