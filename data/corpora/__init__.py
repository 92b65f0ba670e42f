"""Small public corpora that ship with the package, so configs and tests never need a download
or a folder beside the checkout.

  tinyshakespeare             tinyshakespeare.txt (1.1 MB): the char-rnn benchmark text
                              (Karpathy 2015), a 40k-line selection of Shakespeare's plays;
                              the text is in the public domain.
  hh-rlhf-harmless-base       hh-rlhf-harmless-base-test.jsonl.gz (0.7 MB): the test split
                              of Anthropic's hh-rlhf harmless-base preference pairs (2,312
                              {chosen, rejected} dialogues), MIT licence,
                              github.com/anthropics/hh-rlhf.
"""
from __future__ import annotations

import os

_HERE = os.path.dirname(os.path.abspath(__file__))
FILES = {
    'tinyshakespeare': 'tinyshakespeare.txt',
    'hh-rlhf-harmless-base': 'hh-rlhf-harmless-base-test.jsonl.gz',
}


def path(name: str) -> str:
  """Absolute path of a shipped corpus file."""
  if name not in FILES:
    raise KeyError(f'No shipped corpus {name!r}; shipped: {sorted(FILES)}.')
  return os.path.join(_HERE, FILES[name])
