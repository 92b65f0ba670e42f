"""The pretraining corpus: one source (`data.path`) or a mixture of several (`data.mixture`),
its tokenizer, token streams per split, and the train batch iterator.

A source is a text file, a directory of them, a corpus shipped with the install, or JSON-lines
documents (`{"text": ...}`, e.g. the prepare experiment's documents.jsonl). A mixture maps
names to sources with a weight each (all 0: proportional to size, T5's examples-proportional
mixing, optionally capped by data.mixture_cap); a source's examples are its windows, so rates
are in tokens. Every source is validated separately (val_loss_<name>) and together (val_loss).
"""
from __future__ import annotations

import dataclasses
import os
import tempfile

import jax
from ml_collections import ConfigDict

from data import mixture as mixture_lib
from data import pipeline, sources, tokenizers
from experiments.stages import stage, trainer
from lm import paths
from lm.config import ConfigError

JSON_LINES = ('.jsonl', '.jsonl.gz', '.json', '.json.gz')


@dataclasses.dataclass
class Corpus:
  tokenizer: object
  train: dict[str, pipeline.TokenStream]        # source name -> tokens
  validation: dict[str, pipeline.TokenStream]
  is_mixture: bool

  def batch_spec(self, seq_len: int) -> dict:
    """Keys and shapes of a batch row (the same for every stream, see load)."""
    return pipeline.batch_spec(next(iter(self.train.values())), seq_len)


def read_splits(path: str, data_dir: str, val_fraction: float,
                field: str = 'text') -> dict[str, list[str]]:
  """{'train': [doc, ...], 'validation': [...]} of one source, prepared once under data_dir."""
  if path.endswith(JSON_LINES):  # documents ({field: text} per line), split by content hash
    docs = sources.prepare_documents(path, data_dir, val_fraction, field=field)
    return {split: docs.documents(split) for split in sources.SPLITS}
  return sources.prepare_text(path, data_dir, val_fraction)


def source_paths(config: ConfigDict) -> dict[str, tuple[str, str]]:
  """name -> (path, JSON field holding the text)."""
  d = config.data
  if not d.mixture:
    return {'data': (d.path, 'text')}
  return {name: (m.path, m.get('field', 'text')) for name, m in d.mixture.items()}


def check_config(config: ConfigDict) -> None:
  d = config.data
  for name, m in d.mixture.items():
    missing = {'path', 'weight', 'max_windows'} - set(m.keys())
    if missing:
      raise ConfigError(f'data.mixture.{name} lacks {sorted(missing)}; each source is '
                        "{'path': ..., 'weight': 0.0 (proportional) or a rate, 'max_windows': 0}.")
  if d.mixture and d.sampling != 'random':
    raise ConfigError('data.sampling applies to a single source; a mixture draws its own windows.')


def load(config: ConfigDict, workdir: str, tokenizer=None) -> Corpus:
  """Splits, tokenizer (`tokenizer` if given: an init_from source's) and token streams."""
  check_config(config)
  d = config.data
  if not d.data_dir and paths.is_url(workdir):
    raise ConfigError(f'--workdir={workdir} is a URL, and the prepared corpus is plain local '
                      'files: set --config.data.data_dir to a local or shared folder.')
  data_dir = d.data_dir or os.path.join(workdir, 'data')
  splits = {}
  for name, (path, field) in source_paths(config).items():
    where = data_dir if name == 'data' else os.path.join(data_dir, name)
    splits[name] = trainer.process_zero_first(
        lambda p=path, w=where, f=field: read_splits(p, w, d.val_fraction, f), f'prepare {name}')
  train_docs = [t for s in splits.values() for t in s['train']]
  all_docs = train_docs + [t for s in splits.values() for t in s['validation']]
  if tokenizer is not None:
    tok = tokenizer
    if jax.process_index() == 0:
      stage.save_tokenizer(tok, workdir)
  else:
    tok = trainer.process_zero_first(lambda: make_tokenizer(config, workdir, train_docs, all_docs),
                                     'build tokenizer')
  # Every train and validation stream gets the same batch keys (segment ids if any has them).
  streams = pipeline.same_keys({(n, split): pipeline.tokenize_docs(s[split], tok)
                                for n, s in splits.items() for split in ('train', 'validation')})
  return Corpus(tok, {n: streams[n, 'train'] for n in splits},
                {n: streams[n, 'validation'] for n in splits}, is_mixture=bool(d.mixture))


