"""RLHF testbed, online: RLOO (REINFORCE with the leave-one-out baseline over k samples, the
KL to the SFT reference as a penalty in the reward, one on-policy update per rollout) against
the proxy reward model (experiment `rloo`).

python -m experiments.run --config=experiments/configs/rlhf_rloo.py --workdir=runs/rlhf/rloo \
    --config.init_from=runs/rlhf/sft --config.reward_from=runs/rlhf/rm
"""
from experiments.configs import rlhf_base


def get_config():
  c = rlhf_base.online('rloo')
  c.rollout.update(prompts=16, samples=4)
  c.kl.update(coef=0.05, estimator='k1')    # sequence KL, in the reward
  c.train.update(epochs=1, minibatches=1)   # on-policy REINFORCE: no ratio to correct a reuse
  c.optim.update(lr=5e-5, min_lr=5e-5, b2=0.99, eps=1e-8)
  c.eval.batch_size = 64
  return c
