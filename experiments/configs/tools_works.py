"""Tool use on the works (experiment `tools_qa`): closed-book vs RAG vs ReAct accuracy on
held-out questions about the plays ("Which play is the line ... from?", "Who speaks ...?",
"What line follows ...?"), with BM25 recall@k. One command, offline, minutes on 2 cores:

python -m experiments.run --config=experiments/configs/tools_works.py --workdir=runs/tools_qa

With init_from empty a small model is trained here from scratch on the training questions in
all three formats (ReAct: gold plans run through the real tools). A real model:
--config.init_from=hf:PATH --config.train.steps=0 --config.demos=3 (few-shot, no tuning), or
a run's workdir with train.steps > 0 to fine-tune it here first. --config.dense=True adds
dense retrieval from the model's mean-pooled hidden states (recall@k only).
"""
from ml_collections import ConfigDict

from experiments.configs import base


def get_config():
  c = ConfigDict()
  c.experiment = 'tools_qa'
  c.seed = 0
  c.init_from = ''            # '' (train a small model here) | a run's workdir | hf:PATH
  c.methods = ('closed_book', 'rag', 'react')
  c.data = ConfigDict(dict(
      collection='works',     # 'works' (every speech) or a JSON-lines file of {title, text}
      plays='',               # comma-separated titles: only these plays ('' = all 37)
      families='play,speaker,next',
      n_train=500,            # training questions per family
      n_eval=100,             # held-out questions per family
      eval_fraction=0.2,      # share of speeches whose lines are held out
      seed=0))
  c.bm25 = ConfigDict(dict(k1=1.5, b=0.75))
  c.rag_k = 1                 # passages retrieved for RAG (the question is the query)
  c.recall_k = (1, 5, 10)
  c.obs_lines = 2             # lines of a found speech that `search` shows
  c.max_steps = 5             # ReAct steps before an episode stops unfinished
  c.max_step_tokens = 48
  c.max_answer_tokens = 32
  c.demos = 0                 # training examples prepended to each prompt (for untuned models)
  c.dense = False             # also rank by mean-pooled hidden states (cosine)
  c.batch_size = 64           # generation batch
  c.seq_len = 256             # training rows and the evaluation context (<= the model's)
  c.tokenizer = 'bpe'         # of a model trained here: bpe | unigram | char
  c.vocab_size = 1024         # its subword vocabulary
  c.model = base.model(d_model=64, n_layers=2, n_heads=2, d_ff=256, max_seq_len=256,
                       positions='rope', norm='rmsnorm', activation='swiglu', use_bias=False)
  c.train = ConfigDict(dict(steps=1500, batch_size=16, grad_accum=1, log_every=100, keep_checkpoints=1,
                            allow_changed_optim=False))   # True: resume with changed optim.* / train.steps
  c.optim = ConfigDict(dict(
      lr=3e-3, min_lr=1e-4, warmup_steps=50, decay_steps=0, schedule='cosine',
      b1=0.9, b2=0.99, eps=1e-8, weight_decay=0.0, grad_clip=1.0, mu_dtype=''))
  c.mesh = ConfigDict(dict(data=-1, fsdp=1, tensor=1, expert=1))
  return c
