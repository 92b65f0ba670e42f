"""A reward model on hh-rlhf preference pairs (the harmless-base split that ships with the
package; --config.data.path=FILE for another file in that format, or a K-wise file with
--config.data.k=K), from an SFT or pretraining workdir.

python -m experiments.run --config=experiments/configs/reward_hh.py --workdir=runs/rm_hh \
    --config.init_from=runs/sft_hh
"""
from experiments.configs import reward_base


def get_config():
  c = reward_base.reward()
  c.init_from = 'runs/sft_hh'
  c.data.seq_len = 256
  return c