def make_tokenizer(config: ConfigDict, workdir: str, train_docs: list[str], all_docs: list[str]):
  """The run's tokenizer, built once and then reused from WORKDIR/tokenizer_ref.json."""
  d = config.data
  if paths.is_url(workdir):
    if any((paths.path(workdir) / f).exists() for f in (tokenizers.RUN_FILE, tokenizers.OLD_RUN_FILE)):
      return stage.load_tokenizer(workdir)   # resumed: this vocabulary (and its .model) again
  else:
    path = tokenizers.run_file(workdir)  # or a pre-rename workdir's tokenizer.json
    if os.path.exists(path):  # a resumed run (or another host) keeps this vocabulary
      return tokenizers.load(path)
  if d.tokenizer not in tokenizers.TOKENIZER_KINDS:  # a file: e.g. the prepare experiment's
    tok = tokenizers.load(d.tokenizer)
  elif d.tokenizer == 'char':  # nanoGPT's convention: every character of the corpus
    tok = tokenizers.build('char', all_docs, 0, '')
  else:  # subwords are learned from the training split only
    # SentencePiece writes PREFIX.model to local files: for a bucket a kept local folder (the
    # tokenizer reads it by path), which save_tokenizer copies up beside the pointer.
    where = tempfile.mkdtemp(prefix='tokenizer-') if paths.is_url(workdir) else workdir
    tok = tokenizers.build(d.tokenizer, train_docs, d.vocab_size, os.path.join(where, 'tokenizer'))
  stage.save_tokenizer(tok, workdir)   # the pointer and the files it names (.model, .base.json)
  return tok


def make_mixture(config: ConfigDict, corpus: Corpus, seq_len: int) -> mixture_lib.Mixture:
  d = config.data
  sizes = {}
  for name, stream in corpus.train.items():
    sizes[name] = pipeline.num_windows(stream, seq_len)
    if sizes[name] == 0:
      raise ConfigError(f'Mixture source {name!r} has {len(stream)} training tokens, not one window '
                        f'of seq_len + 1 = {seq_len + 1}; give it more text or drop it from data.mixture.')
  weights = {n: float(m.weight) for n, m in d.mixture.items()}
  limits = {n: int(m.max_windows) for n, m in d.mixture.items() if m.max_windows}
  try:
    if any(weights.values()):
      never = [n for n, w in weights.items() if w == 0]
      if never:
        raise ConfigError(f'data.mixture source(s) {never} have weight 0 beside positive weights, so '
                          'they would never be drawn; give them a weight, remove them, or set every '
                          'weight to 0 for size-proportional mixing.')
      if d.mixture_cap or d.mixture_temperature != 1.0:
        raise ConfigError('data.mixture_cap and data.mixture_temperature apply to size-proportional '
                          'mixing; with explicit weights set them to 0 and 1.0.')
      return mixture_lib.weighted(sizes, weights, seed=config.seed, max_examples=limits)
    return mixture_lib.examples_proportional(sizes, cap=d.mixture_cap or None, seed=config.seed,
                                             max_examples=limits, temperature=d.mixture_temperature)
  except mixture_lib.MixtureError as e:
    raise ConfigError(f'data.mixture: {e}') from None


def train_batches(config: ConfigDict, corpus: Corpus, seq_len: int, rows: tuple[int, int]):
  """The train iterator: random/sequential windows of one source, or the mixture."""
  t = config.train
  if not corpus.is_mixture:
    return pipeline.BatchIterator(corpus.train['data'], seq_len, t.batch_size, config.seed,
                                  config.data.sampling, rows)
  return pipeline.MixtureBatches(corpus.train, make_mixture(config, corpus, seq_len), seq_len,
                                 t.batch_size, rows)


def format_report(report: dict) -> str:
  lines = [f"{'source':<16}{'rate':>8}{'realised':>10}{'windows':>12}{'epochs':>8}"]
  for name, r in report.items():
    lines.append(f"{name:<16}{r['rate']:>8.3f}{r['realised']:>10.3f}{r['drawn']:>12,}{r['epochs']:>8.2f}")
  return '\n'.join(lines)
