"""Evaluation metrics against the libraries' documented examples and pass@k by hand (the
code sandbox: tests/test_sandbox.py)."""
import itertools
import math

import numpy as np
import pytest

from experiments.evaluation import metrics

# sacrebleu's README example: three hypotheses, two reference streams.
SYS = ['The dog bit the man.', "It wasn't surprising.", 'The man had just bitten him.']
REFS = [['The dog bit the man.', 'It was not unexpected.', 'The man bit him first.'],
        ['The dog had bit the man.', 'No one was surprised.', 'The man had bitten the dog.']]


def test_bleu_and_chrf_match_sacrebleu_readme():
  items = [(h, [REFS[0][i], REFS[1][i]]) for i, h in enumerate(SYS)]
  assert metrics.summarize('bleu', items, iters=0)['value'] == pytest.approx(48.53, abs=0.005)
  assert metrics.summarize('chrf', items, iters=0)['value'] == pytest.approx(59.73, abs=0.005)


def test_rouge_by_hand():
  # rouge-score README's pair; stemmed tokens: target 'the quick brown fox jump over the lazi dog'
  # (9), prediction 'the quick brown dog jump on the log' (8): 6 shared unigrams, LCS of 5.
  s = metrics.rouge('The quick brown dog jumps on the log.', ['The quick brown fox jumps over the lazy dog'])
  f = lambda m, n1, n2: 2 * (m / n1) * (m / n2) / (m / n1 + m / n2)
  assert s['rouge1'] == pytest.approx(f(6, 8, 9))
  assert s['rougeL'] == pytest.approx(f(5, 8, 9))
  # bigrams: 7 predicted, 8 in the target, 2 shared ('the quick', 'quick brown')
  assert s['rouge2'] == pytest.approx(f(2, 7, 8))


CASED = ['THE dog bit the man!', 'It was not surprising at all.', 'The man bit him.']
NO_4GRAM = ['A dog bit a man.', 'It was a surprise.', 'A man bit him.']   # smoothing matters
BLEU_CASES = [(dict(tokenize='char'), CASED), (dict(lowercase=True), CASED),
              (dict(tokenize='none'), CASED), (dict(smooth_method='floor', smooth_value=0.2), NO_4GRAM),
              (dict(smooth_method='add-k'), NO_4GRAM), (dict(smooth_method='none', tokenize='intl'), NO_4GRAM)]


@pytest.mark.parametrize('options,hyps', BLEU_CASES)
def test_bleu_options_match_sacrebleu_called_directly(options, hyps):
  import sacrebleu
  items = [(h, [REFS[0][i], REFS[1][i]]) for i, h in enumerate(hyps)]
  want = sacrebleu.corpus_bleu(hyps, REFS, **options).score
  got = metrics.summarize('bleu', items, iters=0, options=options)['value']
  assert got == pytest.approx(want, abs=1e-9)
  # the option matters on this input (else the test could not see it being dropped)
  assert want != pytest.approx(sacrebleu.corpus_bleu(hyps, REFS).score, abs=1e-6)


def test_bleu_defaults_are_sacrebleus():
  import sacrebleu
  items = [(h, [REFS[0][i], REFS[1][i]]) for i, h in enumerate(SYS)]
  assert (metrics.summarize('bleu', items, iters=0)['value']
          == metrics.summarize('bleu', items, iters=0, options=metrics.BLEU_DEFAULTS)['value']
          == pytest.approx(sacrebleu.corpus_bleu(SYS, REFS).score, abs=1e-9))
  assert 'tokenize' in metrics.check_bleu_options({'tokenize': 'spm'})
  assert 'unknown BLEU option' in metrics.check_bleu_options({'smoothing': 'exp'})


@pytest.mark.parametrize('stem', [True, False])
def test_rouge_stemming_option_matches_rouge_score(stem):
  from rouge_score import rouge_scorer
  pred, ref = 'The quick brown dogs jumped on the logs.', 'The quick brown fox jumps over the lazy dog'
  want = rouge_scorer.RougeScorer(['rouge1', 'rougeL'], use_stemmer=stem).score(ref, pred)
  got = metrics.rouge(pred, [ref], use_stemmer=stem)
  assert got['rouge1'] == pytest.approx(want['rouge1'].fmeasure)
  assert got['rougeL'] == pytest.approx(want['rougeL'].fmeasure)
  assert metrics.rouge(pred, [ref], use_stemmer=True)['rouge1'] > metrics.rouge(
      pred, [ref], use_stemmer=False)['rouge1']   # 'dogs'/'dog', 'jumped'/'jumps' match only stemmed


def test_pass_at_k_matches_brute_force():
  n, c = 5, 2
  outcomes = [1] * c + [0] * (n - c)
  for k in range(1, n + 1):
    subsets = list(itertools.combinations(outcomes, k))
    brute = sum(any(s) for s in subsets) / len(subsets)
    assert metrics.pass_at_k(n, c, k) == pytest.approx(brute, abs=1e-12), k
    assert metrics.pass_at_k(n, c, k) == pytest.approx(1 - math.comb(n - c, k) / math.comb(n, k))
  assert metrics.pass_at_k(10, 0, 3) == 0.0 and metrics.pass_at_k(10, 10, 1) == 1.0
  with pytest.raises(ValueError):
    metrics.pass_at_k(3, 1, 5)


def test_exact_match_normalisation():
  assert metrics.exact_match('The  Answer!', 'answer') == 1.0
  assert metrics.exact_match('an apple', 'pear') == 0.0
  assert metrics.exact_match('$1,234.00', '1234', numeric=True) == 1.0
  assert metrics.exact_match('-7.', '-7', numeric=True) == 1.0
  assert metrics.exact_match('17', '18', numeric=True) == 0.0
  assert metrics.exact_match(None, '18') == 0.0


def test_perplexity_and_bits_per_byte():
  items = [(-10.0, 5), (-6.0, 3)]     # (logprob, count) per document
  assert metrics.get('perplexity').aggregate(items) == pytest.approx(math.exp(2.0))
  assert metrics.get('bits_per_byte').aggregate(items) == pytest.approx(2.0 / math.log(2))


def test_bootstrap_stderr_is_seeded_and_near_the_binomial_formula():
  rng = np.random.default_rng(0)
  items = list((rng.random(400) < 0.3).astype(float))
  a = metrics.summarize('acc', items, iters=2000, seed=1)
  b = metrics.summarize('acc', items, iters=2000, seed=1)
  assert a == b and a['n'] == 400
  p = np.mean(items)
  assert a['stderr'] == pytest.approx(math.sqrt(p * (1 - p) / 400), rel=0.1)
  # the loop path (corpus metrics) agrees with the vectorised mean path on the same draws
  loop = metrics.bootstrap_stderr(items, lambda xs: float(np.mean(xs)), iters=300, seed=3)
  assert loop == pytest.approx(metrics.bootstrap_stderr(items, metrics._mean, iters=300, seed=3))


def test_unknown_metric():
  with pytest.raises(KeyError):
    metrics.get('accuracy_at_5')
  assert metrics.get('pass@10').kinds == ('generate',)
