"""Cleaning raw documents before tokenization: quality, language, duplicates, contamination, PII.

Every step is a pure function over a list of documents (str) that returns
`(kept documents, report)`, where the report always has `in` and `out` (document counts) and
`removed` (reason -> documents removed), plus counts particular to the step. Document order is
kept. An empty (or whitespace-only) document is removed and counted as `removed['empty']` by
every step, never dropped silently.

  quality_filter      Gopher's heuristic rules (Rae et al. 2021, appendix A): word count, mean
                      word length, symbol ratio, bullet and ellipsis lines, alphabetic words,
                      stop words, and repetition (duplicate lines, top n-grams, duplicated
                      n-grams). Thresholds live in `QualityConfig`; a document is counted
                      under the first rule it fails (`quality_check` names it).
  perplexity_filter   drops the worst fraction by a caller's `score_fn` (mean NLL per
                      document), so data/ never imports lm/.
  filter_language     py3langid (its model ships inside the package: offline).
  dedup_exact         normalised-hash exact duplicates of whole documents.
  dedup_lines         lines already seen in an earlier document (C4/CCNet style).
  dedup_near          MinHash + LSH (datasketch) over word 5-gram shingles; keeps the first
                      document of each near-duplicate cluster.
  decontaminate       drops documents sharing any word 13-gram with evaluation texts.
  scrub_pii           e-mails, phone numbers, IP addresses and Luhn-valid card numbers
                      become <EMAIL>, <PHONE>, <IP>, <CREDIT_CARD>.

`clean(docs, config)` runs the enabled steps from a plain mapping (or an ml_collections
ConfigDict) in the order quality, language, exact dedup, near dedup, decontamination,
perplexity, PII (cheap filters first; the LM scores only what survived; PII last, since
scrubbing does not remove documents) and returns the documents with a report of every step.
"""
from __future__ import annotations

import collections
import dataclasses
import functools
import hashlib
import inspect
import ipaddress
import math
import re
import string
from typing import Callable, Iterable, Mapping, Sequence

from tqdm import tqdm

Report = dict


def _is_empty(doc: str) -> bool:
  return not doc.strip()


def _report(n_in: int, kept: list, removed: Mapping[str, int], **extra) -> Report:
  return {'in': n_in, 'out': len(kept), 'removed': dict(removed), **extra}


def _check_docs(docs) -> list[str]:
  if isinstance(docs, str):
    raise TypeError('Cleaning steps take a list of documents, not a single string; wrap it in a '
                    'list.')
  docs = list(docs)
  for d in docs:
    if not isinstance(d, str):
      raise TypeError(f'Documents must be str, got {type(d).__name__}; decode bytes first.')
  return docs


# --- normalisation -----------------------------------------------------------------------

_NON_WORD = re.compile(r'[^\w\s]+')
_SPACES = re.compile(r'\s+')
_WORD = re.compile(r'\w+')


def normalize(text: str) -> str:
  """Lowercase, punctuation removed, whitespace collapsed: the key for exact duplicates."""
  return _SPACES.sub(' ', _NON_WORD.sub(' ', text.lower())).strip()


def _digest(text: str) -> bytes:
  # 8-byte digests keep the seen-set small; collisions at 2^-64 per pair are negligible.
  return hashlib.blake2b(text.encode('utf-8'), digest_size=8).digest()


def _tokens(text: str) -> list[str]:
  """Normalised word tokens (lowercase runs of word characters), for n-gram matching."""
  return _WORD.findall(text.lower())


# --- heuristic quality filters (Gopher) ----------------------------------------------------

