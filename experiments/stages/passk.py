"""pass@k curves from n samples per problem, overall and by a problem field (steps, digits).

Each problem contributes its count c of correct samples among n; pass@k is the mean over
problems of the unbiased estimator 1 - C(n-c, k) / C(n, k) (Chen et al. 2021; the harness's
experiments/evaluation/metrics.pass_at_k), for k = 1, 2, 4, ... up to n (and max_k).
"""
from __future__ import annotations

import collections
import math
from typing import Sequence

from experiments.evaluation import metrics


def powers_of_two(n: int, max_k: int = 0) -> list[int]:
  """[1, 2, 4, ...] up to n (and max_k when > 0): the ks that n samples can estimate."""
  top = min(n, max_k) if max_k > 0 else n
  return [1 << i for i in range(top.bit_length()) if (1 << i) <= top]


def curve(counts: Sequence[int], n: int, ks: Sequence[int]) -> dict[int, float]:
  """{k: mean over problems of pass@k}, counts[i] the correct samples of problem i among n."""
  if not counts:
    return {k: float('nan') for k in ks}
  return {k: sum(metrics.pass_at_k(n, int(c), k) for c in counts) / len(counts) for k in ks}


def curve_by(records: Sequence[dict], key: str, n: int, ks: Sequence[int]) -> dict:
  """{value of key: pass@k curve of the records with it}, values sorted; records carry
  'n_correct' and key."""
  groups: dict = collections.defaultdict(list)
  for r in records:
    if key in r:
      groups[r[key]].append(r['n_correct'])
  return {g: curve(groups[g], n, ks) for g in sorted(groups)}


def mean_and_stderr(values: Sequence[float]) -> dict:
  """{'value', 'stderr', 'n'} of 0/1 (or real) per-problem values."""
  n = len(values)
  if not n:
    return {'value': float('nan'), 'stderr': float('nan'), 'n': 0}
  m = sum(values) / n
  var = sum((v - m) ** 2 for v in values) / n
  return {'value': m, 'stderr': math.sqrt(var / n), 'n': n}
