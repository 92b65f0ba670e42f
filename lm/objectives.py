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


def next_token_loss(params: dict, batch: dict, rng: jax.Array, cfg: ModelConfig):
  """Causal language modelling: predict batch['targets'] from batch['inputs'].

  batch: inputs, targets [B, T] int32; weights [B, T] float32 (0 = no loss there);
  optional segment_ids / positions [B, T] for packed sequences.
  """
  del rng  # deterministic objective (no dropout)
  logits, _ = model.forward(params, batch['inputs'], cfg, positions=batch.get('positions'),
                            segment_ids=batch.get('segment_ids'))
  nll = token_nll(logits, batch['targets'])
  w = batch['weights'].astype(jnp.float32)
  correct = (jnp.argmax(logits, -1) == batch['targets']).astype(jnp.float32)
  return jnp.sum(nll * w), jnp.sum(w), {'accuracy': jnp.sum(correct * w)}
