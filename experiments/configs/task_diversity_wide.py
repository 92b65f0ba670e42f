"""The task-diversity study on the wide grid (data/composed_tasks.py GRIDS['wide']: 5 cases x 7
separator layouts = 35 families, 5 held out on a diagonal, 30 seen), where every case is
trained with 4 to 6 layouts and every layout with 4 to 5 cases, so a model that binds (case,
layout) pairs fits the seen families worse than one that composes them.

python -m experiments.run --config=experiments/configs/task_diversity_wide.py --workdir=runs/diversity_wide

Tunes 1, 4, 16 and all 30 seen families, one seed, 1000 SFT steps (the small grid's
all-families model needed 1000 to learn its own families: 0.96 exact match, against 0.13 at
400), 100 held-out examples per family and condition (500 per run).
"""
from experiments.configs import task_diversity


def get_config():
  c = task_diversity.get_config()
  c.study.update(grid='wide', families='1,4,16,all', seeds='0')
  c.sft.train.steps = 3000
  return c
