"""The SFT stage's data: instruction sources -> rendered examples (counted) -> a mixture
stream of them -> packed rows.

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

Mixture (data.mixture, through data/tasks.task_mixture): each works family is one source
(other data sources are one source, 'tasks'), drawn examples-proportionally with T5's cap
K = data.mixture.cap (0: none) and temperature, or by explicit per-family
data.mixture.weights (all 0: proportional). data.works.sizes gives a family its own number
of examples (0: data.works.n_per_family). data.pretrain_rate > 0 adds chunks of the works'
text as the source 'pretrain' at that fixed share of the stream, all tokens learned with
loss weight data.pretrain_weight (OPT-IML).

The stream's element i is a pure function of (seed, i) (data/mixture); epoch e is elements
[e*E, (e+1)*E), E = the task examples / (1 - pretrain_rate), packed first fit in stream
order, so batch i is pure in (seed, i) and resume is exact. The report's 'mixture' holds each
source's target rate and the examples actually drawn into the run's steps x batch_size rows.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import os

import numpy as np
from ml_collections import ConfigDict

from data import formats, mixture as mixture_lib, sources, tasks
from lm.config import ConfigError

PRETRAIN = 'pretrain'


def needed_tokens(template: formats.Template, tokenizer) -> list[str]:
  """Special tokens the template writes (role markers, the end token); none but eos where the
  tokenizer's own chat_template renders the chats (a Hugging Face folder's)."""
  if formats.uses_chat_template(template, tokenizer):
    return ['eos']   # pretraining text mixed in ends in eos
  return template.special_names()


@dataclasses.dataclass
class SftData:
  sources: dict               # source name -> TokenizedExample list, rendered once
  mixture: mixture_lib.Mixture  # over `sources`, in their order
  epoch_size: int             # stream elements per epoch
  val_rows: dict              # padded rows of the validation examples (loss on responses)
  eval_examples: list[dict]   # raw examples answered by greedy generation (exact match)
  report: dict                # per split: examples, kept, truncated, dropped by reason; mixture
  seq_len: int
  seed: int
  pack: bool

  @property
  def train(self) -> list:
    """Every rendered training example (all sources)."""
    return [ex for exs in self.sources.values() for ex in exs]

  def epoch_elements(self, epoch: int) -> list[tuple[int, int]]:
    """(source index, example index) of epoch `epoch`'s stream elements."""
    return self.mixture.elements(epoch * self.epoch_size, (epoch + 1) * self.epoch_size)

  def train_rows(self, epoch: int) -> dict[str, np.ndarray]:
    """Epoch `epoch`'s rows: its stream elements packed first fit (or one per row). A pure
    function of (seed, epoch): what makes batch i pure in (seed, i)."""
    names = self.mixture.names
    ordered = [self.sources[names[m]][j] for m, j in self.epoch_elements(epoch)]
    if self.pack:
      return formats.pack(ordered, self.seq_len)
    return one_per_row(formats.pad(ordered, self.seq_len))

  def drawn(self, rows: int) -> dict[str, int]:
    """Examples of each source in the stream's first `rows` rows (what `rows` rows train on)."""
    names = self.mixture.names
    counts = np.zeros(len(names), np.int64)
    epoch = 0
    while rows > 0:
      elements = self.epoch_elements(epoch)
      src = np.array([m for m, _ in elements])
      if self.pack:
        lengths = [len(self.sources[names[m]][j]) for m, j in elements]
        row = np.empty(len(elements), np.int64)
        for r, members in enumerate(formats.first_fit(lengths, self.seq_len)[0]):
          row[members] = r
      else:
        row = np.arange(len(elements))
      n_rows = int(row.max()) + 1
      counts += np.bincount(src[row < rows], minlength=len(names))
      rows -= n_rows
      epoch += 1
    return dict(zip(names, counts.tolist()))


def one_per_row(rows: dict) -> dict:
  """Right-padded rows of one example need no segment ids or positions: causal attention
  never lets a real token see the padding after it (and prompt tuning refuses segment ids)."""
  return {k: v for k, v in rows.items() if k not in ('segment_ids', 'positions')}


def _per_family(d: ConfigDict, key: str) -> dict[str, float]:
  """The non-zero entries of a per-family table (data.works.sizes, data.mixture.weights)."""
  table = d.to_dict() if isinstance(d, ConfigDict) else dict(d or {})
  unknown = sorted(set(table) - set(tasks.FAMILIES))
  if unknown:
    raise ConfigError(f'{key} names {unknown}, which are not task families {list(tasks.FAMILIES)}.')
  bad = {k: v for k, v in table.items() if not v >= 0}
  if bad:
    raise ConfigError(f'{key} must be non-negative, got {bad}.')
  return {k: v for k, v in table.items() if v}


def _works(d: ConfigDict, split: str, n: int, sizes: dict | None = None) -> list[dict]:
  w = d.works
  families = [f for f in w.families.split(',') if f] or None
  held = w.held_out_family or None
  if not sizes:
    return tasks.works_tasks(split, families=families, held_out_family=held, n_per_family=n, seed=w.seed)
  out = []   # a family's examples do not depend on the others asked for (data/tasks)
  for f in families or tasks.FAMILIES:
    if split == 'train' and f == held:
      continue
    out += tasks.works_tasks(split, families=[f], held_out_family=held,
                             n_per_family=int(sizes.get(f, n)), seed=w.seed)
  return out


