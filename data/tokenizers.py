"""Tokenizers: text <-> integer ids. Every tokenizer has encode, decode, vocab_size, save/load.

`build(kind, texts, vocab_size, prefix)` makes one from a corpus: 'char', or SentencePiece
'bpe' / 'unigram'; `load(path)` restores any of them.

The character tokenizer reproduces nanoGPT's shakespeare_char setup: the vocabulary is
the sorted set of characters in the corpus (65 for tinyshakespeare).
"""
from __future__ import annotations

import json
import os
import shutil
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


# Special tokens, declared once. Their ids are fixed in every SentencePiece vocabulary.
SPECIAL_IDS = {'pad': 0, 'bos': 1, 'eos': 2, 'unk': 3}
# Markers for instruction tuning, reserved now so vocabularies stay compatible later.
USER_SYMBOLS = ('<|instruction|>', '<|response|>', '<|end|>', '\n')


class SentencePieceTokenizer:
  """BPE or unigram subwords (the sentencepiece library) with byte fallback.

  Trained with identity normalisation, no dummy prefix and whitespace kept as is, so
  decode(encode(text)) == text for any Unicode string: characters the training corpus
  never contained become UTF-8 byte tokens instead of <unk>.
  """
  kind = 'sentencepiece'

  def __init__(self, model_path: str):
    import sentencepiece as spm
    if not os.path.exists(model_path):
      raise TokenizerError(f'SentencePiece model {model_path} does not exist.')
    self.model_path = model_path
    self.sp = spm.SentencePieceProcessor(model_file=model_path)
    self._special = {i for i in range(self.sp.get_piece_size()) if self.sp.is_control(i)}

  @classmethod
  def train(cls, texts: Iterable[str], prefix: str, vocab_size: int, model_type: str = 'bpe',
            max_lines: int = 2_000_000) -> 'SentencePieceTokenizer':
    """Train on the lines of `texts`; writes PREFIX.model and PREFIX.vocab."""
    import sentencepiece as spm
    if model_type not in ('bpe', 'unigram'):
      raise TokenizerError(f"SentencePiece model_type must be 'bpe' or 'unigram', got {model_type!r}.")

    def lines():
      n = 0
      for t in texts:
        for line in t.split('\n'):
          if line.strip() and n < max_lines:
            n += 1
            yield line
    spm.SentencePieceTrainer.train(
        sentence_iterator=lines(), model_prefix=prefix, vocab_size=vocab_size, model_type=model_type,
        byte_fallback=True, character_coverage=0.9995, normalization_rule_name='identity',
        add_dummy_prefix=False, remove_extra_whitespaces=False, allow_whitespace_only_pieces=True,
        split_digits=True, user_defined_symbols=list(USER_SYMBOLS),
        pad_id=SPECIAL_IDS['pad'], bos_id=SPECIAL_IDS['bos'], eos_id=SPECIAL_IDS['eos'],
        unk_id=SPECIAL_IDS['unk'], minloglevel=2, num_threads=2)
    return cls(prefix + '.model')

  @property
  def vocab_size(self) -> int:
    return self.sp.get_piece_size()

  @property
  def eos_id(self) -> int:
    return SPECIAL_IDS['eos']

  def encode(self, text: str) -> np.ndarray:
    # '\n' is an atomic piece, so encoding line by line (in parallel) gives the same ids
    # as encoding the whole text, several times faster.
    lines = text.split('\n')
    nl = self.sp.piece_to_id('\n')
    parts = self.sp.encode(lines, num_threads=2)
    out = [np.asarray(p + [nl], np.int32) for p in parts]
    return np.concatenate(out)[:-1] if out else np.zeros(0, np.int32)

  def decode(self, ids: Iterable[int]) -> str:
    ids = [int(i) for i in ids if 0 <= int(i) < self.vocab_size and int(i) not in self._special]
    return self.sp.decode(ids)

  def save(self, path: str) -> None:
    """A JSON pointer next to a copy of the .model file, so `load(path)` restores it."""
    target = os.path.splitext(path)[0] + '.model'
    if os.path.abspath(target) != os.path.abspath(self.model_path):
      shutil.copyfile(self.model_path, target)
    with open(path, 'w', encoding='utf-8') as f:
      json.dump({'kind': self.kind, 'model': os.path.basename(target)}, f)


def build(kind: str, texts: list[str], vocab_size: int, prefix: str):
  """A tokenizer of `kind` ('char', 'bpe' or 'unigram') built from the training texts."""
  if kind == 'char':
    return CharTokenizer.from_texts(texts)
  if kind in ('bpe', 'unigram'):
    if vocab_size < 300:
      raise TokenizerError(f'data.vocab_size={vocab_size} is too small for {kind}: byte fallback alone '
                           'needs 256 ids plus specials; use at least 300.')
    return SentencePieceTokenizer.train(texts, prefix, vocab_size, kind)
  raise TokenizerError(f"data.tokenizer={kind!r} is not supported; choose 'char', 'bpe' or 'unigram'.")


def load(path: str):
  """Load a tokenizer saved by `save` (the kind is recorded in the file)."""
  if not os.path.exists(path):
    raise TokenizerError(f'Tokenizer file {path} does not exist; prepare the data first.')
  with open(path, encoding='utf-8') as f:
    meta = json.load(f)
  if meta.get('kind') == 'char':
    return CharTokenizer(meta['chars'])
  if meta.get('kind') == 'sentencepiece':
    return SentencePieceTokenizer(os.path.join(os.path.dirname(os.path.abspath(path)), meta['model']))
  raise TokenizerError(f'Tokenizer file {path} has unknown kind {meta.get("kind")!r}.')
