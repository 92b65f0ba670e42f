"""The task-diversity study's all-families point tuned 2.5x longer (1000 SFT steps, seed 0):
whether the held-out families appear once the seen ones are learned (at the default 400
steps the all-families models reach only 0.13 exact match on their own families).

python -m experiments.run --config=experiments/configs/task_diversity_long.py --workdir=runs/diversity_long

(--config.study.base_from=runs/diversity/base reuses the default study's pretrained base:
the same config and seed give the same base.)
"""
from experiments.configs import task_diversity


def get_config():
  c = task_diversity.get_config()
  c.study.update(families='9', seeds='0')
  c.sft.train.steps = 1000
  return c
