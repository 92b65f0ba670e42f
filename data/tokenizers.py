"""Tokenizers: text <-> integer ids. Every tokenizer has encode, decode, vocab_size, save/load.

Three kinds, one interface (`kind`, `vocab_size`, `special_ids`, `eos_id`, `encode(text) ->
int32 array`, `decode(ids) -> str`, `save(path)`):

  CharTokenizer           nanoGPT's shakespeare_char: the sorted set of corpus characters
                          (65 for tinyshakespeare).
  SentencePieceTokenizer  BPE or unigram subwords with byte fallback, trained here
                          (`build_tokenizer('bpe' | 'unigram', texts, vocab_size, prefix)`) or
                          any existing `.model` file (e.g. LLaMA's).
  HFTokenizer             a Hugging Face `tokenizer.json` (the `tokenizers` library), so public
                          checkpoints keep their own vocabulary; `load_hf_folder(folder)` reads a
                          model folder as transformers' AutoTokenizer does (the special tokens and
                          chat_template that tokenizer_config.json declares).

`add_special_tokens(tok, ['eos', 'user', ...])` wraps any of them (WithSpecialTokens) with the
special tokens it lacks (a char vocabulary has no eos; chat role markers), as new ids after
its vocabulary.

`save(path)` writes a small JSON file naming the kind (plus the model file beside it); a run
keeps it as WORKDIR/tokenizer_ref.json (RUN_FILE), not under Hugging Face's name.
`load(path)` restores any of them, and also accepts a bare `.model` or `tokenizer.json`.
`export_hf(tok, folder)` writes any of them in Hugging Face's own format (tokenizer.json +
tokenizer_config.json), so `transformers.AutoTokenizer.from_pretrained(folder)` reads it.
The embedding table is padded to `padded_vocab_size(n)` rows for even sharding; those
extra ids are never produced by `encode` and are masked out when sampling.
"""
from __future__ import annotations

import importlib
import inspect
import itertools
import json
import os
import shutil
from typing import Iterable, Sequence

import numpy as np


class TokenizerError(ValueError):
  """Text or a tokenizer file that cannot be used; the message says how to fix it."""


class CharTokenizer:
  kind = 'char'
  special_ids: dict = {}  # no pad/bos/eos: nanoGPT's character models have none

  def __init__(self, chars: Iterable[str]):
    self.chars = sorted(set(chars))
    if not self.chars:
      raise TokenizerError('A character tokenizer needs a non-empty corpus to build its vocabulary.')
    self._index = {c: i for i, c in enumerate(self.chars)}
    # A dense code-point table makes encoding a single numpy gather.
    self._table = np.full(max(map(ord, self.chars)) + 1, -1, np.int32)
    for c, i in self._index.items():
      self._table[ord(c)] = i
    self._codes = np.array([ord(c) for c in self.chars], np.uint32)

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
    """Ids outside the vocabulary (padding rows, special ids) are left out."""
    ids = np.asarray(list(ids) if not isinstance(ids, np.ndarray) else ids, np.int64).ravel()
    ids = ids[(ids >= 0) & (ids < len(self.chars))]
    # one gather into the code points, then one UTF-32 decode (not a Python loop per id)
    return np.asarray(self._codes, np.uint32)[ids].tobytes().decode('utf-32-le')

  def save(self, path: str) -> None:
    with open(path, 'w', encoding='utf-8') as f:
      json.dump({'kind': self.kind, 'chars': ''.join(self.chars)}, f, ensure_ascii=False)


