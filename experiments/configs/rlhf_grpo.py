"""RLHF testbed, online: GRPO (group-normalised advantages, clipped ratio, k3 KL to the SFT
reference in the loss, no value model) against the proxy reward model; held-out gold / proxy
/ KL every eval_every iterations in eval.jsonl.

python -m experiments.run --config=experiments/configs/rlhf_grpo.py --workdir=runs/rlhf/grpo \
    --config.init_from=runs/rlhf/sft --config.reward_from=runs/rlhf/rm
"""
import dataclasses

from ml_collections import ConfigDict

from experiments.configs import rlhf_base
from lm import peft


def pg() -> ConfigDict:
  """Defaults shared by the critic-free methods (experiment `pg`)."""
  c = ConfigDict()
  c.experiment = 'pg'
  c.method = 'grpo'                    # grpo | rloo
  c.seed = 0
  c.init_from = 'runs/rlhf/sft'        # the SFT policy (and the frozen reference)
  c.reward_from = 'runs/rlhf/rm'       # the proxy reward model being optimised
  c.k = 4                              # samples per prompt (the group)
  c.max_new_tokens = 24
  c.temperature = 1.0                  # sampling and every log-prob / KL
  c.loss = ConfigDict(dict(
      kl_coef=0.04,          # grpo: k3 KL per token in the loss; rloo: k1 sequence KL in the reward
      clip_eps=0.2,          # grpo's ratio clip
      level='sequence',      # grpo averaging: sequence (the paper) | token (DAPO)
      missing_eos_penalty=0.0))   # subtracted from the score of responses without eos
  c.peft = ConfigDict({k: v for k, v in dataclasses.asdict(peft.PeftConfig()).items()})
  c.train = ConfigDict(dict(
      iterations=40, prompts_per_iter=16, epochs=2, minibatches=2, eval_every=10,
      checkpoint_every=10, keep_checkpoints=2, stop_after=0))
  c.optim = ConfigDict(dict(
      lr=5e-5, min_lr=5e-5, warmup_steps=0, decay_steps=0, schedule='constant',
      b1=0.9, b2=0.99, eps=1e-8, weight_decay=0.0, grad_clip=1.0, mu_dtype=''))
  c.prompts = rlhf_base.prompts()
  c.eval = ConfigDict(dict(gold='vader', batch_size=64,
                           before=True))   # also evaluate the SFT policy at iteration 0
  c.mesh = rlhf_base.mesh()
  return c


def get_config():
  return pg()
