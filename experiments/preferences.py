"""The testbed's synthetic labeller (InstructGPT's ranking step with a known objective):
K samples per prompt from the SFT policy, ranked by the gold reward, written as the K-wise
preference file the `reward` stage reads.

  init_from (SFT workdir) -> K samples per training prompt -> gold (eval.gold: VADER, or a
  frozen gold reward model, model:DIR; experiments/stages/gold_model.py) -> ranks ->
  preferences.jsonl  {"prompt", "responses", "ranks", "gold"[, "noisy"]} per prompt
  report.json        counts (dropped duplicate / empty responses, all-tied groups, noisy
                     groups), gold
                     statistics, and the SFT policy's held-out gold reward (the baseline
                     every later stage is compared with)

Duplicate and empty responses are dropped inside a group (counted); a group left with fewer
than 2 responses is not written (counted); all-tied groups are written and the reward
stage counts them as skips (they hold no comparison).

label_noise = p (Coste et al. 2023 use 0.25): round(p x G) of the G groups that hold a
comparison, drawn with config.seed, get a random different permutation of their ranks (a
flip for K = 2); they carry "noisy": true and "gold" keeps the true scores.
"""
from __future__ import annotations

import json
import os
import time

import numpy as np

import jax
from ml_collections import ConfigDict
from tqdm import tqdm

from experiments.stages import gold_model, policy, trainer
from lm import sharding
from lm.config import ConfigError
from rl import gold

FILE = 'preferences.jsonl'


def check(config: ConfigDict) -> None:
  if config.rollout.samples < 2:
    raise ConfigError(f'rollout.samples={config.rollout.samples}: a ranking needs at least 2 responses '
                      'per prompt; set rollout.samples >= 2.')
  gold_model.check(config.eval.gold)
  if not 0 <= config.get('label_noise', 0.0) <= 1:
    raise ConfigError(f'label_noise={config.label_noise}: the share of rankings to permute must be in [0, 1].')
  if config.rollout.max_new_tokens < 1 or config.rollout.temperature <= 0:
    raise ConfigError('rollout.max_new_tokens must be >= 1 and rollout.temperature > 0 (samples, not greedy).')


def add_label_noise(records: list[dict], p: float, seed: int) -> int:
  """Permute the ranks of round(p x G) of the G records that hold a comparison (seeded), each
  to a ranking different from its own; marks them "noisy". Returns how many."""
  if not p:
    return 0
  rng = np.random.default_rng([seed, 0x4015E])
  eligible = [i for i, r in enumerate(records) if len(set(r['ranks'])) > 1]
  chosen = rng.choice(len(eligible), int(round(p * len(eligible))), replace=False)
  for j in sorted(chosen):
    r = records[eligible[j]]
    new = list(r['ranks'])
    while new == r['ranks']:     # distinct rank values: some permutation differs
      new = [int(x) for x in rng.permutation(r['ranks'])]
    r['ranks'], r['noisy'] = new, True
  return len(chosen)


def run(config: ConfigDict, workdir: str):
  check(config)
  os.makedirs(workdir, exist_ok=True)
  pol = policy.open_policy(config.init_from)
  mesh = sharding.make_mesh(config.mesh.to_dict())
  max_prompt = pol.cfg.max_seq_len - config.rollout.max_new_tokens
  train = policy.prompt_texts(config, 'train')
  held = policy.prompt_texts(config, 'eval')
  train_ids = policy.encode_prompts(pol, train, max_prompt)
  held_ids = policy.encode_prompts(pol, held, max_prompt)
  trainer.write_config(config, workdir, {'source': pol.source.record()})
  params = pol.source.restore_params(mesh, pol.cfg)
  key = jax.random.key(config.seed)
  s = policy.sampling_config(pol, config.rollout.max_new_tokens, config.rollout.temperature)

  t0 = time.time()
  # K samples of each prompt: the prompt list repeated K times, one sample per row.
  reps = [p for p in train_ids for _ in range(config.rollout.samples)]
  texts = []
  bar = tqdm(total=len(reps), desc='sampling', unit='resp')
  for gen in policy.sample(params, pol, reps, key, s, mesh, config.rollout.batch_size):
    texts += policy.texts_of(pol, gen)
    bar.update(len(gen.lengths))
  bar.close()
  scores = gold_model.scorer(config.eval.gold, mesh)(
      [p for p in train for _ in range(config.rollout.samples)], texts)
  counts = {'prompts': len(train), 'written': 0, 'too_few_responses': 0, 'all_tied': 0,
            'empty_responses': 0, 'duplicate_responses': 0, 'noisy': 0}
  records = []
  for i, prompt in enumerate(train):
    lo = i * config.rollout.samples
    resp, g = policy.dedup_responses(texts[lo:lo + config.rollout.samples], scores[lo:lo + config.rollout.samples], counts)
    if len(resp) < 2:
      counts['too_few_responses'] += 1
      continue
    counts['all_tied'] += len(set(g)) == 1
    records.append({'prompt': prompt, 'responses': resp, 'ranks': gold.ranks(g), 'gold': g})
  counts['noisy'] = add_label_noise(records, config.get('label_noise', 0.0), config.seed)
  path = os.path.join(workdir, FILE)
  with open(path, 'w') as f:
    for r in records:
      f.write(json.dumps(r) + '\n')
  counts['written'] = len(records)
  sample_s = time.time() - t0
  baseline = policy.evaluate(params, None, pol, held_ids, jax.random.fold_in(key, 1),
                             max_new_tokens=config.rollout.max_new_tokens, gold_kind=config.eval.gold,
                             mesh=mesh, batch=config.rollout.batch_size)
  report = {'counts': counts, 'gold': {'mean': float(scores.mean()), 'std': float(scores.std()),
                                       'nonzero': float((scores != 0).mean())},
            'sft_heldout': baseline, 'responses_per_s': len(reps) / sample_s}
  with open(os.path.join(workdir, 'report.json'), 'w') as f:
    json.dump(report, f, indent=2)
  print(f'{counts["written"]:,} of {len(train):,} prompts written to {path} '
        f'(K={config.rollout.samples}; dropped: {counts["empty_responses"]} empty, '
        f'{counts["duplicate_responses"]} duplicate responses, {counts["too_few_responses"]} '
        f'groups with < 2; {counts["all_tied"]} all-tied groups; {counts["noisy"]} noisy); gold mean {scores.mean():+.3f}, '
        f'nonzero {report["gold"]["nonzero"]:.2f}; SFT held-out gold {baseline["gold"]:+.3f} '
        f'(eos rate {baseline["eos_rate"]:.2f}, length {baseline["length"]:.1f}); '
        f'{report["responses_per_s"]:.0f} responses/s')
  return report
