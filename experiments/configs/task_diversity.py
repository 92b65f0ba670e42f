"""Task-diversity study (issue 25; experiments/task_diversity.py): held-out-family accuracy of a
small character model against the number of instruction-tuning families, on the composed-task
testbed (data/composed_tasks.py: 3 cases x 4 layouts of one word, 3 families held
out, each made only of primitives other families train).

python -m experiments.run --config=experiments/configs/task_diversity.py --workdir=runs/diversity

Pretrains the base on the works (200 steps), then tunes it on 1, 3 and all 9 seen families,
seed 0 (1000 SFT steps; the same budget of examples and steps whatever the number of
families; --config.study.seeds=0,1 adds seeds), and evaluates each model (and the base) on 300
held-out-family examples per condition.

Measured at commit 40d1bd4 on 2 cores shared with another study and other jobs (load average
6-10): 12 min 45 s wall, 6 min of CPU (4:06 user, 1:51 sys); pretraining 80 s, the base's
evaluation 32 s, each tuned model 184-186 s of SFT and 21-33 s of evaluation. Held-out exact
match 0.000 [0.000,0.013] at 1, 3 and 9 families, seen families 1.000 / 0.917 / 0.958; at 9,
79% of held-out answers have the right layout in a wrong case: the model binds (case, layout)
pairs. (The earlier default, 1,2,4,9 x 2 seeds at 400 steps, took ~29 min and left its seen
families unlearned: 0.09-0.13 exact match at 4 and 9.) task_diversity_wide.py is the grid
where the held-out families do appear.
"""
from ml_collections import ConfigDict

from experiments.configs import base, sft_base


def get_config():
  c = ConfigDict()
  c.experiment = 'task_diversity'
  c.seed = 0                  # the base's pretraining seed
  c.study = ConfigDict(dict(
      grid='small',           # the testbed's grid (composed_tasks.GRIDS): 'small' 3 x 4, 'wide' 5 x 7
      families='1,3,9',       # numbers of seen families tuned on (a seeded subset each; 9 or 'all': all)
      seeds='0',              # one tuned model per (number, seed): its subset, data order and init
      train_examples=8000,    # the training pool, split evenly over the families
      eval_per_family=100,    # held-out-family examples per family and phrasing condition (300 per run)
      seen_eval_per_family=16,   # a run's own families on held-out words
      eval_seed=1234,
      base_from='',           # a finished pretraining workdir to reuse ('' = pretrain into base/)
  ))
  p = base.pretrain()
  p.data.path = 'shakespeare_works'
  p.model = base.model(d_model=64, n_layers=2, n_heads=4, max_seq_len=128, use_bias=False,
                       activation='gelu', tie_embeddings=True, positions='rope')
  p.train.update(steps=200, batch_size=16, eval_batches=10, checkpoint_every=200, samples=0)
  p.eval.every = 200
  p.optim.update(lr=2e-3, min_lr=2e-4, warmup_steps=20)
  c.pretrain = p
  s = sft_base.sft()
  s.data.template = 'chat'    # the works' characters have no '#' (the Alpaca template's)
  s.data.val_fraction = 0.05
  s.train.update(steps=1000, batch_size=16, log_every=20)
  s.eval.update(every=0, before=False, val_examples=64)
  s.optim.update(lr=5e-3, min_lr=5e-4, warmup_steps=20)
  c.sft = s
  c.eval = ConfigDict(dict(max_new_tokens=16, batch_size=128))
  return c
