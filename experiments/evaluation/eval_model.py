"""The model contract of the harness: three calls, as in lm-evaluation-harness.

  lm = LanguageModel(params, cfg, tokenizer, mesh, batch_size=16)
  lm.loglikelihood([(context, continuation), ...])  -> [(logprob, is_greedy), ...]
  lm.loglikelihood_rolling([text, ...])             -> [total logprob, ...]
  lm.generate_until([(context, {'until': [...], 'max_new_tokens': 64}), ...]) -> [text, ...]

loglikelihood. Context and continuation are encoded together and split at the length of the
encoded context (trailing spaces of the context move into the continuation), so the split
matches how the model sees the whole string; BOS goes first when the tokenizer has one and
`add_bos`. Requests that share a context (multiple choice) are grouped: the context is
prefilled into a KV cache once, then every continuation is scored from that cache (the
cache rows are gathered per continuation inside the jitted scorer). Groups are processed
longest first, `batch_size` contexts per prefill and `batch_size` continuations per scoring
call; context lengths are bucketed to powers of two (at least MIN_CONTEXT_BUCKET), one
continuation length serves a whole call, and partial batches are padded: few programs compile. Results do not depend on the batch size: rows
never see each other (left-padded contexts with per-row positions and a slot mask).

loglikelihood_rolling. A document (after BOS, or from its second token when there is no
BOS) is scored token by token with sliding windows of at most `max_length` tokens: the
first window scores everything it covers, each next one advances `rolling_stride` tokens
(default: max_length, disjoint windows as lm-eval's) and scores only its new tokens, with
the rest of the window as their left context. So every token is scored exactly once, with
at least max_length - stride + 1 tokens of context once the document is long enough.

generate_until. The tokenizer's EOS and single-token stop strings end a row inside the loop;
stop strings are applied to the decoded text with lm.decode.truncate_at_stop. Two paths:
`engine=False`: lm.decode.generate in static left-padded batches of `batch_size` (every row
waits for the longest). `engine=True`: lm/engine.py's continuous batching over `batch_size`
slots (a finished row's slot takes the next request at once); each request's stop strings
also end its row early, a sampled request draws from its own seed (the harness seed, the call
and the request's index: the same whatever shares its batch), and a few-shot head (`shared_head`: the
token prefix of at least MIN_SHARED_PREFIX tokens whose one prefill saves the most) is
prefilled once, each prompt sharing it then prefilling only its own tail.
Greedy texts equal the static path's; one exception: two stop strings where one starts
earlier but ends later than the other (the engine stops at the first to end). Repetition
penalty is static-only: such requests take the static path.

Prompts longer than the context: `truncate='left'` drops their oldest tokens (counted in
`stats`), `truncate='error'` refuses them with a ConfigError.

`ReferenceModel` answers what each task says is right (gold choice, gold text, canonical
program, probability 1 for rolling text): a task's plumbing run with it reaches its ceiling.
"""
from __future__ import annotations

import functools
import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from data import tokenizers
from lm import compiled, decode, model, sharding
from lm import engine as engine_lib
from lm.config import ConfigError, ModelConfig

TRUNCATE = ('left', 'error')
GEN_KEYS = ('until', 'max_new_tokens', 'temperature', 'top_k', 'top_p', 'min_p',
            'repetition_penalty', 'stop_ids')
MIN_SHARED_PREFIX = 16   # a shorter common head is not worth its own prefill call


def _bucket(n: int, minimum: int = 1) -> int:
  return max(minimum, 1 << (max(n, 1) - 1).bit_length())


def _chunks(seq, n):
  for i in range(0, len(seq), n):
    yield seq[i:i + n]


