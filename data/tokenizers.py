"""Tokenizers: text <-> integer ids. Every tokenizer has encode, decode, vocab_size, save/load.

The character tokenizer reproduces nanoGPT's shakespeare_char setup: the vocabulary is
the sorted set of characters in the corpus (65 for tinyshakespeare).
"""
from __future__ import annotations

import json
import os
from typing import Iterable

import numpy as np


class TokenizerError(ValueError):
  """Text or a tokenizer file that cannot be used; the message says how to fix it."""


class CharTokenizer:
  kind = 'char'

  def __init__(self, chars: Iterable[str]):
    self.chars = sorted(set(chars))
    if not self.chars:
      raise TokenizerError('A character tokenizer needs a non-empty corpus to build its vocabulary.')
    self._index = {c: i for i, c in enumerate(self.chars)}
    # A dense code-point table makes encoding a single numpy gather.
    self._table = np.full(max(map(ord, self.chars)) + 1, -1, np.int32)
    for c, i in self._index.items():
      self._table[ord(c)] = i

  @classmethod
  def from_texts(cls, texts: Iterable[str]) -> 'CharTokenizer':
    chars = set()
    for t in texts:
      chars.update(t)
    return cls(chars)

  @property
  def vocab_size(self) -> int:
    return len(self.chars)

  eos_id = None

  def encode(self, text: str) -> np.ndarray:
    codes = np.frombuffer(text.encode('utf-32-le'), np.uint32)
    ids = np.where(codes < len(self._table), self._table[np.minimum(codes, len(self._table) - 1)], -1)
    if (ids < 0).any():
      bad = sorted({chr(c) for c in codes[ids < 0]})[:5]
      raise TokenizerError(f'Characters {bad!r} are not in the character vocabulary; rebuild the '
                           'tokenizer from a corpus that contains them.')
    return ids.astype(np.int32)

  def decode(self, ids: Iterable[int]) -> str:
    return ''.join(self.chars[int(i)] for i in ids if 0 <= int(i) < len(self.chars))

  def save(self, path: str) -> None:
    with open(path, 'w', encoding='utf-8') as f:
      json.dump({'kind': self.kind, 'chars': ''.join(self.chars)}, f, ensure_ascii=False)


def load(path: str):
  """Load a tokenizer saved by `save` (the kind is recorded in the file)."""
  if not os.path.exists(path):
    raise TokenizerError(f'Tokenizer file {path} does not exist; prepare the data first.')
  with open(path, encoding='utf-8') as f:
    meta = json.load(f)
  if meta.get('kind') == 'char':
    return CharTokenizer(meta['chars'])
  raise TokenizerError(f'Tokenizer file {path} has unknown kind {meta.get("kind")!r}.')
