"""Offline preference optimisation: DPO, conservative DPO (label smoothing) and IPO.

Each loss takes summed sequence log-probs of the chosen (w) and rejected (l) responses under
the policy and the frozen reference, [B] each, and returns (loss_sum, n_pairs, metric_sums)
as lm/objectives.py does: divide by n_pairs for means.

  h = (log pi(y_w) - log ref(y_w)) - (log pi(y_l) - log ref(y_l))
  DPO  (Rafailov et al. 2023, eq. 7):  -log sigmoid(beta * h)
  cDPO (Mitchell 2023; labels flipped with probability eps):
        -(1 - eps) log sigmoid(beta * h) - eps log sigmoid(-beta * h)
  IPO  (Azar et al. 2023, eq. 17):     (h - 1 / (2 beta))^2

The implicit rewards beta * (log pi - log ref) of chosen and rejected responses, their
margin and the fraction of pairs ranked correctly are the usual metrics.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from rl.common import logprobs_from_logits

LOSSES = ('dpo', 'ipo')


def sequence_logprob(logits: jax.Array, tokens: jax.Array, mask: jax.Array,
                     temperature: float = 1.0) -> jax.Array:
  """sum_t mask_t * log pi(token_t | context): [B, T, V], [B, T], [B, T] -> [B] float32.
  The mask selects the response tokens (the prompt and padding are conditioned on, not scored)."""
  return sum_logprobs(logprobs_from_logits(logits, tokens, temperature), mask)


def sum_logprobs(token_logps: jax.Array, mask: jax.Array) -> jax.Array:
  """Masked sum of per-token log-probs over the last axis."""
  return jnp.sum(token_logps * mask.astype(jnp.float32), axis=-1)


def _metrics(chosen_r, rejected_r, loss):
  stop = jax.lax.stop_gradient
  chosen_r, rejected_r = stop(chosen_r), stop(rejected_r)
  return {'loss': stop(jnp.sum(loss)),
          'rewards/chosen': jnp.sum(chosen_r), 'rewards/rejected': jnp.sum(rejected_r),
          'rewards/margin': jnp.sum(chosen_r - rejected_r),
          'rewards/accuracy': jnp.sum((chosen_r > rejected_r).astype(jnp.float32))}


def _log_ratios(pi_chosen, pi_rejected, ref_chosen, ref_rejected):
  ref_chosen, ref_rejected = jax.lax.stop_gradient(ref_chosen), jax.lax.stop_gradient(ref_rejected)
  return pi_chosen - ref_chosen, pi_rejected - ref_rejected


def dpo_loss(pi_chosen, pi_rejected, ref_chosen, ref_rejected, beta: float = 0.1,
             label_smoothing: float = 0.0):
  """DPO; label_smoothing = eps > 0 gives conservative DPO. All inputs [B] sequence log-probs.
  Returns (loss_sum, n_pairs, metric sums)."""
  cw, cl = _log_ratios(pi_chosen, pi_rejected, ref_chosen, ref_rejected)
  z = beta * (cw - cl)
  loss = -(1.0 - label_smoothing) * jax.nn.log_sigmoid(z) - label_smoothing * jax.nn.log_sigmoid(-z)
  return jnp.sum(loss), jnp.float32(loss.shape[0]), _metrics(beta * cw, beta * cl, loss)


def ipo_loss(pi_chosen, pi_rejected, ref_chosen, ref_rejected, beta: float = 0.1):
  """IPO: squared distance of the log-ratio gap h to 1 / (2 beta) (beta is the paper's tau).
  h uses summed sequence log-probs; pass length-averaged ones for TRL's variant."""
  cw, cl = _log_ratios(pi_chosen, pi_rejected, ref_chosen, ref_rejected)
  loss = jnp.square(cw - cl - 1.0 / (2.0 * beta))
  return jnp.sum(loss), jnp.float32(loss.shape[0]), _metrics(beta * cw, beta * cl, loss)


def preference_loss(kind: str, pi_chosen, pi_rejected, ref_chosen, ref_rejected, beta: float = 0.1,
                    label_smoothing: float = 0.0):
  """Dispatch by name ('dpo' with optional label smoothing, or 'ipo'), for configs."""
  if kind == 'dpo':
    return dpo_loss(pi_chosen, pi_rejected, ref_chosen, ref_rejected, beta, label_smoothing)
  if kind == 'ipo':
    return ipo_loss(pi_chosen, pi_rejected, ref_chosen, ref_rejected, beta)
  raise ValueError(f'unknown preference loss {kind!r}; choose one of {LOSSES}')
