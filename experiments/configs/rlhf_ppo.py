"""RLHF testbed, stage 5: PPO from the SFT policy against the proxy reward model (experiment `ppo`).

python -m experiments.run --config=experiments/configs/rlhf_ppo.py --workdir=runs/rlhf/ppo \
    --config.init_from=runs/rlhf/sft --config.reward_from=runs/rlhf/rm
KL sweep (the over-optimisation study reads each workdir's results.json):
    ... --config.kl.coef=0.2 --workdir=runs/rlhf/ppo_b0.2
"""
from ml_collections import ConfigDict

from experiments.configs import rlhf_base


def get_config():
  c = rlhf_base.online('ppo')
  c.rollout.update(prompts=64, samples=1)   # prompts (= responses) per iteration
  c.train.update(epochs=2, minibatches=4)
  c.reward.update(
      score_clip=0.0,                 # clip normalised RM scores to +-score_clip (0: off)
      score_scale='none',             # none | running (divide by the running std of scores)
      whiten=False)                   # whiten per-token rewards (std 1, mean kept)
  c.loss = ConfigDict(dict(
      clip_eps=0.2,                   # policy ratio clip
      vf_clip_eps=0.2,                # value clipping around the rollout's values (0: off)
      vf_coef=0.1, entropy_coef=0.0,
      gamma=1.0, lam=0.95,            # GAE (Ziegler et al. / InstructGPT)
      whiten_advantages=True))
  c.value = ConfigDict(dict(init='reward'))   # reward (separate trunk + head from the RM) | policy_head
  c.ptx = ConfigDict(dict(
      coef=0.0,                       # gamma_ptx (InstructGPT's PPO-ptx); 0: off
      corpus='shakespeare_works', chars=400000, seq_len=48))
  return c
