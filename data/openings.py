"""Line openings from the shipped works: the prompts of the RLHF sentiment testbed.

A prompt is the first few words of a verse line; its continuation is the rest of that line.
Plays are split with data/tasks.split_plays (the same held-out plays as the SFT tasks), so
policies are scored on openings from plays they never saw during SFT, reward modelling or RL.

  openings('train', n=2000)  -> [{'prompt', 'continuation', 'play'}, ...]
  sft_examples(...)          -> the same as {'instruction', 'input', 'output'} for the `sft`
                                stage with template 'none' (prompt, then the rest of the line,
                                then eos: the SFT policy learns to end a line)
"""
from __future__ import annotations

import random
from typing import Sequence

from data import tasks

MIN_WORDS = 6


def _lines(plays: dict, titles: Sequence[str]) -> list[tuple[str, str]]:
  out = []
  for t in titles:
    for speech in plays[t]:
      out.extend((t, line.strip()) for line in speech.lines if len(line.split()) >= MIN_WORDS)
  return out


def openings(split: str = 'train', n: int = 0, prompt_words: tuple[int, int] = (2, 4),
             seed: int = 0, path: str = 'shakespeare_works', eval_fraction: float = 0.2) -> list[dict]:
  """`n` openings (0: all lines) of lines from the `split` plays ('train' or 'eval'), each cut
  after a seeded number of words in [prompt_words[0], prompt_words[1]]."""
  if split not in ('train', 'eval'):
    raise tasks.TaskError(f"split must be 'train' or 'eval', got {split!r}.")
  lo, hi = prompt_words
  if not 1 <= lo <= hi < MIN_WORDS:
    raise tasks.TaskError(f'prompt_words={prompt_words} must satisfy 1 <= lo <= hi < {MIN_WORDS}.')
  plays = tasks.load_plays(path)
  titles = tasks.split_plays(sorted(plays), eval_fraction)[split]
  lines = _lines(plays, titles)
  rng = random.Random(f'{seed}:{split}')
  rng.shuffle(lines)
  out = []
  for play, line in lines[:n or None]:
    words = line.split(' ')
    k = rng.randint(lo, hi)
    out.append({'prompt': ' '.join(words[:k]), 'continuation': ' ' + ' '.join(words[k:]),
                'play': play})
  return out


def sft_examples(split: str = 'train', n: int = 0, seed: int = 0, **kw) -> list[dict]:
  return [{'instruction': '', 'input': o['prompt'], 'output': o['continuation']}
          for o in openings(split, n, seed=seed, **kw)]
