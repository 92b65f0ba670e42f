"""The testbed's synthetic labeller (InstructGPT's ranking step with a known objective):
K samples per prompt from the SFT policy, ranked by the gold reward, written as the K-wise
preference file the `reward` stage reads.

  init_from (SFT workdir) -> K samples per training prompt -> gold (VADER) -> ranks ->
  preferences.jsonl  {"prompt", "responses", "ranks", "gold"} per prompt
  report.json        counts (dropped duplicate / empty responses, all-tied groups), gold
                     statistics, and the SFT policy's held-out gold reward (the baseline
                     every later stage is compared with)

Duplicate and empty responses are dropped inside a group (counted); a group left with fewer
than 2 responses is not written (counted); all-tied groups are written and the reward
stage counts them as skips (they hold no comparison).
"""
from __future__ import annotations

import json
import os
import time

import jax
from ml_collections import ConfigDict
from tqdm import tqdm

from experiments.stages import policy, trainer
from lm import sharding
from lm.config import ConfigError
from rl import gold

FILE = 'preferences.jsonl'


def check(config: ConfigDict) -> None:
  if config.rollout.samples < 2:
    raise ConfigError(f'rollout.samples={config.rollout.samples}: a ranking needs at least 2 responses '
                      'per prompt; set rollout.samples >= 2.')
  gold.check(config.eval.gold)
  if config.rollout.max_new_tokens < 1 or config.rollout.temperature <= 0:
    raise ConfigError('rollout.max_new_tokens must be >= 1 and rollout.temperature > 0 (samples, not greedy).')


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
  scores = gold.score(texts, config.eval.gold)
  counts = {'prompts': len(train), 'written': 0, 'too_few_responses': 0, 'all_tied': 0,
            'empty_responses': 0, 'duplicate_responses': 0}
  path = os.path.join(workdir, FILE)
  with open(path, 'w') as f:
    for i, prompt in enumerate(train):
      lo = i * config.rollout.samples
      resp, g = policy.dedup_responses(texts[lo:lo + config.rollout.samples], scores[lo:lo + config.rollout.samples], counts)
      if len(resp) < 2:
        counts['too_few_responses'] += 1
        continue
      counts['all_tied'] += len(set(g)) == 1
      f.write(json.dumps({'prompt': prompt, 'responses': resp, 'ranks': gold.ranks(g),
                          'gold': g}) + '\n')
      counts['written'] += 1
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
        f'groups with < 2; {counts["all_tied"]} all-tied groups); gold mean {scores.mean():+.3f}, '
        f'nonzero {report["gold"]["nonzero"]:.2f}; SFT held-out gold {baseline["gold"]:+.3f} '
        f'(eos rate {baseline["eos_rate"]:.2f}, length {baseline["length"]:.1f}); '
        f'{report["responses_per_s"]:.0f} responses/s')
  return report
