"""RLHF testbed, stage 2: SFT on line openings -> the rest of the line + eos (held-out plays
for validation), so the policy writes one line and stops.

python -m experiments.run --config=experiments/configs/rlhf_sft.py --workdir=runs/rlhf/sft \
    --config.init_from=runs/rlhf/pretrain
"""
from experiments.configs import sft_base


def get_config():
  c = sft_base.sft()
  c.init_from = 'runs/rlhf/pretrain'
  c.data.source = 'lines'
  c.data.template = 'none'
  c.data.works.n_per_family = 20000     # training lines
  c.eval.n_per_family = 256             # held-out lines (validation loss)
  c.eval.before = False
  c.train.update(steps=400, batch_size=32, checkpoint_every=200)
  c.eval.every = 200
  c.optim.update(lr=1e-3, min_lr=1e-4)
  return c
