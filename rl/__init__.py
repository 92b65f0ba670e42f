"""Alignment on top of lm/ (pure functions; no I/O loops; see DESIGN.md).

  reward.py      pairwise / K-wise ranking loss, reward normalisation, ensembles
  ppo.py         per-token KL-penalised rewards, GAE, PPO-clip and value losses, KL controller, ptx
  preference.py  DPO, conservative DPO, IPO
  pg.py          RLOO and GRPO (critic-free, k samples per prompt)
  bon.py         best-of-n selection and its analytic KL
"""