@dataclasses.dataclass(frozen=True)
class QualityConfig:
  """Thresholds of Gopher's quality rules (Rae et al. 2021, appendix A); defaults are theirs."""
  min_words: int = 50
  max_words: int = 100_000
  min_mean_word_length: float = 3.0
  max_mean_word_length: float = 10.0
  max_symbol_word_ratio: float = 0.1       # ('#' + '...') per word
  max_bullet_lines: float = 0.9            # fraction of lines starting with a bullet
  max_ellipsis_lines: float = 0.3          # fraction of lines ending in an ellipsis
  min_alpha_words: float = 0.8             # fraction of words with an alphabetic character
  min_stop_words: int = 2
  stop_words: tuple[str, ...] = ('the', 'be', 'to', 'of', 'and', 'that', 'have', 'with')
  max_duplicate_lines: float = 0.3         # fraction of lines that repeat an earlier line
  max_duplicate_line_chars: float = 0.2    # fraction of characters in those lines
  # (n, max fraction of characters in the most common n-gram)
  max_top_ngram_chars: tuple[tuple[int, float], ...] = ((2, 0.20), (3, 0.18), (4, 0.16))
  # (n, max fraction of characters in duplicated n-grams)
  max_duplicate_ngram_chars: tuple[tuple[int, float], ...] = (
      (5, 0.15), (6, 0.14), (7, 0.13), (8, 0.12), (9, 0.11), (10, 0.10))


QUALITY_RULES = ('word_count', 'mean_word_length', 'symbol_word_ratio', 'bullet_lines',
                 'ellipsis_lines', 'alpha_words', 'stop_words', 'duplicate_lines',
                 'duplicate_line_chars', 'top_2gram_chars', 'top_3gram_chars', 'top_4gram_chars',
                 'duplicate_5gram_chars', 'duplicate_6gram_chars', 'duplicate_7gram_chars',
                 'duplicate_8gram_chars', 'duplicate_9gram_chars', 'duplicate_10gram_chars')

_BULLETS = ('•', '●', '○', '■', '□', '▪', '▫', '◦', '‣', '⁃', '·', '-', '–', '—', '*')
_ELLIPSES = ('...', '…')
_PUNCT = string.punctuation + '“”‘’«»…–—'


def _top_ngram_fraction(words: list[str], n: int, total: int) -> float:
  """Characters in all occurrences of the most common n-gram (if it repeats), over all."""
  counts = collections.Counter(zip(*(words[i:] for i in range(n))))
  if not counts:
    return 0.0
  gram, count = counts.most_common(1)[0]
  return 0.0 if count < 2 else count * sum(map(len, gram)) / total


def _duplicate_ngram_fraction(words: list[str], n: int, total: int) -> float:
  """Characters in words covered by a repeat (not the first occurrence) of any n-gram."""
  seen, covered = set(), bytearray(len(words))
  for i, gram in enumerate(zip(*(words[i:] for i in range(n)))):
    if gram in seen:
      covered[i:i + n] = b'\x01' * n
    else:
      seen.add(gram)
  return sum(len(w) for w, c in zip(words, covered) if c) / total


def quality_check(doc: str, config: QualityConfig = QualityConfig()) -> str | None:
  """The first Gopher rule `doc` fails (a name from QUALITY_RULES), or None if it passes."""
  c = config
  raw_words = doc.split()
  if not c.min_words <= len(raw_words) <= c.max_words:
    return 'word_count'
  # Lengths and stop words ignore punctuation glued to words ("end." is a 3-letter word).
  words = [w for w in (w.strip(_PUNCT).lower() for w in raw_words) if w]
  mean_len = sum(map(len, words)) / len(words) if words else 0.0
  if not c.min_mean_word_length <= mean_len <= c.max_mean_word_length:
    return 'mean_word_length'
  symbols = doc.count('#') + doc.count('...') + doc.count('…')
  if symbols / len(raw_words) > c.max_symbol_word_ratio:
    return 'symbol_word_ratio'
  lines = [l.strip() for l in doc.splitlines() if l.strip()]
  if sum(l.startswith(_BULLETS) for l in lines) / len(lines) > c.max_bullet_lines:
    return 'bullet_lines'
  if sum(l.endswith(_ELLIPSES) for l in lines) / len(lines) > c.max_ellipsis_lines:
    return 'ellipsis_lines'
  if sum(any(ch.isalpha() for ch in w) for w in raw_words) / len(raw_words) < c.min_alpha_words:
    return 'alpha_words'
  stop = set(c.stop_words)
  if sum(w in stop for w in words) < c.min_stop_words:
    return 'stop_words'
  seen, dup_lines, dup_chars = set(), 0, 0
  for l in lines:
    if l in seen:
      dup_lines += 1
      dup_chars += len(l)
    seen.add(l)
  if dup_lines / len(lines) > c.max_duplicate_lines:
    return 'duplicate_lines'
  if dup_chars / sum(map(len, lines)) > c.max_duplicate_line_chars:
    return 'duplicate_line_chars'
  total = sum(map(len, words))
  for n, limit in c.max_top_ngram_chars:
    if _top_ngram_fraction(words, n, total) > limit:
      return f'top_{n}gram_chars'
  for n, limit in c.max_duplicate_ngram_chars:
    if _duplicate_ngram_fraction(words, n, total) > limit:
      return f'duplicate_{n}gram_chars'
  return None


