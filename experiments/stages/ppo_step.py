"""The jitted pieces of a PPO iteration (experiments/ppo.py drives them):

  score  = make_score(s, mesh)    (params, frozen, tokens, mask) -> logp, ref_logp, entropy,
                                  values, scores: rl.rollout.score_rollout, ONE jit
  update = make_update(s, tx, mesh, shardings)
                                  (state, frozen, rollout, beta, moments, key)
                                  -> (state, moments, metrics): rewards -> GAE -> a lax.scan
                                  over epochs x shuffled minibatches of lm.train.update, ONE jit

Trees. The trainable tree is {'policy': params} (full fine-tuning) or {'adapters': LoRA}
(peft.method=lora), plus {'value': {'trunk', 'head'}} (a separate value model initialised
from the reward model) or {'value_head': head} (a zero-init head on the policy's trunk).
The frozen tree is {'ref': the SFT params, 'rm': {'trunk', 'head', 'gain', 'bias'}}; under
LoRA it holds {'base'} instead of 'ref': the reference policy IS the base without adapters,
so no second copy of the weights exists. Frozen trees are step arguments, never constants.

`Settings` is hashable: jitted functions are cached on it, so runs of one configuration in
a process (tests, resumes) compile once.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

from lm import objectives, peft, sharding, train as train_lib
from lm.config import ModelConfig
from rl import common, ppo, reward as reward_lib, rollout


@dataclasses.dataclass(frozen=True)
class Settings:
  cfg: ModelConfig                 # the policy
  rm_cfg: ModelConfig              # the reward model (and the separate value model)
  pcfg: peft.PeftConfig
  n_prompt: int                    # P: prompts are left-padded to this many tokens
  temperature: float = 1.0
  value_init: str = 'reward'       # 'reward' (separate trunk + head) | 'policy_head'
  kl_estimator: str = 'k1'
  missing_eos_penalty: float = 0.0  # 0: off
  score_clip: float = 0.0          # 0: off; clip normalised RM scores to +-score_clip
  score_scale: str = 'none'        # 'none' | 'running' (divide by the running std of scores)
  whiten_rewards: bool = False     # per-token rewards rescaled to std 1 (mean kept)
  whiten_advantages: bool = True
  gamma: float = 1.0
  lam: float = 0.95
  clip_eps: float = 0.2
  vf_clip_eps: float = 0.2         # 0: no value clipping
  vf_coef: float = 0.1
  entropy_coef: float = 0.0
  epochs: int = 4
  minibatches: int = 1
  grad_accum: int = 1
  ptx_coef: float = 0.0            # 0: no PPO-ptx


# Trees ----------------------------------------------------------------------------------------
def policy_params(params, frozen, s: Settings):
  """The policy's params for model.forward: trained, or the base with LoRA hooked in."""
  if s.pcfg.method == 'none':
    return params['policy']
  return peft.combine(frozen['base'], params['adapters'], s.cfg, s.pcfg)


def reference_params(frozen, s: Settings):
  """The reference policy: the frozen SFT copy, or under LoRA the base itself (no copy)."""
  return frozen['ref'] if s.pcfg.method == 'none' else frozen['base']


def rm_scores(frozen, tokens, mask, s: Settings):
  """[B] normalised reward-model scores (experiments.reward_model.RewardModel.score, in the jit)."""
  rm = frozen['rm']
  raw = rollout.last_token_scores(rm['trunk'], rm['head'], tokens, mask, s.rm_cfg)
  return reward_lib.normalize(raw, rm['gain'], rm['bias'])


def _value_of(params, policy, tokens, mask, s: Settings):
  if s.value_init == 'policy_head':
    return rollout.response_values(policy, params['value_head'], tokens, mask, s.n_prompt, s.cfg)
  v = params['value']
  return rollout.response_values(v['trunk'], v['head'], tokens, mask, s.n_prompt, s.rm_cfg)


# Scoring: one jit -----------------------------------------------------------------------------
def score(params, frozen, tokens, mask, *, s: Settings) -> dict:
  pol = policy_params(params, frozen, s)
  out = rollout.score_rollout(pol, reference_params(frozen, s), tokens, mask, s.n_prompt, s.cfg,
                              temperature=s.temperature,
                              reward=lambda t, m: rm_scores(frozen, t, m, s))
  out['values'] = jax.lax.stop_gradient(_value_of(params, pol, tokens, mask, s))
  return out


@functools.lru_cache(maxsize=None)
def make_score(s: Settings, mesh):
  rows = lambda nd: sharding.batch_sharding(mesh, nd)
  out_sh = {'logp': rows(2), 'ref_logp': rows(2), 'entropy': rows(2), 'values': rows(2),
            'scores': rows(1)}
  jitted = jax.jit(functools.partial(score, s=s), out_shardings=out_sh)
  return train_lib.with_mesh(jitted, mesh)


