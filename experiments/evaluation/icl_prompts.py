"""In-context learning as data: the survey's LLM(I, f(x1, y1), ..., f(xk, yk), f(xk+1, _)).

  template = Template(input='Review: {x}\\nSentiment:', output=' {y}', separator='\\n\\n')
  sel = Selector(pool, how='bm25', seed=0, embed=None)        # demonstration selection
  demos = sel.select(query, k)                                # pool indices
  demos = order(demos, query, 'similar_last', sel, seed=0)   # demonstration ordering
  prompt = Prompt(instruction, template, [pool[i] for i in demos], query)
  prompt, dropped = fit(prompt, n_tokens, room)               # overflow: drop demos, counted
  preds, scores = classify(lm, prompts, labels)               # argmax of loglikelihood(label)

Examples are dicts {'id', 'x', 'y'}. Selection (random, class_balanced and bm25 reuse
fewshot.Sampler; same rules: a query is never its own demo, by id or identical input):

  random          k drawn without replacement, seeded by (seed, query id)
  class_balanced  round robin over the labels, random within each
  bm25            the k nearest by BM25 (`bm25s`)
  knn             the k nearest by cosine similarity of the model's mean-pooled hidden states
                  (`mean_pooled`: lm.model.hidden_states averaged over the input's tokens)
  diversity       Auto-CoT (Zhang et al. 2022): k-means of the pool's embeddings into k
                  clusters, then the example nearest each centroid (query-independent)

Ordering: `selection` (as selected), `random` (seeded by (seed, query id)), `similar_last`
(ascending similarity to the query: embeddings' cosine when there are embeddings, else BM25),
`global_entropy` (Lu et al. 2022, GlobalE: every candidate permutation of the demos, or
`n_perms` sampled ones, predicts labels for a probe set of pool inputs; the permutation whose
predicted-label distribution has the highest entropy wins; probes are pool examples, not the
paper's model-generated ones, so no sampling is needed).
"""
from __future__ import annotations

import dataclasses
import itertools
import math
import zlib
from typing import Callable, Sequence

import numpy as np

from lm import model
from experiments.evaluation import fewshot
from lm.config import ConfigError

SELECTIONS = ('random', 'class_balanced', 'bm25', 'knn', 'diversity')
ORDERINGS = ('selection', 'random', 'similar_last', 'global_entropy')
NEEDS_EMBEDDINGS = ('knn', 'diversity')


@dataclasses.dataclass(frozen=True)
class Template:
  """f(x, y) = input.format(x=x) + output.format(y=y); demos are joined by `separator`."""
  input: str = '{x}'
  output: str = ' {y}'
  separator: str = '\n'

  def demo(self, ex: dict) -> str:
    return self.input.format(x=ex['x']) + self.output.format(y=ex['y'])

  def query(self, ex: dict) -> str:
    return self.input.format(x=ex['x'])

  def continuation(self, y) -> str:
    return self.output.format(y=y)


@dataclasses.dataclass(frozen=True)
class Prompt:
  """I, f(x1, y1) ... f(xk, yk) in order, then f(x_{k+1}, _): the query's label is scored."""
  instruction: str
  template: Template
  demos: tuple
  query: dict

  def context(self) -> str:
    parts = ([self.instruction] if self.instruction else []) + [self.template.demo(d) for d in self.demos]
    return self.template.separator.join(parts + [self.template.query(self.query)])

  def with_demos(self, demos) -> 'Prompt':
    return dataclasses.replace(self, demos=tuple(demos))


def check(selection: str, ordering: str, has_embeddings: bool = True) -> None:
  """One-sentence ConfigErrors for a bad selection / ordering name."""
  if selection not in SELECTIONS:
    raise ConfigError(f'ICL selection {selection!r} is unknown; choose one of {SELECTIONS}.')
  if ordering not in ORDERINGS:
    raise ConfigError(f'ICL ordering {ordering!r} is unknown; choose one of {ORDERINGS}.')
  if selection in NEEDS_EMBEDDINGS and not has_embeddings:
    raise ConfigError(f'ICL selection {selection!r} needs embeddings of the pool (a model); '
                      'use random, class_balanced or bm25 without one.')


