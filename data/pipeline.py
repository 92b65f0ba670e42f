"""Tokens -> fixed-length windows -> batches -> global jax.Arrays sharded over the batch axes.

Batch i of a run is a pure function of (seed, i), so the iterator's whole state is the
number of batches drawn. That number is saved in checkpoints; a resumed run rebuilds
exactly the batches an uninterrupted run would have seen. Each process builds only
the rows that its own devices hold (`local_rows`), then `to_global` assembles them.

Every batch is a dict of [B, T] numpy arrays:
  inputs, targets  int32   tokens and next tokens
  weights          float32 1 where the target counts in the loss (0 across documents / padding)
  segment_ids      int32   (multi-document corpora only) document index within the row, from 1
  positions        int32   (multi-document corpora only) position within the document
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import numpy as np

SAMPLINGS = ('random', 'sequential')


class DataError(ValueError):
  """Data that cannot fill the configured batches; the message says how to fix it."""


@dataclasses.dataclass
class TokenStream:
  """A corpus split as one token array; doc_ids marks document boundaries (None = one doc)."""
  tokens: np.ndarray
  doc_ids: np.ndarray | None = None

  def __len__(self):
    return len(self.tokens)


def tokenize_docs(docs: Sequence[str], tokenizer) -> TokenStream:
  parts = [tokenizer.encode(d) for d in docs if d]
  tokens = np.concatenate(parts).astype(np.int32) if parts else np.zeros(0, np.int32)
  if len(parts) <= 1:
    return TokenStream(tokens)
  doc_ids = np.concatenate([np.full(len(p), i, np.int32) for i, p in enumerate(parts)])
  return TokenStream(tokens, doc_ids)


def num_windows(stream: TokenStream, seq_len: int) -> int:
  """Non-overlapping seq_len windows (each with its next-token targets) in the stream."""
  return (len(stream) - 1) // seq_len


def same_keys(streams: dict[str, TokenStream]) -> dict[str, TokenStream]:
  """If any stream has several documents, give the others doc_ids too (one document), so
  batches from every stream carry the same keys (segment_ids, positions)."""
  if all(s.doc_ids is None for s in streams.values()):
    return streams
  return {n: s if s.doc_ids is not None else TokenStream(s.tokens, np.zeros(len(s), np.int32))
          for n, s in streams.items()}


def windows(stream: TokenStream, starts: np.ndarray, seq_len: int) -> dict[str, np.ndarray]:
  """Rows of seq_len inputs and their next-token targets, starting at `starts`."""
  idx = starts[:, None] + np.arange(seq_len + 1)[None, :]
  toks = stream.tokens[idx]
  batch = {'inputs': toks[:, :-1], 'targets': toks[:, 1:],
           'weights': np.ones((len(starts), seq_len), np.float32)}
  if stream.doc_ids is not None:
    docs = stream.doc_ids[idx]
    batch['weights'] = (docs[:, 1:] == docs[:, :-1]).astype(np.float32)  # no cross-doc targets
    d = docs[:, :-1]
    batch['segment_ids'] = (d - d[:, :1] + 1).astype(np.int32)
    t = np.arange(seq_len)[None, :]
    new = np.concatenate([np.ones((len(d), 1), bool), d[:, 1:] != d[:, :-1]], axis=1)
    batch['positions'] = (t - np.maximum.accumulate(np.where(new, t, 0), axis=1)).astype(np.int32)
  return batch


class BatchIterator:
  """Global batch i: `random` windows (nanoGPT) or `sequential` non-overlapping windows,
  visited in a fresh permutation every epoch. `rows` restricts it to this process's rows."""

  def __init__(self, stream: TokenStream, seq_len: int, global_batch: int, seed: int,
               sampling: str = 'random', rows: tuple[int, int] | None = None, start: int = 0):
    if sampling not in SAMPLINGS:
      raise DataError(f'data.sampling={sampling!r} is not supported; choose one of {SAMPLINGS}.')
    if len(stream) < seq_len + 1:
      raise DataError(f'The split has {len(stream)} tokens, fewer than seq_len + 1 = {seq_len + 1}; '
                       'use a shorter data.seq_len or more text.')
    self.stream, self.seq_len, self.global_batch = stream, seq_len, global_batch
    self.seed, self.sampling = seed, sampling
    self.rows = rows or (0, global_batch)
    self.batches_drawn = start
    self._perm_epoch, self._perm = -1, None

  def state(self) -> dict:
    return {'batches_drawn': self.batches_drawn}

  def restore(self, state: dict) -> None:
    self.batches_drawn = int(state['batches_drawn'])

  def starts(self, i: int) -> np.ndarray:
    """Window start offsets of every row of global batch i."""
    if self.sampling == 'random':
      rng = np.random.default_rng([self.seed, i])
      return rng.integers(0, len(self.stream) - self.seq_len, size=self.global_batch)
    n = num_windows(self.stream, self.seq_len)
    g = i * self.global_batch + np.arange(self.global_batch)
    out = np.empty(self.global_batch, np.int64)
    for epoch in np.unique(g // n):
      sel = g // n == epoch
      out[sel] = self._permutation(int(epoch), n)[g[sel] % n] * self.seq_len
    return out

  def _permutation(self, epoch: int, n: int) -> np.ndarray:
    if epoch != self._perm_epoch:
      self._perm_epoch, self._perm = epoch, np.random.default_rng([self.seed, 1 << 20, epoch]).permutation(n)
    return self._perm

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    lo, hi = self.rows
    batch = windows(self.stream, self.starts(self.batches_drawn)[lo:hi], self.seq_len)
    self.batches_drawn += 1
    return batch


class MixtureBatches:
  """Global batch i drawn from a mixture of token streams (data/mixture.py).

  A source's examples are its non-overlapping seq_len windows; row r of batch i is mixture
  element i * global_batch + r, i.e. (source, window), so batch i is a pure function of
  (mixture seed, i) and the state is the number of batches drawn (plus the mixture's config,
  so a resume under a different mixture fails instead of silently changing the data).
  """

  def __init__(self, streams: dict[str, TokenStream], mixture, seq_len: int, global_batch: int,
               rows: tuple[int, int] | None = None, start: int = 0):
    names = [s.name for s in mixture.sources]
    if set(names) != set(streams):
      raise DataError(f'The mixture names sources {sorted(names)} but the streams are {sorted(streams)}.')
    self.streams = same_keys(streams)   # all rows of a batch carry the same keys
    self.names, self.mixture = names, mixture
    self.seq_len, self.global_batch = seq_len, global_batch
    self.rows = rows or (0, global_batch)
    self.batches_drawn = start

  def state(self) -> dict:
    return {'batches_drawn': self.batches_drawn, 'mixture': self.mixture.config}

  def restore(self, state: dict) -> None:
    if not self.mixture.same_config(state.get('mixture')):
      raise DataError('The checkpoint\'s data position belongs to a different mixture (sources, '
                      'weights, caps or seed changed); resume with the original data.mixture config '
                      'or use a new --workdir.')
    self.batches_drawn = int(state['batches_drawn'])

  def report(self) -> dict:
    """Target rates and realised proportions of every row drawn so far."""
    return self.mixture.report(self.batches_drawn * self.global_batch)

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    lo, hi = self.rows
    first = self.batches_drawn * self.global_batch
    elems = self.mixture.elements(first + lo, first + hi)
    src = np.array([m for m, _ in elems])
    starts = np.array([k for _, k in elems], np.int64) * self.seq_len
    parts = {m: windows(self.streams[self.names[m]], starts[src == m], self.seq_len)
             for m in np.unique(src)}
    batch = {}
    for key, like in next(iter(parts.values())).items():
      batch[key] = np.empty((hi - lo, self.seq_len), like.dtype)
      for m, p in parts.items():
        batch[key][src == m] = p[key]
    self.batches_drawn += 1
    return batch


def eval_batches(stream: TokenStream, seq_len: int, batch_size: int,
                 max_batches: int = 0, name: str = '') -> list[dict[str, np.ndarray]]:
  """The whole split as non-overlapping windows (or the first max_batches batches).

  The last batch is padded with zero-weight rows so every batch has the same shape.
  """
  n = num_windows(stream, seq_len)
  if n == 0:
    raise DataError(f'The validation split{" of " + name if name else ""} has {len(stream)} tokens, fewer than seq_len + 1; '
                     'lower data.seq_len or data.val_fraction, or set eval.every=0.')
  starts = np.arange(n) * seq_len
  out = []
  for i in range(0, n, batch_size):
    s = starts[i:i + batch_size]
    pad = batch_size - len(s)
    b = windows(stream, np.concatenate([s, np.zeros(pad, s.dtype)]), seq_len)
    if pad:
      b['weights'][len(s):] = 0
    out.append(b)
    if max_batches and len(out) >= max_batches:
      break
  return out


# Example sources (one example per row) ------------------------------------------------------
def example_indices(n: int, global_batch: int, seed: int, i: int,
                    rows: tuple[int, int] | None = None) -> np.ndarray:
  """Indices into a source of n examples for rows [lo, hi) of global batch i.

  Global batch i is rows [k*B, (k+1)*B) of a fresh seeded permutation in every epoch, so a
  process fetches by index only the examples its own devices hold, and together the
  processes see every example once per epoch. An epoch leaves out the last n % B examples
  of its permutation (different ones each epoch) so every batch is full.
  """
  per_epoch = n // global_batch
  if per_epoch == 0:
    raise DataError(f'The source has {n} examples, fewer than one global batch of {global_batch}; '
                     'lower train.batch_size or add data.')
  epoch, k = divmod(i, per_epoch)
  perm = np.random.default_rng([seed, 0x6578, epoch]).permutation(n)
  lo, hi = rows or (0, global_batch)
  return perm[k * global_batch + lo:k * global_batch + hi]


def pad_rows(token_lists: Sequence[np.ndarray], seq_len: int) -> dict[str, np.ndarray]:
  """One example per row: its first seq_len + 1 tokens as inputs/targets, zero-padded, with
  weight 0 where the target is padding."""
  toks = np.zeros((len(token_lists), seq_len + 1), np.int32)
  valid = np.zeros((len(token_lists), seq_len + 1), bool)
  for r, ids in enumerate(token_lists):
    ids = np.asarray(ids)[:seq_len + 1]
    toks[r, :len(ids)], valid[r, :len(ids)] = ids, True
  return {'inputs': toks[:, :-1], 'targets': toks[:, 1:], 'weights': valid[:, 1:].astype(np.float32)}


class RowBatches:
  """Global batches of ready-made rows (e.g. packed instruction examples), resumable.

  Epoch e lays out `make_rows(e)` (a pure function of the epoch, e.g. the examples in a
  seeded permutation packed first fit); the epochs' rows form one stream and global batch
  i is rows [i*B, (i+1)*B) of it, so batch i is pure in (seed, i) and no row is dropped at
  an epoch's end. Each process keeps its rows [lo, hi) of every batch.
  """

  def __init__(self, make_rows, global_batch: int, rows: tuple[int, int] | None = None,
               start: int = 0):
    self.make_rows, self.global_batch = make_rows, global_batch
    self.rows = rows or (0, global_batch)
    self.batches_drawn = start
    self._epochs: dict[int, dict[str, np.ndarray]] = {}
    self._starts = [0]          # first stream row of each epoch computed so far

  def state(self) -> dict:
    return {'batches_drawn': self.batches_drawn}

  def restore(self, state: dict) -> None:
    self.batches_drawn = int(state['batches_drawn'])

  def _epoch(self, e: int) -> dict[str, np.ndarray]:
    if e not in self._epochs:
      rows = self.make_rows(e)
      if len(next(iter(rows.values()))) == 0:
        raise DataError('An epoch of the training data has no rows; add examples.')
      self._epochs = {k: v for k, v in self._epochs.items() if k >= e - 1}   # keep two
      self._epochs[e] = rows
    return self._epochs[e]

  def _locate(self, g: int) -> tuple[int, int]:
    """(epoch, row within it) of stream row g."""
    while len(self._starts) <= 1 or self._starts[-1] <= g:
      e = len(self._starts) - 1
      self._starts.append(self._starts[-1] + len(next(iter(self._epoch(e).values()))))
    e = int(np.searchsorted(self._starts, g, side='right')) - 1
    return e, g - self._starts[e]

  def batch(self, i: int) -> dict[str, np.ndarray]:
    lo, hi = self.rows
    where = [self._locate(i * self.global_batch + r) for r in range(lo, hi)]
    keys = self._epoch(where[0][0]).keys()
    return {k: np.stack([self._epoch(e)[k][r] for e, r in where]) for k in keys}

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    b = self.batch(self.batches_drawn)
    self.batches_drawn += 1
    return b


def padded_batches(arrays: dict[str, np.ndarray], b: int):
  """(batch, real rows) in batches of b along the first axis; the last one padded with zero
  rows (zero weight / invalid), so every batch has the same shape (one compiled program)."""
  n = len(next(iter(arrays.values()))) if arrays else 0
  for i in range(0, n, b):
    chunk = {k: v[i:i + b] for k, v in arrays.items()}
    real = len(next(iter(chunk.values())))
    if real < b:
      chunk = {k: np.concatenate([v, np.zeros((b - real, *v.shape[1:]), v.dtype)])
               for k, v in chunk.items()}
    yield chunk, real


# Global arrays ---------------------------------------------------------------------------
def local_rows(sharding: jax.sharding.Sharding, global_batch: int, seq_len: int) -> tuple[int, int]:
  """The contiguous range of batch rows held by this process's devices."""
  idx = sharding.addressable_devices_indices_map((global_batch, seq_len))
  lo = min((s[0].start or 0) for s in idx.values())
  hi = max((s[0].stop if s[0].stop is not None else global_batch) for s in idx.values())
  return lo, hi


def to_global(local: dict[str, np.ndarray], shardings: dict, global_batch: int) -> dict[str, jax.Array]:
  """Assemble each process's rows into global arrays sharded along the batch axes."""
  return {k: jax.make_array_from_process_local_data(shardings[k], v, (global_batch, *v.shape[1:]))
          for k, v in local.items()}


def batch_spec(stream: TokenStream, seq_len: int) -> dict[str, jax.ShapeDtypeStruct]:
  """Keys and per-row shapes of the batches built from this stream."""
  b = windows(stream, np.zeros(1, np.int64), seq_len)
  return {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in b.items()}
