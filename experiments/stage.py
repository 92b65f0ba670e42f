"""A finished run's workdir as the starting point of the next stage.

A stage's output is its workdir (config.json, tokenizer.json, checkpoints/). `load_run(workdir)`
reads them back: the run's config, its ModelConfig, its tokenizer and the trained params of
its latest readable checkpoint. The perplexity filter of the prepare experiment scores
documents with it; later stages (SFT, reward, PPO) start from it.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Any

import jax
from ml_collections import ConfigDict

from data import tokenizers
from lm import checkpoint as ckpt_lib
from lm import model, sharding, train as train_lib
from lm.config import ConfigError, ModelConfig


@dataclasses.dataclass
class LoadedRun:
  config: ConfigDict
  cfg: ModelConfig
  tokenizer: Any
  params: Any        # replicated over `mesh`
  step: int
  mesh: Any


def load_run(workdir: str, mesh_cfg: dict | None = None) -> LoadedRun:
  """The run in `workdir`, restored onto a mesh (default: all devices, data-parallel)."""
  workdir = os.path.expanduser(workdir)
  path = os.path.join(workdir, 'config.json')
  if not os.path.exists(path):
    raise ConfigError(f'{workdir} holds no config.json, so it is not the workdir of a finished run; '
                      'point at the --workdir of a pretraining run.')
  with open(path) as f:
    saved = json.load(f)
  resolved = saved.pop('resolved', {})
  config = ConfigDict(saved)
  m = config.model.to_dict()
  m['vocab_size'] = resolved.get('vocab_size', m['vocab_size'])
  cfg = ModelConfig.from_dict(m)
  tokenizer = tokenizers.load(os.path.join(workdir, 'tokenizer.json'))
  mesh = sharding.make_mesh(mesh_cfg or {'data': -1})
  axes = model.logical_axes(cfg)
  tx, _ = train_lib.make_optimizer(config.optim.to_dict(), axes, config.train.steps)
  key = jax.random.key(config.seed)
  _, abstract, shardings = train_lib.state_shardings(functools.partial(model.init, cfg), axes, tx,
                                                     mesh, key)
  checkpointer = ckpt_lib.Checkpointer(os.path.join(workdir, 'checkpoints'))
  try:
    found = checkpointer.restore_or_none(train_lib.abstract_with_shardings(abstract, shardings))
  finally:
    checkpointer.close()
  if found is None:
    raise ckpt_lib.CheckpointError(f'{workdir} has no checkpoints to load; train it first '
                                   '(train.checkpoint_every > 0).')
  step, state, _, _ = found
  return LoadedRun(config, cfg, tokenizer, state.params, step, mesh)
