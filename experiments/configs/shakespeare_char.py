"""nanoGPT's CPU "baby" shakespeare_char run (its README reports val loss 1.88).

The corpus is tinyshakespeare, which ships with the package (data/corpora); another text:
--config.data.path=FILE.

python -m experiments.run --config=experiments/configs/shakespeare_char.py --workdir=/tmp/sc
"""
from experiments.configs import base

# A built-in corpus name (data/sources.BUILTIN_CORPORA): the shipped data/corpora/tinyshakespeare.txt.
TINY_SHAKESPEARE = 'tinyshakespeare'


def get_config():
  c = base.pretrain()
  c.data.path = TINY_SHAKESPEARE
  c.model = base.model(d_model=128, n_layers=4, n_heads=4, max_seq_len=64, use_bias=False,
                       norm='layernorm', activation='gelu', positions='learned', tie_embeddings=True)
  c.train.update(steps=2000, batch_size=12, log_every=10, checkpoint_every=500)
  c.eval.every = 250
  c.optim.update(lr=1e-3, min_lr=1e-4, warmup_steps=100, b1=0.9, b2=0.99, weight_decay=0.1,
                 grad_clip=1.0)
  return c
