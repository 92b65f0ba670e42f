"""RLHF testbed, online: GRPO (group-normalised advantages, clipped ratio, k3 KL to the SFT
reference in the loss, no value model) against the proxy reward model (experiment `grpo`);
held-out gold / proxy / KL every eval.every iterations in eval.jsonl, results.json at the end.

python -m experiments.run --config=experiments/configs/rlhf_grpo.py --workdir=runs/rlhf/grpo \
    --config.init_from=runs/rlhf/sft --config.reward_from=runs/rlhf/rm
"""
from ml_collections import ConfigDict

from experiments.configs import rlhf_base


def get_config():
  c = rlhf_base.online('grpo')
  c.rollout.update(prompts=16, samples=4)   # 16 prompts x a group of 4 responses
  c.kl.update(coef=0.04, estimator='k3')    # per token, in the loss
  c.loss = ConfigDict(dict(
      clip_eps=0.2,          # the ratio clip
      clip_eps_low=0.0,      # the clip range [1 - low, 1 + high]; 0: clip_eps (DAPO: high 0.28)
      clip_eps_high=0.0,
      level='sequence',      # averaging: sequence (the paper) | token (DAPO)
      length_norm=True,      # sequence level: / the response's length (GRPO) | / the budget (Dr. GRPO)
      scale_rewards='group', # advantages / the group's std (GRPO) | batch | none (Dr. GRPO)
      ratio='token',         # importance ratio per token (GRPO) | sequence (GSPO)
      overlong_filter=False))  # True: truncated responses (no eos) leave the loss (DAPO)
  c.train.update(epochs=2, minibatches=2)
  c.optim.update(lr=5e-5, min_lr=5e-5, b2=0.99, eps=1e-8)
  c.eval.batch_size = 64
  return c
