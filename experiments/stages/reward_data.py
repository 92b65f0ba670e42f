"""The reward stage's data: preference records -> tokenised [K, T] groups (counted skips).

A record is one prompt with K ranked responses:
  hh-rlhf     {"chosen": dialogue, "rejected": dialogue}: the shared dialogue up to the last
              common '\\n\\nAssistant:' is the prompt (data/sources.split_preference); K = 2
  K-wise      {"prompt": str, "responses": [str, ...], "ranks": [int, ...]} (0 = best)
Ties, identical or empty responses and missing fields are counted skips, never silent drops.
Each response is scored as prompt + response + eos, cut from the left to seq_len (the end,
where the head reads, is kept); groups are right-padded with a mask, and groups with fewer
than K responses carry valid = 0 in the empty slots.
"""
from __future__ import annotations

import dataclasses

import numpy as np
from ml_collections import ConfigDict

from data import corpora
from data import sources
from lm.config import ConfigError


def parse_record(obj: dict) -> dict:
  """{'prompt', 'responses', 'ranks'} or a counted sources.Skip."""
  if obj.get('tie'):
    raise sources.Skip('tie')
  if 'responses' in obj or 'ranks' in obj:
    resp, ranks = obj.get('responses'), obj.get('ranks')
    if not isinstance(resp, list) or not isinstance(ranks, list):
      raise sources.Skip('missing_field')
    if len(resp) != len(ranks) or not all(isinstance(r, int) for r in ranks):
      raise sources.Skip('bad_ranks')
    if len(resp) < 2:
      raise sources.Skip('too_few_responses')
    if not all(isinstance(r, str) and r.strip() for r in resp):
      raise sources.Skip('empty_response')
    if len(set(ranks)) == 1:
      raise sources.Skip('tie')                    # no pair to learn from
    if len(set(resp)) < len(resp):
      raise sources.Skip('identical_responses')
    return {'prompt': sources.text_field(obj, 'prompt', required=False),
            'responses': resp, 'ranks': ranks}
  pair = sources.parse_preference(obj)             # missing_field / empty / identical_pair
  if not pair['chosen'].strip() or not pair['rejected'].strip():
    raise sources.Skip('empty_response')
  return {'prompt': pair['prompt'], 'responses': [pair['chosen'], pair['rejected']], 'ranks': [0, 1]}


def read(path: str, k: int, val_fraction: float) -> tuple[dict[str, list[dict]], dict]:
  """({'train': records, 'validation': records}, read report); split by a hash of the prompt,
  so responses to one dialogue never straddle the two."""
  report = {'lines': 0, 'skipped': {}, 'first_skipped': {}}

  def parse(obj):
    r = parse_record(obj)
    if len(r['responses']) > k:
      raise sources.Skip('more_than_k_responses')
    return r
  out = {'train': [], 'validation': []}
  for _, r in sources.iter_records(sources.resolve_files(path), parse, report):
    out[sources.split_of(r['prompt'], val_fraction)].append(r)
  report['records'] = {s: len(v) for s, v in out.items()}
  return out, report


def encode(records: list[dict], tokenizer, k: int, seq_len: int) -> tuple[dict, int]:
  """Arrays {'tokens', 'mask': [N, K, T] int32, 'ranks': [N, K] int32, 'valid': [N, K] f32}
  and how many responses lost their start to seq_len."""
  n = len(records)
  tokens = np.zeros((n, k, seq_len), np.int32)
  mask = np.zeros((n, k, seq_len), np.int32)
  ranks = np.zeros((n, k), np.int32)
  valid = np.zeros((n, k), np.float32)
  eos = [] if tokenizer.eos_id is None else [tokenizer.eos_id]
  truncated = 0
  for i, r in enumerate(records):
    for j, (resp, rank) in enumerate(zip(r['responses'], r['ranks'])):
      ids = np.concatenate([tokenizer.encode(r['prompt'] + resp), eos]).astype(np.int32)
      truncated += len(ids) > seq_len
      ids = ids[-seq_len:]                          # keep the end: the head reads the last token
      tokens[i, j, :len(ids)], mask[i, j, :len(ids)] = ids, 1
      ranks[i, j], valid[i, j] = rank, 1.0
  return {'tokens': tokens, 'mask': mask, 'ranks': ranks, 'valid': valid}, truncated


@dataclasses.dataclass
class RewardData:
  train: dict                 # encoded training groups
  val: dict                   # encoded held-out groups
  train_records: list[dict]   # raw text (the baselines and the normaliser read these)
  val_records: list[dict]
  report: dict
  seed: int

  def train_rows(self, epoch: int, member: int = 0) -> dict[str, np.ndarray]:
    """Epoch `epoch`'s groups in a seeded permutation: pure in (seed + member, epoch), so
    ensemble member m sees the data order of a single model trained with seed + m."""
    order = np.random.default_rng([self.seed + member, 0x52D, epoch]).permutation(
        len(self.train['ranks']))
    return {key: v[order] for key, v in self.train.items()}

  def ensemble_rows(self, epoch: int, members: int) -> dict[str, np.ndarray]:
    """[N, M, ...]: row i holds member m's i-th group of the epoch in slot m. Every member
    has the same N groups per epoch, so one batch stream of these rows equals M independently
    shuffled streams (and one iterator state resumes all of them)."""
    per = [self.train_rows(epoch, m) for m in range(members)]
    return {key: np.stack([p[key] for p in per], axis=1) for key in self.train}


def load(config: ConfigDict, tokenizer, seq_len: int) -> RewardData:
  d = config.data
  if d.k < 2:
    raise ConfigError(f'data.k={d.k}: a reward model learns from comparisons, so each prompt needs '
                      'at least 2 responses; set data.k >= 2.')
  if not 0 <= d.val_fraction < 1:
    raise ConfigError(f'data.val_fraction={d.val_fraction} must be in [0, 1).')
  path = d.path or corpora.path('hh-rlhf-harmless-base')
  try:
    split, report = read(path, d.k, d.val_fraction)
  except sources.CorpusError as e:
    raise ConfigError(str(e)) from None
  train_rec, val_rec = split['train'], split['validation']
  if len(train_rec) < config.train.batch_size:
    raise ConfigError(f'{path} gave {len(train_rec)} usable training groups (skipped: '
                      f'{report["skipped"]}), fewer than one batch of {config.train.batch_size}; '
                      'lower train.batch_size or add data.')
  if d.max_val:
    val_rec = val_rec[:d.max_val]
  train, t_trunc = encode(train_rec, tokenizer, d.k, seq_len)
  val, v_trunc = encode(val_rec, tokenizer, d.k, seq_len)
  report.update(path=path, k=d.k, seq_len=seq_len, truncated={'train': t_trunc, 'validation': v_trunc},
                used={'train': len(train_rec), 'validation': len(val_rec)})
  return RewardData(train, val, train_rec, val_rec, report, config.seed)
