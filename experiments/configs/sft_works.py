"""Instruction tuning on FLAN-style tasks formatted from the complete works (offline).

Two commands: pretrain with a BPE vocabulary, then tune on the tasks (training plays, five
families) and evaluate on held-out plays, including the never-trained `play` family:

python -m experiments.run --config=experiments/configs/shakespeare_works.py --workdir=runs/works_bpe \
    --config.data.tokenizer=bpe --config.model.max_seq_len=256
python -m experiments.run --config=experiments/configs/sft_works.py --workdir=runs/sft_works

Parameter-efficient: --config.peft.method=lora (or prefix, prompt, adapter; knobs under peft.).
"""
from experiments.configs import sft_base


def get_config():
  c = sft_base.sft()
  c.init_from = 'runs/works_bpe'
  return c
