"""Chat SFT on hh-rlhf `chosen` dialogues (the harmless-base split that ships with the package;
--config.data.path=FILE for another file in that format), with role markers as special tokens.

python -m experiments.run --config=experiments/configs/sft_hh.py --workdir=runs/sft_hh \
    --config.init_from=runs/works_bpe
"""
from experiments.configs import sft_base


def get_config():
  c = sft_base.sft()
  c.init_from = 'runs/works_bpe'
  c.data.source = 'hh'
  c.data.template = 'chat'
  c.eval.n_per_family = 0
  return c
