"""RLHF testbed, stage 1: a small BPE model of the complete works (so samples are words).

The chain (each stage in minutes on 2 cores; see README "RLHF testbed"):
  rlhf_pretrain -> rlhf_sft (line openings -> rest of line + eos) -> rlhf_preferences (K SFT
  samples per prompt ranked by VADER gold) -> rlhf_reward (proxy RM) -> rlhf_ppo / rlhf_dpo /
  rlhf_grpo / rlhf_rloo / rlhf_bon -> overoptimisation

python -m experiments.run --config=experiments/configs/rlhf_pretrain.py --workdir=runs/rlhf/pretrain
"""
from experiments.configs import base


def get_config():
  c = base.pretrain()
  c.data.path = 'shakespeare_works'
  c.data.tokenizer = 'bpe'
  c.data.vocab_size = 2048
  c.model = base.model(d_model=128, n_layers=4, n_heads=4, max_seq_len=64, use_bias=False,
                       activation='gelu', tie_embeddings=True)
  c.train.update(steps=1500, batch_size=32, log_every=50, eval_batches=20,
                 checkpoint_every=500, sample_tokens=48)
  c.eval.every = 500
  c.optim.update(lr=2e-3, min_lr=2e-4, warmup_steps=100)
  return c
