"""Chain-of-thought, self-consistency and PAL on generated arithmetic word problems.

A tiny character-level model is pretrained (experiments/pretrain.py's stage) on documents of
problems in one style each: answers alone (direct), with rationales (few-shot CoT and the
zero-shot 'Let's think step by step' layout) and as PAL programs. Held-out problems are then
answered by each prompting method: direct vs CoT vs self-consistency maj@k vs zero-shot CoT
vs PAL, overall and by the number of steps and digits.

python -m experiments.run --config=experiments/configs/cot_arith.py --workdir=/tmp/cot
A real model instead (no training): --config.init_from=hf:PATH (e.g. with --config.prompt.k=4).
The CoT-components ablation: --config.data.ablation=symbols|patterns|text.
"""
from ml_collections import ConfigDict

from experiments.configs import base


def get_config():
  c = ConfigDict()
  c.experiment = 'cot'
  c.seed = 0
  c.init_from = ''        # '': train the models below; a run workdir or hf:PATH: evaluate it alone
  c.data = ConfigDict(dict(
      source='arith',     # arith (generated) | gsm8k (a JSON-lines file of {question, answer})
      path='',            # gsm8k: the evaluation file
      demo_path='',       # gsm8k: demonstrations from this file ('' = the first prompt.k of path)
      n_train=12000,      # generated training problems
      train_steps=(1, 3), train_digits=(1, 1),
      n_eval=120,         # held-out problems (never a training question)
      eval_steps=(1, 3), eval_digits=(1, 2),
      ops='+-',
      ablation='none',    # none | symbols | patterns | text: the rationale component removed
      problems_per_doc=2,  # problems per training document, all in the document's style
  ))
  # Models trained from scratch, each on its own mix of styles (weights of documents).
  c.models = ConfigDict(dict(
      mixed=ConfigDict(dict(direct=1.0, cot=1.0, zero_shot_cot=0.5, pal=1.0)),
  ))
  # 3 layers with rotary positions: a 2-layer learned-position model of the same width did not
  # learn to copy operands into its rationale in 600 steps (about 1% on every method).
  c.model = base.model(d_model=64, n_layers=3, n_heads=4, max_seq_len=320, use_bias=False,
                       norm='layernorm', activation='gelu', positions='rope',
                       tie_embeddings=True)
  c.train = ConfigDict(dict(steps=1200, batch_size=8, log_every=50, checkpoint_every=1200))
  c.optim = ConfigDict(dict(lr=3e-3, min_lr=3e-4, warmup_steps=50, weight_decay=0.1))
  c.methods = ('direct', 'cot', 'zero_shot_cot', 'self_consistency', 'pal')
  c.prompt = ConfigDict(dict(
      question='Q: {question}\nA:',
      k=1,                # demonstrations per prompt (the same seeded draw for every query)
      demo_max_steps=2,   # arith: demonstrations drawn among training problems this short
      extract='strict',   # answers.extract: strict ('#### N') | flexible (the last number)
      max_new_tokens=96,  # rationale / program budget
      direct_tokens=8))   # answer budget (direct, zero-shot CoT's second stage)
  c.sc = ConfigDict(dict(n=16, ks=(1, 2, 4, 8, 16), temperature=0.8, top_k=0))
  c.pal = ConfigDict(dict(wall_s=3.0, cpu_s=2, memory_mb=512, workers=2))
  c.eval = ConfigDict(dict(batch_size=128, dtype='float32'))
  c.mesh = ConfigDict(dict(data=-1, fsdp=1, tensor=1, expert=1))
  return c
