"""A question-answering testbed over the shipped works, where tools matter (ReAct, RAG).

  collection()   the documents: every speech of every play, titled "Play | Speaker"
  questions()    questions about single lines of those speeches:
                   play     Which play is the line "..." from?   -> the play's title
                   speaker  Who speaks the line "..."?            -> the speaker
                   next     What line follows "..."?              -> the next line of the speech
                 split into train / eval by a hash of the speech, so a held-out question's
                 line (and its answer) is never in a training question. A closed-book model
                 sees only training questions; the collection is there at test time, as in
                 open-domain QA, for a retriever or a search tool to find.
  gold_plan()    the (thought, tool, argument) steps an expert would take; an experiment runs
                 them through the real tools to make ReAct trajectories for fine-tuning (as
                 the ReAct paper does for small models). Thoughts that depend on the answer
                 are format strings over it.

Quoted lines are unique in the collection (a line said twice has no single answer) and
have at least `min_words` words. data/ knows text only: retrieval and tools live in
experiments/evaluation.
"""
from __future__ import annotations

import dataclasses
import hashlib
import zlib
from typing import Sequence

import numpy as np

from data import tasks

FAMILIES = ('play', 'speaker', 'next')
QUESTIONS = {
    'play': 'Which play is the line "{quote}" from?',
    'speaker': 'Who speaks the line "{quote}"?',
    'next': 'What line follows "{quote}"?',
}


@dataclasses.dataclass(frozen=True)
class Doc:
  id: int
  play: str
  speaker: str
  lines: tuple[str, ...]

  @property
  def title(self) -> str:
    return f'{self.play} | {self.speaker}'

  @property
  def text(self) -> str:
    return '\n'.join(self.lines)


def collection(path: str = 'shakespeare_works', plays: Sequence[str] | None = None) -> list[Doc]:
  """The speeches of the plays under `path` (all, or the titles in `plays`) as documents."""
  works = tasks.load_plays(path)
  titles = list(works) if plays is None else [t for t in works if t in set(plays)]
  docs = []
  for t in titles:
    for s in works[t]:
      if s.lines:
        docs.append(Doc(len(docs), s.play, s.speaker, tuple(s.lines)))
  return docs


def split_of(doc: Doc, eval_fraction: float, split_seed: int = 0) -> str:
  """'eval' for a fixed share of speeches (by a hash of play, speaker and first line)."""
  key = f'{split_seed}:{doc.play}:{doc.speaker}:{doc.lines[0]}'.encode()
  u = int(hashlib.sha256(key).hexdigest()[:8], 16) / 0x1_0000_0000
  return 'eval' if u < eval_fraction else 'train'


def _line_counts(docs: Sequence[Doc]) -> dict[str, int]:
  counts: dict[str, int] = {}
  for d in docs:
    for l in d.lines:
      k = ' '.join(l.lower().split())
      counts[k] = counts.get(k, 0) + 1
  return counts


def questions(docs: Sequence[Doc], split: str = 'train', families: Sequence[str] = FAMILIES,
              n_per_family: int = 500, seed: int = 0, eval_fraction: float = 0.2,
              split_seed: int = 0, min_words: int = 6) -> list[dict]:
  """Up to n_per_family questions per family from the split's speeches:
  {id, family, question, answer, quote, doc_id, play, speaker}. The same arguments give the
  same questions; each family draws with its own (seed, family) key."""
  if split not in ('train', 'eval'):
    raise tasks.TaskError(f"split must be 'train' or 'eval', got {split!r}.")
  unknown = sorted(set(families) - set(FAMILIES))
  if unknown:
    raise tasks.TaskError(f'Unknown works_qa families {unknown}; choose from {list(FAMILIES)}.')
  pool = [d for d in docs if split_of(d, eval_fraction, split_seed) == split]
  if not pool:
    raise tasks.TaskError(f'No speeches in the {split} split of a {len(docs)}-document collection.')
  unique = _line_counts(docs)
  out = []
  for family in families:
    rng = np.random.default_rng([seed, zlib.crc32(family.encode()), split == 'eval'])
    seen = set()
    for _ in range(30 * n_per_family):
      if len(seen) == n_per_family:
        break
      d = pool[rng.integers(len(pool))]
      last = len(d.lines) - (1 if family == 'next' else 0)
      ok = [i for i in range(last) if len(d.lines[i].split()) >= min_words
            and unique[' '.join(d.lines[i].lower().split())] == 1
            and (family != 'next' or len(d.lines[i + 1].split()) >= 3)]
      if not ok or (family == 'speaker' and d.speaker in tasks.CROWDS):
        continue
      i = ok[rng.integers(len(ok))]
      if (d.id, i) in seen:
        continue
      seen.add((d.id, i))
      quote = d.lines[i]
      answer = {'play': d.play, 'speaker': d.speaker}.get(family) or d.lines[i + 1]
      out.append({'id': f'{split}-{family}-{len(seen) - 1}', 'family': family,
                  'question': QUESTIONS[family].format(quote=quote), 'answer': answer,
                  'quote': quote, 'doc_id': d.id, 'play': d.play, 'speaker': d.speaker})
  return out


def gold_plan(q: dict) -> list[tuple[str, str, str]]:
  """An expert's ReAct steps for question q: search the quoted line, read the answer off
  the document's title (play, speaker) or look the line up for the one after it."""
  search = ('I need to search for the line.', 'search', q['quote'])
  if q['family'] == 'play':
    return [search, ('The line is from {answer}.', 'finish', q['answer'])]
  if q['family'] == 'speaker':
    return [search, ('The line is spoken by {answer}.', 'finish', q['answer'])]
  return [search, ('I need to look up the line in this speech.', 'lookup', q['quote']),
          ('I found the next line.', 'finish', q['answer'])]
