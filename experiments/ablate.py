"""Architecture ablation: train a grid of variants at equal parameter count and token budget.

Each variant is a set of model overrides on a shared baseline. Its MLP width (d_ff) is
re-solved so that its non-embedding parameter count matches the baseline's (e.g. SwiGLU's
three matrices get 2/3 of the width). Runs live in sub-workdirs and are resumable like
the scaling sweep; the result is a table and a plot of validation loss and tokens/s.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import os

from ml_collections import ConfigDict
from tqdm import tqdm

from experiments import registry
from experiments.stages import runlog
from lm.config import ConfigError, ModelConfig


def matched_d_ff(base: ModelConfig, overrides: dict) -> int:
  """The d_ff (a multiple of 8) that brings the variant closest to the baseline's size."""
  target = base.num_params(non_embedding=True)
  fields = {**dataclasses.asdict(base), **overrides, 'd_ff': 8}
  small = ModelConfig(**fields).num_params(non_embedding=True)
  per_unit = ModelConfig(**{**fields, 'd_ff': 16}).num_params(non_embedding=True) - small
  d_ff = 8 + round((target - small) / per_unit) * 8
  if d_ff < 8:
    raise ConfigError(f'Variant {overrides} has more parameters than the baseline even with a '
                      'tiny MLP; shrink it or enlarge the baseline.')
  return d_ff


def variant_configs(config: ConfigDict) -> dict[str, ConfigDict]:
  base_fields = config.run.model.to_dict()
  base_fields['vocab_size'] = base_fields['vocab_size'] or 256   # sizes only; real vocab at run time
  base = ModelConfig.from_dict(base_fields)
  out = {}
  for name, overrides in config.variants.items():
    overrides = dict(overrides)
    c = copy.deepcopy(config.run)
    c.model.update(overrides)
    if config.match_params and 'd_ff' not in overrides:
      c.model.d_ff = matched_d_ff(base, overrides)
    c.train.update(samples=0)
    c.eval.every = c.train.steps
    out[name] = c
  return out


def run(config: ConfigDict, workdir: str):
  pretrain = registry.get('pretrain')   # a study runs the pretrain experiment (drivers never import drivers)
  os.makedirs(workdir, exist_ok=True)
  configs = variant_configs(config)
  rows = []
  for name, c in tqdm(configs.items(), desc='ablation', unit='variant'):
    sub = os.path.join(workdir, 'runs', name)
    done = os.path.join(sub, 'result.json')
    if not os.path.exists(done):
      c.data.data_dir = c.data.data_dir or os.path.join(workdir, 'data')
      pretrain(c, sub)
      metrics = runlog.read(os.path.join(sub, 'metrics.jsonl'))
      resolved = json.load(open(os.path.join(sub, 'config.json')))['resolved']
      tps = [m['tokens_per_sec'] for m in metrics if m.get('tokens_per_sec')]
      with open(done, 'w') as f:
        json.dump({'variant': name, 'params': resolved['non_embedding_params'],
                   'd_ff': c.model.d_ff, 'val_loss': [m['val_loss'] for m in metrics if 'val_loss' in m][-1],
                   'tokens_per_sec': sorted(tps)[len(tps) // 2] if tps else None}, f)
    rows.append(json.load(open(done)))
  table = format_table(rows)
  print(table)
  with open(os.path.join(workdir, 'ablation.json'), 'w') as f:
    json.dump(rows, f, indent=1)
  with open(os.path.join(workdir, 'ablation.txt'), 'w') as f:
    f.write(table + '\n')
  plot(rows, os.path.join(workdir, 'ablation.png'))
  return rows


def format_table(rows: list[dict]) -> str:
  head = f"{'variant':<22}{'params':>10}{'d_ff':>7}{'val loss':>10}{'tokens/s':>11}"
  lines = [head, '-' * len(head)]
  for r in sorted(rows, key=lambda r: r['val_loss']):
    tps = f"{r['tokens_per_sec']:,.0f}" if r['tokens_per_sec'] else 'n/a'
    lines.append(f"{r['variant']:<22}{r['params']:>10,}{r['d_ff']:>7}{r['val_loss']:>10.4f}{tps:>11}")
  return '\n'.join(lines)


def plot(rows: list[dict], path: str) -> str:
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  rows = sorted(rows, key=lambda r: r['val_loss'])
  names = [r['variant'] for r in rows]
  fig, axes = plt.subplots(1, 2, figsize=(11, 0.4 * len(rows) + 1.5), sharey=True)
  axes[0].barh(names, [r['val_loss'] for r in rows], color='tab:blue')
  lo = min(r['val_loss'] for r in rows)
  axes[0].set_xlim(lo - 0.1, max(r['val_loss'] for r in rows) + 0.05)
  axes[0].set_xlabel('validation loss (lower is better)')
  axes[1].barh(names, [r['tokens_per_sec'] or 0 for r in rows], color='tab:orange')
  axes[1].set_xlabel('training tokens/s')
  axes[0].invert_yaxis()
  for ax in axes:
    ax.grid(alpha=0.3, axis='x')
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return path