def quality_filter(docs: Sequence[str], config: QualityConfig = QualityConfig()
                   ) -> tuple[list[str], Report]:
  """Documents passing every Gopher rule; `removed` counts each by the first rule it fails."""
  docs = _check_docs(docs)
  kept, removed = [], collections.Counter()
  for d in docs:
    rule = 'empty' if _is_empty(d) else quality_check(d, config)
    if rule is None:
      kept.append(d)
    else:
      removed[rule] += 1
  return kept, _report(len(docs), kept, removed)


def perplexity_filter(docs: Sequence[str], score_fn: Callable[[list[str]], Sequence[float]],
                      drop_fraction: float = 0.1) -> tuple[list[str], Report]:
  """Drops the `drop_fraction` of documents with the highest score (mean NLL under a small LM).

  `score_fn(list of str) -> per-document mean NLL` is the caller's (e.g. built from lm/ in
  experiments/), so this module never imports the model. Scores that are not finite count as
  the worst. The report has the NLL threshold and the mean NLL of kept and dropped documents.
  """
  docs = _check_docs(docs)
  if not 0.0 <= drop_fraction < 1.0:
    raise ValueError(f'drop_fraction must be in [0, 1), got {drop_fraction}.')
  texts = [d for d in docs if not _is_empty(d)]
  removed = collections.Counter(empty=len(docs) - len(texts))
  scores = [float(s) for s in score_fn(texts)] if texts else []
  if len(scores) != len(texts):
    raise ValueError(f'score_fn returned {len(scores)} scores for {len(texts)} documents; it must '
                     'return one mean NLL per document.')
  scores = [s if math.isfinite(s) else math.inf for s in scores]
  n_drop = int(round(drop_fraction * len(texts)))
  # Stable: among equal scores the later document goes first.
  worst = sorted(range(len(texts)), key=lambda i: (scores[i], i), reverse=True)[:n_drop]
  drop = set(worst)
  kept = [t for i, t in enumerate(texts) if i not in drop]
  removed['perplexity'] = n_drop

  def mean(xs):
    xs = [x for x in xs if math.isfinite(x)]
    return sum(xs) / len(xs) if xs else None

  return kept, _report(
      len(docs), kept, removed,
      threshold=min((scores[i] for i in drop), default=None),
      mean_nll_kept=mean([s for i, s in enumerate(scores) if i not in drop]),
      mean_nll_dropped=mean([scores[i] for i in drop]))


# --- language identification ------------------------------------------------------------

@functools.lru_cache(maxsize=1)
def _language_identifier():
  try:
    from py3langid.langid import MODEL_FILE, LanguageIdentifier
  except ImportError as e:
    raise ImportError('Language identification needs py3langid; install it with '
                      '`pip install py3langid`.') from e
  # norm_probs gives a probability in [0, 1] that min_confidence can threshold.
  return LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)


