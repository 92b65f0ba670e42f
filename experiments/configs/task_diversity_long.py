"""The task-diversity study's control for the wide grid: the small grid's all-families point
(9 seen families, seed 0) tuned 3000 SFT steps, as long as task_diversity_wide.py tunes, to ask
whether tuning longer alone makes the held-out families appear.

python -m experiments.run --config=experiments/configs/task_diversity_long.py --workdir=runs/diversity_long

(--config.study.base_from=runs/diversity/base reuses the default study's pretrained base:
the same config and seed give the same base.)

It does not (measured at commit 8ebad5a, 2 shared cores, ~11 min): the seen families are
learned (0.993 exact match on evaluation words) and the held-out ones are not, 0.017
[0.007,0.038] exact match on 300 (0.000 [0.000,0.013] paraphrased); 73% of held-out answers
have the right layout in a wrong case and 21% the right case in a wrong layout, and even with
the letters aside only 3.0% have both primitives' form (composed_tasks.form). At 1000 steps
(the default's) it was 0.958 seen, 0.000 held-out, 79% right layout in a wrong case.
"""
from experiments.configs import task_diversity


def get_config():
  c = task_diversity.get_config()
  c.study.update(families='9', seeds='0')
  c.sft.train.steps = 3000
  return c
