"""Evaluate a model on built-in or file tasks: python -m experiments.run \\
  --config=experiments/configs/evaluate.py --workdir=/tmp/eval --config.init_from=/tmp/sft

init_from: a finished run's workdir, hf:PATH (a local Hugging Face folder), or 'reference'
(every task answered with its reference: the ceiling its plumbing should reach).
tasks: names of entries of `task` (each a full task config, see experiments/evaluation/
tasks.py); e.g. --config.tasks=gsm8k --config.task.gsm8k.path=problems.jsonl. Writes
results.json (task -> metric -> {value, stderr, n}), samples.jsonl, and prints a table.
"""
from ml_collections import ConfigDict

from experiments.evaluation import tasks as eval_tasks


def get_config():
  c = ConfigDict()
  c.experiment = 'evaluate'
  c.seed = 0
  c.init_from = 'reference'
  c.tasks = ('works_cloze', 'works_ppl', 'works_instruct', 'humaneval')
  # every preset, overridable; a file task: set source='jsonl', path, templates and list its name
  c.task = ConfigDict({name: eval_tasks.preset(name) for name in eval_tasks.PRESETS})
  c.task.gsm8k.path = ''        # GSM8K-format JSON lines (not shipped): --config.task.gsm8k.path=FILE
  c.limit = 0                   # > 0: at most this many documents per task (overrides task limits)
  c.mesh = ConfigDict(dict(data=-1, fsdp=1, tensor=1))
  c.model = ConfigDict(dict(dtype='float32'))   # runtime fields only (the weights fix the rest)
  c.batch_size = 16
  c.add_bos = True              # BOS before every prompt when the tokenizer has one
  c.truncate = 'left'           # prompts longer than the context: 'left' (counted) or 'error'
  c.max_length = 0              # 0: the model's context
  c.rolling_stride = 0          # 0: the context (disjoint windows)
  c.bootstrap_iters = 1000
  return c