# Special tokens, declared once, in id order: every vocabulary trained here has exactly these
# ids. pad/bos/eos/unk are SentencePiece's own meta pieces; the markers for instruction
# tuning are reserved now so that later stages keep the same vocabulary. All are control
# symbols: `encode` never produces them from text (a user typing '<|response|>' gets ordinary
# pieces, not the marker); code that needs one inserts its id.
SPECIAL_TOKENS = {
    'pad': '<pad>',
    'bos': '<s>',
    'eos': '</s>',
    'unk': '<unk>',   # unused thanks to byte fallback, but SentencePiece requires one
    'instruction': '<|instruction|>',
    'response': '<|response|>',
    'end': '<|end|>',
}
SPECIAL_IDS = {name: i for i, name in enumerate(SPECIAL_TOKENS)}
_MARKERS = [p for n, p in SPECIAL_TOKENS.items() if n not in ('pad', 'bos', 'eos', 'unk')]
# Ordinary text pieces that must stay atomic: a newline is its own piece, so a text can be
# encoded line by line (in parallel) and give the same ids as encoding it whole.
USER_SYMBOLS = ('\n',)
MIN_SUBWORD_VOCAB = 300   # 256 byte pieces + specials + room for a few merges


def padded_vocab_size(n: int, multiple: int = 128) -> int:
  """n rounded up to a multiple (of 128, or the tensor-axis size) so the embedding shards evenly."""
  if n <= 0 or multiple <= 0:
    raise TokenizerError(f'padded_vocab_size needs positive sizes, got n={n}, multiple={multiple}.')
  return -(-n // multiple) * multiple


def sampling_mask(tokenizer, padded_size: int | None = None) -> np.ndarray:
  """bool[padded_size]: the ids a model may generate.

  Padding rows beyond the vocabulary, <pad>, <s> and <unk> are excluded; eos and the
  instruction markers stay (a model must be able to end a response)."""
  n = tokenizer.vocab_size
  mask = np.zeros(padded_size or n, bool)
  mask[:n] = True
  ids = tokenizer.special_ids
  for name in ('pad', 'bos', 'unk'):
    if ids.get(name) is not None and ids[name] >= 0:
      mask[ids[name]] = False
  return mask


class SentencePieceTokenizer:
  """BPE or unigram subwords (the sentencepiece library) with byte fallback.

  Trained with identity normalisation, no dummy prefix and whitespace kept as is, so
  decode(encode(text)) == text for any Unicode string: characters the training corpus
  never contained become UTF-8 byte tokens instead of <unk>. Also wraps any existing
  `.model` file; its special ids are then read from the model, not from SPECIAL_IDS.
  """
  kind = 'sentencepiece'

  def __init__(self, model_path: str):
    import sentencepiece as spm
    if not os.path.isfile(model_path):
      raise TokenizerError(f'SentencePiece model {model_path} does not exist.')
    self.model_path = model_path
    self.sp = spm.SentencePieceProcessor()
    try:
      self.sp.load(model_path)
    except (OSError, RuntimeError) as e:
      raise TokenizerError(f'{model_path} is not a readable SentencePiece model ({e}).') from None
    self._control = np.array([self.sp.is_control(i) for i in range(self.vocab_size)], bool)
    self._newline = self.sp.piece_to_id('\n')
    # Line-parallel encoding is exact only when '\n' is an atomic piece (our vocabularies).
    self._split_lines = self.sp.id_to_piece(self._newline) == '\n' and not self.sp.is_unknown(self._newline)
    self._threads = min(8, os.cpu_count() or 1)

  @classmethod
  def train(cls, texts: Iterable[str], prefix: str, vocab_size: int, model_type: str = 'bpe',
            max_lines: int = 2_000_000, character_coverage: float = 0.9995,
            seed: int = 0) -> 'SentencePieceTokenizer':
    """Train on the non-blank lines of `texts`; writes PREFIX.model and PREFIX.vocab.

    At most `max_lines` lines, sampled uniformly (with `seed`) when the corpus has more."""
    import sentencepiece as spm
    if model_type not in ('bpe', 'unigram'):
      raise TokenizerError(f"SentencePiece model_type must be 'bpe' or 'unigram', got {model_type!r}.")

    def lines():
      for t in texts:
        for line in t.split('\n'):
          if line.strip():  # blank lines teach nothing; '\n' itself is a user symbol
            yield line
    spm.set_random_generator_seed(seed)
    os.makedirs(os.path.dirname(os.path.abspath(prefix)), exist_ok=True)
    try:
      spm.SentencePieceTrainer.train(
          sentence_iterator=lines(), model_prefix=prefix, vocab_size=vocab_size,
          model_type=model_type, byte_fallback=True, character_coverage=character_coverage,
          # Exact round trip: no NFKC, no dummy '▁' prefix, spaces kept as they are.
          normalization_rule_name='identity', add_dummy_prefix=False,
          remove_extra_whitespaces=False, allow_whitespace_only_pieces=True, split_digits=True,
          max_sentence_length=1 << 16, input_sentence_size=max_lines, shuffle_input_sentence=True,
          control_symbols=_MARKERS, user_defined_symbols=list(USER_SYMBOLS),
          pad_id=SPECIAL_IDS['pad'], bos_id=SPECIAL_IDS['bos'], eos_id=SPECIAL_IDS['eos'],
          unk_id=SPECIAL_IDS['unk'], minloglevel=2, num_threads=min(16, os.cpu_count() or 1))
    except RuntimeError as e:
      # e.g. "Vocabulary size is too high (8000). Please set it to a value <= 1234."
      raise TokenizerError(f'SentencePiece could not train a {vocab_size}-token {model_type} '
                           f'vocabulary on this corpus: {str(e).splitlines()[-1]}') from None
    return cls(prefix + '.model')

  @property
  def vocab_size(self) -> int:
    return self.sp.get_piece_size()

  @property
  def special_ids(self) -> dict[str, int]:
    """Name -> id for the special tokens this model has (ours: exactly SPECIAL_IDS)."""
    out = {'pad': self.sp.pad_id(), 'bos': self.sp.bos_id(), 'eos': self.sp.eos_id(),
           'unk': self.sp.unk_id()}
    for name, piece in SPECIAL_TOKENS.items():
      if name not in out:
        i = self.sp.piece_to_id(piece)
        out[name] = i if self.sp.id_to_piece(i) == piece else -1
    return {k: v for k, v in out.items() if v >= 0}

  @property
  def eos_id(self) -> int | None:
    return self.special_ids.get('eos')

  def encode(self, text: str) -> np.ndarray:
    """Ids of `text`; never a control id (pad/bos/eos/markers) and never an id >= vocab_size."""
    if not text:
      return np.zeros(0, np.int32)
    if not self._split_lines:
      return np.asarray(self.sp.encode(text), np.int32)
    # '\n' is an atomic piece, so encoding line by line (in parallel) gives the same ids
    # as encoding the whole text, several times faster.
    parts = self.sp.encode(text.split('\n'), num_threads=self._threads)
    nl = [self._newline]
    n = sum(map(len, parts)) + len(parts) - 1
    ids = itertools.chain.from_iterable(p + nl for p in parts)  # lines joined by '\n' ids
    return np.fromiter(ids, np.int32, count=n)  # count= stops before the trailing '\n'

  def decode(self, ids: Iterable[int], keep_special: bool = False) -> str:
    """Text of `ids`. Control ids (pad/bos/eos/markers) and ids outside the vocabulary are
    dropped, or rendered as their piece (e.g. '<|response|>') with keep_special=True."""
    ids = np.asarray(ids if hasattr(ids, '__len__') else list(ids), np.int64).ravel()
    ids = ids[(ids >= 0) & (ids < self.vocab_size)]
    if not keep_special:
      return self.sp.decode(ids[~self._control[ids]].tolist())
    ids = ids.tolist()
    out, run = [], []
    for i in ids:  # decode runs of ordinary ids; spell control ids out between them
      if self._control[i]:
        out += [self.sp.decode(run), self.sp.id_to_piece(i)]
        run = []
      else:
        run.append(i)
    return ''.join(out + [self.sp.decode(run)])

  def save(self, path: str) -> None:
    """A JSON pointer next to a copy of the .model file, so `load(path)` restores it."""
    target = os.path.splitext(path)[0] + '.model'
    if os.path.dirname(os.path.abspath(self.model_path)) == os.path.dirname(os.path.abspath(path)):
      target = self.model_path   # already beside the pointer (WORKDIR/tokenizer.model): no copy
    elif os.path.abspath(target) != os.path.abspath(self.model_path):
      shutil.copyfile(self.model_path, target)
    with open(path, 'w', encoding='utf-8') as f:
      json.dump({'kind': self.kind, 'model': os.path.basename(target)}, f)


# Names under which public tokenizer.json files spell the specials we use: only for a bare
# tokenizer.json; a model folder's tokenizer_config.json declares its own (load_hf_folder).
_HF_SPECIAL_NAMES = {
    'pad': ('<pad>', '<|pad|>', '[PAD]'),
    'bos': ('<s>', '<|begin_of_text|>', '<bos>', '[CLS]'),
    'eos': ('</s>', '<|endoftext|>', '<|end_of_text|>', '<eos>', '[SEP]'),
    'unk': ('<unk>', '[UNK]'),
}


class HFTokenizer:
  """A Hugging Face `tokenizer.json` (through the `tokenizers` library), e.g. GPT-2's or LLaMA's.

  `special_tokens` (name -> piece) as a model folder declares them; with `declared` False (a bare
  tokenizer.json) the conventional spellings above are looked up too. `chat_template` is the
  folder's Jinja chat template, if any (`encode_chat` renders it as transformers does).
  Exactness of the round trip is whatever that tokenizer gives (byte-level BPE is exact)."""
  kind = 'hf'

  def __init__(self, path: str, special_tokens: dict[str, str] | None = None,
               chat_template: str | None = None, declared: bool = False, tk=None):
    hf = importlib.import_module('tokenizers')   # this module is itself called `tokenizers`
    if tk is None:
      if not os.path.isfile(path):
        raise TokenizerError(f'Hugging Face tokenizer {path} does not exist.')
      try:
        tk = hf.Tokenizer.from_file(path)
      except Exception as e:  # the library raises a bare Exception for malformed files
        raise TokenizerError(f'{path} is not a readable Hugging Face tokenizer.json ({e}).') from None
    self.tk, self.path, self.chat_template, self.declared = tk, path, chat_template, declared
    vocab = self.tk.get_vocab(with_added_tokens=True)
    names = {k: (v,) for k, v in (special_tokens or {}).items()}
    self._special = {}
    for name, pieces in ({**names} if declared else {**_HF_SPECIAL_NAMES, **names}).items():
      hit = next((vocab[p] for p in pieces if p in vocab), None)
      if hit is not None:
        self._special[name] = hit
      elif declared:
        raise TokenizerError(f'{path} declares {name}_token={pieces[0]!r}, which is not in its vocabulary.')
    self._fast = None

  @property
  def vocab_size(self) -> int:
    return self.tk.get_vocab_size(with_added_tokens=True)

  @property
  def special_ids(self) -> dict[str, int]:
    return dict(self._special)

  @property
  def eos_id(self) -> int | None:
    return self._special.get('eos')

  def encode(self, text: str) -> np.ndarray:
    return np.asarray(self.tk.encode(text, add_special_tokens=False).ids, np.int32)

  def decode(self, ids: Iterable[int]) -> str:
    return self.tk.decode([int(i) for i in ids if 0 <= int(i) < self.vocab_size],
                          skip_special_tokens=True)

  def render_chat(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
    """The chat template's text for `messages`, rendered by transformers' apply_chat_template
    (bos_token, eos_token, ... as this tokenizer declares them)."""
    if not self.chat_template:
      raise TokenizerError(f'{self.path} has no chat_template to format conversations with.')
    if self._fast is None:
      from transformers import PreTrainedTokenizerFast
      pieces = {f'{n}_token': self.tk.id_to_token(i) for n, i in self._special.items()}
      own = importlib.import_module('tokenizers').Tokenizer.from_str(self.tk.to_str())   # self.tk stays as it is
      self._fast = PreTrainedTokenizerFast(tokenizer_object=own, chat_template=self.chat_template, **pieces)
    return self._fast.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)

  def encode_chat(self, text: str) -> tuple[np.ndarray, np.ndarray]:
    """(ids, [n, 2] character offsets) of a rendered chat: special tokens written in it are theirs."""
    enc = self.tk.encode(text, add_special_tokens=False)
    return np.asarray(enc.ids, np.int32), np.asarray(enc.offsets, np.int64).reshape(-1, 2)

  def save(self, path: str) -> None:
    """A JSON pointer next to the tokenizer (as STEM.hf.json) and its chat template."""
    target = os.path.splitext(path)[0] + '.hf.json'
    if os.path.abspath(target) != os.path.abspath(self.path):
      self.tk.save(target)
    with open(path, 'w', encoding='utf-8') as f:
      json.dump({'kind': self.kind, 'model': os.path.basename(target), 'declared': self.declared,
                 'special_tokens': {k: self.tk.id_to_token(v) for k, v in self._special.items()},
                 'chat_template': self.chat_template}, f)


def load_hf_folder(folder: str) -> HFTokenizer:
  """A Hugging Face model folder's tokenizer as transformers reads it: AutoTokenizer's own
  tokenizer (ids equal to its `encode(text, add_special_tokens=False)`), with exactly the
  special tokens and chat_template its tokenizer_config.json declares. A folder with only a
  tokenizer.json falls back to that file and the conventional spellings."""
  path = os.path.join(folder, 'tokenizer.json')
  if not os.path.exists(os.path.join(folder, 'tokenizer_config.json')):
    return HFTokenizer(path)
  from transformers import AutoTokenizer
  try:
    fast = AutoTokenizer.from_pretrained(folder, local_files_only=True)
  except (OSError, ValueError) as e:
    raise TokenizerError(f'transformers cannot read the tokenizer in {folder} ({e}).') from None
  if not getattr(fast, 'is_fast', False):
    raise TokenizerError(f'{folder} holds a slow ({type(fast).__name__}) tokenizer; save it with tokenizer.json.')
  specials = {n: str(getattr(fast, f'{n}_token')) for n in ('pad', 'bos', 'eos', 'unk')
              if getattr(fast, f'{n}_token', None) is not None}
  hf = importlib.import_module('tokenizers')
  tk = hf.Tokenizer.from_str(fast.backend_tokenizer.to_str())   # its own copy, settings as transformers left them
  stored = HFTokenizer(path, declared=True).vocab_size
  if tk.get_vocab_size(with_added_tokens=True) != stored:
    extra = [tk.id_to_token(i) for i in range(stored, tk.get_vocab_size(with_added_tokens=True))]
    raise TokenizerError(f"transformers' {type(fast).__name__} adds {extra} (its class defaults), which "
                         f'{path} lacks; declare them in tokenizer_config.json (e.g. "unk_token": null).')
  tk.no_truncation()
  tk.no_padding()
  template = fast.chat_template   # several named templates: the default one
  template = template if isinstance(template, str) or template is None else template.get('default')
  return HFTokenizer(path, specials, template, declared=True, tk=tk)


# Chat role markers (data/formats.py's `chat` template). Not in SPECIAL_TOKENS, so vocabularies
# trained before them keep their ids; `add_special_tokens` appends them where missing.
CHAT_TOKENS = {'system': '<|system|>', 'user': '<|user|>', 'assistant': '<|assistant|>'}


def special_piece(name: str) -> str:
  """The spelling of a special token: ours for known names, '<|name|>' otherwise."""
  return {**SPECIAL_TOKENS, **CHAT_TOKENS}.get(name, f'<|{name}|>')


class WithSpecialTokens:
  """A tokenizer plus special tokens it lacks, as new ids right after its vocabulary.

  Like control symbols, `encode` never produces them (text is encoded by the base);
  code inserts their ids. A model whose embedding was padded (`padded_vocab_size`) often
  has rows for them already, so an existing checkpoint can learn them without resizing.
  """
  kind = 'added'

  def __init__(self, base, added: Sequence[str]):
    clash = sorted(set(added) & set(base.special_ids))
    if clash or len(set(added)) != len(added):
      raise TokenizerError(f'Special tokens {list(added)} repeat or are already in the tokenizer '
                           f'({clash}); add each missing name once.')
    self.base, self.added = base, list(added)
    self._added_ids = {n: base.vocab_size + i for i, n in enumerate(self.added)}

  @property
  def vocab_size(self) -> int:
    return self.base.vocab_size + len(self.added)

  @property
  def special_ids(self) -> dict[str, int]:
    return {**self.base.special_ids, **self._added_ids}

  @property
  def eos_id(self) -> int | None:
    return self.special_ids.get('eos')

  def encode(self, text: str) -> np.ndarray:
    return self.base.encode(text)

  @property
  def chat_template(self) -> str | None:
    return getattr(self.base, 'chat_template', None)

  def render_chat(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
    return self.base.render_chat(messages, add_generation_prompt)

  def encode_chat(self, text: str) -> tuple[np.ndarray, np.ndarray]:
    return self.base.encode_chat(text)

  def decode(self, ids: Iterable[int], keep_special: bool = False) -> str:
    """Added ids are dropped, or spelled out (e.g. '<|user|>') with keep_special=True."""
    ids = np.asarray(ids if hasattr(ids, '__len__') else list(ids), np.int64).ravel()
    if not keep_special:
      return self.base.decode(ids[ids < self.base.vocab_size])
    # the base spells its own specials too, where it can (SentencePiece control pieces)
    spell = 'keep_special' in inspect.signature(self.base.decode).parameters
    base = lambda part: self.base.decode(part, keep_special=True) if spell else self.base.decode(part)
    out, start = [], 0
    for j in np.flatnonzero(ids >= self.base.vocab_size):
      out.append(base(ids[start:j]))
      k = int(ids[j]) - self.base.vocab_size
      out.append(special_piece(self.added[k]) if k < len(self.added) else '')
      start = j + 1
    return ''.join(out + [base(ids[start:])])

  def save(self, path: str) -> None:
    """The base tokenizer as STEM.base.json beside a pointer naming the added tokens."""
    base = os.path.splitext(path)[0] + '.base.json'
    self.base.save(base)
    with open(path, 'w', encoding='utf-8') as f:
      json.dump({'kind': self.kind, 'base': os.path.basename(base), 'added': self.added}, f)


def add_special_tokens(tokenizer, names: Sequence[str]):
  """`tokenizer` with every special token in `names` (e.g. 'eos', 'user', 'end') it lacks
  appended as a new id; unchanged if it has them all. Ids already given never move."""
  base, have = tokenizer, list(getattr(tokenizer, 'added', []))
  if isinstance(tokenizer, WithSpecialTokens):
    base = tokenizer.base
  missing = [n for n in dict.fromkeys(names) if n not in tokenizer.special_ids]
  return WithSpecialTokens(base, have + missing) if missing else tokenizer


TOKENIZER_KINDS = ('char', 'bpe', 'unigram')


def build_tokenizer(kind: str, texts: Sequence[str], vocab_size: int, prefix: str = '', **options):
  """A tokenizer of `kind` ('char', 'bpe' or 'unigram') built from the training texts.

  Subword kinds write PREFIX.model; `options` go to SentencePieceTokenizer.train
  (max_lines, character_coverage, seed)."""
  if kind == 'char':
    return CharTokenizer.from_texts(texts)
  if kind in ('bpe', 'unigram'):
    if vocab_size < MIN_SUBWORD_VOCAB:
      raise TokenizerError(f'data.vocab_size={vocab_size} is too small for {kind}: byte fallback alone '
                           f'needs 256 ids plus specials; use at least {MIN_SUBWORD_VOCAB}.')
    if not prefix:
      raise TokenizerError(f'A {kind} tokenizer needs a file prefix to write its .model to.')
    if not any(t.strip() for t in texts):
      raise TokenizerError(f'A {kind} tokenizer needs non-blank training text.')
    return SentencePieceTokenizer.train(texts, prefix, vocab_size, kind, **options)
  raise TokenizerError(f"data.tokenizer={kind!r} is not supported; choose one of {TOKENIZER_KINDS}.")


build = build_tokenizer  # the name the pretraining driver uses

# A run's tokenizer pointer (what `save` writes) in its workdir. Not Hugging Face's tokenizer.json,
# a different format that `export_hf` writes; workdirs from before the rename used that name.
RUN_FILE = 'tokenizer_ref.json'
OLD_RUN_FILE = 'tokenizer.json'


def run_file(workdir: str) -> str:
  """A workdir's tokenizer pointer: RUN_FILE, or the old tokenizer.json where only that exists."""
  new, old = os.path.join(workdir, RUN_FILE), os.path.join(workdir, OLD_RUN_FILE)
  return old if not os.path.exists(new) and os.path.exists(old) else new


def load(path: str):
  """Any tokenizer from disk: a pointer written by `save`, a SentencePiece `.model`, or a
  Hugging Face `tokenizer.json`."""
  path = os.fspath(path)
  if not os.path.exists(path):
    raise TokenizerError(f'Tokenizer file {path} does not exist; prepare the data first.')
  if path.endswith('.model'):
    return SentencePieceTokenizer(path)
  try:
    with open(path, encoding='utf-8') as f:
      meta = json.load(f)
  except (UnicodeDecodeError, json.JSONDecodeError):
    raise TokenizerError(f'Tokenizer file {path} is neither JSON nor a SentencePiece .model.') from None
  if not isinstance(meta, dict):
    raise TokenizerError(f'Tokenizer file {path} is JSON but not a tokenizer description.')
  kind = meta.get('kind')
  here = os.path.dirname(os.path.abspath(path))
  if kind == 'char':
    return CharTokenizer(meta['chars'])
  if kind == 'sentencepiece':
    return SentencePieceTokenizer(os.path.join(here, meta['model']))
  if kind == 'hf':
    return HFTokenizer(os.path.join(here, meta['model']), meta.get('special_tokens'), meta.get('chat_template'),
                       bool(meta.get('declared')))
  if kind == 'added':
    return WithSpecialTokens(load(os.path.join(here, meta['base'])), meta['added'])
  if kind is None and isinstance(meta.get('model'), dict):  # a Hugging Face tokenizer.json itself
    return HFTokenizer(path)
  raise TokenizerError(f'Tokenizer file {path} has unknown kind {kind!r}.')


def check_vocab(tokenizer, model_vocab_size: int, multiple: int = 128) -> None:
  """Raise TokenizerError unless a model with `model_vocab_size` rows fits this tokenizer:
  exactly its vocabulary, or that padded up to `multiple`."""
  n = tokenizer.vocab_size
  if model_vocab_size not in (n, padded_vocab_size(n, multiple)):
    raise TokenizerError(
        f'The tokenizer has {n} tokens but the model expects {model_vocab_size}; use the tokenizer '
        f'the model was trained with, or set model.vocab_size={n}.')


def bytes_per_token(tokenizer, texts: Iterable[str]) -> float:
  """UTF-8 bytes per token over `texts`: the compression that makes subwords worth it."""
  n_bytes = n_tokens = 0
  for t in texts:
    n_bytes += len(t.encode('utf-8'))
    n_tokens += len(tokenizer.encode(t))
  return n_bytes / max(n_tokens, 1)


# Hugging Face export ---------------------------------------------------------------------------
def to_hf(tokenizer):
  """A `tokenizers.Tokenizer` giving the same ids as `tokenizer` for any text it encodes, and the
  same text back; special tokens (control pieces, added ones) are special there too, same ids."""
  hf = importlib.import_module('tokenizers')
  base, added = tokenizer, []
  if isinstance(tokenizer, WithSpecialTokens):
    base, added = tokenizer.base, [special_piece(n) for n in tokenizer.added]
  specials = []
  if isinstance(base, CharTokenizer):
    # one word per character; no unk: like ours, an unknown character is an error
    tk = hf.Tokenizer(hf.models.WordLevel({c: i for i, c in enumerate(base.chars)}))
    tk.pre_tokenizer = hf.pre_tokenizers.Split(hf.Regex(r'[\s\S]'), 'isolated')
    tk.decoder = hf.decoders.Fuse()
  elif isinstance(base, SentencePieceTokenizer):
    tk, specials = _spm_to_hf(base.model_path)
  elif isinstance(base, HFTokenizer):
    tk = hf.Tokenizer.from_str(base.tk.to_str())
  else:
    raise TokenizerError(f'Cannot export a {type(base).__name__} to Hugging Face format.')
  tk.add_special_tokens([hf.AddedToken(p, special=True, normalized=False) for p in specials])
  for i, piece in enumerate(added):
    want = base.vocab_size + i
    tk.add_special_tokens([hf.AddedToken(piece, special=True, normalized=False)])
    if tk.token_to_id(piece) != want:  # the spelling is already an ordinary token
      raise TokenizerError(f'The added special token {piece!r} would get id {tk.token_to_id(piece)} '
                           f'in Hugging Face format instead of {want}; it clashes with the vocabulary.')
  return tk


def _spm_to_hf(model_path: str):
  """(tokenizers.Tokenizer, control pieces) for a SentencePiece .model, built by transformers'
  converter, which follows the model's own normalizer and piece scores (BPE merges by score)."""
  from sentencepiece import sentencepiece_model_pb2
  try:
    from transformers.convert_slow_tokenizer import SpmConverter
    build = SpmConverter.build_tokenizer_from_spm_proto
  except (ImportError, AttributeError):
    raise TokenizerError('Exporting a SentencePiece tokenizer needs transformers >= 5 '
                         '(pip install -U transformers).') from None
  proto = sentencepiece_model_pb2.ModelProto()
  with open(model_path, 'rb') as f:
    proto.ParseFromString(f.read())
  pieces = [(p.piece, p.score) for p in proto.pieces]
  kind = proto.trainer_spec.model_type   # 1 unigram, 2 bpe
  if kind == proto.trainer_spec.BPE:
    vocab = {p: i for i, (p, _) in enumerate(pieces)}
  elif kind == proto.trainer_spec.UNIGRAM:
    vocab = pieces
  else:
    raise TokenizerError(f'{model_path} is a {proto.trainer_spec.ModelType.Name(kind)} SentencePiece '
                         'model; only bpe and unigram ones can be exported.')
  tk = build(proto, vocab, legacy=True)   # legacy: the dummy prefix exactly as SentencePiece adds it
  control = [p.piece for p in proto.pieces
             if p.type in (proto.SentencePiece.CONTROL, proto.SentencePiece.UNKNOWN)]
  return tk, control


def export_hf(tokenizer, folder: str, chat_template: str | None = None, model_max_length: int | None = None) -> str:
  """Write `tokenizer` as a Hugging Face tokenizer (tokenizer.json, tokenizer_config.json, ...)
  in `folder`, so `transformers.AutoTokenizer.from_pretrained(folder)` loads it offline; with
  `chat_template`, its apply_chat_template formats conversations with it; `model_max_length`:
  the model's context (else transformers' "unlimited" 1e30)."""
  from transformers import PreTrainedTokenizerFast
  tk = to_hf(tokenizer)
  names = {f'{n}_token': tk.id_to_token(i) for n, i in tokenizer.special_ids.items()
           if n in ('pad', 'bos', 'eos', 'unk')}
  # No cleanup: it would delete spaces before punctuation, and decode must give the text back.
  # split_special_tokens: like ours, text spelling '<|response|>' is ordinary pieces, never the id;
  # but a chat template writes its markers as text, which must then become their ids.
  fast = PreTrainedTokenizerFast(tokenizer_object=tk, clean_up_tokenization_spaces=False,
                                 split_special_tokens=chat_template is None, chat_template=chat_template, **names,
                                 **({'model_max_length': model_max_length} if model_max_length else {}))
  os.makedirs(folder, exist_ok=True)
  fast.save_pretrained(folder)
  path = os.path.join(folder, 'tokenizer_config.json')
  with open(path, encoding='utf-8') as f:
    meta = json.load(f)
  # Specials we lack are declared absent: else AutoTokenizer's class for the model (Qwen2Tokenizer,
  # LlamaTokenizer, ...) would add its defaults as new ids the model has no rows for.
  meta.update({f'{n}_token': None for n in ('pad', 'bos', 'eos', 'unk') if f'{n}_token' not in names})
  if chat_template is not None:   # also where transformers < 4.43 looks for it
    meta['chat_template'] = chat_template
  with open(path, 'w', encoding='utf-8') as f:
    json.dump(meta, f, indent=2, ensure_ascii=False)
  return folder
