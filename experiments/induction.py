"""The mechanism lab (`icl_induction`): when do induction heads and in-context learning appear?

A 2-layer transformer trains (lm.train's step, stage.build's state) on synthetic characters:

  bursty   Chan et al. (2022): a few fresh random "entities" per sequence, each with a random
           label digit, recur in "nn eeL " triples (nn a fresh distractor word): the label of
           an entity is predictable only from an earlier occurrence in the same context
  repeat   a random character segment repeated to fill the context (Olsson et al. 2022)

Every `probe.every` steps it measures (lm/probe.py): per-head induction (prefix-matching) and
previous-token scores on repeated random tokens, the in-context-learning score (loss at a late
token index minus at an early one) on held-out sequences, and the accuracy on labels whose
entity appeared earlier in the context. Writes metrics.jsonl, results.json (with the step at
which the induction score rises), bursty.png, and a checkpoint + config.json +
tokenizer_ref.json: the workdir is a model other stages can name with init_from (icl_sweep).

With `init_from=DIR|hf:PATH` it trains nothing and probes that checkpoint instead (repeated
random tokens from its vocabulary; the ICL score on windows of the shipped tinyshakespeare).
"""
from __future__ import annotations

import json
import os

import numpy as np
from ml_collections import ConfigDict

from experiments.stages import bursty
from lm import probe

def run(config: ConfigDict, workdir: str):
  bursty.check(config)
  os.makedirs(workdir, exist_ok=True)
  if config.init_from:
    res = bursty.probe_checkpoint(config, workdir)
  else:
    params, cfg, _, rows = bursty.train_model(config, workdir)
    p = config.probe
    last = rows[-1]
    res = {'steps': config.train.steps, 'rows': len(rows),
           'induction_rise_step': bursty.rise_step(rows, 'induction_max', p.threshold),
           'label_acc_rise_step': bursty.rise_step(rows, 'label_acc_seen', 0.5),
           'threshold': p.threshold, 'final': {k: v for k, v in last.items()},
           'copying': np.asarray(probe.copying_scores(params, cfg)).round(4).tolist()}
    bursty.plot(rows, os.path.join(workdir, 'bursty.png'), p.threshold)
    print(f'induction score reaches {p.threshold} at step {res["induction_rise_step"]}; '
          f'label accuracy (entity seen) reaches 0.5 at step {res["label_acc_rise_step"]}')
    print('step   induction  prev-token  ICL score  label acc seen/first')
    shown = rows[::max(1, len(rows) // 12)]
    for r in shown + ([rows[-1]] if shown[-1] is not rows[-1] else []):
      print(f'{r["step"]:5d}  {r["induction_max"]:9.3f}  {r["previous_token_max"]:10.3f}  '
            f'{r["icl_score"]:+9.3f}  {r["label_acc_seen"]:.3f}/{r["label_acc_first"]:.3f}')
  with open(os.path.join(workdir, 'results.json'), 'w') as f:
    json.dump(res, f, indent=2, default=str)
  return res
