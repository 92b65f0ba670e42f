"""RLHF testbed, stage 4: the proxy reward model, trained on the K-wise VADER rankings of SFT
samples (rlhf_preferences), trunk from the SFT policy; held-out accuracy beside longer-wins
and bag-of-words, calibration, reward_norm.json. `--config.ensemble.members=3` trains an
ensemble of 3 in one vmapped step (Coste et al. 2023; scored by ensemble.combine).

python -m experiments.run --config=experiments/configs/rlhf_reward.py --workdir=runs/rlhf/rm \
    --config.init_from=runs/rlhf/sft --config.data.path=runs/rlhf/prefs/preferences.jsonl
python -m experiments.run --config=experiments/configs/rlhf_reward.py --workdir=runs/rlhf/rm_ens \
    --config.init_from=runs/rlhf/sft --config.data.path=runs/rlhf/prefs/preferences.jsonl \
    --config.ensemble.members=3
"""
from experiments.configs import reward_base


def get_config():
  c = reward_base.reward()
  c.init_from = 'runs/rlhf/sft'
  c.data.path = 'runs/rlhf/prefs/preferences.jsonl'
  c.data.k = 4              # rlhf_preferences' k: one batch element = a prompt's 4 ranked samples
  c.data.seq_len = 48       # 2-4 word prompt + <= 24 sampled tokens + eos (truncation is reported)
  c.train.update(steps=240, batch_size=16, log_every=20, checkpoint_every=120)
  c.eval.every = 120
  c.optim.update(lr=3e-4, min_lr=3e-5, warmup_steps=20)
  return c
