"""RLHF testbed: best-of-n sampling from the SFT policy against one or several proxy RMs
(comma-separated reward_from: two RM sizes, an ensemble), n = 1, 2, 4, ..., n_samples, with
the unbiased estimator from n_samples draws per held-out prompt and KL_bon = log n - (n-1)/n.
Writes results.json, scores.npz, a printed table and bon.png; the `overoptimisation`
experiment reads it.

python -m experiments.run --config=experiments/configs/rlhf_bon.py --workdir=runs/rlhf/bon \
    --config.init_from=runs/rlhf/sft \
    --config.reward_from=runs/rlhf/rm,runs/rlhf_small/rm,runs/rlhf/rm_ens

The second, smaller proxy RM (same tokenizer as the policy, so its ids mean the same text):
python -m experiments.run --config=experiments/configs/rlhf_pretrain.py \
    --workdir=runs/rlhf_small/pretrain --config.data.tokenizer=runs/rlhf/pretrain/tokenizer_ref.json \
    --config.model.d_model=64 --config.model.n_layers=2 --config.model.n_heads=2 --config.train.steps=800
python -m experiments.run --config=experiments/configs/rlhf_reward.py --workdir=runs/rlhf_small/rm \
    --config.init_from=runs/rlhf_small/pretrain --config.data.path=runs/rlhf/prefs/preferences.jsonl
"""
from ml_collections import ConfigDict

from experiments.configs import rlhf_base


def get_config():
  c = ConfigDict()
  c.experiment = 'bon'
  c.seed = 0
  c.init_from = 'runs/rlhf/sft'
  c.reward_from = 'runs/rlhf/rm'    # one RM workdir, or several separated by commas
  c.prompts = rlhf_base.prompts()
  c.prompts.n_eval = 64             # held-out prompts (x rollout.samples responses each)
  # N = samples draws per prompt (n = 1, 2, 4, ..., N); max_new_tokens as rlhf_preferences (the
  # RM saw responses this long); KL_bon is relative to the distribution sampled (temperature)
  c.rollout = rlhf_base.sampling(samples=256, batch_size=256)
  c.eval = ConfigDict(dict(gold='vader'))   # rl/gold.GOLDS
  c.mesh = rlhf_base.mesh()
  return c
