"""RLHF testbed, stage 5: PPO from the SFT policy against the proxy reward model (experiment `ppo`).

python -m experiments.run --config=experiments/configs/rlhf_ppo.py --workdir=runs/rlhf/ppo \
    --config.init_from=runs/rlhf/sft --config.reward_from=runs/rlhf/rm
Beta sweep (the over-optimisation study reads each workdir's eval.jsonl):
    ... --config.kl.beta=0.2 --workdir=runs/rlhf/ppo_b0.2
"""
import dataclasses

from ml_collections import ConfigDict

from experiments.configs import rlhf_base
from lm import peft


def get_config():
  c = ConfigDict()
  c.experiment = 'ppo'
  c.seed = 0
  c.init_from = 'runs/rlhf/sft'       # the policy and the frozen reference
  c.reward_from = 'runs/rlhf/rm'      # experiments.reward_model.load_reward_model
  c.prompts = rlhf_base.prompts()
  c.gold = 'vader'                    # rl/gold.GOLDS: logged, never optimised
  c.rollout = ConfigDict(dict(
      batch_size=64,                  # prompts (= responses) per iteration
      max_new_tokens=24,              # truncation; rows without eos are "missing EOS"
      temperature=1.0))               # sampling AND every log-prob (ratios, KL) use it
  c.ppo = ConfigDict(dict(
      epochs=2, minibatches=4, grad_accum=1,
      clip_eps=0.2,                   # policy ratio clip
      vf_clip_eps=0.2,                # value clipping around the rollout's values (0: off)
      vf_coef=0.1, entropy_coef=0.0,
      gamma=1.0, lam=0.95,            # GAE (Ziegler et al. / InstructGPT)
      whiten_advantages=True))
  c.reward = ConfigDict(dict(
      kl_estimator='k1',              # per-token KL penalty: k1 (log-ratio) | k3
      missing_eos_penalty=0.0,        # subtracted from the RM score of truncated responses (0: off)
      score_clip=0.0,                 # clip normalised RM scores to +-score_clip (0: off)
      score_scale='none',             # none | running (divide by the running std of scores)
      whiten=False))                  # whiten per-token rewards (std 1, mean kept)
  c.kl = ConfigDict(dict(
      mode='fixed',                   # fixed | adaptive (Ziegler et al. 2019)
      beta=0.05,                      # fixed beta, or the adaptive controller's start
      target=6.0,                     # adaptive: KL target (nats per sequence), > 0
      horizon=10000))                 # adaptive: samples over which the error is corrected
  c.value = ConfigDict(dict(init='reward'))   # reward (separate trunk + head from the RM) | policy_head
  c.ptx = ConfigDict(dict(
      coef=0.0,                       # gamma_ptx (InstructGPT's PPO-ptx); 0: off
      corpus='shakespeare_works', chars=400000, seq_len=48))
  c.peft = ConfigDict({k: v for k, v in dataclasses.asdict(peft.PeftConfig()).items()})
  c.train = ConfigDict(dict(
      iterations=40, checkpoint_every=10, keep_checkpoints=2, stop_after=0))
  c.eval = ConfigDict(dict(every=10, before=True, batch_size=128, max_new_tokens=0))
  c.optim = ConfigDict(dict(
      lr=1e-4, min_lr=1e-4, warmup_steps=0, decay_steps=0, schedule='constant',
      b1=0.9, b2=0.95, eps=1e-5, weight_decay=0.0, grad_clip=1.0, mu_dtype=''))
  c.mesh = rlhf_base.mesh()
  return c
