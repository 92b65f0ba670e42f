"""Alignment on top of lm/: reward models, PPO, DPO (see DESIGN.md; built in later issues)."""
