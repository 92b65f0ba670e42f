"""Evaluate a model on built-in or file tasks: python -m experiments.run \\
  --config=experiments/configs/evaluate.py --workdir=/tmp/eval --config.init_from=/tmp/sft

init_from: a finished run's workdir, hf:PATH (a local Hugging Face folder), or 'reference'
(every task answered with its reference: the ceiling its plumbing should reach).
tasks: names of entries of `task` (each a full task config, see experiments/evaluation/
tasks.py), comma-separated: --config.tasks=works_cloze,gsm8k --config.task.gsm8k.path=FILE.
Writes results.json (task -> metric -> {value, stderr, n}), samples.jsonl, and prints a table.

A JSON-lines file of your own, from the command line: the slots `jsonl`, `jsonl_2` and
`jsonl_3` are empty jsonl tasks (listed in results.json under the slot's name), e.g.

  --config.tasks=jsonl --config.task.jsonl.path=qa.jsonl \\
  --config.task.jsonl.query_template='Q: {question}\\nA:' --config.task.jsonl.target_template='{answer}'

  path               the file (one JSON object per line; .gz read too)
  kind               generate (default) | multiple_choice | rolling
  metrics            comma list: generate: exact_match, bleu, chrf, rouge1, rouge2, rougeL,
                     rougeLsum; multiple_choice: acc, acc_norm; rolling: bits_per_byte,
                     perplexity, word_perplexity, byte_perplexity
  query_template     the prompt, a str.format over the record's fields ('\\n' is a newline)
  target_template    generate: the reference output; answer_template: what exact match
                     compares (default the target); references_field: a list field of
                     references for BLEU / ROUGE
  choices_field, gold_field   multiple_choice: the list of options and the right one (index
                     or text); text_field: rolling's document (default 'text')
  extract, numeric   exact match: extractors (none, first_line, strict, flexible, regex:P) and
                     numeric comparison; target_delimiter, description, limit
  fewshot.k, fewshot.sampler   demonstrations from the same file (or fewshot.path)
  generation.max_new_tokens, generation.until (one stop string), generation.temperature
  bleu.tokenize, bleu.smooth_method, bleu.smooth_value, bleu.lowercase   sacrebleu's options
  rouge.use_stemmer  rouge-score's Porter stemmer (default true)
"""
from ml_collections import ConfigDict

from experiments.evaluation import eval_tasks

JSONL_SLOTS = ('jsonl', 'jsonl_2', 'jsonl_3')


def get_config():
  c = ConfigDict()
  c.experiment = 'evaluate'
  c.seed = 0
  c.init_from = 'reference'
  c.tasks = ('works_cloze', 'works_ppl', 'works_instruct', 'humaneval')
  # every preset, overridable; a file task: set source='jsonl', path, templates and list its name
  c.task = ConfigDict({name: eval_tasks.preset(name) for name in eval_tasks.PRESETS})
  c.task.gsm8k.path = ''        # GSM8K-format JSON lines (not shipped): --config.task.gsm8k.path=FILE
  for slot in JSONL_SLOTS:      # files of your own (see above); unused unless listed in tasks
    c.task[slot] = eval_tasks.task_config(name=slot, source='jsonl')
  c.limit = 0                   # > 0: at most this many documents per task (overrides task limits)
  c.mesh = ConfigDict(dict(data=-1, fsdp=1, tensor=1))
  c.model = ConfigDict(dict(dtype='float32'))   # runtime fields only (the weights fix the rest)
  c.batch_size = 16
  # generate_until through lm/engine.py's continuous batching (batch_size slots; a row's slot
  # frees at its stop string, a shared few-shot head prefilled once); False: static batches of
  # lm.decode.generate. bench_engine measured 1.76x static on mixed answer lengths, 0.86x when
  # every answer runs the full max_new_tokens (nothing to reclaim).
  c.engine = True
  c.add_bos = True              # BOS before every prompt when the tokenizer has one
  c.truncate = 'left'           # prompts longer than the context: 'left' (counted) or 'error'
  c.max_length = 0              # 0: the model's context
  c.rolling_stride = 0          # 0: the context (disjoint windows)
  c.bootstrap_iters = 1000
  return c
