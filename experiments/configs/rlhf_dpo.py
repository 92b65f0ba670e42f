"""RLHF testbed, offline: DPO (IPO / cDPO by loss.kind) on the K-wise gold rankings from the SFT
policy, then held-out gold / proxy / KL beside the SFT policy's.

python -m experiments.run --config=experiments/configs/rlhf_dpo.py --workdir=runs/rlhf/dpo_b0.1 \
    --config.init_from=runs/rlhf/sft --config.data.path=runs/rlhf/prefs/preferences.jsonl \
    --config.reward_from=runs/rlhf/rm --config.kl.coef=0.1
(a kl.coef (beta) sweep: one workdir per beta, e.g. runs/rlhf/dpo_b0.03, dpo_b0.3)
"""
import dataclasses

from ml_collections import ConfigDict

from experiments.configs import rlhf_base
from lm import peft


def get_config():
  c = ConfigDict()
  c.experiment = 'dpo'
  c.seed = 0
  c.init_from = 'runs/rlhf/sft'        # the SFT policy: trained copy starts here, reference stays
  c.reward_from = 'runs/rlhf/rm'       # proxy RM, only for the final evaluation ('' = none)
  c.data = ConfigDict(dict(
      path='runs/rlhf/prefs/preferences.jsonl',   # K-wise records or hh-rlhf chosen / rejected
      pairs='best',          # best: best vs each worse response; all: every ranked pair
      max_k=16,              # records with more responses are counted skips
      seq_len=0,             # 0: the model's context; prompts cut from the left
      val_fraction=0.1,      # held-out share of prompts (by content hash)
      max_val=256))          # cap on held-out pairs (whole batches)
  c.loss = ConfigDict(dict(
      kind='dpo',            # dpo | ipo | cdpo
      label_smoothing=0.0))  # cdpo: probability eps that a label is flipped
  c.kl = ConfigDict(dict(coef=0.1))   # beta: the KL strength (IPO: tau)
  c.peft = ConfigDict({k: v for k, v in dataclasses.asdict(peft.PeftConfig()).items()})
  c.train = ConfigDict(dict(
      steps=150, batch_size=32, grad_accum=1, log_every=10,
      checkpoint_every=50, keep_checkpoints=2, stop_after=0,
      allow_changed_optim=False))   # True: resume with changed optim.* / train.steps
  c.optim = ConfigDict(dict(
      lr=1e-4, min_lr=1e-5, warmup_steps=10, decay_steps=0, schedule='cosine',
      b1=0.9, b2=0.99, eps=1e-8, weight_decay=0.0, grad_clip=1.0, mu_dtype=''))
  c.prompts = rlhf_base.prompts()      # n_eval held-out prompts for the final evaluation
  c.rollout = ConfigDict(dict(max_new_tokens=24, temperature=1.0))   # the held-out samples
  c.eval = ConfigDict(dict(every=50,   # steps between held-out pair losses (0: none)
                           gold='vader', batch_size=64,
                           before=True))   # also evaluate the reference (same prompts / draws)
  c.mesh = rlhf_base.mesh()
  return c
