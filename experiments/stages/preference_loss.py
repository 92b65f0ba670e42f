"""The offline preference objective on a policy's trees (DPO, IPO, cDPO): summed response
log-probs of pair rows under the policy and the frozen reference, into rl.preference's loss.

Used by the dpo stage (experiments/dpo.py) and by bench_rl. A batch is pairs of rows
{'tokens', 'mask', 'resp': [B, 2, T]} (index 0 chosen, 1 rejected; right-padded; `resp` marks
the response tokens, the only ones scored).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from experiments.stages import policy
from lm import model
from rl import preference


def sequence_logprobs(params, batch, cfg) -> jax.Array:
  """[B, 2, T] pair rows -> [B, 2] summed log-probs of the response tokens (temperature 1)."""
  b, two, t = batch['tokens'].shape
  tokens = batch['tokens'].reshape(b * two, t)
  mask = batch['mask'].reshape(b * two, t)
  resp = batch['resp'].reshape(b * two, t)
  positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0)
  logits = model.forward(params, tokens, cfg, positions=positions, segment_ids=mask)[0]
  logp = preference.sequence_logprob(logits[:, :-1], tokens[:, 1:], resp[:, 1:])
  return logp.reshape(b, two)


def make_loss(trees: policy.Trees, kind: str, beta: float, label_smoothing: float = 0.0):
  """loss_fn(params, batch, rng, frozen) for lm.train: the policy is trees.full(params,
  frozen), the reference is the frozen 'reference' role."""
  base = 'ipo' if kind == 'ipo' else 'dpo'
  ls = label_smoothing if kind == 'cdpo' else 0.0

  def loss_fn(params, batch, rng, frozen):
    del rng
    pi = sequence_logprobs(trees.full(params, frozen), batch, trees.cfg)
    ref = jax.lax.stop_gradient(sequence_logprobs(trees.reference(frozen), batch, trees.cfg))
    return preference.preference_loss(base, pi[:, 0], pi[:, 1], ref[:, 0], ref[:, 1], beta, ls)
  return loss_fn
