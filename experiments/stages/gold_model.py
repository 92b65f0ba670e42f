"""The gold reward every policy stage reports and the labeller ranks by, chosen by kind:

  'vader', 'vader_neg'   rl/gold.py's lexicon, on the continuation alone (the default)
  'model:DIR'            the frozen reward model trained in DIR (a finished `reward` run), on
                         prompt + continuation + eos, tokenised and cut from the left exactly as
                         the reward stage scores its training responses (reward_data.encode);
                         its normalised score (reward_norm.json). Gao et al. (2022): a larger
                         RM trained on many labels stands in for the human, so that a proxy
                         trained on its labels has something learnable to over-optimise.

  check(kind)                    one sentence at start-up (unknown kind, DIR not a finished run)
  score = scorer(kind, mesh)     callable(prompts, continuations) -> [N] float64

Scorers are cached per (DIR, its normaliser, mesh): a stage that evaluates every few
iterations loads and compiles the gold model once.
"""
from __future__ import annotations

from typing import Callable, Sequence

import jax
import numpy as np
from jax.sharding import NamedSharding

from experiments.stages import reward_data, reward_model
from lm import paths
from lm.config import ConfigError
from rl import gold

PREFIX = 'model:'
BATCH = 256          # rows per gold forward (the last chunk is padded: one program)
_CACHE: dict = {}


def model_dir(kind: str) -> str | None:
  """DIR of 'model:DIR', else None."""
  return kind[len(PREFIX):].strip() if isinstance(kind, str) and kind.startswith(PREFIX) else None


def check(kind: str) -> None:
  d = model_dir(kind)
  if d is None:
    if not isinstance(kind, str) or kind not in gold.GOLDS:
      raise ConfigError(f'gold={kind!r} is not a gold reward; choose one of {gold.GOLDS} or '
                        f"'{PREFIX}DIR' (a finished reward run).")
    return
  for name in ('config.json', reward_model.NORM_FILE):
    if not d or not (paths.path(d) / name).exists():
      raise ConfigError(f'gold={kind!r}: {d or "(no directory)"} holds no {name}; point '
                        f'{PREFIX}DIR at the workdir of a finished `reward` run.')


def scorer(kind: str, mesh=None) -> Callable[[Sequence[str], Sequence[str]], np.ndarray]:
  """callable(prompts, continuations) -> [N] float64 gold rewards (one per pair)."""
  check(kind)
  d = model_dir(kind)
  if d is None:
    return lambda prompts, continuations: gold.score(list(continuations), kind)
  norm = paths.path(d) / reward_model.NORM_FILE
  key = (str(paths.absolute(d)), norm.stat().mtime, paths.read_text(norm), mesh)
  if key not in _CACHE:
    _CACHE.clear()     # one gold model held at a time
    _CACHE[key] = _model_scorer(d, mesh)
  return _CACHE[key]


def _model_scorer(d: str, mesh):
  rm = reward_model.load_reward_model(d)
  if mesh is not None:     # the caller's devices, the same specs
    rm.params = jax.tree.map(lambda x: jax.device_put(x, NamedSharding(mesh, x.sharding.spec)), rm.params)
  seq_len = rm.seq_len or rm.cfg.max_seq_len

  def score(prompts: Sequence[str], continuations: Sequence[str]) -> np.ndarray:
    if len(prompts) != len(continuations):
      raise ValueError(f'{len(prompts)} prompts for {len(continuations)} continuations.')
    records = [{'prompt': p, 'responses': [c], 'ranks': [0]} for p, c in zip(prompts, continuations)]
    arr, _ = reward_data.encode(records, rm.tokenizer, 1, seq_len)
    tokens, mask = arr['tokens'][:, 0], arr['mask'][:, 0]
    out = []
    for i in range(0, len(records), BATCH):
      t, m = tokens[i:i + BATCH], mask[i:i + BATCH]
      pad = BATCH - len(t)
      t, m = np.pad(t, ((0, pad), (0, 0))), np.pad(m, ((0, pad), (0, 0)))
      out.append(np.asarray(rm.score(rm.params, t, m))[:BATCH - pad])
    return np.concatenate(out).astype(np.float64) if out else np.zeros(0)
  return score
