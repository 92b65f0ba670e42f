"""A GRPO iteration's rollout (generation) time, static batch (lm.decode) vs the continuous-
batching engine (lm/engine, rollout.engine=True) with pools of --slots sizes (0: a slot per
row; rollout.engine_slots), side by side in one process on the same random weights, prompts
and keys (stages/rollouts.generate: what the online loop calls), runs interleaved.

  python -m experiments.run --config=experiments/configs/bench_rollouts.py --workdir=/tmp/bench_rollouts \
      [--config.repeats=5] [--config.slots=0,16,32]      (writes WORKDIR/bench_rollouts.json)

Two testbeds' shapes: rlhf (rlhf_pretrain's model: BPE 2048, d128 x 4 layers, context 64;
rlhf_grpo with samples=8: 16 prompts x 8, prompts of 2-8 tokens, 24 new tokens) and arith
(cot_arith's model: chars, d64 x 3 layers rope, context 320; rlvr_arith: 16 x 8, 40-60 character
prompts, 96 new tokens). Random weights give no EOS of their own, so the EOS id is the token
whose sampled frequency (in a run without EOS) makes the mean response length nearest a target
(rlhf 12 of 24 tokens, arith 48 of 96): mixed lengths, reported as mean / min / max.
"""
from __future__ import annotations

import json
import os
import statistics
import time

import jax
import numpy as np

from experiments.stages import rollouts
from lm import model
from lm.config import ModelConfig

SHAPES = {
    'rlhf': dict(cfg=dict(vocab_size=2048, d_model=128, n_layers=4, n_heads=4, max_seq_len=64,
                          use_bias=False, activation='gelu', tie_embeddings=True, init_std=0.3),
                 prompts=16, samples=8, prompt_len=(2, 8), new=24, target=12),
    'arith': dict(cfg=dict(vocab_size=40, d_model=64, n_layers=3, n_heads=4, max_seq_len=320,
                           use_bias=False, norm='layernorm', activation='gelu', positions='rope',
                           tie_embeddings=True, init_std=0.3),
                  prompts=16, samples=8, prompt_len=(40, 60), new=96, target=48),
}


def pick_eos(params, cfg, prompts, width, n_new, target) -> int:
  """The token whose first-hit step, over sampled rows without EOS, averages nearest `target`."""
  ro = rollouts.generate(params, prompts, jax.random.key(99), cfg=cfg, width=width,
                         max_new_tokens=n_new, temperature=1.0, eos=None)
  resp = ro.tokens[:, width:]
  best, gap = 1, None
  for t in range(1, cfg.vocab_size):
    hit = [(np.flatnonzero(r == t)[:1] + 1).tolist() or [n_new] for r in resp]
    mean = float(np.mean(hit))
    if gap is None or abs(mean - target) < gap:
      best, gap = t, abs(mean - target)
  return best


def bench(name: str, spec: dict, repeats: int, slots=(0,)) -> dict:
  cfg = ModelConfig(**spec['cfg'])
  params = model.init(cfg, jax.random.key(0))
  rng = np.random.default_rng(0)
  lo, hi = spec['prompt_len']
  distinct = [rng.integers(1, cfg.vocab_size, int(rng.integers(lo, hi + 1))) for _ in range(spec['prompts'])]
  prompts = [p for p in distinct for _ in range(spec['samples'])]
  width = hi
  eos = pick_eos(params, cfg, prompts, width, spec['new'], spec['target'])
  out = {'rows': len(prompts), 'max_new_tokens': spec['new'], 'eos': eos}
  paths = ['static'] + [f'engine_{n}' for n in slots]
  gens = {path: (lambda k, path=path: rollouts.generate(
      params, prompts, jax.random.key(k), cfg=cfg, width=width, max_new_tokens=spec['new'],
      temperature=1.0, eos=eos, use_engine=path != 'static',
      slots=0 if path == 'static' else int(path.split('_')[1]))) for path in paths}
  for g in gens.values():
    g(1000)                                       # compile (and warm every bucket once)
  times, lengths = {p: [] for p in gens}, {p: [] for p in gens}
  for i in range(repeats):                        # interleaved: all see the same machine load
    for path, g in gens.items():
      t0 = time.perf_counter()
      ro = g(i)
      times[path].append(time.perf_counter() - t0)
      lengths[path].append(ro.lengths)
  for path in gens:
    n, t = np.concatenate(lengths[path]), times[path]
    out[path] = {'seconds': statistics.median(t), 'all_seconds': [round(x, 4) for x in t],
                 'length_mean': float(n.mean()), 'length_min': int(n.min()), 'length_max': int(n.max()),
                 'tokens_per_sec': float(n.sum() / len(t) / statistics.median(t))}
    out[path]['speedup'] = out['static']['seconds'] / out[path]['seconds']
  return out


def run(config, workdir: str) -> dict:
  slots = [int(x) for x in str(config.slots).split(',')]
  res = {'backend': jax.default_backend(), 'devices': jax.device_count()}
  for name in str(config.shapes).split(','):
    res[name] = r = bench(name, SHAPES[name], config.repeats, slots)
    st = r['static']
    print(f"{name}: {r['rows']} rows x {r['max_new_tokens']} new tokens (lengths mean "
          f"{st['length_mean']:.1f}, {st['length_min']}-{st['length_max']}): seconds per iteration's "
          f"generation (median of {config.repeats}): static {st['seconds']:.3f}" + ''.join(
              f", {p} {v['seconds']:.3f} ({v['speedup']:.2f}x)" for p, v in r.items()
              if p.startswith('engine')), flush=True)
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, 'bench_rollouts.json'), 'w') as f:
    json.dump(res, f, indent=1)
  return res