def _rng(seed: int, key) -> np.random.Generator:
  return np.random.default_rng([seed, zlib.crc32(str(key).encode())])


# Embeddings -----------------------------------------------------------------------------------
def mean_pooled(params, cfg, tokenizer, texts: Sequence[str], batch_size: int = 32) -> np.ndarray:
  """[N, d_model] mean over each text's tokens of lm.model.hidden_states (final-normed): the
  model's own sentence embedding for kNN selection and diversity clustering."""
  import jax
  import jax.numpy as jnp
  ids = [np.asarray(tokenizer.encode(t), np.int32)[-cfg.max_seq_len:] for t in texts]
  width = max(8, 1 << (max(map(len, ids), default=1) - 1).bit_length())
  width = min(width, cfg.max_seq_len)
  fn = jax.jit(lambda p, x: model.hidden_states(p, x, cfg)[0])
  out = []
  for s in range(0, len(ids), batch_size):
    chunk = ids[s:s + batch_size]
    toks = np.zeros((batch_size, width), np.int32)
    mask = np.zeros((batch_size, width), np.float32)
    for r, x in enumerate(chunk):
      toks[r, :len(x)], mask[r, :len(x)] = x, 1.0    # right padding: causal, pads never seen
    h = np.asarray(fn(params, jnp.asarray(toks)), np.float64)
    pooled = (h * mask[..., None]).sum(1) / np.maximum(mask.sum(1, keepdims=True), 1)
    out.append(pooled[:len(chunk)])
  return np.concatenate(out) if out else np.zeros((0, cfg.d_model))


def _unit(v: np.ndarray) -> np.ndarray:
  return v / np.maximum(np.linalg.norm(v, axis=-1, keepdims=True), 1e-12)


def kmeans(x: np.ndarray, k: int, seed: int, iters: int = 50) -> tuple[np.ndarray, np.ndarray]:
  """(centroids [k, d], assignment [N]): Lloyd's algorithm from a k-means++ start, seeded.
  Empty clusters are re-seeded with the point farthest from its centroid."""
  rng = np.random.default_rng(seed)
  n = len(x)
  cent = [x[rng.integers(n)]]
  for _ in range(1, k):
    d2 = np.min(((x[:, None] - np.asarray(cent)[None]) ** 2).sum(-1), 1)
    cent.append(x[rng.choice(n, p=d2 / d2.sum())] if d2.sum() > 0 else x[rng.integers(n)])
  cent = np.asarray(cent, np.float64)
  assign = np.zeros(n, int)
  for _ in range(iters):
    dist = ((x[:, None] - cent[None]) ** 2).sum(-1)
    new = dist.argmin(1)
    for c in range(k):
      if not (new == c).any():
        far = dist[np.arange(n), new].argmax()
        new[far] = c
    cent = np.stack([x[new == c].mean(0) for c in range(k)])
    if (new == assign).all():
      break
    assign = new
  return cent, assign


