"""Weighted mixtures of several sources, with per-source caps, as a pure function of (seed, i).

Mixing rates (T5, Raffel et al. 2020, sec. 3.5.2; FLAN's per-dataset limits):

  examples-proportional   rate_m ∝ min(n_m, cap)     the default; `cap` (T5's K) stops the
                                                      largest sources from drowning the rest
  explicit weights        rate_m ∝ weight_m          e.g. a GPT-3-style table of proportions
  temperature T           rate_m ∝ rate_m ** (1/T)   T > 1 flattens towards uniform

`max_examples` limits how many distinct examples of a source are ever used (a seeded random
subset of that size), which also bounds its examples-proportional rate.

Element i of the mixture, (source m, example index within m), is a pure function of
(seed, i), so the iterator's whole state is the number of elements drawn:

  * Which source: the stream is cut into blocks of BLOCK elements. The number of elements
    of source m among the first N is floor(N * C_m) - floor(N * C_{m-1}) (C the cumulative
    rates), so every block holds its exact share (systematic sampling: realised proportions
    are within 1/BLOCK of the rates, with no random drift), and the block's order is a
    seeded shuffle.
  * Which example: the k-th draw from source m (k counted in closed form as above) is
    entry k mod n of a seeded permutation of m's pool, a fresh one each pass (epoch), so a
    source repeats no example before it has used all of them.
"""
from __future__ import annotations

import dataclasses
import functools
import json
from typing import Mapping, Sequence

import numpy as np

BLOCK = 4096


class MixtureError(ValueError):
  """A mixture that cannot be sampled; the message says what is wrong and how to fix it."""


def mixing_rates(sizes: Sequence[int], weights: Sequence[float] | None = None,
                 cap: int | None = None, temperature: float = 1.0) -> np.ndarray:
  """Sampling probability of each source (sums to 1); see the module docstring."""
  sizes = np.asarray(sizes, np.float64)
  if sizes.ndim != 1 or len(sizes) == 0:
    raise MixtureError('A mixture needs at least one source.')
  if (sizes < 0).any():
    raise MixtureError(f'Source sizes must be non-negative, got {sizes.tolist()}.')
  if weights is None:
    if cap is not None and cap <= 0:
      raise MixtureError(f'The mixing cap must be a positive number of examples, got {cap}.')
    raw = np.minimum(sizes, cap) if cap is not None else sizes
    if raw.sum() == 0:
      raise MixtureError('Every source of the mixture is empty; prepare the sources first.')
  else:
    raw = np.asarray(weights, np.float64)
    if raw.shape != sizes.shape:
      raise MixtureError(f'{len(raw)} mixture weights for {len(sizes)} sources; give one weight per source.')
    if not np.isfinite(raw).all() or (raw < 0).any():
      raise MixtureError(f'Mixture weights must be finite and non-negative, got {raw.tolist()}.')
    if raw.sum() == 0:
      raise MixtureError('All mixture weights are zero; give at least one source a positive weight.')
    empty = (raw > 0) & (sizes == 0)
    if empty.any():
      raise MixtureError(f'Source {int(np.argmax(empty))} has a positive weight but no examples; '
                         'prepare it or set its weight to 0.')
  if not temperature > 0:
    raise MixtureError(f'The mixing temperature must be positive, got {temperature}.')
  raw = raw ** (1.0 / temperature)
  return raw / raw.sum()


def _cumulative(rates: np.ndarray) -> np.ndarray:
  """[0, C_1, ..., C_M] with C_M exactly 1, so per-source counts always sum to N."""
  c = np.concatenate([[0.0], np.cumsum(rates)])
  c[-1] = 1.0
  return c


def counts_before(n: int | np.ndarray, cumulative: np.ndarray) -> np.ndarray:
  """Elements of each source among the first n of the stream (exact, O(sources))."""
  n = np.asarray(n, np.float64)
  edges = np.floor(n[..., None] * cumulative).astype(np.int64)
  return np.diff(edges, axis=-1)


