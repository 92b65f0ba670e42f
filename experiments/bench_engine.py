"""generate_until's two paths side by side in one process: static batches vs the engine.

  python -m experiments.run --config=experiments/configs/bench_engine.py --workdir=/tmp/bench_engine \
      [--config.n=64] [--config.k=4] [--config.batch=16] [--config.train_steps=0]

The workload: the `gsm8k` preset (until 'Question:' / '\\n\\n', 256 new tokens) over n
generated arithmetic word problems in GSM8K format (data/arith.py), k demonstrations from
another file (one few-shot head for every prompt), on a character model the size of the
README's quick start (d_model 128, 4 layers, 4 heads; context 1024 so the head fits).
`train_steps=N` first trains it N AdamW steps on problems in that format, so answers end at
their own lengths (random weights rarely produce a stop string: every row runs 256 tokens).
Each path runs twice (compile, then timed); prints wall seconds, answer tokens/s (tokens
up to each answer's stop, the same work for both), tokens computed, and whether the
outputs and the engine's shared head agree.

Measured (CPU, 2 cores shared with other jobs, load average ~15; the first at 6c4d27f, the second at a529698,
then as `python -m experiments.evaluation.bench_engine --KEY VALUE`, the same keys):
  k=2 batch=16 max_len=512 max_new=128 init_std=0.3 extra_stop=.
    answers 0-97 tokens (median 18); static 29.6 s, engine 16.8 s (1.76x), outputs equal
    64 of 64; shared head 311 tokens for 45 prompts (the rest truncated or first_n's own)
  k=4 batch=16 train_steps=300
    2 of 64 answers end before 256 tokens (the model has not learned to stop): static
    177.5 s, engine 206.5 s (0.86x), outputs equal 64 of 64; shared head 627 tokens for 60
"""
from __future__ import annotations

import json
import os
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from data import arith, tokenizers
from experiments.evaluation import eval_model, eval_tasks
from lm import model


def workload(n: int, k: int, seed: int = 0):
  """(task config, documents, tokenizer): n held-out problems, k demos from a train split."""
  problems = arith.to_gsm8k(arith.generate(n, seed=seed, split='test'))
  demos = arith.to_gsm8k(arith.generate(max(k, 1), seed=seed, split='train'))
  folder = tempfile.mkdtemp()
  paths = {}
  for name, rows in (('test', problems), ('demos', demos)):
    paths[name] = os.path.join(folder, name + '.jsonl')
    with open(paths[name], 'w', encoding='utf-8') as f:
      f.writelines(json.dumps(r) + '\n' for r in rows)
  cfg = eval_tasks.preset('gsm8k', path=paths['test'])
  cfg.fewshot.update(k=k, path=paths['demos'])
  train = arith.to_gsm8k(arith.generate(2000, seed=seed + 1, split='train'))
  corpus = ''.join(f"Question: {r['question']}\nAnswer: {r['answer']}\n\n" for r in train)
  tok = tokenizers.CharTokenizer.from_texts([corpus, *(json.dumps(r) for r in problems + demos)])
  docs, _ = eval_tasks.load(cfg, tok)
  return cfg, docs, tok, corpus


def quick_start_model(tok, max_len: int, init_std: float = 0.02):
  from lm.config import ModelConfig
  return ModelConfig(vocab_size=tok.vocab_size, d_model=128, n_layers=4, n_heads=4,
                     max_seq_len=max_len, use_bias=False, activation='gelu', tie_embeddings=True,
                     init_std=init_std)


def train(params, cfg, tok, corpus: str, steps: int, batch: int = 8, seq: int = 512, lr=3e-3):
  """A few AdamW steps of next-token loss on random windows of the corpus (positions past
  `seq` stay untrained, which only makes late tokens noisier)."""
  ids = np.asarray(tok.encode(corpus), np.int32)
  opt = optax.adamw(optax.cosine_decay_schedule(lr, steps, 0.1), weight_decay=0.0)
  state = opt.init(params)

  def loss(p, x):
    logits, _ = model.forward(p, x[:, :-1], cfg)
    lp = jax.nn.log_softmax(logits.astype(jnp.float32))
    return -jnp.take_along_axis(lp, x[:, 1:, None], -1).mean()

  @jax.jit
  def step(p, s, x):
    value, g = jax.value_and_grad(loss)(p, x)
    u, s = opt.update(g, s, p)
    return optax.apply_updates(p, u), s, value

  rng = np.random.default_rng(0)
  for i in range(steps):
    starts = rng.integers(0, len(ids) - seq - 1, size=batch)
    params, state, value = step(params, state, np.stack([ids[s:s + seq + 1] for s in starts]))
    if i % 50 == 0 or i == steps - 1:
      print(f'train step {i}: loss {float(value):.3f}', flush=True)
  return params


