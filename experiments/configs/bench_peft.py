"""Full fine-tuning vs LoRA / prefix / prompt / adapters on a d_model=512 model, one run.

python -m experiments.run --config=experiments/configs/bench_peft.py --workdir=runs/bench_peft
"""
import dataclasses

from ml_collections import ConfigDict

from lm import peft


def get_config():
  c = ConfigDict()
  c.experiment = 'bench_peft'
  c.model = ConfigDict(dict(vocab_size=8192, d_model=512, n_layers=4, n_heads=8, max_seq_len=256,
                            use_bias=False, activation='gelu'))
  c.methods = 'none,lora,prefix,prompt,adapter'
  c.peft = ConfigDict(dataclasses.asdict(peft.PeftConfig()))   # lora rank 8 on q,k,v,o
  c.batch_size = 8
  c.seq_len = 256
  c.steps = 3
  c.warmup_steps = 1
  c.repeats = 3
  c.optim = ConfigDict(dict(lr=1e-4, min_lr=1e-5, warmup_steps=10, decay_steps=0, schedule='cosine',
                            b1=0.9, b2=0.99, eps=1e-8, weight_decay=0.0, grad_clip=1.0, mu_dtype=''))
  c.mesh = ConfigDict(dict(data=-1, fsdp=1, tensor=1, expert=1))
  return c
