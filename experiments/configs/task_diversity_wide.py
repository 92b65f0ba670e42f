"""The task-diversity study on the wide grid (data/composed_tasks.py GRIDS['wide']: 5 cases x 7
separator layouts = 35 families, 5 held out on a diagonal, 30 seen), where every case is
trained with 4 to 6 layouts and every layout with 4 to 5 cases, so a model that binds (case,
layout) pairs fits the seen families worse than one that composes them.

python -m experiments.run --config=experiments/configs/task_diversity_wide.py --workdir=runs/diversity_wide

Tunes 1, 4, 16 and all 30 seen families, seed 0, 3000 SFT steps, and evaluates 100 held-out
examples per family and condition (500 per run); the model and its pretraining are the
default study's (--config.study.base_from=runs/diversity/base reuses its base).

Measured at commit 8ebad5a (one seed; 2 shared cores, load average 5-10: 8-10 min of SFT per
model, ~35 min in all), held-out exact match [95% Wilson] with trained phrasings / seen
families' exact match / held-out answers with both primitives' form, letters aside:
   1 family    0.000 [0.000,0.008]   0.000   0.000
   4           0.000 [0.000,0.008]   0.719   0.000
  16           0.010 [0.004,0.023]   0.281   0.018   (68% the right layout's form, a wrong case)
  30           0.760 [0.721,0.795]   0.685   0.996   (each held-out family 0.71-0.84)
Rank classification 0.242 / 0.560 / 0.274 / 1.000 (chance 0.25, base 0.030). Paraphrased
instructions (words never trained) 0.000 at every point. The 30-family model composes: its
held-out families are as good as its seen ones, and its misses are miscopied letters in the
right form. With seeds 0,1,2 at 16 and 30 families (--config.study.families=16,30
--config.study.seeds=0,1,2; 5-6 min of SFT per model on a quieter machine), pooled over 1500:
  16 families  0.065 [0.053,0.078]  (per seed 0.010 / 0.048 / 0.136; seen 0.474; form 0.131)
  30 families  0.713 [0.690,0.736]  (per seed 0.760 / 0.498 / 0.882; seen 0.799; form 0.829)
a difference of +0.649 [+0.622,+0.674] (Newcombe). Seed 1 at 30 composes three of the five
held-out families (upper-dash 0.83, title-dot 0.73, last-comma 0.73; lower-space 0.20 and
alternate-underscore 0.00, whose misses are the right layout in a wrong case). Paraphrased
instructions: 0.018 and 0.019. The small grid at the same 3000 steps does not compose
(task_diversity_long.py: 0.017), nor does this grid at 1000 steps (30 families: 0.000, seen
0.002, form 0.402).
"""
from experiments.configs import task_diversity


def get_config():
  c = task_diversity.get_config()
  c.study.update(grid='wide', families='1,4,16,all', seeds='0')
  c.sft.train.steps = 3000
  return c