# Rewards and advantages -----------------------------------------------------------------------
def advantages(ro: dict, beta, moments: ppo.RunningMoments, s: Settings):
  """Per-token rewards (KL penalty + RM score at the EOS) -> GAE -> (batch rows for the
  update, new running moments, metrics). `ro` holds the rollout (tokens, mask [B, P+N],
  has_eos [B]) and its scores (logp, ref_logp, values [B, N], scores [B])."""
  rmask = ro['mask'][:, s.n_prompt:].astype(jnp.float32)
  scores = ro['scores']
  if s.score_scale == 'running':   # trlx: scale by the running std of all scores seen so far
    moments = ppo.update_moments(moments, scores)
    scores = scores / jnp.sqrt(moments.var + 1e-8)
  if s.score_clip > 0:
    scores = ppo.clip_scores(scores, s.score_clip)
  rewards, kl = ppo.per_token_rewards(
      scores, ro['logp'], ro['ref_logp'], rmask, beta, s.kl_estimator, has_eos=ro['has_eos'],
      missing_eos_penalty=s.missing_eos_penalty if s.missing_eos_penalty else None)
  if s.whiten_rewards:
    rewards = common.masked_whiten(rewards, rmask, shift_mean=False) * rmask
  adv, returns = ppo.gae(rewards, ro['values'], rmask, s.gamma, s.lam)
  if s.whiten_advantages:
    adv = ppo.whiten_advantages(adv, rmask)
  batch = {'tokens': ro['tokens'], 'mask': ro['mask'], 'logp': ro['logp'], 'values': ro['values'],
           'advantages': adv, 'returns': returns}
  metrics = {'reward_total': jnp.mean(jnp.sum(rewards, 1)),
             'kl_penalty': jnp.mean(jnp.sum(kl, 1)) * beta,
             'value_error': common.masked_mean(jnp.square(ro['values'] - returns), rmask),
             'returns': common.masked_mean(returns, rmask)}
  return batch, moments, metrics


# The update: one jit --------------------------------------------------------------------------
def loss_fn(params, batch, rng, frozen, *, s: Settings):
  """Clipped surrogate + vf_coef * clipped value loss (- entropy bonus) (+ gamma_ptx * LM loss)."""
  pol = policy_params(params, frozen, s)
  tokens, mask = batch['tokens'], batch['mask']
  want_ent = s.entropy_coef > 0
  if s.value_init == 'policy_head':   # one trunk pass gives both
    logp, ent, values = rollout.response_logprobs_values(pol, params['value_head'], tokens, mask,
                                                         s.n_prompt, s.cfg, s.temperature, want_ent)
  else:
    logp, ent = rollout.response_logprobs(pol, tokens, mask, s.n_prompt, s.cfg, s.temperature,
                                          want_ent)
    values = _value_of(params, pol, tokens, mask, s)
  rmask = mask[:, s.n_prompt:]
  out = ppo.ppo_loss(logp, batch['logp'], values, batch['values'], batch['advantages'],
                     batch['returns'], rmask, clip_eps=s.clip_eps,
                     vf_clip_eps=s.vf_clip_eps if s.vf_clip_eps > 0 else jnp.inf,
                     vf_coef=s.vf_coef, entropy=ent, entropy_coef=s.entropy_coef)
  if s.ptx_coef > 0:
    ptx = {'inputs': batch['ptx_inputs'], 'targets': batch['ptx_targets'],
           'weights': batch['ptx_weights']}
    out = ppo.ppo_ptx_loss(out, objectives.next_token_loss(pol, ptx, rng, cfg=s.cfg), s.ptx_coef)
  return out


def minibatches(batch: dict, key, n: int) -> dict:
  """[B, ...] rows -> [n, B/n, ...] after a permutation drawn from `key` (one epoch)."""
  b = jax.tree.leaves(batch)[0].shape[0]
  perm = jax.random.permutation(key, b)
  return jax.tree.map(lambda x: x[perm].reshape(n, b // n, *x.shape[1:]), batch)


def ppo_updates(state, batch, key, frozen, *, s: Settings, tx, mesh=None, grad_sh=None):
  """epochs x minibatches of lm.train.update in nested lax.scans; minibatch i of epoch e
  gets rng fold_in(epoch_key_e, i). Returns (state, per-update metrics [E, M])."""
  upd = functools.partial(train_lib.update, loss_fn=functools.partial(loss_fn, s=s), tx=tx,
                          grad_accum=s.grad_accum, mesh=mesh, grad_sh=grad_sh)
  constrain = lambda x: x
  if mesh is not None:
    def constrain(x):
      spec = P(sharding.logical_to_pspec(('batch',), None, mesh)[0], *([None] * (x.ndim - 1)))
      return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))

  def epoch(state, ek):
    def step(state, xs):
      i, mb = xs
      return upd(state, jax.tree.map(constrain, mb), jax.random.fold_in(ek, i), frozen)
    return jax.lax.scan(step, state, (jnp.arange(s.minibatches), minibatches(batch, ek, s.minibatches)))
  return jax.lax.scan(epoch, state, jax.random.split(key, s.epochs))


def iteration_update(state, frozen, ro, beta, moments, key, *, s: Settings, tx, mesh=None,
                     grad_sh=None):
  batch, moments, metrics = advantages(ro, beta, moments, s)
  for k in ('ptx_inputs', 'ptx_targets', 'ptx_weights'):
    if k in ro:
      batch[k] = ro[k]
  state, per = ppo_updates(state, batch, key, frozen, s=s, tx=tx, mesh=mesh, grad_sh=grad_sh)
  metrics.update({k: jnp.mean(v) for k, v in per.items() if k != 'lr'})
  return state, moments, metrics


def make_update(s: Settings, tx, mesh, shardings: train_lib.TrainState):
  """The jitted iteration update; the TrainState is donated, the frozen tree an argument."""
  fn = functools.partial(iteration_update, s=s, tx=tx, mesh=mesh, grad_sh=shardings.params)
  rep = sharding.replicated(mesh)
  jitted = jax.jit(fn, out_shardings=(shardings, rep, rep), donate_argnums=(0,))
  return train_lib.with_mesh(jitted, mesh)
