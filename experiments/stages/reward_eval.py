"""Held-out evaluation of a reward model beside two trivial baselines, and its normaliser.

  reward model      accuracy, loss, mean margin and calibration on held-out pairs: accuracy
                    by fixed |margin| bucket, and by |margin| quantile beside the accuracy
                    the Bradley-Terry model predicts there (mean sigmoid|margin|) and their
                    gap (expected calibration error); for an ensemble per member and combined
  longer wins       the longer response (in characters) is preferred; equal lengths score 1/2
  bag of words      L2-regularised logistic regression on word counts of (winner - loser),
                    fitted on the training pairs (no bias: swapping a pair flips the sign)

Every pair (w, l) of a group with rank_w < rank_l is one comparison (K = 2: chosen, rejected).
"""
from __future__ import annotations

import collections
import json
import re

import jax
import numpy as np
import scipy.optimize
import scipy.sparse

from data import pipeline
from lm import paths

BUCKETS = (0.0, 0.25, 0.5, 1.0, 2.0, float('inf'))   # |margin| edges for the calibration table
QUANTILES = 5                                         # equal-count |margin| buckets (scale-free)
WORD = re.compile(r"[a-z0-9']+")


def pair_index(ranks: np.ndarray, valid: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(group, winner slot, loser slot) of every ordered pair; ties form none."""
  better = (ranks[:, :, None] < ranks[:, None, :]) & (valid[:, :, None] > 0) & (valid[:, None, :] > 0)
  return np.nonzero(better)


def record_pairs(records: list[dict]) -> list[tuple[str, str]]:
  """(winner text, loser text) of every pair of raw records, in pair_index's order."""
  out = []
  for r in records:
    for i, ri in enumerate(r['ranks']):
      for j, rj in enumerate(r['ranks']):
        if ri < rj:
          out.append((r['responses'][i], r['responses'][j]))
  return out


def pair_metrics(diff: np.ndarray, margin: float = 0.0) -> dict:
  """Accuracy (ties 1/2), loss, mean margin and calibration of score differences r_w - r_l."""
  diff = np.asarray(diff, np.float64)
  acc = (diff > 0) + 0.5 * (diff == 0)
  out = {'pairs': int(diff.size), 'accuracy': float(acc.mean()),
         'loss': float(np.mean(np.logaddexp(0.0, -(diff - margin)))),
         'mean_margin': float(diff.mean()), 'calibration': []}
  for lo, hi in zip(BUCKETS[:-1], BUCKETS[1:]):
    sel = (np.abs(diff) >= lo) & (np.abs(diff) < hi)
    out['calibration'].append({'abs_margin': [lo, hi], 'pairs': int(sel.sum()),
                               'accuracy': float(acc[sel].mean()) if sel.any() else None})
  out['calibration_quantiles'], out['ece'] = quantile_calibration(diff, acc)
  return out


def quantile_calibration(diff: np.ndarray, acc: np.ndarray, q: int = QUANTILES):
  """Pairs sorted by |margin| in q equal-count buckets: each one's |margin| range, accuracy,
  and predicted accuracy mean(sigmoid(|margin|)) (a calibrated Bradley-Terry model's); and
  the expected calibration error sum_b n_b / n * |accuracy_b - predicted_b|."""
  if not diff.size:
    return [], None
  a = np.abs(diff)
  order = np.argsort(a, kind='stable')
  rows, ece = [], 0.0
  for idx in np.array_split(order, min(q, diff.size)):
    pred = float(np.mean(1.0 / (1.0 + np.exp(-a[idx]))))
    hit = float(acc[idx].mean())
    ece += idx.size / diff.size * abs(hit - pred)
    rows.append({'abs_margin': [float(a[idx].min()), float(a[idx].max())], 'pairs': int(idx.size),
                 'accuracy': hit, 'predicted': pred})
  return rows, float(ece)


def longer_wins(pairs: list[tuple[str, str]]) -> dict:
  """Accuracy of 'the longer response is better' (equal lengths: a coin flip, 1/2)."""
  acc = [1.0 if len(w) > len(l) else 0.5 if len(w) == len(l) else 0.0 for w, l in pairs]
  return {'pairs': len(acc), 'accuracy': float(np.mean(acc)) if acc else None}


def words(text: str) -> list[str]:
  return WORD.findall(text.lower())


class BagOfWords:
  """Logistic regression p(w beats l) = sigmoid(theta . (bow(w) - bow(l))), L2 penalty l2/2."""

  def __init__(self, max_words: int = 5000, l2: float = 1.0):
    self.max_words, self.l2 = max_words, l2

  def features(self, pairs):
    rows, cols, vals = [], [], []
    for i, (w, l) in enumerate(pairs):
      c = collections.Counter(x for x in words(w) if x in self.vocab)
      c.subtract(x for x in words(l) if x in self.vocab)
      for word, n in c.items():
        if n:
          rows.append(i), cols.append(self.vocab[word]), vals.append(n)
    return scipy.sparse.csr_matrix((vals, (rows, cols)), shape=(len(pairs), len(self.vocab)))

  def fit(self, pairs) -> 'BagOfWords':
    counts = collections.Counter(x for p in pairs for t in p for x in words(t))
    self.vocab = {w: i for i, (w, _) in enumerate(counts.most_common(self.max_words))}
    x = self.features(pairs)

    def f(theta):
      z = x @ theta
      loss = np.logaddexp(0.0, -z).sum() + 0.5 * self.l2 * theta @ theta
      grad = -(x.T @ (1.0 / (1.0 + np.exp(z)))) + self.l2 * theta   # d/dz log(1+e^-z) = -sigmoid(-z)
      return loss, grad
    res = scipy.optimize.minimize(f, np.zeros(len(self.vocab)), jac=True, method='L-BFGS-B')
    self.theta = res.x
    return self

  def evaluate(self, pairs) -> dict:
    if not pairs:
      return {'pairs': 0, 'accuracy': None}
    z = self.features(pairs) @ self.theta
    return {'pairs': len(pairs), 'accuracy': float(np.mean((z > 0) + 0.5 * (z == 0))),
            'loss': float(np.mean(np.logaddexp(0.0, -z)))}


chunks = pipeline.padded_batches   # (batch, real groups), the last one padded


def scores(score_fn, arrays: dict, b: int) -> np.ndarray:
  """[N, K] scores of every group (score_fn: local batch -> [b, K] host array)."""
  if not len(arrays['ranks']):
    return np.zeros((0, arrays['ranks'].shape[1]), np.float32)
  return np.concatenate([np.asarray(score_fn(c))[:n] for c, n in chunks(arrays, b)])


def table(results: dict) -> str:
  rm, lw, bow = results['reward_model'], results['longer_wins'], results['bag_of_words']
  f = lambda v: '' if v is None else f'{v:.3f}'
  row = lambda name, r: (f"{name:<36}{f(r['accuracy']):>10}{f(r.get('loss')):>10}"
                         f"{f(r.get('mean_margin')):>10}{f(r.get('ece')):>10}").rstrip()
  norm = results.get('norm', {})
  name = 'reward model' if 'members' not in results else f"ensemble ({norm.get('combine', '')})"
  lines = [f"held-out pairs: {rm['pairs']}",
           f"{'':<36}{'accuracy':>10}{'loss':>10}{'margin':>10}{'ECE':>10}",
           row(name, rm)]
  for i, r in enumerate(results.get('members', [])):
    lines.append(row(f'  member {i}', r))
  for how, r in results.get('combined', {}).items():
    lam = f" (lam {norm['lam']:g})" if how in ('mean_minus_std', 'uwo') else ''
    lines.append(row(f'  combined {how}{lam}', r))
  lines += [row('longer response wins', lw), row('bag-of-words logreg', bow),
            f'{name} accuracy by |margin|:']
  for c in rm['calibration']:
    lo, hi = c['abs_margin']
    lines.append(f"{f'  [{lo:g}, {hi:g})':<36}{f(c['accuracy']):>10}{c['pairs']:>10} pairs")
  lines.append(f"{name + ' by |margin| quantile:':<36}{'accuracy':>10}{'predicted':>10}{'pairs':>8}")
  for c in rm.get('calibration_quantiles', []):
    lo, hi = c['abs_margin']
    lines.append(f"{f'  [{lo:.3g}, {hi:.3g}]':<36}{f(c['accuracy']):>10}{f(c['predicted']):>10}"
                 f"{c['pairs']:>8}")
  return '\n'.join(lines)


def write(workdir: str, results: dict) -> None:
  text = table(results)
  print(text)
  if jax.process_index() == 0:
    out = paths.path(workdir)   # epath: the workdir may be a bucket (gs://)
    paths.write_text(out / 'eval.json', json.dumps(results, indent=2))
    paths.write_text(out / 'eval.txt', text + '\n')
