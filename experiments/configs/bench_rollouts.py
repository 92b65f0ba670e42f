"""Rollout generation benchmark: a GRPO iteration's generation, static batch vs the engine.

python -m experiments.run --config=experiments/configs/bench_rollouts.py --workdir=/tmp/bench_rollouts

Measured at b00c4d7 (2 CPU cores, load average 16-21 from other work; median of 5, seconds per
iteration's generation): RLHF shapes (128 rows x 24 tokens, mean length 18.7) static 1.611,
engine 0.60-0.75x at every pool size; rlvr_arith shapes (128 x 96, mean 46.2) static 6.708,
engine with 16 slots 2.419 (2.77x), 8 slots 1.902 (3.53x), one slot per row 6.958 (0.96x).
"""
from ml_collections import ConfigDict


def get_config():
  c = ConfigDict()
  c.experiment = 'bench_rollouts'
  c.shapes = 'rlhf,arith'      # experiments/bench_rollouts.SHAPES
  c.slots = '0,16,32'          # engine pool sizes (0: a slot per row; rollout.engine_slots)
  c.repeats = 3
  return c
