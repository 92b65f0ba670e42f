"""An online-RL iteration's generation: the static batch (lm.decode.generate_padded) or the
continuous-batching engine (lm/engine.Engine, rollout.engine=True), both returned as host rows
in the layout the scoring jit reads: prompt left-padded to the run's prompt width W, response
right-padded with 0 to rollout.max_new_tokens N, mask 1 on real tokens (an ending eos included).

The engine prefills each distinct prompt once and copies its KV into the slots of its k
samples (GRPO's group), and decodes in a window that follows the live rows. Its sampled rows
draw token i with fold_in(key(seed), i), so each row gets a seed drawn from the iteration's
key (`request_seeds`): a pure function of the checkpointed RNG, hence exact resume. Greedy
rows equal the static path's; sampled rows are a different (equally distributed) draw.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import numpy as np

from lm import decode, engine


@dataclasses.dataclass
class Rollout:
  tokens: np.ndarray             # [B, W+N] int32
  mask: np.ndarray               # [B, W+N] int32
  lengths: np.ndarray            # [B] int32 response tokens (an ending eos included)

  def take(self, rows) -> 'Rollout':
    rows = np.asarray(rows, np.int64)
    return Rollout(self.tokens[rows], self.mask[rows], self.lengths[rows])

  @staticmethod
  def concat(parts: Sequence['Rollout']) -> 'Rollout':
    return Rollout(*(np.concatenate([getattr(p, f) for p in parts]) for f in ('tokens', 'mask', 'lengths')))


def texts(pol, ro: Rollout, width: int) -> list[str]:
  """Each response's text, without its eos (as policy.texts_of)."""
  return [pol.tok.decode([int(t) for t in row[width:width + n] if int(t) != pol.eos])
          for row, n in zip(ro.tokens, ro.lengths)]


def through_stop(text: str, stop: Sequence[str]) -> str:
  """The text up to and including its first stop string (what an engine row with `stop`
  keeps); the whole text when none occurs."""
  ends = [text.find(s) + len(s) for s in stop if s and s in text]
  return text[:min(ends)] if ends else text


def has_eos(ro: Rollout, width: int, eos: int) -> np.ndarray:
  """[B] whether each response ended with eos (rl.rollout.has_eos on the host)."""
  n = ro.lengths
  last = ro.tokens[np.arange(len(n)), width + np.maximum(n, 1) - 1]
  return (last == eos) & (n > 0)


def request_seeds(key, n: int) -> np.ndarray:
  """[n] engine seeds (uint32) drawn from a jax key on the host."""
  return np.random.default_rng(np.asarray(jax.random.key_data(key))).integers(0, 2**32, n, dtype=np.uint64)


def generate(params, prompts: Sequence[np.ndarray], key, *, cfg, width: int, max_new_tokens: int,
             temperature: float, eos: int | None, use_engine: bool = False, mesh=None,
             sync_every: int = 8, slots: int = 0, stop: Sequence[str] = (),
             detokenize=None) -> Rollout:
  """Rows for `prompts` (each at most `width` tokens); temperature 0 is greedy; eos None: none.
  stop (engine only; needs detokenize): a row ends with the token that completes the first
  stop string in its text, that token kept."""
  eos_ids = () if eos is None else (eos,)
  if use_engine:
    return _engine_rows(params, prompts, key, cfg=cfg, width=width, n_new=max_new_tokens,
                        temperature=temperature, eos_ids=eos_ids, sync_every=sync_every,
                        slots=slots, stop=tuple(stop), detokenize=detokenize)
  if stop:
    raise ValueError('stop strings need use_engine=True')
  toks, pmask = decode.left_pad(prompts, width)
  s = decode.SamplingConfig(temperature=temperature, max_new_tokens=max_new_tokens, eos_ids=eos_ids, pad_id=0)
  gen = decode.generate_padded(params, toks, pmask, key, cfg, s, mesh=mesh)
  tokens, mask = jax.device_get(gen.sequences())
  return Rollout(np.asarray(tokens, np.int32), np.asarray(mask, np.int32),
                 np.asarray(jax.device_get(gen.lengths), np.int32))


def _engine_rows(params, prompts, key, *, cfg, width, n_new, temperature, eos_ids, sync_every, slots,
                 stop=(), detokenize=None):
  """One engine of `slots` rows (0: one per row, the static batch's cache memory; fewer: rows
  join as others end, each slot W+N columns); a fresh engine per iteration: its prefix LRU
  holds KV of the params it was built with."""
  b = len(prompts)
  # The k samples of a prompt are adjacent: an LRU of 2 prompts serves them from one prefill.
  eng = engine.Engine(params, cfg, slots=min(slots or b, b), max_len=width + n_new,
                      sync_every=sync_every, prefix_cache=2, detokenize=detokenize)
  seeds = request_seeds(key, b)
  reqs = [engine.Request(prompt=[int(t) for t in np.asarray(p).reshape(-1)], max_tokens=n_new,
                         eos_ids=eos_ids, temperature=temperature, seed=int(s), stop=stop)
          for p, s in zip(prompts, seeds)]
  out = eng.generate(reqs)
  tokens = np.zeros((b, width + n_new), np.int32)
  mask = np.zeros_like(tokens)
  lengths = np.zeros(b, np.int32)
  for i, (p, res) in enumerate(zip(reqs, out)):
    n_p, n = len(p.prompt), len(res.tokens)
    tokens[i, width - n_p:width], mask[i, width - n_p:width] = p.prompt, 1
    tokens[i, width:width + n], mask[i, width:width + n] = res.tokens, 1
    lengths[i] = n
  return Rollout(tokens, mask, lengths)
