"""Programmatic gold rewards for testbeds where the true objective is known (Gao et al. 2022;
the DPO paper's sentiment task): a policy optimises a learned proxy, and the gold reward says
how much of that is real.

  gold.score(texts, 'vader')   -> [N] float64 in [-1, 1], VADER's compound sentiment (positive)
  gold.score(texts, 'vader_neg')  the same, negated (optimise for negative sentiment)

VADER (Hutto & Gilbert 2014, the `vaderSentiment` package) is a lexicon with rules for
negation, intensifiers and punctuation: deterministic, CPU-cheap, no weights to download.
"""
from __future__ import annotations

import functools
from typing import Sequence

import numpy as np

from lm.config import ConfigError

GOLDS = ('vader', 'vader_neg')


@functools.lru_cache(maxsize=1)
def _analyzer():
  from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer
  return SentimentIntensityAnalyzer()


def check(kind: str) -> None:
  if kind not in GOLDS:
    raise ConfigError(f'gold={kind!r} is not a gold reward; choose one of {GOLDS}.')


def score(texts: Sequence[str], kind: str = 'vader') -> np.ndarray:
  """Gold reward of each text (a continuation, without its prompt)."""
  check(kind)
  a = _analyzer()
  s = np.array([a.polarity_scores(t)['compound'] for t in texts], np.float64)
  return -s if kind == 'vader_neg' else s


def ranks(scores: Sequence[float]) -> list[int]:
  """0 = best; equal scores share a rank (a tie forms no pair in the K-wise loss)."""
  uniq = sorted(set(float(s) for s in scores), reverse=True)
  return [uniq.index(float(s)) for s in scores]
