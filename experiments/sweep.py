"""Scaling sweep: a sequence of pretraining runs in one process, each in its own sub-workdir.

IsoFLOP design (Hoffmann et al. 2022, approach 2): for every FLOP budget C and every
model size N in the grid, train on D = C / (6 N) tokens with a cosine schedule matched
to that length. Runs whose D falls outside [min_tokens, max_tokens] are skipped.

Resumable: a finished run leaves `result.json` and is not rerun; an interrupted run
resumes from its own checkpoints. The summary (`sweep.json`, a table) lists every run.
"""
from __future__ import annotations

import copy
import json
import math
import os

from ml_collections import ConfigDict
from tqdm import tqdm

from experiments import registry
from experiments.stages import scaling_fits
from experiments.stages import runlog
from lm.config import ConfigError, ModelConfig


def plan(config: ConfigDict) -> list[dict]:
  """Every (budget, size) run of the sweep with its token count and step count."""
  s = config.sweep
  tokens_per_step = config.run.train.batch_size * (config.run.data.seq_len or config.run.model.max_seq_len)
  runs = []
  for budget in s.flop_budgets:
    for n_layers, d_model, n_heads in s.sizes:
      m = config.run.model.to_dict()
      # vocab_size only sizes the embedding, which Kaplan's N excludes
      m.update(n_layers=n_layers, d_model=d_model, n_heads=n_heads, vocab_size=m['vocab_size'] or 256)
      n = ModelConfig.from_dict(m).num_params(non_embedding=True)
      tokens = budget / (6 * n)
      if not s.min_tokens <= tokens <= s.max_tokens:
        continue
      steps = max(1, round(tokens / tokens_per_step))
      runs.append({'name': f'C{budget:.0e}_L{n_layers}_d{d_model}'.replace('+', ''),
                   'flops': float(budget), 'n_layers': n_layers, 'd_model': d_model,
                   'n_heads': n_heads, 'N': n, 'steps': steps, 'D': steps * tokens_per_step})
  if not runs:
    raise ConfigError('The sweep plan is empty: no size gives a token count within '
                      '[sweep.min_tokens, sweep.max_tokens] for any budget; widen them.')
  return runs


def run_config(config: ConfigDict, r: dict, workdir: str) -> ConfigDict:
  c = copy.deepcopy(config.run)
  c.data.data_dir = c.data.data_dir or os.path.join(workdir, 'data')  # prepare the corpus once
  c.model.update(n_layers=r['n_layers'], d_model=r['d_model'], n_heads=r['n_heads'])
  c.eval.every = r['steps']
  c.train.update(steps=r['steps'], checkpoint_every=config.sweep.checkpoint_every,
                 samples=0)
  c.optim.warmup_steps = min(c.optim.warmup_steps, max(1, r['steps'] // 10))
  return c


def run(config: ConfigDict, workdir: str):
  pretrain = registry.get('pretrain')   # a study runs the pretrain experiment (drivers never import drivers)
  os.makedirs(workdir, exist_ok=True)
  runs = plan(config)
  print(f'sweep: {len(runs)} runs, N from {min(r["N"] for r in runs):,} to {max(r["N"] for r in runs):,} '
        f'non-embedding params ({math.log10(max(r["N"] for r in runs) / min(r["N"] for r in runs)):.2f} '
        f'decades), {sum(r["D"] for r in runs):,} tokens in all')
  results = []
  for r in tqdm(runs, desc='sweep', unit='run'):
    sub = os.path.join(workdir, 'runs', r['name'])
    done = os.path.join(sub, 'result.json')
    if not os.path.exists(done):
      pretrain(run_config(config, r, workdir), sub)
      rows = runlog.read(os.path.join(sub, 'metrics.jsonl'))
      val = [x['val_loss'] for x in rows if x.get('val_loss') is not None]
      with open(done, 'w') as f:
        json.dump({**r, 'loss': val[-1], 'train_loss': rows[-1]['loss']}, f)
    with open(done) as f:
      results.append(json.load(f))
  with open(os.path.join(workdir, 'sweep.json'), 'w') as f:
    json.dump(results, f, indent=1)
  print(format_table(results))
  if config.sweep.fit:
    scaling_fits.fit_and_plot(results, workdir, curves=scaling_fits.loss_curves(results, workdir))
  return results


def format_table(results: list[dict]) -> str:
  head = f"{'run':<22}{'FLOPs':>10}{'N':>10}{'D':>12}{'val loss':>10}"
  lines = [head, '-' * len(head)]
  for r in results:
    lines.append(f"{r['name']:<22}{r['flops']:>10.1e}{r['N']:>10,}{r['D']:>12,}{r['loss']:>10.4f}")
  return '\n'.join(lines)
