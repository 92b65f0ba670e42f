"""Metrics: each is (per-sample items) -> one number, plus a seeded bootstrap standard error.

A metric's `aggregate(items)` turns the items of all samples into the task's figure; the
bootstrap resamples the samples (with replacement, `iters` times, a seeded generator) and
takes the standard deviation of the re-aggregated figure. Corpus metrics (BLEU, chrF,
perplexity) are re-aggregated over each resample, not averaged per sample.

  acc, acc_norm, exact_match   mean of 0/1 items
  bleu, chrf                   sacrebleu's corpus_bleu / corpus_chrf on (hypothesis, [refs]);
                               BLEU takes sacrebleu's tokenize, smooth_method, smooth_value
                               and lowercase (BLEU_DEFAULTS: sacrebleu's own defaults)
  rouge1/2/L/Lsum              rouge-score F-measure per sample, averaged (use_stemmer:
                               Porter stemming, on by default as in most papers' setups)
  pass@k                       mean over problems of the unbiased estimator (Chen et al. 2021)
  perplexity, word_perplexity, byte_perplexity, bits_per_byte   from (logprob, count) totals
"""
from __future__ import annotations

import dataclasses
import functools
import math
import re
import string
from typing import Callable, Sequence

import numpy as np

LN2 = math.log(2)


# Answer normalisation (exact match) -------------------------------------------------------------
_ARTICLES = re.compile(r'\b(a|an|the)\b')
_PUNCT = str.maketrans('', '', string.punctuation)


def normalize_answer(text: str, *, lower: bool = True, punctuation: bool = True,
                     articles: bool = True) -> str:
  """SQuAD-style: lower case, punctuation and articles removed, whitespace collapsed."""
  text = str(text)
  if lower:
    text = text.lower()
  if punctuation:
    text = text.translate(_PUNCT)
  if articles:
    text = _ARTICLES.sub(' ', text)
  return ' '.join(text.split())


def normalize_number(text: str) -> str:
  """'$1,234.50' -> '1234.5', '-7.' -> '-7': thousands separators, units and trailing zeros go."""
  t = str(text).strip().replace(',', '').replace('$', '').rstrip('.')
  try:
    v = float(t)
  except ValueError:
    return normalize_answer(text)
  return str(int(v)) if v == int(v) else repr(v)


def exact_match(prediction: str, reference: str, numeric: bool = False) -> float:
  norm = normalize_number if numeric else normalize_answer
  return float(prediction is not None and norm(prediction) == norm(reference))


# pass@k ------------------------------------------------------------------------------------------
def pass_at_k(n: int, c: int, k: int) -> float:
  """1 - C(n-c, k) / C(n, k), computed stably as 1 - prod_{i=n-c+1..n} (1 - k/i)."""
  if k > n:
    raise ValueError(f'pass@{k} needs at least {k} samples per problem, got n={n}.')
  if n - c < k:
    return 1.0
  return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


# Aggregations over items -------------------------------------------------------------------------
def _mean(items):
  return float(np.mean(items)) if len(items) else float('nan')


# sacrebleu's corpus_bleu defaults; smooth_value 0 means the method's own default
# (floor 0.1, add-k 1). Tokenizers that download models (spm, flores) are left out: no network.
BLEU_DEFAULTS = {'tokenize': '13a', 'smooth_method': 'exp', 'smooth_value': 0.0, 'lowercase': False}
BLEU_TOKENIZERS = ('13a', 'none', 'intl', 'char', 'zh', 'ja-mecab', 'ko-mecab')
BLEU_SMOOTHING = ('exp', 'floor', 'add-k', 'none')


def check_bleu_options(options: dict) -> str | None:
  """Why these BLEU options cannot work (one sentence), or None."""
  unknown = sorted(set(options) - set(BLEU_DEFAULTS))
  if unknown:
    return f'unknown BLEU option(s) {unknown}; known: {sorted(BLEU_DEFAULTS)}'
  o = {**BLEU_DEFAULTS, **options}
  if o['tokenize'] not in BLEU_TOKENIZERS:
    return f"bleu.tokenize={o['tokenize']!r}; choose from {BLEU_TOKENIZERS}"
  if o['smooth_method'] not in BLEU_SMOOTHING:
    return f"bleu.smooth_method={o['smooth_method']!r}; choose from {BLEU_SMOOTHING}"
  if not isinstance(o['lowercase'], bool) or o['smooth_value'] < 0:
    return 'bleu.lowercase must be true or false and bleu.smooth_value >= 0'
  return None


