"""Defaults shared by the instruction-tuning configs (experiment `sft`)."""
import dataclasses

from ml_collections import ConfigDict

from data import tasks
from experiments.configs import base
from lm import peft


def sft() -> ConfigDict:
  c = ConfigDict()
  c.experiment = 'sft'
  c.seed = 0
  c.init_from = ''           # a finished stage's workdir, or hf:PATH; the model comes from it
  c.model = base.model()     # only runtime fields (dtype, remat, ...) may differ from the source
  c.data = ConfigDict(dict(
      source='works',        # works | lines | hh | a JSON-lines file of instructions or chats
      path='',               # for hh: another file in hh-rlhf's format ('' = the shipped split)
      template='alpaca',     # alpaca | chat | none
      train_on='response',   # response (loss on answers only) | all
      truncate='prompt_left',
      seq_len=0,             # 0: the model's context
      pack=True,             # several examples per row (segment ids keep them apart)
      val_fraction=0.1,      # for hh / files: held-out share (by content hash)
      mixture=ConfigDict(dict(   # how the stream draws its sources (data/tasks.task_mixture)
          cap=0,             # T5's K: a source counts as at most this many examples (0: no cap)
          temperature=1.0,   # rates ** (1/T), T > 1 flattens towards uniform
          weights=ConfigDict({f: 0.0 for f in tasks.FAMILIES}),   # explicit per-family
                             # proportions instead of examples-proportional (all 0: proportional)
      )),
      pretrain_rate=0.0,     # fixed share of the stream that is pretraining text (OPT-IML)
      pretrain_weight=1.0,   # its loss weight
      pretrain_chunk_chars=512,
      works=ConfigDict(dict(
          families='',       # comma-separated subset of data/tasks.FAMILIES ('' = all)
          held_out_family='play',   # never trained on; evaluated on held-out plays (options listed,
                                  # so a model that learned to answer from options can transfer)
          n_per_family=2000, seed=0,
          sizes=ConfigDict({f: 0 for f in tasks.FAMILIES}),   # a family's own example count
      )),                                                     # (0: n_per_family)
  ))
  c.peft = ConfigDict({k: v for k, v in dataclasses.asdict(peft.PeftConfig()).items()})
  c.train = ConfigDict(dict(
      steps=300, batch_size=16, grad_accum=1, log_every=10, eval_batch_size=0,
      checkpoint_every=100, keep_checkpoints=2, stop_after=0,
      allow_changed_optim=False))   # True: resume with changed optim.* / train.steps
  c.optim = ConfigDict(dict(
      lr=3e-4, min_lr=3e-5, warmup_steps=20, decay_steps=0, schedule='cosine',
      b1=0.9, b2=0.99, eps=1e-8, weight_decay=0.0, grad_clip=1.0, mu_dtype=''))
  c.eval = ConfigDict(dict(
      every=100,             # steps between validation losses (0: none)
      before=True,           # also evaluate the init_from model (the baseline)
      n_per_family=40,       # held-out-play examples per family answered greedily
      val_examples=256,      # validation examples for the response-token loss (0: all)
      max_new_tokens=24, batch_size=64))
  c.mesh = ConfigDict(dict(data=-1, fsdp=1, tensor=1, expert=1))
  return c
