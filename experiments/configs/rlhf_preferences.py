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
  c.rollout = rlhf_base.sampling(samples=4, batch_size=64)   # samples ranked per prompt (InstructGPT: 4-9)
  c.eval = ConfigDict(dict(gold='vader'))   # the labeller: vader | vader_neg | model:DIR (a reward run)
  c.label_noise = 0.0                       # share of rankings permuted at random (seeded; Coste: 0.25)
  c.mesh = rlhf_base.mesh()
  return c
