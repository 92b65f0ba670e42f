"""Mechanism lab: a 2-layer transformer on bursty / repeated synthetic characters; per-head
induction scores, the in-context-learning score and in-context label accuracy over training
(experiments/induction.py). A few minutes on 2 CPU cores.

python -m experiments.run --config=experiments/configs/icl_induction.py --workdir=/tmp/induction
Probe any checkpoint instead: --config.init_from=DIR|hf:PATH
"""
from ml_collections import ConfigDict

from experiments.configs import base


def get_config():
  c = ConfigDict()
  c.experiment = 'icl_induction'
  c.seed = 0
  c.init_from = ''      # set: train nothing, probe this checkpoint
  c.model = base.model(d_model=64, n_layers=2, n_heads=4, max_seq_len=64, positions='rope',
                       use_bias=False, norm='layernorm', activation='gelu', tie_embeddings=True,
                       vocab_multiple=8)
  c.train = ConfigDict(dict(steps=1500, batch_size=64, keep_checkpoints=1))
  c.optim = base.pretrain().optim
  c.optim.update(lr=1e-3, min_lr=1e-4, warmup_steps=50, weight_decay=0.0)
  c.synthetic = ConfigDict(dict(
      repeat_fraction=0.75,  # share of repeated random segments; the rest bursty entity/label items
      min_entities=2, max_entities=4,   # entities per bursty sequence (fresh each sequence)
      n_labels=4,            # label digits 0..n-1
      word_len=2,            # letters per entity / distractor word
      min_period=8,          # repeated segments: period in [min_period, T/2]
  ))
  c.probe = ConfigDict(dict(
      every=50,              # probe every N steps
      batch=32,              # sequences per probe
      period=0,              # repeated random tokens' period (0: half the context)
      length=0,              # init_from probing: tokens per window (0: the model context)
      early=0, late=0,       # ICL score token indices (0: Olsson's 50 and 500 of 512, scaled)
      window=2,              # average the loss over +-window indices around each
      threshold=0.3,         # the induction score that counts as "formed"
  ))
  c.mesh = ConfigDict(dict(data=-1, fsdp=1, tensor=1, expert=1))
  return c