def _bleu(items, **options):
  import sacrebleu
  o = {**BLEU_DEFAULTS, **options}
  hyps, refs = _streams(items)
  return float(sacrebleu.corpus_bleu(hyps, refs, tokenize=o['tokenize'], lowercase=o['lowercase'],
                                     smooth_method=o['smooth_method'],
                                     smooth_value=o['smooth_value'] or None).score)


def _chrf(items):
  import sacrebleu
  hyps, refs = _streams(items)
  return float(sacrebleu.corpus_chrf(hyps, refs).score)


def _streams(items):
  """(hyp, [refs]) pairs -> sacrebleu's layout: hypotheses and one stream per reference slot."""
  hyps = [h for h, _ in items]
  n = max(len(r) for _, r in items)
  # a sample with fewer references repeats its last one (sacrebleu needs equal streams)
  refs = [[r[min(i, len(r) - 1)] for _, r in items] for i in range(n)]
  return hyps, refs


@functools.lru_cache(maxsize=2)
def _rouge_scorer(use_stemmer: bool = True):
  from rouge_score import rouge_scorer
  return rouge_scorer.RougeScorer(['rouge1', 'rouge2', 'rougeL', 'rougeLsum'], use_stemmer=use_stemmer)


def rouge(prediction: str, references: Sequence[str], use_stemmer: bool = True) -> dict[str, float]:
  """rouge-score F-measures against the best of several references (rougeLsum splits on newlines)."""
  scorer = _rouge_scorer(bool(use_stemmer))
  scores = [scorer.score(ref, prediction) for ref in references]
  return {k: max(s[k].fmeasure for s in scores) for k in ('rouge1', 'rouge2', 'rougeL', 'rougeLsum')}


def _ratio_exp(items):
  """exp(-sum logprob / sum count): (logprob, count) items -> perplexity per counted unit."""
  lp, n = np.sum(np.asarray(items, np.float64), axis=0)
  return float(math.exp(-lp / n))


def _bits_per_byte(items):
  lp, n = np.sum(np.asarray(items, np.float64), axis=0)
  return float(-lp / n / LN2) + 0.0   # (no -0.0)


@dataclasses.dataclass(frozen=True)
class Metric:
  name: str
  kinds: tuple[str, ...]                 # task kinds it fits
  aggregate: Callable[[list], float]
  higher_is_better: bool = True


ROUGE = ('rouge1', 'rouge2', 'rougeL', 'rougeLsum')
_GEN = ('generate',)
METRICS = {m.name: m for m in [
    Metric('acc', ('multiple_choice',), _mean),
    Metric('acc_norm', ('multiple_choice',), _mean),
    Metric('exact_match', _GEN, _mean),
    Metric('bleu', _GEN, _bleu),
    Metric('chrf', _GEN, _chrf),
    *[Metric(r, _GEN, _mean) for r in ROUGE],
    Metric('perplexity', ('rolling',), _ratio_exp, False),
    Metric('word_perplexity', ('rolling',), _ratio_exp, False),
    Metric('byte_perplexity', ('rolling',), _ratio_exp, False),
    Metric('bits_per_byte', ('rolling',), _bits_per_byte, False),
]}


def get(name: str) -> Metric:
  """A metric by name; 'pass@K' for any K."""
  if name in METRICS:
    return METRICS[name]
  m = re.fullmatch(r'pass@(\d+)', name)
  if m and int(m.group(1)) >= 1:
    return Metric(name, _GEN, _mean)
  raise KeyError(name)


def known() -> list[str]:
  return sorted(METRICS) + ['pass@K']


# Bootstrap -----------------------------------------------------------------------------------------
def bootstrap_stderr(items: Sequence, aggregate: Callable[[list], float], iters: int = 1000,
                     seed: int = 0) -> float:
  """Standard deviation of aggregate() over `iters` resamples of the items (seeded)."""
  n = len(items)
  if n < 2 or iters < 2:
    return float('nan')
  rng = np.random.default_rng(seed)
  if aggregate is _mean:   # vectorised: the same draws as the loop below would use
    idx = rng.integers(0, n, (iters, n))
    return float(np.std(np.asarray(items, np.float64)[idx].mean(1), ddof=1))
  items = list(items)
  vals = [aggregate([items[j] for j in rng.integers(0, n, n)]) for _ in range(iters)]
  return float(np.std(vals, ddof=1))


def summarize(name: str, items: Sequence, iters: int = 1000, seed: int = 0,
              options: dict | None = None) -> dict:
  """{'value', 'stderr', 'n'} for one metric over its per-sample items (options: e.g. BLEU's)."""
  metric = get(name)
  aggregate = functools.partial(metric.aggregate, **options) if options else metric.aggregate
  items = list(items)
  value = aggregate(items) if items else float('nan')
  return {'value': value, 'stderr': bootstrap_stderr(items, aggregate, iters, seed), 'n': len(items)}
