"""Export a run to a Hugging Face folder: python -m experiments.run \\
  --config=experiments/configs/export.py --workdir=/tmp/export \\
  --config.init_from=/tmp/sft --config.out=/tmp/hf_model

init_from: a pretraining or SFT workdir (full or LoRA; LoRA is merged into its base).
out: the destination folder ('' means --workdir).
"""
from ml_collections import ConfigDict


def get_config():
  c = ConfigDict()
  c.experiment = 'export'
  c.init_from = ''
  c.out = ''
  c.mesh = ConfigDict(dict(data=-1, fsdp=1, tensor=1))
  return c
