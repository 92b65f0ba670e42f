"""IsoFLOP scaling sweep on Shakespeare's works (char level), sized for a 2-core CPU (about 20 min).

3 FLOP budgets x 5-6 model sizes (N from ~800 to ~150k non-embedding params), each trained
on D = C / 6N tokens, then KM and Chinchilla fits and their plots:

python -m experiments.run --config=experiments/configs/scaling_isoflop.py --workdir=runs/scaling

Scale it up by changing sweep.sizes / sweep.flop_budgets (and mesh) only.
"""
from ml_collections import ConfigDict

from experiments.configs import base


def get_config():
  c = ConfigDict()
  c.experiment = 'scaling_sweep'
  c.run = base.pretrain()
  c.run.data.path = 'shakespeare_works'
  c.run.model = base.model(max_seq_len=64, use_bias=False, activation='gelu')
  c.run.train.update(batch_size=16, log_every=20, eval_batches=50)
  c.run.optim.update(lr=2e-3, min_lr=2e-4, warmup_steps=50)
  c.sweep = ConfigDict(dict(
      # (n_layers, d_model, n_heads)
      sizes=((1, 8, 2), (1, 12, 2), (1, 16, 2), (2, 16, 2), (2, 24, 2), (2, 32, 2), (2, 48, 4),
             (3, 64, 4)),
      flop_budgets=(3e10, 1e11, 3e11),
      min_tokens=2.4e5,
      max_tokens=1.2e7,
      checkpoint_every=500,
      fit=True,
  ))
  return c
