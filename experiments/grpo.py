"""GRPO (experiment `grpo`; Shao et al. 2024, DeepSeekMath eq. 3) on the online-RL loop:
group-normalised advantages, a clipped ratio against the rollout policy, and a per-token KL
(kl.estimator, k3 in the paper) to the reference in the loss; no value model.

  advantage  A_i = (score_i - group mean) / (group std + eps)        (rl/pg.py)
  loss       -min(rho A, clip(rho, 1 -+ eps) A) + kl.coef * k3(pi || pi_ref) per token,
             rho = pi / pi_old; averaged per sequence (the paper) or per token (loss.level)

python -m experiments.run --config=experiments/configs/rlhf_grpo.py --workdir=runs/rlhf/grpo \\
    --config.init_from=runs/rlhf/sft --config.reward_from=runs/rlhf/rm
"""
from __future__ import annotations

from ml_collections import ConfigDict

from experiments.stages import online
from lm.config import ConfigError
from rl import common, pg, rollout


class GRPO(online.Algorithm):
  name = 'grpo'

  def check(self, config: ConfigDict) -> None:
    l = config.loss
    if config.rollout.samples < 2:
      raise ConfigError(f'rollout.samples={config.rollout.samples}: GRPO normalises each reward within '
                        'the samples of its prompt, so it needs at least 2 per prompt.')
    if not l.clip_eps > 0:
      raise ConfigError(f'loss.clip_eps={l.clip_eps} must be > 0.')
    if l.level not in pg.LEVELS:
      raise ConfigError(f'loss.level={l.level!r} is not known; choose one of {pg.LEVELS}.')

  def score(self, ctx, trees, params, frozen, tokens, mask):
    out, metrics = online.common_scores(ctx, trees, params, frozen, tokens, mask)
    c = ctx.config
    scores = out['scores']
    if c.reward.missing_eos_penalty:
      scores = common.apply_missing_eos_penalty(scores, out['has_eos'], c.reward.missing_eos_penalty)
    k = c.rollout.samples
    adv = pg.grpo_advantages(scores.reshape(-1, k)).reshape(-1)
    metrics['group_std'] = scores.reshape(-1, k).std(-1).mean()
    batch = {'tokens': tokens, 'mask': mask, 'old_logp': out['logp'], 'ref_logp': out['ref_logp'],
             'adv': adv}
    return batch, metrics

  def loss_fn(self, ctx, trees):
    n_prompt, cfg, c = ctx.width, ctx.pol.cfg, ctx.config

    def loss_fn(params, b, rng, frozen):
      logp, _ = rollout.response_logprobs(trees.full(params, frozen), b['tokens'], b['mask'],
                                          n_prompt, cfg, c.rollout.temperature)
      return pg.grpo_loss(logp, b['old_logp'], b['ref_logp'], b['adv'], b['mask'][:, n_prompt:],
                          c.loss.clip_eps, c.kl.coef, c.loss.level, c.kl.estimator)
    return loss_fn


def run(config: ConfigDict, workdir: str) -> dict:
  return online.run(config, workdir, GRPO())


ALGORITHM = GRPO   # registry.algorithm('grpo')
