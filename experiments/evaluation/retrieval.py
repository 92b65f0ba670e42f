"""Retrieval for RAG and the ReAct `search` tool: BM25 (bm25s) or dense, and recall@k.

  docs  = load_collection('works' | PATH)   # [Passage(title, lines)], ConfigError if empty/missing
  index = BM25Index([d.text for d in docs]) # Lucene BM25 (k1, b) over lower-cased word tokens
  index.search('to be or not', k=5)         # [(doc index, score), ...] best first, ties by index
  DenseIndex(embed(texts))                  # cosine over vectors, e.g. `mean_pooled` hidden states
  recall_at_k(ranked, gold, k)              # share of queries with a gold doc in the top k
  snippet(lines, query)                     # the best-overlapping line and the one after it

Lucene BM25 (bm25s' default): score(q, d) = sum over query terms t in d of
  idf(t) * tf / (tf + k1 * (1 - b + b * |d| / avgdl)),  idf(t) = ln(1 + (N - df + 0.5) / (df + 0.5)).
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from data import works_qa
from lm import compiled, model
from lm.config import ConfigError

_WORD = re.compile(r"[a-z0-9]+(?:'[a-z]+)*")


def tokenize(text: str) -> list[str]:
  """Lower-cased words (apostrophes kept inside a word: "o'er", "heaven's")."""
  return _WORD.findall(text.lower())


@dataclasses.dataclass(frozen=True)
class Passage:
  title: str
  lines: tuple[str, ...]

  @property
  def text(self) -> str:
    return '\n'.join(self.lines)


def load_collection(source: str = 'works', plays=None) -> tuple[list[Passage], dict]:
  """(documents, report). 'works': every speech of the shipped plays (title 'Play | Speaker';
  `plays` keeps those titles only); PATH: JSON lines of {title, text} (text split into
  lines; bad or empty records counted in report['skipped']). A missing or empty collection is a ConfigError."""
  if source == 'works':
    docs = [Passage(d.title, d.lines) for d in works_qa.collection(plays=plays)]
    if not docs:
      raise ConfigError(f'No play of the works is among {plays}; name titles as data/tasks.load_plays gives them.')
    return docs, {'skipped': 0}
  path = os.path.expanduser(source)
  if not os.path.isfile(path):
    raise ConfigError(f'The retrieval collection {source!r} does not exist; give a JSON-lines file '
                      "of {title, text} documents or 'works'.")
  docs, skipped = [], 0
  with open(path, encoding='utf-8') as f:
    for line in f:
      try:
        obj = json.loads(line)
        lines = tuple(l for l in str(obj['text']).split('\n') if l.strip())
      except (json.JSONDecodeError, KeyError, TypeError):
        lines = ()
      if lines:
        docs.append(Passage(str(obj.get('title', '')), lines))
      else:
        skipped += 1
  if not docs:
    raise ConfigError(f'The retrieval collection {source!r} holds no documents (JSON lines of '
                      '{title, text} with non-empty text); an index needs at least one.')
  return docs, {'skipped': skipped}


class BM25Index:
  """Lucene BM25 over `texts` through bm25s; search ranks by score, ties by document index."""

  def __init__(self, texts: Sequence[str], k1: float = 1.5, b: float = 0.75):
    if texts is None or not len(texts):
      raise ConfigError('The retrieval collection is empty; a BM25 index needs at least one document.')
    import bm25s
    self.n = len(texts)
    self.bm25 = bm25s.BM25(k1=k1, b=b, method='lucene')
    # bm25s needs one non-empty token list per document to keep the indices aligned
    self.bm25.index([tokenize(t) or [''] for t in texts], show_progress=False)

  def scores(self, query: str) -> np.ndarray:
    return np.asarray(self.bm25.get_scores(tokenize(query)), np.float64)

  def search(self, query: str, k: int = 10) -> list[tuple[int, float]]:
    s = self.scores(query)
    order = np.lexsort((np.arange(self.n), -s))[:k]   # score descending, then index
    return [(int(i), float(s[i])) for i in order if s[i] > 0]


class DenseIndex:
  """Cosine similarity over document vectors [N, d] (e.g. mean-pooled hidden states)."""

  def __init__(self, vectors: np.ndarray, embed: Callable[[Sequence[str]], np.ndarray]):
    vectors = np.asarray(vectors, np.float64)
    if vectors.ndim != 2 or not len(vectors):
      raise ConfigError('The retrieval collection is empty; a dense index needs at least one document.')
    self.vectors = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
    self.embed = embed

  def search_many(self, queries: Sequence[str], k: int = 10) -> list[list[tuple[int, float]]]:
    q = np.asarray(self.embed(list(queries)), np.float64)
    q = q / np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-12)
    s = q @ self.vectors.T
    out = []
    for row in s:
      order = np.lexsort((np.arange(len(row)), -row))[:k]
      out.append([(int(i), float(row[i])) for i in order])
    return out

  def search(self, query: str, k: int = 10) -> list[tuple[int, float]]:
    return self.search_many([query], k)[0]


def mean_pooled(lm, texts: Sequence[str], max_tokens: int = 64) -> np.ndarray:
  """[N, d_model] float32: the mean of the final hidden states over each text's tokens (BOS
  and padding excluded), from an experiments.evaluation.eval_model.LanguageModel."""
  def pool(params, tokens, mask):
    h, _ = model.hidden_states(params, tokens, lm.cfg)
    m = mask.astype(h.dtype)[..., None]
    return (h * m).sum(1) / jnp.maximum(m.sum(1), 1)
  pooled = _PROGRAMS.get(('mean_pooled', lm.cfg), lambda: jax.jit(pool))
  width = min(max_tokens, lm.max_length)
  rows, out = lm._rows(), []
  for i in range(0, len(texts), rows):
    part = [lm.encode(t)[:width] for t in texts[i:i + rows]]
    tokens = np.zeros((rows, width), np.int32)
    mask = np.zeros((rows, width), bool)
    for r, ids in enumerate(part):
      tokens[r, :len(ids)], mask[r, :len(ids)] = ids, True
    out.append(np.asarray(pooled(lm.params, tokens, mask))[:len(part)])
  return np.concatenate(out).astype(np.float32)


_PROGRAMS = compiled.Programs()


def recall_at_k(ranked: Sequence[Sequence[int]], gold: Sequence[set], k: int) -> float:
  """Share of queries whose top k (ranked doc indices) hold at least one gold document;
  queries without any gold document count as misses."""
  if not len(ranked):
    return float('nan')
  return float(np.mean([bool(set(r[:k]) & set(g)) for r, g in zip(ranked, gold)]))


def overlap_order(lines: Sequence[str], query: str) -> list[int]:
  """Line indices sharing at least one word with the query, most shared words first (ties
  by position): a forgiving Ctrl+F for `lookup` and snippets."""
  q = set(tokenize(query))
  counts = [len(q & set(tokenize(l))) for l in lines]
  return [i for i in sorted(range(len(lines)), key=lambda i: (-counts[i], i)) if counts[i] > 0]


def snippet(lines: Sequence[str], query: str) -> str:
  """The line that best matches the query and the line after it (' / ' between), or the
  first two lines when nothing matches."""
  order = overlap_order(lines, query)
  i = order[0] if order else 0
  return ' / '.join(lines[i:i + 2])


def norm_line(text: str) -> str:
  return ' '.join(text.lower().split())


def gold_docs(docs: Sequence[Passage], quotes: Sequence[str]) -> list[set[int]]:
  """For each quoted line, the documents that contain it (whitespace and case ignored)."""
  where: dict[str, set[int]] = {}
  for i, d in enumerate(docs):
    for l in d.lines:
      where.setdefault(norm_line(l), set()).add(i)
  return [where.get(norm_line(q), set()) for q in quotes]
