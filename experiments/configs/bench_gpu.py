"""Train-step throughput on one accelerator: GPT-2 124M and a LLaMA-style 1.1B in bfloat16.

python -m experiments.run --config=experiments/configs/bench_gpu.py --workdir=/tmp/bench_gpu

Params and optimizer state stay float32 (compute in bfloat16); attention goes through
jax.nn.dot_product_attention (cuDNN flash attention on GPU). Too big for a CPU.
"""
from ml_collections import ConfigDict

from experiments.configs import base
from lm import presets


def _model(name, **kw):
  m = presets.as_dict(name)
  m.update(dtype='bfloat16', param_dtype='float32', **kw)
  return m


def get_config():
  c = ConfigDict()
  c.experiment = 'bench_train'
  c.warmup_steps = 3
  c.repeats = 3
  c.models = ConfigDict({
      'gpt2_124m': ConfigDict(dict(model=_model('gpt2-124m'), batch_size=8, seq_len=1024, steps=10)),
      'gpt2_124m_remat': ConfigDict(dict(model=_model('gpt2-124m', remat='dots'), batch_size=16,
                                         seq_len=1024, steps=10)),
      # LLaMA shape at 1.1B (TinyLlama's: 22 layers, d 2048, GQA 32/4, SwiGLU 5632)
      'llama_1b1': ConfigDict(dict(model=_model('llama-7b', n_layers=22, d_model=2048, n_heads=32,
                                                 n_kv_heads=4, d_ff=5632, remat='dots'), batch_size=4,
                                    seq_len=2048, steps=5)),
  })
  c.optim = base.pretrain().optim
  c.mesh = ConfigDict(dict(data=-1, fsdp=1, tensor=1, expert=1))
  return c