def raw_examples(config: ConfigDict) -> tuple[list[dict], list[dict], list[dict], dict]:
  """(train, validation, generation-eval examples, read report)."""
  d = config.data
  if d.source == 'works':
    train = _works(d, 'train', d.works.n_per_family, _per_family(d.works.sizes, 'data.works.sizes'))
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


def by_source(config: ConfigDict, examples: list[dict]) -> dict[str, list[dict]]:
  """The training examples as mixture sources: one per works family, else one 'tasks'."""
  if config.data.source != 'works':
    return {'tasks': examples}
  out: dict[str, list[dict]] = {}
  for ex in examples:
    out.setdefault(ex['family'], []).append(ex)
  return out


@functools.lru_cache(maxsize=2)
def _pretraining_text(chunk_chars: int) -> tuple[dict, ...]:
  texts = [sources.read_text(f) for f in sources.resolve_files('shakespeare_works')]
  return tuple(tasks.pretraining_examples(texts, chunk_chars=chunk_chars))


def pretraining_text(config: ConfigDict) -> list[dict]:
  """Chunks of the works' text, each learned with loss weight data.pretrain_weight."""
  d = config.data
  return [dict(ex, weight=d.pretrain_weight) for ex in _pretraining_text(d.pretrain_chunk_chars)]


def build_mixture(config: ConfigDict, sizes: dict[str, int]) -> mixture_lib.Mixture:
  """tasks.task_mixture over the sources, from data.mixture and data.pretrain_rate."""
  m, d = config.data.mixture, config.data
  weights = _per_family(m.weights, 'data.mixture.weights')
  if weights and d.source != 'works':
    raise ConfigError('data.mixture.weights are per works family; set them only with data.source=works.')
  if weights and m.cap:
    raise ConfigError(f'data.mixture.cap={m.cap} applies to examples-proportional mixing; explicit '
                      'data.mixture.weights replace it: set one of them.')
  if m.cap < 0 or not m.temperature > 0:
    raise ConfigError(f'data.mixture.cap must be >= 0 (0: none) and temperature > 0; got '
                      f'{m.cap}, {m.temperature}.')
  missing = sorted(set(weights) - set(sizes))
  if missing:
    raise ConfigError(f'data.mixture.weights name families {missing} that have no training examples '
                      f'(trained families: {sorted(set(sizes) - {PRETRAIN})}).')
  rates = {PRETRAIN: d.pretrain_rate} if d.pretrain_rate else None
  w = {n: weights.get(n, 0.0) for n in sizes if n != PRETRAIN} if weights else None
  try:
    return tasks.task_mixture(sizes, seed=config.seed, cap=m.cap or None, weights=w,
                              temperature=m.temperature, rates=rates)
  except (tasks.TaskError, mixture_lib.MixtureError) as e:
    raise ConfigError(f'data.mixture: {e}') from None


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
  raw = by_source(config, train_raw)
  if d.pretrain_rate:
    raw[PRETRAIN] = pretraining_text(config)
  render = lambda exs: formats.render_examples(exs, d.template, tokenizer, d.train_on, seq_len,
                                               d.truncate)
  rendered, per_source = {}, {}
  for name, exs in raw.items():
    rendered[name], per_source[name] = render(exs)
  report['train'] = _total(per_source)
  report['train_sources'] = per_source
  val, report['validation'] = render(val_raw[:config.eval.val_examples or None])
  empty = sorted(n for n, exs in rendered.items() if not exs)
  if empty:
    raise ConfigError(f'Every training example of {empty} was dropped ({report["train"]["dropped"]}); '
                      'raise data.seq_len or shorten the examples.')
  mix = build_mixture(config, {n: len(exs) for n, exs in rendered.items()})
  n_tasks = sum(len(exs) for n, exs in rendered.items() if n != PRETRAIN)
  epoch_size = math.ceil(n_tasks / (1 - d.pretrain_rate))
  if epoch_size < config.train.batch_size and not pack:
    raise ConfigError(f'{epoch_size} training examples do not fill one batch of '
                      f'{config.train.batch_size}; lower train.batch_size.')
  val_rows = {}
  if val:   # the same batch keys as the training rows
    val_rows = formats.pad(val, seq_len) if pack else one_per_row(formats.pad(val, seq_len))
  data = SftData(rendered, mix, epoch_size, val_rows, eval_raw, report, seq_len, config.seed, bool(pack))
  report['mixture'] = mixture_report(data, config.train.steps * config.train.batch_size)
  return data


def mixture_report(data: SftData, rows: int) -> dict:
  """Per source: target rate, examples drawn into the first `rows` rows, their share, the
  pool size and how many passes over it that is."""
  drawn = data.drawn(rows)
  total = max(sum(drawn.values()), 1)
  return {n: {'rate': float(r), 'drawn': drawn[n], 'realised': drawn[n] / total,
              'pool': len(data.sources[n]), 'epochs': drawn[n] / max(len(data.sources[n]), 1)}
          for n, r in zip(data.mixture.names, data.mixture.rates)}


def _total(per_source: dict) -> dict:
  out = {'examples': 0, 'kept': 0, 'truncated': 0, 'dropped': {}}
  for rep in per_source.values():
    for k in ('examples', 'kept', 'truncated'):
      out[k] += rep[k]
    for reason, n in rep['dropped'].items():
      out['dropped'][reason] = out['dropped'].get(reason, 0) + n
  return out
