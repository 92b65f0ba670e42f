"""Defaults shared by the RLHF testbed's policy stages (preferences, ppo, dpo, pg, bon)."""
from ml_collections import ConfigDict


def prompts() -> ConfigDict:
  """Line openings of the works: training plays for RL, held-out plays for evaluation."""
  return ConfigDict(dict(source='openings', n_train=2000, n_eval=256, words=(2, 4), seed=0))


def mesh() -> ConfigDict:
  return ConfigDict(dict(data=-1, fsdp=1, tensor=1, expert=1))
