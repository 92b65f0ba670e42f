"""RLHF testbed, the over-optimisation study (Gao et al. 2022): gold and proxy reward against
d = sqrt(KL) for best-of-n (every proxy RM in the bon runs: two RM sizes, the ensemble) and
along PPO (several beta, 0 included), GRPO / RLOO and DPO runs; Gao's forms fitted per
series. Each list is comma-separated workdirs or glob patterns; missing ones are skipped with
a note. Writes overoptimisation.json, overoptimisation_{gold,proxy}.png.

python -m experiments.run --config=experiments/configs/overoptimisation.py \
    --workdir=runs/rlhf/overopt --config.bon=runs/rlhf/bon \
    --config.ppo='runs/rlhf/ppo*' --config.grpo='runs/rlhf/grpo*' --config.rloo='runs/rlhf/rloo*' \
    --config.dpo='runs/rlhf/dpo*'

The runs it reads (see experiments/configs/rlhf_bon.py for the second, smaller RM):
  rlhf_bon  --config.reward_from=runs/rlhf/rm,runs/rlhf_small/rm,runs/rlhf/rm_ens
  rlhf_ppo  --config.kl.coef=B --workdir=runs/rlhf/ppo_bB  (B = 0, 0.01, 0.05, ...)
  rlhf_grpo / rlhf_rloo, rlhf_dpo --config.kl.coef=B --workdir=runs/rlhf/dpo_bB
Every policy stage writes results.json in one schema (experiments/stages/online_report.py).
"""
from ml_collections import ConfigDict


def get_config():
  c = ConfigDict()
  c.experiment = 'overoptimisation'
  c.bon = 'runs/rlhf/bon*'                         # workdirs of `bon` runs
  c.ppo = 'runs/rlhf/ppo*'                         # ... of `ppo` runs
  c.grpo = 'runs/rlhf/grpo*'                       # ... of `grpo` runs
  c.rloo = 'runs/rlhf/rloo*'                       # ... of `rloo` runs
  c.dpo = 'runs/rlhf/dpo*'                         # ... of `dpo` runs
  return c
