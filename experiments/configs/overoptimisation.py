"""RLHF testbed, the over-optimisation study (Gao et al. 2022): gold and proxy reward against
d = sqrt(KL) for best-of-n (every proxy RM in the bon runs: two RM sizes, the ensemble) and
along PPO (several beta, 0 included), GRPO / RLOO and DPO runs; Gao's forms fitted per
series. Each list is comma-separated workdirs or glob patterns; missing ones are skipped with
a note. Writes overoptimisation.json, overoptimisation_{gold,proxy}.png.

python -m experiments.run --config=experiments/configs/overoptimisation.py \
    --workdir=runs/rlhf/overopt --config.bon=runs/rlhf/bon \
    --config.ppo='runs/rlhf/ppo*' --config.pg='runs/rlhf/grpo*,runs/rlhf/rloo*' \
    --config.dpo='runs/rlhf/dpo*'

The runs it reads (see experiments/configs/rlhf_bon.py for the second, smaller RM):
  rlhf_bon  --config.reward_from=runs/rlhf/rm,runs/rlhf_small/rm,runs/rlhf/rm_ens
  rlhf_ppo  --config.kl.beta=B --workdir=runs/rlhf/ppo_bB  (B = 0, 0.01, 0.05, ...)
  rlhf_grpo / rlhf_rloo, rlhf_dpo --config.loss.beta=B --workdir=runs/rlhf/dpo_bB
"""
from ml_collections import ConfigDict


def get_config():
  c = ConfigDict()
  c.experiment = 'overoptimisation'
  c.bon = 'runs/rlhf/bon*'                         # results.json of `bon` runs
  c.ppo = 'runs/rlhf/ppo*'                         # eval.jsonl of `ppo` runs
  c.pg = 'runs/rlhf/grpo*,runs/rlhf/rloo*'         # eval.jsonl of `pg` runs (GRPO / RLOO)
  c.dpo = 'runs/rlhf/dpo*'                         # eval.json of `dpo` runs
  return c