# Jitted cores (one per static shape set; jit's cache handles the rest) ---------------------
def _prefill(params, tokens, mask, *, cfg, cache_len):
  """Left-padded contexts [G, P] -> (cache with cache_len slots, log-probs of the next token [G, V])."""
  g, p = tokens.shape
  positions = decode.positions_from_mask(mask)
  cache = decode.init_cache(cfg, g, cache_len)
  pad = jnp.zeros((g, cache_len - p), jnp.int32)
  kv_pos = jnp.concatenate([positions, pad], 1)
  kv_mask = jnp.concatenate([mask, pad.astype(bool)], 1)   # later slots are still empty
  h, cache = model.hidden_states(params, tokens, cfg, positions=positions, cache=cache,
                                 cache_index=0, kv_positions=kv_pos, kv_mask=kv_mask)
  logits = model.logits_from_hidden(params, h[:, -1:], cfg)[:, 0]
  return cache, jax.nn.log_softmax(logits, axis=-1)


def _score(params, cache, ctx_mask, first_logp, group, cont_in, in_mask, targets, target_mask,
           *, cfg):
  """Continuations [R, L] scored from their contexts' cache rows (`group` [R] picks them).

  targets[:, 0] is predicted by the context's last token (first_logp), targets[:, j] by
  cont_in[:, j - 1] = targets[:, j - 1]. Returns (log-prob per target [R, L], all greedy? [R])."""
  cache = jax.tree.map(lambda c: c[:, group], cache)
  ctx_mask, first = ctx_mask[group], first_logp[group]
  p = ctx_mask.shape[1]
  n = cont_in.shape[1]
  lengths = ctx_mask.sum(1).astype(jnp.int32)
  positions = lengths[:, None] + jnp.arange(n, dtype=jnp.int32)[None]
  kv_pos = jnp.concatenate([decode.positions_from_mask(ctx_mask), positions], 1)
  kv_mask = jnp.concatenate([ctx_mask, in_mask], 1)
  h, _ = model.hidden_states(params, cont_in, cfg, positions=positions, cache=cache,
                             cache_index=p, kv_positions=kv_pos, kv_mask=kv_mask)
  logp = jax.nn.log_softmax(model.logits_from_hidden(params, h, cfg), axis=-1)
  logp = jnp.concatenate([first[:, None], logp[:, :-1]], 1)
  tok = jnp.take_along_axis(logp, targets[..., None], -1)[..., 0]
  greedy = (jnp.argmax(logp, -1) == targets) | ~target_mask
  # per-token log-probs: summed on the host in float64, so padding never changes the sum
  return jnp.where(target_mask, tok, 0.0), jnp.all(greedy, 1)


def _window_logprob(params, tokens, targets, mask, *, cfg):
  """Plain forward over right-padded windows [R, W]: the masked targets' log-probs."""
  logits, _ = model.forward(params, tokens, cfg)
  lp = jnp.take_along_axis(jax.nn.log_softmax(logits, -1), targets[..., None], -1)[..., 0]
  return jnp.where(mask, lp, 0.0)   # summed on the host in float64


_PROGRAMS = compiled.Programs()
MIN_CONTEXT_BUCKET = 64   # contexts pad to >= 64 tokens (or the context): few programs


def rolling_windows(n: int, window: int, stride: int) -> list[tuple[int, int, int]]:
  """(start, first_scored, end) index triples over a sequence of n tokens: the window's
  inputs are tokens[start:end], and it scores the targets tokens[first_scored + 1 .. end]
  (target t predicted from tokens[start:t]). Targets 1..n-1 are each scored exactly once."""
  if window < 1 or not 1 <= stride <= window:
    raise ConfigError(f'rolling windows need 1 <= stride <= window, got stride={stride}, window={window}.')
  out, scored = [], 0
  while scored < n - 1:
    end = min(scored + (window if not out else stride), n - 1)
    start = max(0, end - window)
    out.append((start, scored, end))
    scored = end
  return out