# Selection ------------------------------------------------------------------------------------
class Selector:
  """Demonstrations for a query from a pool of {'id', 'x', 'y'} examples (see module doc).

  embed: [N, d] pool embeddings plus a function texts -> [M, d] for queries (knn, diversity,
  and similarity ordering); without them similarity is BM25's."""

  def __init__(self, pool: Sequence[dict], how: str = 'random', seed: int = 0,
               embed: tuple[np.ndarray, Callable] | None = None):
    check(how, 'selection', embed is not None)
    self.pool, self.how, self.seed = list(pool), how, seed
    self._as_docs = [{'id': e['id'], 'query': str(e['x']), 'answer': e['y']} for e in self.pool]
    self._samplers: dict[int, fewshot.Sampler] = {}
    self._pool_emb = None if embed is None else _unit(np.asarray(embed[0], np.float64))
    self._embed_fn = None if embed is None else embed[1]
    self._query_emb: dict = {}
    self._clusters: dict[int, list[int]] = {}
    self._bm25 = None

  def _others(self, query: dict) -> list[int]:
    return [i for i, e in enumerate(self.pool) if e['id'] != query['id'] and e['x'] != query['x']]

  def embedding(self, query: dict) -> np.ndarray:
    key = query['id']
    if key not in self._query_emb:
      self._query_emb[key] = _unit(np.asarray(self._embed_fn([str(query['x'])]), np.float64))[0]
    return self._query_emb[key]

  def prefetch(self, queries: Sequence[dict]) -> None:
    """Embed many queries in one batched call (kNN / similarity ordering)."""
    todo = [q for q in queries if q['id'] not in self._query_emb]
    if self._embed_fn is not None and todo:
      for q, e in zip(todo, _unit(np.asarray(self._embed_fn([str(q['x']) for q in todo]), np.float64))):
        self._query_emb[q['id']] = e

  def bm25_scores(self, query: dict) -> np.ndarray:
    """BM25 score of every pool example for the query's input."""
    import bm25s
    if self._bm25 is None:
      self._bm25 = bm25s.BM25()
      self._bm25.index(bm25s.tokenize([d['query'] for d in self._as_docs], stopwords='en',
                                      show_progress=False), show_progress=False)
    q = bm25s.tokenize([str(query['x'])], stopwords='en', show_progress=False, return_ids=False)[0]
    return np.asarray(self._bm25.get_scores(q), np.float64)

  def similarity(self, query: dict, idx: Sequence[int]) -> np.ndarray:
    """Similarity of pool examples to the query by the selection's own measure: BM25 for bm25
    selection or without embeddings, else the embeddings' cosine."""
    if self._pool_emb is not None and self.how != 'bm25':
      return self._pool_emb[list(idx)] @ self.embedding(query)
    return self.bm25_scores(query)[list(idx)]

  def select(self, query: dict, k: int) -> list[int]:
    """k pool indices (fewer if the pool has fewer usable examples)."""
    if k <= 0:
      return []
    if self.how in ('random', 'class_balanced', 'bm25'):
      if k not in self._samplers:
        self._samplers[k] = fewshot.Sampler(self._as_docs, k, self.how, self.seed)
      return self._samplers[k].demos({'id': query['id'], 'query': str(query['x'])})
    others = self._others(query)
    if self.how == 'knn':
      sims = self._pool_emb[others] @ self.embedding(query)
      best = np.argsort(-sims, kind='stable')[:k]         # nearest first
      return [others[i] for i in best]
    # diversity: one example per cluster, the nearest its centroid (excluding the query)
    members = self._cluster_members(k)
    ok = set(others)
    out = []
    for ranked in members:
      pick = next((i for i in ranked if i in ok), None)
      if pick is not None:
        out.append(pick)
    return out

  def _cluster_members(self, k: int) -> list[list[int]]:
    """Per cluster, its pool indices nearest the centroid first (cached per k)."""
    if k not in self._clusters:
      k_eff = min(k, len(self.pool))
      cent, assign = kmeans(self._pool_emb, k_eff, self.seed)
      members = []
      for c in range(k_eff):
        idx = np.flatnonzero(assign == c)
        d = ((self._pool_emb[idx] - cent[c]) ** 2).sum(-1)
        members.append([int(i) for i in idx[np.argsort(d, kind='stable')]])
      self._clusters[k] = members
    return self._clusters[k]


# Ordering -------------------------------------------------------------------------------------
def order(demos: Sequence[int], query: dict, how: str, selector: Selector | None = None,
          seed: int = 0) -> list[int]:
  """demos reordered (global_entropy needs the model: see global_entropy_orders)."""
  demos = list(demos)
  if how == 'selection' or len(demos) < 2:
    return demos
  if how == 'random':
    return [demos[i] for i in _rng(seed, query['id']).permutation(len(demos))]
  if how == 'similar_last':
    sims = selector.similarity(query, demos)
    return [demos[i] for i in np.argsort(sims, kind='stable')]    # most similar last
  raise ValueError(f'order({how!r}) needs the model: use global_entropy_orders.')


