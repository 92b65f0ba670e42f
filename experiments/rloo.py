"""RLOO (experiment `rloo`): REINFORCE with the leave-one-out baseline over the k samples of
each prompt (Ahmadian et al. 2024; Kool et al. 2019), on the online-RL loop.

  reward     r_i = score_i - kl.coef * KL_i   (sum over the response of kl.estimator's per-token
                                              KL to the reference: k1 = log pi - log pi_ref)
  advantage  A_i = r_i - mean of the other k - 1 rewards of its prompt   (rl/pg.py)
  loss       -A_i * log pi(y_i | x)           one action per sequence; train.epochs = 1 and
                                              train.minibatches = 1 keep it on-policy

python -m experiments.run --config=experiments/configs/rlhf_rloo.py --workdir=runs/rlhf/rloo \\
    --config.init_from=runs/rlhf/sft --config.reward_from=runs/rlhf/rm
"""
from __future__ import annotations

import jax.numpy as jnp
from ml_collections import ConfigDict

from experiments.stages import online
from lm.config import ConfigError
from rl import common, pg, rollout


class RLOO(online.Algorithm):
  name = 'rloo'
  groups = True

  def check(self, config: ConfigDict) -> None:
    if config.rollout.samples < 2:
      raise ConfigError(f'rollout.samples={config.rollout.samples}: RLOO compares each response with '
                        'the other samples of its prompt, so it needs at least 2 per prompt.')

  def score(self, ctx, trees, params, frozen, tokens, mask):
    out, metrics = online.common_scores(ctx, trees, params, frozen, tokens, mask)
    c = ctx.config
    scores = online.penalised_scores(ctx, out)
    k = c.rollout.samples
    rmask = mask[:, ctx.width:]
    kl = jnp.sum(common.kl_estimate(out['logp'], out['ref_logp'], c.kl.estimator) * rmask, -1)
    r = pg.rloo_rewards(scores, kl, c.kl.coef)
    adv = pg.rloo_advantages(r.reshape(-1, k)).reshape(-1)
    groups = scores.reshape(-1, k)
    metrics['group_std'] = groups.std(-1).mean()
    metrics['groups/all_equal'] = jnp.mean(jnp.all(groups == groups[:, :1], -1).astype(jnp.float32))
    return {'tokens': tokens, 'mask': mask, 'adv': adv}, metrics

  def loss_fn(self, ctx, trees):
    n_prompt, cfg, temp = ctx.width, ctx.pol.cfg, ctx.config.rollout.temperature

    def loss_fn(params, b, rng, frozen):
      logp, _ = rollout.response_logprobs(trees.full(params, frozen), b['tokens'], b['mask'],
                                          n_prompt, cfg, temp)
      return pg.rloo_loss(logp, b['adv'], b['mask'][:, n_prompt:], b.get('keep'))
    return loss_fn


def run(config: ConfigDict, workdir: str) -> dict:
  return online.run(config, workdir, RLOO())


ALGORITHM = RLOO   # registry.algorithm('rloo')
