"""The CoT testbed's with/without-rationales comparison: the `mixed` model of cot_arith.py
(answers, rationales, zero-shot layout, PAL programs) beside a model of the same size and
steps trained on answers alone, each evaluated with every prompting method.

python -m experiments.run --config=experiments/configs/cot_rationales.py --workdir=/tmp/cot
(a cot_arith workdir is reused: its `mixed` model is not trained again)
"""
from ml_collections import ConfigDict

from experiments.configs import cot_arith


def get_config():
  c = cot_arith.get_config()
  c.models = ConfigDict(dict(
      mixed=ConfigDict(dict(direct=1.0, cot=1.0, zero_shot_cot=0.5, pal=1.0)),
      answers_only=ConfigDict(dict(direct=1.0)),
  ))
  return c
