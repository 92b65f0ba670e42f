"""Defaults shared by the reward-model configs (experiment `reward`)."""
import dataclasses

from ml_collections import ConfigDict

from experiments.configs import base
from lm import peft


def reward() -> ConfigDict:
  c = ConfigDict()
  c.experiment = 'reward'
  c.seed = 0
  c.init_from = ''           # an SFT or pretraining workdir, or hf:PATH; the trunk comes from it
  c.model = base.model()     # only runtime fields (dtype, remat, ...) may differ from the source
  c.data = ConfigDict(dict(
      path='',               # preference JSON lines (hh-rlhf or K-wise); '' = the shipped harmless-base
      k=2,                   # responses per prompt in a batch element (2: chosen / rejected)
      seq_len=0,             # 0: the model's context; prompt + response cut from the left
      val_fraction=0.1,      # held-out share of prompts (by content hash)
      max_val=0,             # cap on held-out groups (0: all)
      margin=0.0,            # m in -log sigmoid(r_w - r_l - m)
  ))
  c.ensemble = ConfigDict(dict(
      members=1,             # M reward models in one vmapped step (Coste et al. 2023); 1 = one model
      combine='mean',        # how load_reward_model scores: mean | min | mean_minus_std | uwo
      lam=0.5,               # lambda of mean - lam * std (mean_minus_std) and mean - lam * var (uwo)
  ))
  c.peft = ConfigDict({k: v for k, v in dataclasses.asdict(peft.PeftConfig()).items()})
  c.train = ConfigDict(dict(
      steps=200, batch_size=16, grad_accum=1, log_every=10,
      checkpoint_every=100, keep_checkpoints=2, stop_after=0,
      allow_changed_optim=False))   # True: resume with changed optim.* / train.steps
  c.optim = ConfigDict(dict(
      lr=1e-4, min_lr=1e-5, warmup_steps=20, decay_steps=0, schedule='cosine',
      b1=0.9, b2=0.99, eps=1e-8, weight_decay=0.0, grad_clip=1.0, mu_dtype=''))
  c.eval = ConfigDict(dict(
      every=100,             # steps between held-out losses (0: none)
      norm_groups=0,         # training groups scored for the mean-0 / std-1 normaliser (0: all)
      bow_words=5000,        # bag-of-words baseline: vocabulary size and L2 strength
      bow_l2=1.0))
  c.mesh = ConfigDict(dict(data=-1, fsdp=1, tensor=1, expert=1))
  return c
