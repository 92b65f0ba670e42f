"""Train-step throughput benchmark: the shakespeare_char model and a d_model=512 model.

python -m experiments.run --config=experiments/configs/bench_train.py --workdir=/tmp/bench \
    --config.nanogpt_dir=PATH_TO_NANOGPT_CHECKOUT
"""
from ml_collections import ConfigDict

from experiments.configs import base


def get_config():
  c = ConfigDict()
  c.experiment = 'bench_train'
  c.warmup_steps = 3
  c.repeats = 3
  c.unroll_study = True      # compile s and ms/step with the layer scan unrolled fully vs rolled
  c.checkpoint_stall = True  # ms the training thread blocks per checkpoint save, async vs sync
  c.checkpoint_repeats = 3
  # Side by side with nanoGPT (PyTorch eager): the path of a nanoGPT checkout, or '' to skip
  # (git clone https://github.com/karpathy/nanoGPT; its model.py is imported, not copied).
  c.nanogpt_dir = ''
  c.rounds = 2               # ours and nanoGPT timed alternately this many times; best of each
  c.profile = True           # ms per step by kind of op (matmul, data movement, ...), both sides
  c.models = ConfigDict({
      'shakespeare_char': ConfigDict(dict(
          model=dict(vocab_size=65, d_model=128, n_layers=4, n_heads=4, max_seq_len=64,
                     use_bias=False, activation='gelu', dtype='float32'),
          batch_size=12, seq_len=64, steps=50)),
      'gpt_d512': ConfigDict(dict(
          model=dict(vocab_size=65, d_model=512, n_layers=8, n_heads=8, max_seq_len=256,
                     use_bias=False, activation='gelu', dtype='float32',
                     attention_q_block=64),   # causal block skipping (nanoGPT's SDPA does the same)
          batch_size=8, seq_len=256, steps=3)),
  })
  c.optim = base.pretrain().optim
  c.mesh = ConfigDict(dict(data=-1, fsdp=1, tensor=1, expert=1))
  return c