def detect_language(text: str) -> tuple[str, float]:
  """(ISO 639-1 code, probability) by py3langid, whose model ships in the package."""
  lang, prob = _language_identifier().classify(text)
  return lang, float(prob)


def filter_language(docs: Sequence[str], keep: Iterable[str] = ('en',),
                    min_confidence: float = 0.5) -> tuple[list[str], Report]:
  """Documents detected as a language in `keep` with probability >= min_confidence.

  The report counts every document's detected language (`languages`) and removes by
  `language` (another language) or `low_confidence` (a kept language, but unsure).
  """
  docs = _check_docs(docs)
  keep = {keep} if isinstance(keep, str) else set(keep)
  known = set(_language_identifier().labels)
  if not keep or keep - known:
    raise ValueError(f'Unknown language codes {sorted(keep - known)} in keep; use ISO 639-1 codes '
                     f'py3langid knows, e.g. {sorted(known)[:10]}...')
  kept, removed, languages = [], collections.Counter(), collections.Counter()
  for d in docs:
    if _is_empty(d):
      removed['empty'] += 1
      continue
    lang, prob = detect_language(d)
    languages[lang] += 1
    if lang not in keep:
      removed['language'] += 1
    elif prob < min_confidence:
      removed['low_confidence'] += 1
    else:
      kept.append(d)
  return kept, _report(len(docs), kept, removed, languages=dict(languages.most_common()))


# --- de-duplication -----------------------------------------------------------------------

def dedup_exact(docs: Sequence[str]) -> tuple[list[str], Report]:
  """Keeps the first of documents equal after `normalize` (case, punctuation, whitespace)."""
  docs = _check_docs(docs)
  kept, seen, removed = [], set(), collections.Counter()
  for d in docs:
    if _is_empty(d):
      removed['empty'] += 1
      continue
    key = _digest(normalize(d))
    if key in seen:
      removed['duplicate'] += 1
    else:
      seen.add(key)
      kept.append(d)
  n = len(docs) - removed['empty']
  return kept, _report(len(docs), kept, removed,
                       duplicate_rate=removed['duplicate'] / n if n else 0.0)


def dedup_lines(docs: Sequence[str]) -> tuple[list[str], Report]:
  """Removes lines (after `normalize`) already seen in an earlier document.

  Repeats inside one document are kept (that is the quality filter's business); blank lines
  are never duplicates. A document left with no text is removed as `emptied`.
  """
  docs = _check_docs(docs)
  kept, seen, removed = [], set(), collections.Counter()
  lines_in = lines_removed = 0
  for d in docs:
    if _is_empty(d):
      removed['empty'] += 1
      continue
    out, new = [], set()
    for line in d.splitlines(keepends=True):
      norm = normalize(line)
      if not norm:
        out.append(line)
        continue
      lines_in += 1
      key = _digest(norm)
      if key in seen:
        lines_removed += 1
      else:
        new.add(key)
        out.append(line)
    seen |= new
    text = ''.join(out)
    if _is_empty(text):
      removed['emptied'] += 1
    else:
      kept.append(text)
  return kept, _report(len(docs), kept, removed, lines_in=lines_in, lines_removed=lines_removed,
                       duplicate_rate=lines_removed / lines_in if lines_in else 0.0)


def _shingles(text: str, ngram: int) -> set[bytes]:
  words = _tokens(text)
  if len(words) < ngram:  # too short for one shingle: the whole text is its only shingle
    return {' '.join(words).encode('utf-8')}
  return {' '.join(words[i:i + ngram]).encode('utf-8') for i in range(len(words) - ngram + 1)}