def run(config, workdir: str) -> dict:
  a = config
  os.makedirs(workdir, exist_ok=True)
  task, docs, tok, corpus = workload(a.n, a.k)
  task.generation.max_new_tokens = a.max_new
  if a.extra_stop:
    task.generation.until = tuple(task.generation.until) + (a.extra_stop,)
  cfg = quick_start_model(tok, a.max_len, a.init_std)
  params = model.init(cfg, jax.random.key(0))
  print(f'model: {sum(x.size for x in jax.tree.leaves(params)):,} params; {len(docs)} requests, '
        f'prompts {min(len(tok.encode(d["prompt"])) for d in docs)}-'
        f'{max(len(tok.encode(d["prompt"])) for d in docs)} tokens; device {jax.devices()[0]}',
        flush=True)
  if a.train_steps:
    params = train(params, cfg, tok, corpus, a.train_steps)
  results = {}
  for engine in (False, True):
    lm = eval_model.LanguageModel(params, cfg, tok, batch_size=a.batch, engine=engine)
    for rep in ('compile', 'timed'):
      before = lm.stats['generated_tokens']
      t0 = time.perf_counter()
      out = eval_tasks.run(task, docs, lm, bootstrap_iters=0)
      wall = time.perf_counter() - t0
      results[engine, rep] = dict(wall=wall, computed=lm.stats['generated_tokens'] - before,
                                  answers=[s['output'] for s in out['samples']],
                                  em=out['metrics']['exact_match_flexible']['value'])
    if engine:
      results['head'] = (lm.stats['shared_prefix_tokens'], lm.stats['shared_prefix_requests'],
                         dict(lm._engine.stats))
  lengths = [len(tok.encode(x)) for x in results[False, 'timed']['answers']]
  # an answer's tokens plus its stop string's (for a row that hit one): the work a path must do
  useful = sum(min(n + 1, task.generation.max_new_tokens) for n in lengths)
  print(f'answer lengths (tokens): min {min(lengths)}, median {int(np.median(lengths))}, '
        f'max {max(lengths)}; {sum(n < task.generation.max_new_tokens for n in lengths)} of '
        f'{len(lengths)} ended before {task.generation.max_new_tokens}')
  for engine in (False, True):
    for rep in ('compile', 'timed'):
      r = results[engine, rep]
      print(f"{'engine' if engine else 'static'} {rep:7s}: {r['wall']:7.2f} s, "
            f"{useful / r['wall']:8.1f} answer tokens/s, {r['computed']} tokens decoded, "
            f"exact_match_flexible {r['em']:.3f}")
  same = sum(x == y for x, y in zip(results[False, 'timed']['answers'], results[True, 'timed']['answers']))
  head, members, stats = results['head']
  print(f"engine / static (timed): {results[False, 'timed']['wall'] / results[True, 'timed']['wall']:.2f}x; "
        f'outputs equal: {same} of {len(lengths)}')
  print(f'shared head: {head} tokens for {members} of {len(lengths)} prompts; engine prefill '
        f"tokens {stats.get('prefill_tokens')} (prompts total "
        f"{sum(len(tok.encode(d['prompt'])) for d in docs) * 2}, both runs), "
        f"decode calls {stats.get('decode_calls')}")
  summary = {'speedup': results[False, 'timed']['wall'] / results[True, 'timed']['wall'],
             'outputs_equal': same, 'requests': len(lengths),
             'seconds': {('engine' if e else 'static') + '_' + rep: results[e, rep]['wall']
                         for e in (False, True) for rep in ('compile', 'timed')},
             'shared_head_tokens': head, 'shared_head_requests': members}
  with open(os.path.join(workdir, 'bench_engine.json'), 'w') as f:
    json.dump(summary, f, indent=1)
  return summary
