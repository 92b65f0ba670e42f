"""GRPO (experiment `grpo`; Shao et al. 2024, DeepSeekMath eq. 3) on the online-RL loop:
group-normalised advantages, a clipped ratio against the rollout policy, and a per-token KL
(kl.estimator, k3 in the paper) to the reference in the loss; no value model.

  advantage  A_i = (score_i - group mean) / (group std + eps)        (rl/pg.py)
  loss       -min(rho A, clip(rho, 1 -+ eps) A) + kl.coef * k3(pi || pi_ref) per token,
             rho = pi / pi_old; averaged per sequence (the paper) or per token (loss.level)

The family's variants are switches (rl/pg.py has the formulas):
  loss.scale_rewards  group (GRPO) | batch | none (Dr. GRPO: no std)
  loss.length_norm    True (GRPO) | False (Dr. GRPO: a response's token sum / the budget)
  loss.level          sequence (GRPO) | token (DAPO's token-level aggregation)
  loss.clip_eps_low, loss.clip_eps_high   the clip range (DAPO's clip-higher); 0: clip_eps
  loss.ratio          token (GRPO) | sequence (GSPO's length-normalised sequence ratio)
  loss.overlong_filter  True: responses cut at rollout.max_new_tokens (no eos) leave the loss (DAPO)
  rollout.dynamic_sampling, rollout.max_refills   DAPO's dynamic sampling (stages/online.py:
                      groups whose rule rewards are all equal are replaced by fresh prompts')
  kl.coef = 0         no KL term; with full fine-tuning no reference model is held

python -m experiments.run --config=experiments/configs/rlhf_grpo.py --workdir=runs/rlhf/grpo \\
    --config.init_from=runs/rlhf/sft --config.reward_from=runs/rlhf/rm
"""
from __future__ import annotations

import jax.numpy as jnp
from ml_collections import ConfigDict

from experiments.stages import online
from lm.config import ConfigError
from rl import pg, rollout


class GRPO(online.Algorithm):
  name = 'grpo'
  groups = True

  def check(self, config: ConfigDict) -> None:
    l = config.loss
    if config.rollout.samples < 2:
      raise ConfigError(f'rollout.samples={config.rollout.samples}: GRPO normalises each reward within '
                        'the samples of its prompt, so it needs at least 2 per prompt.')
    if not l.clip_eps > 0:
      raise ConfigError(f'loss.clip_eps={l.clip_eps} must be > 0.')
    if l.level not in pg.LEVELS:
      raise ConfigError(f'loss.level={l.level!r} is not known; choose one of {pg.LEVELS}.')
    for key, known in (('scale_rewards', pg.SCALES), ('ratio', pg.RATIOS)):
      if l.get(key, known[0]) not in known:
        raise ConfigError(f'loss.{key}={l[key]!r} is not known; choose one of {known}.')
    for key in ('clip_eps_low', 'clip_eps_high'):
      if l.get(key, 0.0) < 0:
        raise ConfigError(f'loss.{key}={l[key]} must be > 0 (or 0: loss.clip_eps).')

  def score(self, ctx, trees, params, frozen, tokens, mask):
    out, metrics = online.common_scores(ctx, trees, params, frozen, tokens, mask)
    c = ctx.config
    scores = online.penalised_scores(ctx, out)
    k = c.rollout.samples
    groups = scores.reshape(-1, k)
    adv = pg.grpo_advantages(groups, scale=c.loss.get('scale_rewards', 'group')).reshape(-1)
    metrics['group_std'] = groups.std(-1).mean()
    metrics['groups/all_equal'] = jnp.mean(jnp.all(groups == groups[:, :1], -1).astype(jnp.float32))
    batch = {'tokens': tokens, 'mask': mask, 'old_logp': out['logp'], 'ref_logp': out['ref_logp'],
             'adv': adv}
    if c.loss.get('overlong_filter', False):   # DAPO: truncated responses leave the loss
      batch['keep'] = out['has_eos'].astype(jnp.float32)
      metrics['overlong_filtered'] = 1.0 - jnp.mean(batch['keep'])
    return batch, metrics

  def loss_fn(self, ctx, trees):
    n_prompt, cfg, c = ctx.width, ctx.pol.cfg, ctx.config
    l = c.loss

    def loss_fn(params, b, rng, frozen):
      logp, _ = rollout.response_logprobs(trees.full(params, frozen), b['tokens'], b['mask'],
                                          n_prompt, cfg, c.rollout.temperature)
      rmask = b['mask'][:, n_prompt:]
      if 'keep' in b:
        rmask = rmask * b['keep'][:, None].astype(rmask.dtype)
      return pg.grpo_loss(logp, b['old_logp'], b['ref_logp'], b['adv'], rmask,
                          l.clip_eps, c.kl.coef, l.level, c.kl.estimator,
                          clip_low=l.get('clip_eps_low', 0.0) or None,
                          clip_high=l.get('clip_eps_high', 0.0) or None,
                          ratio=l.get('ratio', 'token'), length_norm=l.get('length_norm', True))
    return loss_fn


def run(config: ConfigDict, workdir: str) -> dict:
  return online.run(config, workdir, GRPO())


ALGORITHM = GRPO   # registry.algorithm('grpo')
