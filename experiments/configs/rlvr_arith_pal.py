"""RLVR on the arithmetic testbed with the `program` reward (PAL) instead of `answer`: rlvr_arith
with the response's fenced program run in the sandbox (experiments/stages/sandbox_rules.py) and
scored 1 when the last line it prints is the problem's answer. The prompt is rlvr_arith's CoT
query: zero-shot, cot_arith's `mixed` model already answers it with a PAL program in 99 of 120
greedy answers (the reasoning lab), so no PAL template is needed. The `answer` rule ('#### N')
is logged at weight 0, to see whether the policy stays with programs or drifts to rationales.
Measured (reasoning_arith.py's docstring): held-out program reward 26.6% -> 68.8% in 30
iterations (~31 s each on 2 busy cores, 21 of them in the sandbox); the lab's pass@1 11.1 -> 29.1.

python -m experiments.run --config=experiments/configs/rlvr_arith_pal.py --workdir=runs/rlvr/pal \
    --config.init_from=runs/cot/runs/mixed
"""
from ml_collections import ConfigDict

from experiments.configs import rlvr_arith


def get_config():
  c = rlvr_arith.get_config()
  c.reward.rules = ConfigDict(dict(
      program=ConfigDict(dict(weight=1.0, field='answer', wall_s=3.0, cpu_s=2)),
      answer=ConfigDict(dict(weight=0.0, extract='strict', field='answer'))))
  return c
