"""RLHF testbed, online: RLOO (REINFORCE with the leave-one-out baseline over k samples, the
KL to the SFT reference as a penalty in the reward, one on-policy update per rollout) against
the proxy reward model.

python -m experiments.run --config=experiments/configs/rlhf_rloo.py --workdir=runs/rlhf/rloo \
    --config.init_from=runs/rlhf/sft --config.reward_from=runs/rlhf/rm
"""
from experiments.configs import rlhf_grpo


def get_config():
  c = rlhf_grpo.pg()
  c.method = 'rloo'
  c.loss.kl_coef = 0.05
  c.train.update(epochs=1, minibatches=1)   # on-policy REINFORCE: no ratio to correct a reuse
  return c
