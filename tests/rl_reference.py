"""Independent references for the RL stages' losses: the published formulas in numpy on a
small batch, fed by log-probs from a plain model.forward (no rollout layout code), so a wiring
error in an adapter (old and reference log-probs swapped, a clip around the wrong values, a
KL added instead of subtracted) shows as a mismatch."""
from __future__ import annotations

import types

import jax
import numpy as np

from experiments.configs import rlhf_grpo, rlhf_ppo, rlhf_rloo
from experiments.stages import policy
from lm import model, peft
from tests import rl_fixtures

P, N, B, VOCAB = 3, 4, 4, 23


def setup(kind: str, **sections):
  """(ctx, trees, params, frozen, tokens, mask): a tiny random policy (and reference) and a
  batch of unpadded rows, prompt P tokens + response N tokens."""
  c = {'ppo': rlhf_ppo, 'grpo': rlhf_grpo, 'rloo': rlhf_rloo}[kind].get_config()
  for name, values in sections.items():
    c[name].update(values)
  cfg = rl_fixtures.tiny_cfg(VOCAB, n_layers=1, max_seq_len=16)
  ctx = types.SimpleNamespace(width=P, pol=types.SimpleNamespace(cfg=cfg, eos=VOCAB - 1),
                              rm=types.SimpleNamespace(cfg=cfg), config=c)
  trees = policy.Trees({}, None, None, None, None, cfg, peft.PeftConfig())
  params = {'policy': model.init(cfg, jax.random.key(1))}
  frozen = {'reference': model.init(cfg, jax.random.key(2))}
  tokens = np.asarray(jax.random.randint(jax.random.key(3), (B, P + N), 1, VOCAB - 1), np.int32)
  return ctx, trees, params, frozen, tokens, np.ones_like(tokens)


def logprobs(params, tokens, cfg, temperature: float = 1.0) -> np.ndarray:
  """[B, N] log pi(response token) from plain logits: log_softmax(logits / T) gathered."""
  logits = np.asarray(model.forward(params, tokens, cfg)[0], np.float64)[:, P - 1:-1] / temperature
  logits -= logits.max(-1, keepdims=True)
  logz = np.log(np.exp(logits).sum(-1))
  picked = np.take_along_axis(logits, tokens[:, P:, None], -1)[..., 0]
  return picked - logz


def ppo_clip(logp, old, adv, eps):
  ratio = np.exp(logp - old)
  return np.maximum(-adv * ratio, -adv * np.clip(ratio, 1 - eps, 1 + eps))


def k3(logp, ref):
  return np.exp(ref - logp) - (ref - logp) - 1