def candidate_orders(n: int, n_perms: int, seed: int, key) -> list[tuple[int, ...]]:
  """All n! permutations when there are at most n_perms, else the identity plus n_perms - 1
  distinct random ones (seeded by (seed, key))."""
  if math.factorial(n) <= n_perms:
    return list(itertools.permutations(range(n)))
  rng = _rng(seed, key)
  out, seen = [tuple(range(n))], {tuple(range(n))}
  while len(out) < n_perms:
    p = tuple(int(i) for i in rng.permutation(n))
    if p not in seen:
      seen.add(p)
      out.append(p)
  return out


def entropy(labels: Sequence, classes: Sequence) -> float:
  """Entropy (nats) of the distribution of predicted labels over `classes`."""
  counts = np.asarray([sum(1 for y in labels if y == c) for c in classes], np.float64)
  p = counts[counts > 0] / max(counts.sum(), 1)
  return float(-(p * np.log(p)).sum())


def global_entropy_orders(demo_sets: Sequence[Sequence[int]], probe_sets: Sequence[Sequence[dict]],
                          make_prompt: Callable[[list[int], dict], Prompt],
                          predict: Callable[[list[Prompt]], list], classes: Sequence,
                          n_perms: int = 6, seed: int = 0) -> tuple[list[list[int]], list[dict]]:
  """GlobalE (Lu et al. 2022) for several demo sets at once (one batched `predict` call).

  For each demo set, each candidate permutation predicts the probe set's labels; the
  permutation with the highest entropy of predicted labels wins (the first on ties).
  Returns (chosen orders, per set {'entropies', 'candidates'})."""
  jobs, prompts = [], []
  for s, (demos, probes) in enumerate(zip(demo_sets, probe_sets)):
    if len(demos) < 2:
      continue
    for c, perm in enumerate(candidate_orders(len(demos), n_perms, seed, tuple(demos))):
      ordered = [demos[i] for i in perm]
      for q in probes:
        jobs.append((s, c, ordered))
        prompts.append(make_prompt(ordered, q))
  preds = predict(prompts) if prompts else []
  grouped: dict = {}
  for (s, c, ordered), y in zip(jobs, preds):
    grouped.setdefault(s, {}).setdefault(c, [ordered, []])[1].append(y)
  chosen, info = [], []
  for s, demos in enumerate(demo_sets):
    if s not in grouped:
      chosen.append(list(demos))
      info.append({'entropies': [], 'candidates': 0})
      continue
    cands = [grouped[s][c] for c in sorted(grouped[s])]
    ents = [entropy(ys, classes) for _, ys in cands]
    chosen.append(list(cands[int(np.argmax(ents))][0]))
    info.append({'entropies': [round(e, 4) for e in ents], 'candidates': len(cands)})
  return chosen, info


# Overflow -------------------------------------------------------------------------------------
def fit(prompt: Prompt, n_tokens: Callable[[str], int], room: int) -> tuple[Prompt, int]:
  """Drop demonstrations from the front (farthest from the query) until the context takes at
  most `room` tokens; returns (prompt, how many were dropped). A query alone that does not
  fit is left to the harness's truncation (counted there)."""
  dropped = 0
  while prompt.demos and n_tokens(prompt.context()) > room:
    prompt = prompt.with_demos(prompt.demos[1:])
    dropped += 1
  return prompt, dropped


# Scoring --------------------------------------------------------------------------------------
def classify(lm, prompts: Sequence[Prompt], labels: Sequence) -> tuple[list, np.ndarray]:
  """(predicted label per prompt, log-probs [N, n_labels]): each label's continuation scored by
  lm.loglikelihood after the prompt's context; argmax, the first label on ties."""
  requests = [(p.context(), p.template.continuation(y)) for p in prompts for y in labels]
  out = lm.loglikelihood(requests) if requests else []
  lp = np.asarray([o[0] for o in out], np.float64).reshape(len(prompts), len(labels))
  return [labels[int(i)] for i in lp.argmax(1)] if len(prompts) else [], lp
