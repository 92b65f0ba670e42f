"""Config keys that were renamed when the policy stages took one vocabulary (rollout.*, kl.*,
eval.*): an override with an old spelling fails with one sentence naming the new key
(experiments/run.py asks `hint`)."""
from __future__ import annotations

RENAMED = {
    # online RL (ppo, grpo, rloo)
    'k': 'rollout.samples',
    'method': 'the experiment itself: --config=experiments/configs/rlhf_grpo.py or rlhf_rloo.py',
    'max_new_tokens': 'rollout.max_new_tokens',
    'temperature': 'rollout.temperature',
    'gold': 'eval.gold',
    'rollout.batch_size': 'rollout.prompts',
    'train.prompts_per_iter': 'rollout.prompts',
    'train.eval_every': 'eval.every',
    'kl.beta': 'kl.coef',
    'loss.kl_coef': 'kl.coef',
    'loss.beta': 'kl.coef',
    'reward.kl_estimator': 'kl.estimator',
    'loss.missing_eos_penalty': 'reward.missing_eos_penalty',
    'ppo.epochs': 'train.epochs',
    'ppo.minibatches': 'train.minibatches',
    'ppo.grad_accum': 'train.grad_accum',
    **{f'ppo.{k}': f'loss.{k}' for k in ('clip_eps', 'vf_clip_eps', 'vf_coef', 'entropy_coef',
                                          'gamma', 'lam', 'whiten_advantages')},
    # offline policy stages (dpo, bon, preferences, label)
    'n_samples': 'rollout.samples',
    'batch_size': 'rollout.batch_size',
    'eval.temperature': 'rollout.temperature',
    'eval.max_new_tokens': 'rollout.max_new_tokens',
    # overoptimisation
    'pg': 'grpo and rloo (one list each)',
}


def _has(config, dotted: str) -> bool:
  node = config
  for part in dotted.split('.'):
    if not hasattr(node, 'keys') or part not in node.keys():
      return False
    node = node[part]
  return True


def hint(key: str, config=None) -> str | None:
  """'KEY is now NEW' for a renamed key (NEW checked against `config` when given), else None."""
  new = RENAMED.get(key)
  if new is None:
    return None
  if config is not None and '.' in new.split(' ')[0] and not _has(config, new):
    return None
  if config is not None and _has(config, key):
    return None
  return f'--config.{key} was renamed: use --config.{new}' if ' ' not in new else \
      f'--config.{key} was renamed: it is now {new}'