class LanguageModel:
  """A model of this codebase (params, ModelConfig, tokenizer) behind the harness contract."""

  kind = 'model'

  def __init__(self, params, cfg: ModelConfig, tokenizer, mesh=None, *, batch_size: int = 16,
               add_bos: bool = True, truncate: str = 'left', max_length: int | None = None,
               rolling_stride: int | None = None, seed: int = 0, engine: bool = False):
    if truncate not in TRUNCATE:
      raise ConfigError(f"truncate={truncate!r} is not supported; choose 'left' (drop the oldest "
                        "tokens, counted) or 'error'.")
    if batch_size < 1:
      raise ConfigError(f'batch_size must be >= 1, got {batch_size}.')
    self.max_length = max_length or cfg.max_seq_len
    if self.max_length > cfg.max_seq_len:
      raise ConfigError(f'max_length={max_length} exceeds the model context {cfg.max_seq_len}.')
    self.rolling_stride = rolling_stride or self.max_length
    if not 1 <= self.rolling_stride <= self.max_length:
      raise ConfigError(f'rolling_stride must be in [1, {self.max_length}], got {rolling_stride}.')
    self.params, self.cfg, self.tokenizer, self.mesh = params, cfg, tokenizer, mesh
    self.batch_size, self.truncate, self.seed = batch_size, truncate, seed
    bos = tokenizer.special_ids.get('bos') if add_bos else None
    self.bos = bos if bos is not None and 0 <= bos < cfg.vocab_size else None
    self.eos = tokenizer.eos_id
    self.stats = {'truncated': 0, 'truncated_tokens': 0, 'prompts': 0}
    self.progress = 'eval'   # the progress bar's label (evaluate sets the task's name)
    self._unsampleable = ~tokenizers.sampling_mask(tokenizer, cfg.padded_vocab)
    self._batches = 0
    self.use_engine, self._engine, self._calls = engine, None, 0
    self.stats.update(generated_tokens=0, shared_prefix_tokens=0, shared_prefix_requests=0)

  # Plumbing -------------------------------------------------------------------------------
  def _jit(self, name, fn, **static):
    """One jax.jit per (core, cfg, mesh, static options), shared by every instance."""
    mesh = self.mesh

    def make():
      jitted = jax.jit(functools.partial(fn, cfg=self.cfg, **static))

      def call(*args):
        with sharding.activation_sharding(mesh):   # the layers' activation constraints see it
          return jitted(*args)
      return call
    return _PROGRAMS.get((name, self.cfg, mesh, tuple(sorted(static.items()))), make)

  def _rows(self) -> int:
    """Rows per call: batch_size rounded up to a power of two that the mesh's batch axes
    divide, always the same (a partial batch is padded) so few programs compile."""
    div = 1 if self.mesh is None else sharding.batch_size_divisor(self.mesh)
    return -(-_bucket(self.batch_size) // div) * div

  def _bar(self, total: int, unit: str):
    """A progress bar on a terminal (process 0 only); silent in logs and tests."""
    return tqdm(total=total, desc=self.progress, unit=unit, leave=False, dynamic_ncols=True,
                disable=None if jax.process_index() == 0 else True)

  def _put(self, x):
    x = np.asarray(x)
    if self.mesh is None:
      return x
    return jax.device_put(x, sharding.batch_sharding(self.mesh, x.ndim))

  def encode(self, text) -> np.ndarray:
    """A string through the tokenizer; token ids (e.g. a chat template's) pass unchanged."""
    if isinstance(text, str):
      return np.asarray(self.tokenizer.encode(text), np.int32)
    return np.asarray(text, np.int32).reshape(-1)

  def _with_bos(self, ids: np.ndarray) -> np.ndarray:
    if self.bos is None or (len(ids) and ids[0] == self.bos):
      return ids   # never a double BOS
    return np.concatenate([[self.bos], ids]).astype(np.int32)

  def _fit(self, ids: np.ndarray, room: int, what: str) -> np.ndarray:
    """Keep the last `room` tokens (truncate='left', counted) or refuse."""
    over = len(ids) - room
    self.stats['prompts'] += 1
    if over <= 0:
      return ids
    if self.truncate == 'error':
      raise ConfigError(f'A {what} of {len(ids)} tokens does not fit the {room} tokens available '
                        f'(max_length={self.max_length}); shorten it or set truncate=left.')
    self.stats['truncated'] += 1
    self.stats['truncated_tokens'] += over
    return ids[over:]

  def split(self, context, continuation: str) -> tuple[np.ndarray, np.ndarray]:
    """(context ids with BOS, continuation ids): encoded together, split at the context."""
    if isinstance(context, str):
      n = len(context) - len(context.rstrip())
      if n:   # trailing spaces belong to the continuation (' Paris', not ' ' + 'Paris')
        context, continuation = context[:-n], context[-n:] + continuation
      ctx = self.encode(context)
      whole = self.encode(context + continuation)
      if len(whole) > len(ctx):
        ctx, cont = whole[:len(ctx)], whole[len(ctx):]
      else:
        cont = self.encode(continuation)
    else:
      ctx, cont = self.encode(context), self.encode(continuation)
    ctx = self._with_bos(ctx)
    if not len(ctx) and len(cont):
      raise ConfigError('A loglikelihood request has an empty context and the tokenizer has no BOS '
                        'token to predict its first token from; give it a context.')
    if len(cont) > self.max_length:
      raise ConfigError(f'A continuation of {len(cont)} tokens is longer than max_length='
                        f'{self.max_length}; it cannot be scored.')
    # the last continuation token is never an input: ctx + cont[:-1] must fit
    return self._fit(ctx, self.max_length + 1 - len(cont), 'context'), cont

  # loglikelihood -------------------------------------------------------------------------------
  def loglikelihood(self, requests: Sequence[tuple[Any, str]], references=None) -> list[tuple[float, bool]]:
    out: list = [None] * len(requests)
    groups: dict[bytes, list] = {}
    for i, (context, continuation) in enumerate(requests):
      ctx, cont = self.split(context, continuation)
      if not len(cont):
        out[i] = (0.0, True)    # nothing to score
        continue
      groups.setdefault(ctx.tobytes(), [ctx, []])[1].append((i, cont))
    # longest first: the biggest shapes compile and run first (and fail early if too big)
    order = sorted(groups.values(), key=lambda g: -(len(g[0]) + max(len(c) for _, c in g[1])))
    # one continuation length per call (a task's continuations are alike): fewer programs
    n = _bucket(max((len(c) for g in order for _, c in g[1]), default=1), 8)
    with self._bar(sum(len(g[1]) for g in order), 'req') as bar:
      for chunk in _chunks(order, self.batch_size):
        self._score_groups(chunk, n, out)
        bar.update(sum(len(g[1]) for g in chunk))
    return out

  def _score_groups(self, groups, n, out):
    ctxs = [g[0] for g in groups]
    rows = [(gi, i, cont) for gi, g in enumerate(groups) for i, cont in g[1]]
    p = min(_bucket(max(len(c) for c in ctxs), MIN_CONTEXT_BUCKET), self.max_length)
    gb = self._rows()
    tokens, mask = decode.left_pad(ctxs, p, gb)
    prefill = self._jit('prefill', _prefill, cache_len=p + n)
    cache, first = prefill(self.params, self._put(tokens), self._put(mask))
    score = self._jit('score', _score)
    rows.sort(key=lambda r: -len(r[2]))
    for part in _chunks(rows, self.batch_size):
      rb = self._rows()
      group = np.zeros(rb, np.int32)
      cont_in = np.zeros((rb, n), np.int32)
      in_mask = np.zeros((rb, n), bool)
      targets = np.zeros((rb, n), np.int32)
      t_mask = np.zeros((rb, n), bool)
      for r, (gi, _, cont) in enumerate(part):
        group[r] = gi
        cont_in[r, :len(cont) - 1] = cont[:-1]
        in_mask[r, :len(cont) - 1] = True
        targets[r, :len(cont)] = cont
        t_mask[r, :len(cont)] = True
      lp, greedy = score(self.params, cache, mask, first, self._put(group), self._put(cont_in),
                         self._put(in_mask), self._put(targets), self._put(t_mask))
      lp, greedy = np.asarray(lp, np.float64).sum(1), np.asarray(greedy)
      for r, (_, i, _) in enumerate(part):
        out[i] = (float(lp[r]), bool(greedy[r]))

  # loglikelihood_rolling ---------------------------------------------------------------------
  def rolling_tokens(self, text) -> np.ndarray:
    """The scored sequence: BOS + the document (every document token scored), or the
    document alone (its first token is context only)."""
    return self._with_bos(self.encode(text))

  def loglikelihood_rolling(self, texts: Sequence, references=None, return_counts: bool = False):
    """Total log-prob of each text (and the number of tokens scored, with return_counts)."""
    windows = []   # (doc, inputs, targets, n_skip)
    counts = []
    for d, text in enumerate(texts):
      toks = self.rolling_tokens(text)
      counts.append(max(len(toks) - 1, 0))
      for start, first, end in rolling_windows(len(toks), self.max_length, self.rolling_stride):
        windows.append((d, toks[start:end], toks[start + 1:end + 1], first - start))
    totals = np.zeros(len(texts), np.float64)
    windows.sort(key=lambda w: -len(w[1]))
    fn = self._jit('rolling', _window_logprob)
    bar = self._bar(len(windows), 'window')
    for part in _chunks(windows, self.batch_size):
      bar.update(len(part))
      w = min(_bucket(len(part[0][1]), 16), self.max_length)
      rb = self._rows()
      tokens = np.zeros((rb, w), np.int32)
      targets = np.zeros((rb, w), np.int32)
      mask = np.zeros((rb, w), bool)
      for r, (_, inp, tgt, skip) in enumerate(part):
        tokens[r, :len(inp)], targets[r, :len(tgt)] = inp, tgt
        mask[r, skip:len(tgt)] = True
      lp = np.asarray(fn(self.params, self._put(tokens), self._put(targets), self._put(mask)),
                      np.float64).sum(1)
      for r, (d, *_) in enumerate(part):
        totals[d] += lp[r]
    bar.close()
    out = [float(t) for t in totals]
    return (out, counts) if return_counts else out

  # generate_until ------------------------------------------------------------------------------
  def _sampling(self, kwargs: dict) -> tuple[decode.SamplingConfig, tuple[str, ...]]:
    unknown = sorted(set(kwargs) - set(GEN_KEYS))
    if unknown:
      raise ConfigError(f'Unknown generation settings {unknown}; use {list(GEN_KEYS)}.')
    until = kwargs.get('until') or ()
    until = (until,) if isinstance(until, str) else tuple(until)
    stop_ids = set(int(i) for i in kwargs.get('stop_ids') or ())
    if self.eos is not None:
      stop_ids.add(int(self.eos))
    for s in until:   # a stop string that is one token can end the row inside the loop
      ids = self.encode(s) if s else ()
      if len(ids) == 1:
        stop_ids.add(int(ids[0]))
    s = decode.SamplingConfig(
        temperature=float(kwargs.get('temperature', 0.0)), top_k=int(kwargs.get('top_k', 0)),
        top_p=float(kwargs.get('top_p', 1.0)), min_p=float(kwargs.get('min_p', 0.0)),
        repetition_penalty=float(kwargs.get('repetition_penalty', 1.0)),
        max_new_tokens=int(kwargs.get('max_new_tokens', 64)), eos_ids=tuple(sorted(stop_ids)))
    if s.max_new_tokens >= self.max_length:
      raise ConfigError(f'max_new_tokens={s.max_new_tokens} leaves no room for a prompt in '
                        f'max_length={self.max_length}.')
    return s, until

  def generate_until(self, requests: Sequence[tuple[Any, dict]], references=None) -> list[str]:
    out: list = [None] * len(requests)
    groups: dict = {}
    for i, (context, kwargs) in enumerate(requests):
      s, until = self._sampling(dict(kwargs))
      ids = self._fit(self._with_bos(self.encode(context)), self.max_length - s.max_new_tokens, 'prompt')
      if not len(ids):
        raise ConfigError('A generation request has an empty prompt and the tokenizer has no BOS token.')
      groups.setdefault((s, until), []).append((i, ids))
    bar = self._bar(len(requests), 'req')
    if self.use_engine:
      served = [(i, s, until, ids) for (s, until), items in groups.items() if _engine_serves(s)
                for i, ids in items]
      self._generate_engine(sorted(served, key=lambda x: x[0]), out, bar)
      groups = {k: v for k, v in groups.items() if not _engine_serves(k[0])}
    for (s, until), items in groups.items():
      items.sort(key=lambda x: -len(x[1]))
      for part in _chunks(items, self.batch_size):
        bar.update(len(part))
        key = jax.random.fold_in(jax.random.key(self.seed), self._batches)
        self._batches += 1
        gen = decode.generate(self.params, [ids for _, ids in part], key, cfg=self.cfg, sampling=s,
                              mesh=self.mesh, unsampleable=self._unsampleable)
        tokens, lengths = np.asarray(gen.tokens), np.asarray(gen.lengths)
        for r, (i, _) in enumerate(part):
          out[i] = self._text(tokens[r, :lengths[r]], s, until)
    bar.close()
    return out

  def _text(self, row, s: decode.SamplingConfig, until) -> str:
    """New tokens -> the answer: an ending stop id dropped, decoded, cut before a stop string."""
    row = np.asarray(row)
    self.stats['generated_tokens'] += len(row)
    if len(row) and int(row[-1]) in s.eos_ids:
      row = row[:-1]
    return decode.truncate_at_stop([self.tokenizer.decode(row)], until)[0][0]

  def _get_engine(self) -> engine_lib.Engine:
    if self._engine is None:   # one pool per model: its compiled programs are shared anyway
      self._engine = engine_lib.Engine(self.params, self.cfg, slots=self.batch_size,
                                       max_len=self.max_length, unsampleable=self._unsampleable,
                                       detokenize=self.tokenizer.decode)
    return self._engine

  def _generate_engine(self, items: list, out: list, bar) -> None:
    """items [(request index, sampling, until, prompt ids)] through the engine, in its slots."""
    if not items:
      return
    eng = self._get_engine()
    shared, members = shared_head([ids for *_, ids in items], MIN_SHARED_PREFIX)
    self.stats['shared_prefix_tokens'] = shared            # the last call's head
    self.stats['shared_prefix_requests'] = int(members.sum())
    call, self._calls = self._calls, self._calls + 1
    reqs = []
    for (i, s, until, ids), member in zip(items, members):
      seed = int(np.random.SeedSequence([self.seed, call, i]).generate_state(1)[0])
      reqs.append(engine_lib.Request(
          prompt=ids.tolist(), max_tokens=s.max_new_tokens, temperature=s.temperature,
          top_p=s.top_p, top_k=s.top_k, min_p=s.min_p, seed=seed, eos_ids=s.eos_ids,
          stop=tuple(u for u in until if u), prefix_len=shared if member else 0))
    rids, done = [], 0
    try:
      rids = [eng.submit(r) for r in reqs]
      while done < len(rids):
        eng.step()
        now = sum(r in eng.results for r in rids)
        bar.update(now - done)
        done = now
    except BaseException:   # a failed call leaves nothing queued for the next one
      eng.fail_all()
      eng.results.clear()
      raise
    for (i, s, until, _), rid in zip(items, rids):
      out[i] = self._text(eng.results.pop(rid).tokens, s, until)


def _engine_serves(s: decode.SamplingConfig) -> bool:
  """What lm/engine.py's requests carry: no repetition penalty, at most MAX_EOS stop ids."""
  return s.repetition_penalty == 1.0 and len(s.eos_ids) <= engine_lib.MAX_EOS


def shared_head(seqs: Sequence[np.ndarray], minimum: int = 1) -> tuple[int, np.ndarray]:
  """(L, members): the head of L >= minimum tokens that the most prefill saves ((members - 1)
  * L) by being computed once, and which sequences start with it; (0, none) when there is none.
  Not just the common prefix of all: a few-shot sampler that leaves a document out of its own
  demonstrations (first_n) gives the first k documents other heads than the rest."""
  n = len(seqs)
  members = np.zeros(n, bool)
  if n < 2:
    return 0, members
  order = sorted(range(n), key=lambda i: seqs[i].tolist())
  lcp = np.zeros(n - 1, np.int64)   # between neighbours in sorted order
  for j in range(n - 1):
    a, b = seqs[order[j]], seqs[order[j + 1]]
    m = min(len(a), len(b))
    diff = np.flatnonzero(a[:m] != b[:m])
    lcp[j] = diff[0] if len(diff) else m
  best = (0, 0, 0, 0)               # (saving, L, first and last link of the run)
  for length in np.unique(lcp[lcp >= minimum]):
    # runs of neighbours sharing >= length tokens: sorted order keeps each head contiguous
    ok = np.concatenate([[0], (lcp >= length).astype(np.int64), [0]])
    starts, ends = np.flatnonzero(np.diff(ok) == 1), np.flatnonzero(np.diff(ok) == -1)
    k = int(np.argmax(ends - starts))
    saving = int((ends[k] - starts[k]) * length)   # run of r links = r + 1 sequences
    if saving > best[0]:
      best = (saving, int(length), int(starts[k]), int(ends[k]))
  if not best[0]:
    return 0, members
  _, length, start, end = best
  members[[order[j] for j in range(start, end + 1)]] = True
  return length, members


class ReferenceModel:
  """Answers each request with the task's reference: the gold choice scores 0 (probability 1)
  and is greedy, the others REFERENCE_WRONG; generation returns the reference text; rolling
  text has probability 1. Checks that a task's plumbing reaches its ceiling."""

  kind = 'reference'
  WRONG = -1e9
  stats: dict = {}

  def _need(self, references, n):
    if references is None or len(references) != n:
      raise ConfigError('The reference model needs each request\'s reference from the task '
                        '(references=[...], one per request).')

  def loglikelihood(self, requests, references=None):
    self._need(references, len(requests))
    return [(0.0, True) if gold else (self.WRONG, False) for gold in references]

  def loglikelihood_rolling(self, texts, references=None, return_counts=False):
    out = [0.0] * len(texts)
    # counts in characters: a reference "model" has no tokenizer
    return (out, [len(t) for t in texts]) if return_counts else out

  def generate_until(self, requests, references=None):
    self._need(references, len(requests))
    return [str(r) for r in references]


# Helpers for rolling scores -----------------------------------------------------------------------
def bits_per_byte(logprobs: Sequence[float], texts: Sequence[str]) -> float:
  """-sum log p / (ln 2 * UTF-8 bytes): comparable across tokenizers."""
  return -float(np.sum(logprobs)) / (math.log(2) * sum(len(t.encode('utf-8')) for t in texts))


def word_perplexity(logprobs: Sequence[float], texts: Sequence[str]) -> float:
  """exp(-sum log p / words), words split on whitespace (lm-eval's word_perplexity)."""
  return math.exp(-float(np.sum(logprobs)) / sum(len(t.split()) for t in texts))


def token_perplexity(logprobs: Sequence[float], counts: Sequence[int]) -> float:
  return math.exp(-float(np.sum(logprobs)) / sum(counts))
