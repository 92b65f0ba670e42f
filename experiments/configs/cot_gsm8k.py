"""The cot_arith evaluation, unchanged, on a GSM8K-format file ({question, answer} per line,
'#### N' closing each answer; not shipped: point data.path at it).

python -m experiments.run --config=experiments/configs/cot_gsm8k.py --workdir=/tmp/cot_gsm8k \\
  --config.data.path=test.jsonl --config.data.demo_path=train.jsonl --config.init_from=hf:PATH
init_from: hf:PATH, or a cot_arith run's WORKDIR/runs/NAME (its character vocabulary skips,
and counts, problems with characters it never saw). Demonstrations: the first prompt.k records
of data.demo_path (default: of data.path, then left out of the evaluation). PAL needs
demonstrations with programs, which GSM8K lacks, so it is off here.
"""
from experiments.configs import cot_arith


def get_config():
  c = cot_arith.get_config()
  c.data.update(source='gsm8k', path='', demo_path='', n_eval=0)   # n_eval 0: every record
  c.methods = ('direct', 'cot', 'zero_shot_cot', 'self_consistency')
  c.prompt.update(k=4, extract='flexible', max_new_tokens=256, direct_tokens=16)
  c.sc.update(n=16, ks=(1, 2, 4, 8, 16), temperature=0.7)
  c.eval.batch_size = 32
  return c
