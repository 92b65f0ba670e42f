"""Defaults shared by every pretraining config; a config file overrides what it needs."""
import dataclasses

from ml_collections import ConfigDict

from lm.config import ModelConfig


def model(**overrides) -> ConfigDict:
  fields = dataclasses.asdict(ModelConfig())
  fields['vocab_size'] = 0  # 0: take it from the tokenizer
  fields.update(overrides)
  return ConfigDict(fields)


def pretrain() -> ConfigDict:
  c = ConfigDict()
  c.experiment = 'pretrain'
  c.seed = 0
  c.init_from = ''  # a finished stage's workdir, or hf:PATH (a local Hugging Face folder)
  c.model = model()
  c.data = ConfigDict(dict(
      path='shakespeare_works',  # a text file, a directory, a corpus shipped with the install, or
                                 # JSON-lines documents {"text": ...} (.jsonl[.gz], e.g. prepare's output)
      tokenizer='char',          # char | bpe | unigram (SentencePiece, byte fallback) | a tokenizer file
      vocab_size=2048,           # for bpe / unigram
      seq_len=0,                 # 0: model.max_seq_len
      val_fraction=0.1,          # last 10% of each document is validation
      sampling='random',         # random windows (nanoGPT) | sequential (epochs of packed windows)
      data_dir='',               # prepared tfds data; '' = WORKDIR/data
      # Several sources instead of data.path: name -> ConfigDict(path=..., weight=..., max_windows=...)
      # (weight 0 everywhere: proportional to size, capped by mixture_cap); see experiments/stages/corpus.py.
      mixture=ConfigDict(),
      mixture_cap=0,             # T5's K: a source counts as at most this many windows (0: no cap)
      mixture_temperature=1.0,   # > 1 flattens size-proportional rates towards uniform
  ))
  c.eval = ConfigDict(dict(every=250))   # steps between validations (0: none)
  c.train = ConfigDict(dict(
      steps=1000,
      objective='next_token',    # next_token | prefix_lm | masked_lm (model.causal=False) | span_corruption
      batch_size=32,             # global, in sequences
      grad_accum=1,              # microbatches per step (scan inside the jitted step)
      log_every=10,
      eval_batches=0,            # 0: the whole validation split
      eval_batch_size=0,         # 0: train.batch_size
      checkpoint_every=500,
      keep_checkpoints=3,
      stop_after=0,              # stop this invocation after N steps (preemptible slices); 0: run to the end
      allow_changed_optim=False, # a resume whose optim.* or train.steps differ is refused unless True
      # Several processes: every N steps the hosts all-gather their SIGTERM/SIGINT flags and all
      # stop at that step (one collective save). The gather drains the queued steps, so N=10
      # costs <1 dispatch gap per 10 steps, and the stop comes within 10 steps: well inside a
      # 30 s preemption notice at steps under ~2 s. One process stops at the next step anyway.
      preempt_check_every=10,
      max_consecutive_skips=20,  # stop after this many non-finite updates in a row (each is skipped); 0: never
      # Loss spikes (PaLM): a logged loss above spike_factor x the median of the last spike_window
      # logged losses restarts from the newest checkpoint before it and skips spike_skip_batches
      # batches (0: those from that checkpoint through the spike). spike_factor=0: off.
      spike_factor=0.0,
      spike_window=20,
      spike_skip_batches=0,
      samples=3,                 # printed at the end
      sample_tokens=200,
      sample_prompt='\n',
      temperature=0.8,
      top_k=0,
  ))
  c.optim = ConfigDict(dict(
      lr=1e-3, min_lr=1e-4, warmup_steps=100, decay_steps=0, schedule='cosine',
      b1=0.9, b2=0.99, eps=1e-8, weight_decay=0.1, grad_clip=1.0, mu_dtype='',
  ))
  c.mesh = ConfigDict(dict(data=-1, fsdp=1, tensor=1, expert=1))
  return c
