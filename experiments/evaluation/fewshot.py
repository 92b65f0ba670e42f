"""Few-shot demonstrations: which pool documents go before each evaluated one.

  first_n         the first k of the pool
  random          k drawn without replacement, seeded by (seed, document id): a document's
                  demos do not depend on which other documents are evaluated
  class_balanced  round robin over the answers (labels) in sorted order, random within each
  bm25            the k pool documents nearest to the query by BM25 (the `bm25s` package),
                  the nearest placed last (closest to the query)

The evaluated document is never its own demo: matched by identical query text and, when the
pool is the evaluated split itself (same_pool=True), by id. A separate demonstration file
numbers its records from 0 too, so there an id says nothing about identity.
"""
from __future__ import annotations

import zlib
from typing import Sequence

import numpy as np

SAMPLERS = ('first_n', 'random', 'class_balanced', 'bm25')


def _rng(seed: int, doc_id: str):
  return np.random.default_rng([seed, zlib.crc32(str(doc_id).encode())])


def _others(pool: Sequence[dict], doc: dict, by_id: bool = True) -> list[int]:
  return [i for i, d in enumerate(pool)
          if (not by_id or d['id'] != doc['id']) and d['query'] != doc['query']]


class Sampler:
  """demos(doc) -> list of pool indices (k of them, or all there are)."""

  def __init__(self, pool: Sequence[dict], k: int, how: str = 'random', seed: int = 0,
               same_pool: bool = True):
    if how not in SAMPLERS:
      raise ValueError(how)
    self.pool, self.k, self.how, self.seed = list(pool), k, how, seed
    self.same_pool = same_pool
    if how == 'bm25' and k and self.pool:
      import bm25s
      self._bm25s = bm25s
      self._index = bm25s.BM25()
      self._index.index(bm25s.tokenize([d['query'] for d in self.pool], stopwords='en',
                                       show_progress=False), show_progress=False)

  def demos(self, doc: dict) -> list[int]:
    if not self.k:
      return []
    others = _others(self.pool, doc, by_id=self.same_pool)
    k = min(self.k, len(others))
    if self.how == 'first_n':
      return others[:k]
    rng = _rng(self.seed, doc['id'])
    if self.how == 'random':
      return [others[i] for i in rng.choice(len(others), k, replace=False)]
    if self.how == 'class_balanced':
      classes: dict[str, list[int]] = {}
      for i in others:
        classes.setdefault(str(self.pool[i]['answer']), []).append(i)
      queues = {c: [idx[j] for j in rng.permutation(len(idx))] for c, idx in sorted(classes.items())}
      out = []
      while len(out) < k:
        for c in queues:
          if queues[c] and len(out) < k:
            out.append(queues[c].pop())
      return out
    # bm25: ask for k + a few (the document itself, or duplicates of it, may be in the pool)
    ok = set(others)
    want = min(len(self.pool), k + 1 + (len(self.pool) - len(others)))
    q = self._bm25s.tokenize([doc['query']], stopwords='en', show_progress=False, return_ids=False)
    hits, _ = self._index.retrieve(q, k=want, show_progress=False)
    near = [int(i) for i in hits[0] if int(i) in ok][:k]
    return near[::-1]
