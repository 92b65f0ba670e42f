"""The SFT stage's data: instruction sources -> rendered examples (counted) -> packed rows.

Sources (config.data.source):
  works      FLAN-style tasks formatted from the shipped complete works (data/tasks.py):
             training plays x the seen families; evaluation on held-out plays, including a
             task family never trained on (data.works.held_out_family)
  lines      line openings -> the rest of the line, from the works (data/openings.py): the
             RLHF sentiment testbed's SFT policy, which learns to end a line with eos
             (data.works.n_per_family lines; eval.n_per_family held-out-play lines)
  hh         hh-rlhf `chosen` dialogues as chats (the shipped harmless-base split, or
             data.path in that format)
  PATH       a JSON-lines file of {instruction, input, output} or {messages} records

data.pretrain_rate > 0 mixes chunks of the works' text into the stream at that rate, all
tokens learned with loss weight data.pretrain_weight (OPT-IML).
"""
from __future__ import annotations

import dataclasses
import math
import os

import numpy as np
from ml_collections import ConfigDict

from data import formats, sources, tasks
from lm.config import ConfigError


def needed_tokens(template: formats.Template, tokenizer) -> list[str]:
  """Special tokens the template writes (role markers, the end token)."""
  return template.special_names()


@dataclasses.dataclass
class SftData:
  train: list                 # TokenizedExample, rendered once
  val_rows: dict              # padded rows of the validation examples (loss on responses)
  eval_examples: list[dict]   # raw examples answered by greedy generation (exact match)
  report: dict                # per split: examples, kept, truncated, dropped by reason
  seq_len: int
  seed: int
  pack: bool

  def train_rows(self, epoch: int) -> dict[str, np.ndarray]:
    """Epoch `epoch`'s rows: the examples in a seeded permutation, packed first fit (or one
    per row). A pure function of (seed, epoch): what makes batch i pure in (seed, i)."""
    order = np.random.default_rng([self.seed, 0x5F7, epoch]).permutation(len(self.train))
    ordered = [self.train[k] for k in order]
    if self.pack:
      return formats.pack(ordered, self.seq_len)
    return one_per_row(formats.pad(ordered, self.seq_len))


def one_per_row(rows: dict) -> dict:
  """Right-padded rows of one example need no segment ids or positions: causal attention
  never lets a real token see the padding after it (and prompt tuning refuses segment ids)."""
  return {k: v for k, v in rows.items() if k not in ('segment_ids', 'positions')}


def _works(d: ConfigDict, split: str, n: int) -> list[dict]:
  w = d.works
  families = [f for f in w.families.split(',') if f] or None
  return tasks.works_tasks(split, families=families, held_out_family=w.held_out_family or None,
                           n_per_family=n, seed=w.seed)


def raw_examples(config: ConfigDict) -> tuple[list[dict], list[dict], list[dict], dict]:
  """(train, validation, generation-eval examples, read report)."""
  d = config.data
  if d.source == 'works':
    train = _works(d, 'train', d.works.n_per_family)
    held = _works(d, 'eval', config.eval.n_per_family)
    return train, held, held, {}
  if d.source == 'lines':   # the RLHF testbed's policy: a line opening -> the rest of the line
    from data import openings
    train = openings.sft_examples('train', d.works.n_per_family, seed=d.works.seed)
    held = openings.sft_examples('eval', config.eval.n_per_family, seed=d.works.seed)
    return train, held, [], {}
  if d.source == 'hh':
    path = d.path or None
    train, rep = tasks.hh_chat(path, split='train', val_fraction=d.val_fraction)
    val, _ = tasks.hh_chat(path, split='validation', val_fraction=d.val_fraction)
    return train, val, [], {'read': rep}
  path = d.source
  if not os.path.exists(os.path.expanduser(path)):
    raise ConfigError(f'data.source={path!r} is neither works, lines, hh nor an existing JSON-lines file.')
  train, rep = tasks.read_instructions(path, split='train', val_fraction=d.val_fraction)
  val, _ = tasks.read_instructions(path, split='validation', val_fraction=d.val_fraction)
  return train, val, [], {'read': rep}


def with_pretraining_text(config: ConfigDict, examples: list[dict]) -> list[dict]:
  """The examples mixed with works text at data.pretrain_rate (one epoch's worth)."""
  d = config.data
  if not d.pretrain_rate:
    return examples
  texts = [sources.read_text(f) for f in sources.resolve_files('shakespeare_works')]
  chunk = d.pretrain_chunk_chars
  pre = tasks.pretraining_examples(texts, chunk_chars=chunk, weight=d.pretrain_weight)
  it = tasks.mix({'tasks': examples, 'pretrain': pre}, seed=config.seed,
                 rates={'pretrain': d.pretrain_rate})
  n = math.ceil(len(examples) / (1 - d.pretrain_rate))
  return [next(it)[1] for _ in range(n)]


def load(config: ConfigDict, tokenizer, seq_len: int, pack: bool | None = None) -> SftData:
  """`pack` overrides data.pack (prompt tuning feeds one example per row)."""
  d = config.data
  pack = d.pack if pack is None else pack
  if d.train_on not in formats.TRAIN_ON or d.truncate not in formats.TRUNCATE:
    raise ConfigError(f'data.train_on must be one of {formats.TRAIN_ON} and data.truncate one of '
                      f'{formats.TRUNCATE}; got {d.train_on!r}, {d.truncate!r}.')
  if not 0 <= d.pretrain_rate < 1:
    raise ConfigError(f'data.pretrain_rate={d.pretrain_rate} must be in [0, 1).')
  train_raw, val_raw, eval_raw, report = raw_examples(config)
  if not train_raw:
    raise ConfigError(f'data.source={d.source!r} gave no training examples.')
  train_raw = with_pretraining_text(config, train_raw)
  render = lambda exs: formats.render_examples(exs, d.template, tokenizer, d.train_on, seq_len,
                                               d.truncate)
  train, report['train'] = render(train_raw)
  val, report['validation'] = render(val_raw[:config.eval.val_examples or None])
  if not train:
    raise ConfigError(f'Every training example was dropped ({report["train"]["dropped"]}); raise '
                      'data.seq_len or shorten the examples.')
  if len(train) < config.train.batch_size and not pack:
    raise ConfigError(f'{len(train)} training examples do not fill one batch of '
                      f'{config.train.batch_size}; lower train.batch_size.')
  val_rows = {}
  if val:   # the same batch keys as the training rows
    val_rows = formats.pad(val, seq_len) if pack else one_per_row(formats.pad(val, seq_len))
  return SftData(train, val_rows, eval_raw, report, seq_len, config.seed, bool(pack))
