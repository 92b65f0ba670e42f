"""Answer extraction from generated text (lm-evaluation-harness's filters, as functions).

  none       the output, stripped
  first_line the first non-empty line
  strict     GSM8K's convention: the number after '#### ' (None when absent)
  flexible   the last number anywhere in the output
  regex:P    the first group of the first match of P (the whole match without groups)

None means "no answer found": it never matches a reference.
"""
from __future__ import annotations

import re

_STRICT = re.compile(r'#### (-?[0-9.,]+)')
_NUMBER = re.compile(r'-?[$0-9.,]*[0-9]')
EXTRACTORS = ('none', 'first_line', 'strict', 'flexible')


def _number(text: str) -> str:
  return text.replace('$', '').rstrip('.').strip()


def extract(text: str, how: str = 'none') -> str | None:
  if how == 'none':
    return text.strip()
  if how == 'first_line':
    return next((l.strip() for l in text.split('\n') if l.strip()), '')
  if how == 'strict':
    m = _STRICT.search(text)
    return _number(m.group(1)) if m else None
  if how == 'flexible':
    found = _NUMBER.findall(text)
    return _number(found[-1]) if found else None
  if how.startswith('regex:'):
    m = re.search(how[len('regex:'):], text)
    return None if m is None else (m.group(1) if m.groups() else m.group(0)).strip()
  raise ValueError(how)


def check(how: str) -> bool:
  """Whether `how` names an extractor (a regex must compile)."""
  if how in EXTRACTORS:
    return True
  if how.startswith('regex:'):
    try:
      re.compile(how[len('regex:'):])
      return True
    except re.error:
      return False
  return False


_GOLD = re.compile(r'-?[0-9]+(\.[0-9]+)?')


def gsm8k_gold(answer: str) -> str | None:
  """The number after a GSM8K solution's last '####' ('...\n#### -1,234' -> '-1234'), or None.

  Parsed by splitting, apart from the extractors above: an extraction bug (say, a lost minus
  sign) must not be repeated in the gold answer it is compared with.
  """
  if '####' not in answer:
    return None
  number = answer.rsplit('####', 1)[1].split('\n')[0].strip()
  number = number.replace(',', '').replace('$', '').rstrip('.')
  return number if _GOLD.fullmatch(number) else None