def dedup_near(docs: Sequence[str], threshold: float = 0.8, num_perm: int = 128,
               ngram: int = 5, seed: int = 1) -> tuple[list[str], Report]:
  """Removes documents whose word `ngram` shingles have Jaccard >= threshold with a kept one.

  MinHash signatures (datasketch, fixed `seed`: deterministic) are bucketed by LSH; every LSH
  candidate is confirmed by its estimated Jaccard, so LSH's false positives never remove a
  document. Documents are visited in order, so the first of each cluster is the one kept.
  """
  from datasketch import MinHash, MinHashLSH
  docs = _check_docs(docs)
  if not 0.0 < threshold < 1.0:  # 1.0 is exact dedup's job
    raise ValueError(f'threshold is a Jaccard similarity strictly between 0 and 1, got '
                     f'{threshold}; use dedup_exact for identical documents.')
  try:
    lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
  except ValueError as e:  # datasketch found no banding with at least two bands
    raise ValueError(f'No LSH banding for threshold={threshold} with num_perm={num_perm} ({e}); '
                     'lower the threshold or raise num_perm.') from e
  kept, signatures, removed = [], {}, collections.Counter()
  for i, d in enumerate(docs):
    if _is_empty(d):
      removed['empty'] += 1
      continue
    m = MinHash(num_perm=num_perm, seed=seed)
    m.update_batch(list(_shingles(d, ngram)))
    if any(signatures[k].jaccard(m) >= threshold for k in lsh.query(m)):
      removed['near_duplicate'] += 1
      continue
    signatures[i] = m
    lsh.insert(i, m)
    kept.append(d)
  n = len(docs) - removed['empty']
  return kept, _report(len(docs), kept, removed,
                       duplicate_rate=removed['near_duplicate'] / n if n else 0.0)


# --- decontamination ------------------------------------------------------------------------

def decontaminate(docs: Sequence[str], eval_sets: Mapping[str, Iterable[str]] | Iterable[str],
                  n: int = 13) -> tuple[list[str], Report]:
  """Drops documents sharing any word n-gram (normalised tokens) with an evaluation text.

  `eval_sets` maps a name to its texts (a plain list is named 'eval'); `matched` counts removed
  documents by the eval set of their first shared n-gram. Eval texts shorter than n words
  cannot match and are counted as `eval_texts_too_short`.
  """
  docs = _check_docs(docs)
  if isinstance(eval_sets, str):
    raise TypeError('eval_sets is a list of texts or a mapping name -> texts, not one string.')
  # hasattr, not isinstance(Mapping): a ConfigDict of eval sets is a mapping too.
  eval_sets = _as_dict(eval_sets) if hasattr(eval_sets, 'items') else {'eval': eval_sets}
  if n < 1:
    raise ValueError(f'n must be a positive n-gram length, got {n}.')
  owner, too_short = {}, 0
  for name, texts in eval_sets.items():
    for t in _check_docs(texts):
      words = _tokens(t)
      too_short += len(words) < n
      for i in range(len(words) - n + 1):
        owner.setdefault(_digest(' '.join(words[i:i + n])), name)
  kept, removed, matched = [], collections.Counter(), collections.Counter()
  for d in docs:
    if _is_empty(d):
      removed['empty'] += 1
      continue
    words = _tokens(d)
    hit = next((owner[k] for k in (_digest(' '.join(words[i:i + n]))
                                   for i in range(len(words) - n + 1)) if k in owner), None)
    if hit is None:
      kept.append(d)
    else:
      removed['contaminated'] += 1
      matched[hit] += 1
  return kept, _report(len(docs), kept, removed, matched=dict(matched), ngrams=len(owner),
                       eval_texts_too_short=too_short)


# --- PII scrubbing -----------------------------------------------------------------------------

PII_TOKENS = {'email': '<EMAIL>', 'credit_card': '<CREDIT_CARD>', 'ip': '<IP>', 'phone': '<PHONE>'}

_EMAIL = re.compile(
    r'(?<![\w.+-])[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b')
