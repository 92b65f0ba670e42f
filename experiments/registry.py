"""The one table of experiments: config.experiment names a function(config, workdir)."""
from __future__ import annotations

import importlib
from typing import Callable

# name -> 'module:function'; modules import lazily so one experiment's deps don't slow others.
EXPERIMENTS: dict[str, str] = {
    'pretrain': 'experiments.pretrain:run',
    'bench_train': 'experiments.bench:run',
    'bench_data': 'experiments.bench_data:run',
    'bench_decode': 'experiments.bench_decode:run',
    'bench_engine': 'experiments.bench_engine:run',
    'bench_rl': 'experiments.bench_rl:run',
    'bench_rollouts': 'experiments.bench_rollouts:run',
    'scaling_sweep': 'experiments.sweep:run',
    'scaling_fit': 'experiments.fit:run',
    'ablate_arch': 'experiments.ablate:run',
    'prepare': 'experiments.prepare:run',
    'evaluate': 'experiments.evaluate:run',
    'sft': 'experiments.sft:run',
    'reward': 'experiments.reward:run',
    'aot': 'experiments.aot:run',
    'bench_peft': 'experiments.bench_peft:run',
    'export': 'experiments.export:run',
    'cot': 'experiments.cot:run',
    'tools_qa': 'experiments.tools:run',
    'preferences': 'experiments.preferences:run',
    'bon': 'experiments.bon:run',
    'overoptimisation': 'experiments.overoptimisation:run',
    'overopt_study': 'experiments.overopt_study:run',
    'label': 'experiments.label:run',
    'serve': 'experiments.serve:run',
    'ppo': 'experiments.ppo:run',
    'dpo': 'experiments.dpo:run',
    'grpo': 'experiments.grpo:run',
    'rloo': 'experiments.rloo:run',
    'icl_induction': 'experiments.induction:run',
    'icl_sweep': 'experiments.icl:run',
    'task_diversity': 'experiments.task_diversity:run',
    'reasoning': 'experiments.reasoning:run',
}


def get(name: str) -> Callable:
  if name not in EXPERIMENTS:
    raise KeyError(f'Unknown experiment {name!r}; registered: {sorted(EXPERIMENTS)}. '
                   'Set config.experiment to one of them or register yours in experiments/registry.py.')
  module, fn = EXPERIMENTS[name].split(':')
  return getattr(importlib.import_module(module), fn)


def algorithm(name: str):
  """The online-RL algorithm class (experiments.stages.online.Algorithm) of a registered
  experiment: its module's ALGORITHM (e.g. 'ppo' -> experiments.ppo.PPO), imported lazily, for
  code that runs the online loop's pieces itself (bench_rl) without importing a driver."""
  get(name)   # the unknown-name error
  module = importlib.import_module(EXPERIMENTS[name].split(':')[0])
  if not hasattr(module, 'ALGORITHM'):
    raise KeyError(f'Experiment {name!r} is not an online-RL algorithm (its module has no ALGORITHM).')
  return module.ALGORITHM
