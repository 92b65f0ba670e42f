"""The rlvr_arith recipe on a real model and GSM8K-format data: GRPO (experiment `grpo`) with the
`answer` rule (GSM8K's '#### N', strict) and a small `format` bonus, from a Hugging Face folder.

python -m experiments.run --config=experiments/configs/rlvr_gsm8k.py --workdir=runs/rlvr/gsm8k \
    --config.init_from=hf:PATH --config.prompts.path=gsm8k_train.jsonl

prompts.path is a JSON-lines file of {question, answer} records (GSM8K's own layout: the
solution ending in '#### N'); its last prompts.n_eval records are held out, the first
prompts.n_train of the rest are the training prompts. The prompt is the question in the
folder's chat template when it has one (one user turn), else prompts.template. The reasoning
lab then compares the policies: experiments/configs/reasoning_arith.py with
--config.data.source=gsm8k --config.data.path=HELD_OUT.jsonl --config.policies.base=hf:PATH
--config.policies.grpo=runs/rlvr/gsm8k.
"""
from ml_collections import ConfigDict

from experiments.configs import rlvr_arith


def get_config():
  c = rlvr_arith.get_config()
  c.init_from = ''                          # hf:PATH (required), or a run's workdir
  c.prompts = ConfigDict(dict(
      source='jsonl', path='',              # the GSM8K-format file (required)
      n_train=100000, n_eval=64, seed=0,
      steps=(1, 3), digits=(1, 1), ops='+-',   # unused with jsonl (arith's knobs)
      template="Question: {question}\nAnswer: Let's think step by step.\n",
      shots=0))   # the file's first records as 'Q: ...\nA:\n<solution>' demonstrations before it
  c.reward.rules.answer.extract = 'strict'
  c.reward.missing_eos_penalty = 0.0
  c.rollout.update(prompts=8, samples=8, max_new_tokens=256, temperature=1.0)
  c.train.update(iterations=100, epochs=1, minibatches=2, checkpoint_every=20)
  c.optim.update(lr=1e-6, min_lr=1e-6)
  c.eval.update(every=20, batch_size=64)
  return c