# Card-like runs: 13-19 digits, optional single spaces/dashes; never a tail of a longer run.
_CARD = re.compile(r'(?<![\w.+-])(?<!\d[ -])(?:\d[ -]?){12,18}\d(?!\w|[.-]\d|[ -]\d)')
_OCTET = r'(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)'
# Valid octets only, and not inside a longer dotted run ("1.2.3.4.5" is not an address).
_IPV4 = re.compile(rf'(?<![\w.])(?:{_OCTET}\.){{3}}{_OCTET}(?![\w]|\.\d)')
_IPV6 = re.compile(r'(?<![\w:.])[0-9A-Fa-f:][0-9A-Fa-f:.]*[0-9A-Fa-f](?![\w:])')
_PHONE = re.compile(
    r'(?<![\w+])(?:'
    r'\+\d{1,3}(?:[ .-]?\(\d{1,4}\)|[ .-]?\d{1,4}){2,5}'      # international: +44 20 7946 0958
    r'|(?:1[ .-]?)?(?:\(\d{3}\)[ .-]?|\d{3}[ .-])\d{3}[ .-]\d{4}'  # US: (555) 123-4567
    r')(?!\w|[.-]\d)')


def _luhn(digits: str) -> bool:
  total = 0
  for i, ch in enumerate(reversed(digits)):
    d = int(ch) * (2 if i % 2 else 1)
    total += d - 9 if d > 9 else d
  return total % 10 == 0


def _is_card(match: str) -> bool:
  digits = re.sub(r'\D', '', match)
  groups = re.split(r'[ -]', match)
  # Real cards print digits in groups of 3+ (4-4-4-4, 4-6-5); spaced single digits are not cards.
  return 13 <= len(digits) <= 19 and all(len(g) >= 3 for g in groups) and _luhn(digits)


def _is_ipv6(match: str) -> bool:
  # Two colons, a digit and two hex groups: rules out '::', 'a::b' and slices like '::2'.
  groups = [g for g in match.split(':') if g]
  if match.count(':') < 2 or not any(ch.isdigit() for ch in match) or len(groups) < 2:
    return False
  try:
    ipaddress.IPv6Address(match)
  except ValueError:
    return False
  return True


def _is_phone(match: str) -> bool:
  return 8 <= len(re.sub(r'\D', '', match)) <= 15  # E.164 numbers have at most 15 digits


# Order matters: e-mails may hold digits, and card runs must not be cut into phone numbers.
_PII = (('email', _EMAIL, None), ('credit_card', _CARD, _is_card), ('ip', _IPV4, None),
        ('ip', _IPV6, _is_ipv6), ('phone', _PHONE, _is_phone))


def scrub_pii_text(text: str) -> tuple[str, collections.Counter]:
  """`text` with PII replaced by PII_TOKENS, and the count of replacements per kind."""
  counts = collections.Counter()
  for kind, pattern, valid in _PII:
    def replace(m, kind=kind, valid=valid):
      if valid is not None and not valid(m.group()):
        return m.group()
      counts[kind] += 1
      return PII_TOKENS[kind]
    text = pattern.sub(replace, text)
  return text, counts


def scrub_pii(docs: Sequence[str]) -> tuple[list[str], Report]:
  """Every document with PII replaced; `replaced` counts replacements per kind."""
  docs = _check_docs(docs)
  kept, removed, replaced, changed = [], collections.Counter(), collections.Counter(), 0
  for d in docs:
    if _is_empty(d):
      removed['empty'] += 1
      continue
    text, counts = scrub_pii_text(d)
    replaced.update(counts)
    changed += bool(counts)
    kept.append(text)
  return kept, _report(len(docs), kept, removed,
                       replaced={k: replaced[k] for k in PII_TOKENS}, documents_changed=changed)


# --- the pipeline ------------------------------------------------------------------------------

def _quality_step(docs, **options):
  options = {k: tuple(map(tuple, v)) if k.startswith('max_') and k.endswith('ngram_chars')
             else tuple(v) if k == 'stop_words' else v for k, v in options.items()}
  return quality_filter(docs, QualityConfig(**options))