@dataclasses.dataclass(frozen=True)
class Source:
  """One ingredient: a name, how many examples it has, and optional weight / example limit."""
  name: str
  size: int
  weight: float | None = None
  max_examples: int | None = None

  @property
  def pool_size(self) -> int:
    return self.size if self.max_examples is None else min(self.size, self.max_examples)


class Mixture:
  """Element i -> (source index, example index), a pure function of (seed, i)."""

  def __init__(self, sources: Sequence[Source], seed: int = 0, cap: int | None = None,
               temperature: float = 1.0):
    if not sources:
      raise MixtureError('A mixture needs at least one source.')
    names = [s.name for s in sources]
    if len(set(names)) != len(names):
      raise MixtureError(f'Mixture source names must be unique, got {names}.')
    for s in sources:
      if s.max_examples is not None and s.max_examples <= 0:
        raise MixtureError(f'Source {s.name!r}: max_examples must be positive, got {s.max_examples}.')
    given = [s.weight is not None for s in sources]
    if any(given) and not all(given):
      raise MixtureError('Give a weight to every mixture source or to none (none = proportional to size).')
    self.sources, self.seed = list(sources), int(seed)
    weights = [s.weight for s in sources] if all(given) else None
    self.rates = mixing_rates([s.pool_size for s in sources], weights, cap, temperature)
    self._cum = _cumulative(self.rates)
    self.config = {'sources': [dataclasses.asdict(s) for s in sources], 'seed': self.seed,
                   'cap': cap, 'temperature': temperature}
    # Per-instance caches: consecutive elements share a block, a pass shares a permutation.
    self._block = functools.lru_cache(maxsize=4)(self._make_block)
    self._pool = functools.lru_cache(maxsize=None)(self._make_pool)
    self._permutation = functools.lru_cache(maxsize=2 * len(self.sources))(self._make_permutation)

  @property
  def names(self) -> list[str]:
    return [s.name for s in self.sources]

  def same_config(self, saved: Mapping | None) -> bool:
    """Whether a config saved in a checkpoint (JSON round-tripped) describes this mixture."""
    return json.loads(json.dumps(saved)) == json.loads(json.dumps(self.config))

  # Which source ------------------------------------------------------------------------
  def _make_block(self, b: int) -> tuple[np.ndarray, np.ndarray]:
    """(source of each element of block b, rank of that element among its source's draws)."""
    counts = counts_before((b + 1) * BLOCK, self._cum) - counts_before(b * BLOCK, self._cum)
    order = np.repeat(np.arange(len(self.sources)), counts)
    order = np.random.default_rng([self.seed, 0x6d6978, b]).permutation(order)
    rank = counts_before(b * BLOCK, self._cum)[order]  # draws of that source before the block
    for m in range(len(self.sources)):  # ...plus those earlier in this block
      at = np.flatnonzero(order == m)
      rank[at] += np.arange(len(at))
    return order, rank

  # Which example -------------------------------------------------------------------------
  def _make_pool(self, m: int) -> np.ndarray | None:
    """The example indices source m may use (None: all of them)."""
    s = self.sources[m]
    if s.pool_size == s.size:
      return None
    return np.sort(np.random.default_rng([self.seed, 0x706f6f6c, m]).permutation(s.size)[:s.pool_size])

  def _make_permutation(self, m: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([self.seed, 0x65706f, m, epoch]).permutation(self.sources[m].pool_size)

  def _example(self, m: int, k: int) -> int:
    n = self.sources[m].pool_size
    j = int(self._permutation(m, k // n)[k % n])
    pool = self._pool(m)
    return j if pool is None else int(pool[j])

  def element(self, i: int) -> tuple[int, int]:
    """(source index, example index) of element i."""
    order, rank = self._block(i // BLOCK)
    m = int(order[i % BLOCK])
    return m, self._example(m, int(rank[i % BLOCK]))

  def elements(self, start: int, stop: int) -> list[tuple[int, int]]:
    return [self.element(i) for i in range(start, stop)]

  # Reports -----------------------------------------------------------------------------
  def drawn(self, stop: int, start: int = 0) -> np.ndarray:
    """Elements per source among elements [start, stop), exactly, without drawing them."""
    b0, b1 = start // BLOCK, stop // BLOCK

    def upto(n, b):  # counts in [0, n) from whole blocks plus the partial block b
      whole = counts_before(b * BLOCK, self._cum)
      if n % BLOCK:
        whole = whole + np.bincount(self._block(b)[0][:n % BLOCK], minlength=len(self.sources))
      return whole
    return upto(stop, b1) - upto(start, b0)

  def report(self, stop: int) -> dict:
    """Target rates next to the realised proportions of the first `stop` elements."""
    drawn = self.drawn(stop)
    out = {}
    for m, s in enumerate(self.sources):
      out[s.name] = {'rate': float(self.rates[m]), 'realised': float(drawn[m] / max(stop, 1)),
                     'drawn': int(drawn[m]), 'pool': s.pool_size,
                     'epochs': float(drawn[m] / s.pool_size) if s.pool_size else 0.0}
    return out


class MixtureIterator:
  """Iterates a Mixture over real sources (anything indexable: lists, tfds data sources),
  yielding (source name, example). Its state is a small JSON-able dict for checkpoints."""

  def __init__(self, mixture: Mixture, datasets: Mapping[str, Sequence], start: int = 0):
    for s in mixture.sources:
      if s.name not in datasets:
        raise MixtureError(f'No dataset given for mixture source {s.name!r}.')
      if len(datasets[s.name]) != s.size:
        raise MixtureError(f'Mixture source {s.name!r} was declared with {s.size} examples but its '
                           f'dataset has {len(datasets[s.name])}; rebuild the mixture from the data.')
    self.mixture, self.datasets, self.position = mixture, datasets, int(start)

  def __iter__(self):
    return self

  def __next__(self):
    m, j = self.mixture.element(self.position)
    self.position += 1
    name = self.mixture.sources[m].name
    return name, self.datasets[name][j]

  def state(self) -> dict:
    """The position, plus the mixture's config so a resume with a different mixture fails."""
    return {'position': self.position, 'config': self.mixture.config}

  def restore(self, state: Mapping) -> None:
    if not self.mixture.same_config(state['config']):
      raise MixtureError('The saved data position belongs to a different mixture (sources, weights, '
                         'caps or seed changed); restore with the original mixture config.')
    self.position = int(state['position'])

  def report(self) -> dict:
    """Rates and realised proportions of everything drawn so far."""
    return self.mixture.report(self.position)


def examples_proportional(sizes: Mapping[str, int], cap: int | None = None, seed: int = 0,
                          max_examples: Mapping[str, int] | None = None,
                          temperature: float = 1.0) -> Mixture:
  """T5's examples-proportional mixing with an artificial limit `cap` (K)."""
  max_examples = max_examples or {}
  return Mixture([Source(n, s, max_examples=max_examples.get(n)) for n, s in sizes.items()],
                 seed=seed, cap=cap, temperature=temperature)


def weighted(sizes: Mapping[str, int], weights: Mapping[str, float], seed: int = 0,
             max_examples: Mapping[str, int] | None = None) -> Mixture:
  """Explicit proportions, e.g. {'web': 0.6, 'books': 0.3, 'code': 0.1}."""
  missing = set(sizes) ^ set(weights)
  if missing:
    raise MixtureError(f'Mixture weights and sources differ on {sorted(missing)}; give one weight per source.')
  max_examples = max_examples or {}
  return Mixture([Source(n, s, weights[n], max_examples.get(n)) for n, s in sizes.items()], seed=seed)
