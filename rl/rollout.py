"""Rollouts and their scoring: what every online method (PPO, RLOO, GRPO, best-of-n) shares.

A rollout is lm.decode.generate_padded's Generation: left-padded prompts [B, P] and
right-padded responses [B, N] (mask 1 on real tokens, EOS included). `gen.sequences()` joins
them into [B, P+N] rows whose real tokens are contiguous, so one teacher-forced pass with
positions from the mask and segment ids = mask (padding attends to nothing real) sees each
row exactly as the sampler did. Everything below reads the response slice [P-1, P+N-1) of
that pass: the state *before* response token t predicts it, and values V(s_t) live there.

  logp, ent = response_logprobs(params, tokens, mask, P, cfg, temperature)   [B, N]
  values    = response_values(trunk, head, tokens, mask, P, cfg)           [B, N]
  scores    = last_token_scores(trunk, head, tokens, mask, cfg)            [B]
  out       = score_rollout(...)   all of them for one batch, in one traced function

Temperature: the sampler drew from softmax(logits / T), so ratios and KLs use the same T
(Huang et al. 2024); the reference model is scored at that T too.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from lm import heads, model
from lm.config import ModelConfig
from rl import common


def _layout(mask: jax.Array) -> dict:
  m = mask.astype(jnp.int32)
  return {'positions': jnp.maximum(jnp.cumsum(m, axis=1) - 1, 0), 'segment_ids': m}


def response_hidden(params, tokens, mask, n_prompt: int, cfg: ModelConfig) -> jax.Array:
  """[B, N, d] hidden states of the states that predict the N response tokens."""
  h = model.hidden_states(params, tokens, cfg, **_layout(mask))[0]
  n = tokens.shape[1] - n_prompt
  return jax.lax.dynamic_slice_in_dim(h, n_prompt - 1, n, axis=1)


def response_logprobs(params, tokens, mask, n_prompt: int, cfg: ModelConfig,
                      temperature: float = 1.0, with_entropy: bool = False):
  """(log-probs [B, N], entropy [B, N] or None) of the response tokens at `temperature`;
  0 where the response mask is 0."""
  h = response_hidden(params, tokens, mask, n_prompt, cfg)
  logits = model.logits_from_hidden(params, h, cfg)
  resp, rmask = tokens[:, n_prompt:], mask[:, n_prompt:].astype(jnp.float32)
  logp = common.logprobs_from_logits(logits, resp, temperature) * rmask
  ent = common.entropy_from_logits(logits, temperature) * rmask if with_entropy else None
  return logp, ent


def response_values(trunk, head, tokens, mask, n_prompt: int, cfg: ModelConfig) -> jax.Array:
  """V(s_t) [B, N] float32 from a scalar head on `trunk` (0 where the response mask is 0)."""
  h = response_hidden(trunk, tokens, mask, n_prompt, cfg)
  return heads.apply(head, h.reshape(-1, h.shape[-1])).reshape(h.shape[:2]) * mask[:, n_prompt:]


def response_logprobs_values(params, head, tokens, mask, n_prompt: int, cfg: ModelConfig,
                             temperature: float = 1.0, with_entropy: bool = False):
  """(log-probs, entropy or None, values) [B, N] from ONE pass of a policy whose value head
  sits on its own trunk (shared-trunk actor-critic): the same numbers as response_logprobs
  and response_values(params, head, ...), without running the trunk twice."""
  h = response_hidden(params, tokens, mask, n_prompt, cfg)
  logits = model.logits_from_hidden(params, h, cfg)
  resp, rmask = tokens[:, n_prompt:], mask[:, n_prompt:].astype(jnp.float32)
  logp = common.logprobs_from_logits(logits, resp, temperature) * rmask
  ent = common.entropy_from_logits(logits, temperature) * rmask if with_entropy else None
  values = heads.apply(head, h.reshape(-1, h.shape[-1])).reshape(h.shape[:2]) * rmask
  return logp, ent, values


def last_token_scores(trunk, head, tokens, mask, cfg: ModelConfig) -> jax.Array:
  """[B] the scalar head at each row's last real token (a reward model reads the EOS)."""
  return heads.score(trunk, head, tokens, mask, cfg)[:, 0]


def has_eos(gen_tokens: jax.Array, gen_mask: jax.Array, eos_id: int) -> jax.Array:
  """[B] whether each response ended with eos (else it ran out of max_new_tokens)."""
  last = common.last_token_index(gen_mask)
  tok = jnp.take_along_axis(gen_tokens, last[:, None], axis=1)[:, 0]
  return (tok == eos_id) & (gen_mask.sum(1) > 0)


def score_rollout(policy, ref, tokens, mask, n_prompt: int, cfg: ModelConfig, *,
                  temperature: float = 1.0, value: tuple | None = None,
                  reward: Callable | None = None) -> dict:
  """One scoring pass over a rollout (trace it inside one jit):

  policy, ref   param trees for model.forward (ref: the frozen SFT policy)
  value         (trunk, head) of the value model, or None (critic-free methods)
  reward        (tokens, mask) -> [B] normalised reward-model scores, or None
  Returns {'logp', 'ref_logp', 'entropy', 'values'?, 'scores'?}, response arrays [B, N].
  """
  logp, ent = response_logprobs(policy, tokens, mask, n_prompt, cfg, temperature, True)
  ref_logp, _ = response_logprobs(ref, tokens, mask, n_prompt, cfg, temperature)
  out = {'logp': logp, 'ref_logp': ref_logp, 'entropy': ent}
  if value is not None:
    out['values'] = response_values(value[0], value[1], tokens, mask, n_prompt, cfg)
  if reward is not None:
    out['scores'] = reward(tokens, mask)
  return jax.tree.map(jax.lax.stop_gradient, out)
