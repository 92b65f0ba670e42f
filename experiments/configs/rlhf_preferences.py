"""RLHF testbed, stage 3: K samples per prompt from the SFT policy, ranked by VADER gold
sentiment (the synthetic labeller) -> preferences.jsonl for the reward stage.

python -m experiments.run --config=experiments/configs/rlhf_preferences.py \
    --workdir=runs/rlhf/prefs --config.init_from=runs/rlhf/sft
"""
from ml_collections import ConfigDict

from experiments.configs import rlhf_base


def get_config():
  c = ConfigDict()
  c.experiment = 'preferences'
  c.seed = 0
  c.init_from = 'runs/rlhf/sft'
  c.prompts = rlhf_base.prompts()
  c.k = 4                   # samples ranked per prompt (InstructGPT: 4-9)
  c.max_new_tokens = 24
  c.temperature = 1.0
  c.gold = 'vader'          # rl/gold.GOLDS
  c.batch_size = 64
  c.mesh = rlhf_base.mesh()
  return c
