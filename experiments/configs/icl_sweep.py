"""In-context learning sweep: accuracy over k demonstrations x selection x ordering, several
seeds (experiments/icl.py). Default: the synthetic entity-classification task on the 2-layer
model that configs/icl_induction.py trains (in-process into WORKDIR/model, reused on rerun).
A few minutes on 2 CPU cores.

python -m experiments.run --config=experiments/configs/icl_sweep.py --workdir=/tmp/icl_sweep
A real model and task: --config.init_from=hf:PATH --config.task.source=jsonl --config.task.path=F
"""
from ml_collections import ConfigDict

from experiments.configs import base, icl_induction


def get_config():
  c = ConfigDict()
  c.experiment = 'icl_sweep'
  c.seed = 0
  c.init_from = ''            # DIR | hf:PATH; empty: train the synthetic model (c.pretrain)
  c.model = base.model()      # runtime fields (dtype, ...) apply to an init_from model
  c.pretrain = icl_induction.get_config()
  c.pretrain.probe.every = 500
  c.batch_size = 64           # contexts per harness call
  c.add_bos = True
  c.task = ConfigDict(dict(
      source='synthetic',     # synthetic | jsonl
      instruction='',         # I: text before the demonstrations
      seed=0,                 # synthetic: entities, their labels, pool and eval examples
      n_entities=16, n_labels=4, word_len=2,
      n_pool=64,              # demonstration pool (jsonl: the first n_pool records, or pool_path)
      n_eval=48,              # evaluated examples (jsonl: 0 = all the rest)
      path='', pool_path='', input_field='x', label_field='y', labels=(),
      input_template='{x}', output_template=' {y}', separator='\n',   # jsonl template f(x, y)
  ))
  c.sweep = ConfigDict(dict(
      ks=(0, 1, 2, 4, 8),
      seeds=3,                # selection / ordering seeds: error bars are the std over them
      combos=('random/random', 'class_balanced/random', 'bm25/random', 'knn/random',
              'diversity/random', 'random/similar_last', 'random/global_entropy',
              'bm25/similar_last'),
      n_perms=4,              # global_entropy: candidate permutations (all of them when k! <= this)
      n_probe=4,              # global_entropy: probe examples from the pool
  ))
  c.mesh = ConfigDict(dict(data=-1, fsdp=1, tensor=1, expert=1))
  return c