def _exact_step(docs, lines=False):
  docs, report = dedup_exact(docs)
  if not lines:
    return docs, report
  docs, line_report = dedup_lines(docs)
  removed = collections.Counter(report['removed'])
  removed.update(line_report['removed'])
  return docs, {**report, 'out': len(docs), 'removed': dict(removed),
                'lines': {k: line_report[k]
                          for k in ('lines_in', 'lines_removed', 'duplicate_rate')}}


# name -> (function(docs, **options), enabled when the config does not mention it)
STEPS: dict[str, tuple[Callable, bool]] = {
    'quality': (_quality_step, True),
    'language': (filter_language, True),
    'exact_dedup': (_exact_step, True),
    'near_dedup': (dedup_near, True),
    'decontaminate': (decontaminate, False),   # needs eval_sets
    'perplexity': (perplexity_filter, False),  # needs score_fn
    'pii': (scrub_pii, True),
}


def _check_options(step: str, options: Mapping, valid: Iterable[str]):
  unknown = set(options) - set(valid)
  if unknown:
    raise ValueError(f'Unknown option(s) {sorted(unknown)} for cleaning step {step!r}; valid '
                     f'options are {sorted(valid)}.')


def _as_dict(mapping) -> dict:
  """A plain dict from a dict or an ml_collections ConfigDict (which has items() too)."""
  return dict(mapping.items()) if hasattr(mapping, 'items') else dict(mapping)


def _parameters(step: str) -> dict[str, inspect.Parameter]:
  params = inspect.signature(STEPS[step][0]).parameters
  return {k: p for k, p in params.items() if k != 'docs'}


def _step_options(step: str, value) -> dict | None:
  """None to skip the step, else the keyword options it runs with."""
  if value is None or value is False:
    return None
  options = {} if value is True else value
  if not hasattr(options, 'items'):
    raise ValueError(f'Cleaning step {step!r} takes True, False or a mapping of options, got '
                     f'{value!r}.')
  options = _as_dict(options)
  if step == 'quality':
    _check_options(step, options, [f.name for f in dataclasses.fields(QualityConfig)])
    return options
  _check_options(step, options, _parameters(step))
  missing = [k for k, p in _parameters(step).items()
             if p.default is inspect.Parameter.empty and k not in options]
  if missing:
    raise ValueError(f'Cleaning step {step!r} needs the option(s) {missing}.')
  return options


def clean(docs: Sequence[str], config: Mapping | None = None,
          progress: bool = False) -> tuple[list[str], Report]:
  """Runs the enabled cleaning steps in STEPS order; returns (documents, report).

  `config` maps a step name to True (defaults), False/None (skip) or a mapping of that step's
  options, e.g. `{'language': {'keep': ('en', 'fr')}, 'near_dedup': {'threshold': 0.7},
  'decontaminate': {'eval_sets': {'lambada': texts}}}`. Steps not named run if enabled by
  default (all but `decontaminate` and `perplexity`, which need data from the caller). Empty
  documents are removed first and counted. The report has `in`, `out` and `steps`: one entry
  per step run with its name and its own report. `progress` shows a bar over the steps.
  """
  docs = _check_docs(docs)
  config = _as_dict(config or {})
  _check_options('clean', config, STEPS)
  plan = [(name, _step_options(name, config.get(name, default)))
          for name, (_, default) in STEPS.items()]
  n_in = len(docs)
  kept = [d for d in docs if not _is_empty(d)]
  steps = [{'step': 'empty', **_report(n_in, kept, {'empty': n_in - len(kept)})}]
  plan = [(name, options) for name, options in plan if options is not None]
  bar = tqdm(plan, desc='clean', unit='step', disable=not progress)
  for name, options in bar:
    bar.set_postfix_str(f'{name}: {len(kept):,} documents')
    kept, report = STEPS[name][0](kept, **options)
    steps.append({'step': name, **report})
  return kept, {'in': n_in, 'out': len(kept), 'steps': steps}
