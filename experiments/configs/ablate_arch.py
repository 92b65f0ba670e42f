"""Architecture ablation on Shakespeare's works (char level): one variant per row, equal
non-embedding parameter count (d_ff re-solved) and equal tokens. About 10 min on 2 cores.

python -m experiments.run --config=experiments/configs/ablate_arch.py --workdir=runs/ablate
"""
from ml_collections import ConfigDict

from experiments.configs import base


def get_config():
  c = ConfigDict()
  c.experiment = 'ablate_arch'
  c.run = base.pretrain()
  c.run.data.path = 'shakespeare_works'
  c.run.model = base.model(d_model=64, n_layers=4, n_heads=4, max_seq_len=64, use_bias=False,
                           norm='layernorm', activation='gelu', positions='learned')
  c.run.train.update(steps=600, batch_size=16, log_every=20, eval_batches=50, checkpoint_every=600)
  c.run.optim.update(lr=2e-3, min_lr=2e-4, warmup_steps=60)
  c.match_params = True
  c.variants = ConfigDict({
      'baseline_gpt': {},
      'post_ln': {'norm_position': 'post'},
      'sandwich_ln': {'norm_position': 'sandwich'},
      'deepnorm': {'norm_position': 'deepnorm'},
      'rmsnorm': {'norm': 'rmsnorm'},
      'relu': {'activation': 'relu'},
      'gelu_tanh': {'activation': 'gelu_tanh'},
      'swiglu': {'activation': 'swiglu'},
      'geglu': {'activation': 'geglu'},
      'sinusoidal': {'positions': 'sinusoidal'},
      'sinusoidal_scaled': {'positions': 'sinusoidal', 'scale_embeddings': True},   # as Vaswani et al.
      'rope': {'positions': 'rope'},
      'alibi': {'positions': 'alibi'},
      'no_positions': {'positions': 'none'},
      't5_relative': {'positions': 'relative'},
      'multi_query': {'n_kv_heads': 1},
      'grouped_query_2': {'n_kv_heads': 2},
      'parallel_block': {'parallel_block': True},
      'llama_style': {'norm': 'rmsnorm', 'activation': 'swiglu', 'positions': 'rope'},
  })
  return c
