"""Continuous batching: a fixed pool of KV-cache slots that requests join as soon as one frees.

  eng = Engine(params, cfg, slots=8, detokenize=tok.decode)
  out = eng.generate([Request(prompt=[5, 7, 1], max_tokens=32, eos_ids=(2,)),
                      Request(prompt=[9, 4], max_tokens=8, temperature=0.8, seed=3, stop=('\\n',))])
  out[0].tokens, out[0].finish_reason          # 'stop' (EOS id / stop string) or 'length'

Why slotted, not paged. The pool is one stacked cache [layers, slots, W, kv_heads, head_dim]
whose row r holds one request, column c its token at position c. A paged cache (vLLM) saves
memory when requests are much shorter than W, but needs a gather of each row's pages inside
attention, which lm/layers does not do; slots reuse the model's own cache attention unchanged
(a row's stale columns from an earlier occupant lie at positions past the row's own, so the
causal mask already hides them) and cost W columns per slot, the same as a static batch.

Loop (host side, `step`): admit waiting requests into free slots (prefill each distinct prompt
once, batch 1, then copy its KV into the slot), run `sync_every` decode steps in one program
over the whole pool, then hand each row's new tokens to its request and free finished slots.
A row's stop rule: an EOS id or max_tokens (on device), or a stop string (host, on the text).

Equal to the static path. Greedy rows give lm.decode.generate's tokens: the same model
function, processors and masks; only the cache layout differs (right-aligned columns instead
of left padding), which changes float summation order at most. A sampled row draws token i
with fold_in(key(seed), i) over its own logits, so it does not depend on its companions
(they set the decode window, which adds masked columns only: exact zeros in the softmax).

Shared prefixes. A prompt prefilled recently (an LRU of `prefix_cache` rows) is copied, not
recomputed: n samples of one prompt prefill it once. `Request.prefix_len` marks a shared head
(few-shot demonstrations): it is prefilled once and each prompt prefills only its own tail.

Compiled programs: one decode program per (pool size, sync_every, window), the window being
the columns the live rows reach (a power of two up to W: a step's cost follows the cache it
carries), one prefill per prompt bucket (powers of two up to W), one insert.
`compiled_programs()` counts traces.
"""
from __future__ import annotations

import collections
import dataclasses
import functools
import threading
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lm import compiled, decode, model
from lm.config import ConfigError, ModelConfig

_TRACES = collections.Counter()   # incremented at trace time: one per compiled program
MAX_EOS = 8                       # EOS ids per request (padded with -1 on device)
TOP_LOGPROBS = 5                  # the most likely alternatives a request may ask for, per token


def compiled_programs(kind: str | None = None) -> int:
  return sum(_TRACES.values()) if kind is None else _TRACES[kind]


@dataclasses.dataclass
class Request:
  prompt: Sequence[int]
  max_tokens: int = 64
  temperature: float = 0.0          # 0: greedy
  top_p: float = 1.0
  top_k: int = 0
  min_p: float = 0.0
  min_tokens: int = 0               # EOS ids banned before this many tokens
  seed: int = 0
  eos_ids: Sequence[int] = ()
  stop: Sequence[str] = ()          # stop strings (needs the engine's detokenize)
  prefix_len: int = 0               # the first prefix_len tokens are a shared head
  top_logprobs: int = 0             # alternatives reported per token (raw model log-probs)
  # Called from the engine thread with (new tokens, their raw logprobs, their top logprobs,
  # the Result once finished else None).
  on_update: Callable | None = None
  id: int = -1                      # set by submit


@dataclasses.dataclass
class Result:
  tokens: list                      # new tokens (an ending EOS id included)
  logprobs: list                    # under the processed (sampling) distribution
  raw_logprobs: list                # under the model: log_softmax of its logits
  finish_reason: str                # 'stop' (EOS or stop string), 'length', 'cancelled', 'error'
  text: str | None = None           # detokenized, cut before a stop string
  prompt_tokens: int = 0
  top_logprobs: list | None = None  # per token [(id, raw logprob), ...], most likely first


def validate(req: Request, cfg: ModelConfig, width: int, detokenize=None) -> None:
  """One sentence for the first thing wrong with a request (ConfigError)."""
  n = len(req.prompt)
  checks = [(n >= 1, 'the prompt needs at least one token'),
            (req.max_tokens >= 1, f'max_tokens must be >= 1, got {req.max_tokens}'),
            (n + req.max_tokens <= width,
             f'a prompt of {n} tokens plus max_tokens={req.max_tokens} exceeds the context of '
             f'{width} tokens; shorten the prompt or lower max_tokens'),
            (req.temperature >= 0, f'temperature must be >= 0, got {req.temperature}'),
            (0 < req.top_p <= 1, f'top_p must be in (0, 1], got {req.top_p}'),
            (req.top_k >= 0, f'top_k must be >= 0, got {req.top_k}'),
            (0 <= req.min_p <= 1, f'min_p must be in [0, 1], got {req.min_p}'),
            (0 <= req.min_tokens <= req.max_tokens, 'min_tokens must be between 0 and max_tokens'),
            (len(req.eos_ids) <= MAX_EOS, f'at most {MAX_EOS} EOS ids per request'),
            (not req.stop or detokenize is not None, 'stop strings need an engine with detokenize'),
            (0 <= req.prefix_len <= n, 'prefix_len must be between 0 and the prompt length'),
            (0 <= req.top_logprobs <= TOP_LOGPROBS, f'top_logprobs must be between 0 and {TOP_LOGPROBS}'),
            (all(0 <= int(t) < cfg.vocab_size for t in req.prompt),
             f'prompt token ids must lie in [0, {cfg.vocab_size})')]
  for ok, msg in checks:
    if not ok:
      raise ConfigError(f'Bad request: {msg}.')


# Device programs ------------------------------------------------------------------------------
def _prefill(params, row_cache, tokens, start, n_real, *, cfg):
  """tokens [1, L] (right-padded) written at columns start.. of a batch-1 cache of W columns;
  returns (cache, logits at the last real token [V]). Pads sit at later positions than every
  real token, so the causal mask keeps them out; decode overwrites their columns."""
  _TRACES['prefill'] += 1
  pos = start + jnp.arange(tokens.shape[1], dtype=jnp.int32)[None]
  h, cache = model.hidden_states(params, tokens, cfg, positions=pos, cache=row_cache,
                                 cache_index=start)
  last = jax.lax.dynamic_slice_in_dim(h, n_real - 1, 1, axis=1)
  return cache, model.logits_from_hidden(params, last, cfg)[0, 0]


def _insert(state, row_cache, logits, row, fields):
  """Put a prefilled request into pool row `row` (cache, last logits, its per-row fields)."""
  _TRACES['insert'] += 1
  put = lambda buf, v: jax.lax.dynamic_update_index_in_dim(buf, v.astype(buf.dtype), row, 0)
  cache = {n: jax.lax.dynamic_update_index_in_dim(state['cache'][n], row_cache[n][:, 0], row, 1)
           for n in ('k', 'v')}
  new = {n: put(state[n], v) for n, v in fields.items()}
  return {**state, **new, 'cache': cache, 'logits': put(state['logits'], logits)}


def _top_k_rows(x, k):
  """Per-row top-k (k = 0: off), ties with the k-th kept as in decode.apply_top_k."""
  srt = -jnp.sort(-x, axis=-1)
  kth = jnp.take_along_axis(srt, jnp.maximum(k - 1, 0)[:, None], axis=-1)
  return jnp.where((k[:, None] > 0) & (x < kth), decode.NEG_INF, x)


def _process(logits, s, ban):
  """decode.process_logits' order with per-row knobs; a processor no row uses is skipped."""
  early = s['n_gen'] < s['min_new']
  eos_mask = jnp.zeros(logits.shape, bool).at[jnp.arange(logits.shape[0])[:, None],
                                              jnp.maximum(s['eos'], 0)].max(s['eos'] >= 0)
  x = jnp.where(ban[None] | (eos_mask & early[:, None]), decode.NEG_INF, logits)
  x = x / s['temperature'][:, None]
  maybe = lambda use, f, v: jax.lax.cond(jnp.any(use), f, lambda v: v, v)
  x = maybe(s['top_k'] > 0, lambda v: _top_k_rows(v, s['top_k']), x)
  x = maybe(s['top_p'] < 1, lambda v: jnp.where((s['top_p'] < 1)[:, None],
                                                decode.apply_top_p(v, s['top_p'][:, None]), v), x)
  x = maybe(s['min_p'] > 0, lambda v: jnp.where((s['min_p'] > 0)[:, None],
                                                decode.apply_min_p(v, s['min_p'][:, None]), v), x)
  return x, eos_mask


def _row_forward(params, cache_row, tok, pos, cfg):
  """One token of one row at its own column (= position); vmapped over the pool's rows, so
  every row writes its own cache column (the model's cache_index is one scalar per call)."""
  cache = jax.tree.map(lambda a: a[:, None], cache_row)
  h, cache = model.hidden_states(params, tok.reshape(1, 1), cfg, positions=pos.reshape(1, 1),
                                 cache=cache, cache_index=pos)
  return model.logits_from_hidden(params, h, cfg)[0, 0], jax.tree.map(lambda a: a[:, 0], cache)


def _decode_chunk(params, state, ban, kill, *, cfg, steps, window):
  """`steps` decode steps over the whole pool; returns (state, tokens/logprobs/raw/emitted [B, steps]).

  Only the first `window` columns take part (every live row stays inside them this chunk): a
  step's cost follows the cache it carries, so short requests do not pay for the full row."""
  _TRACES['decode'] += 1
  full = state['cache']
  state = {**state, 'done': state['done'] | kill,
           'cache': {n: c[:, :, :window] for n, c in full.items()}}
  forward = jax.vmap(functools.partial(_row_forward, cfg=cfg), in_axes=(None, 1, 0, 0),
                     out_axes=(0, 1))

  def body(s, _):
    live = ~s['done']
    x, eos_mask = _process(s['logits'], s, ban)
    draw = jax.vmap(lambda k, i, row: jax.random.categorical(jax.random.fold_in(k, i), row))
    greedy = jnp.argmax(x, axis=-1).astype(jnp.int32)
    # Random bits and the top alternatives cost a step real time: only when a row needs them.
    sampled = jax.lax.cond(jnp.any(live & ~s['greedy']),
                           lambda: draw(s['keys'], s['n_gen'], x).astype(jnp.int32), lambda: greedy)
    tok = jnp.where(s['greedy'], greedy, sampled)
    lp = decode._token_logprob(x, tok)
    raw = decode._token_logprob(s['logits'], tok)
    b = tok.shape[0]
    top_lp, top_id = jax.lax.cond(
        jnp.any(live & s['want_top']),
        lambda: tuple(jax.lax.top_k(jax.nn.log_softmax(s['logits'], axis=-1), TOP_LOGPROBS)),
        lambda: (jnp.zeros((b, TOP_LOGPROBS), jnp.float32), jnp.zeros((b, TOP_LOGPROBS), jnp.int32)))
    n_gen = s['n_gen'] + live
    hit_eos = jnp.take_along_axis(eos_mask, tok[:, None], axis=1)[:, 0]
    done = s['done'] | (live & (hit_eos | (n_gen >= s['max_new'])))
    # Finished rows keep running (the batch is fixed) at a frozen, in-range column.
    pos = jnp.minimum(s['pos'], window - 1)
    logits, cache = forward(params, s['cache'], tok, pos)
    s = {**s, 'cache': cache, 'logits': jnp.where(live[:, None], logits, s['logits']),
         'pos': s['pos'] + live, 'n_gen': n_gen, 'done': done}
    return s, (tok, lp, raw, live, top_id, top_lp)

  state, (tok, lp, raw, live, top_id, top_lp) = jax.lax.scan(body, state, None, length=steps)
  state['cache'] = {n: jax.lax.dynamic_update_slice_in_dim(full[n], c, 0, 2)
                    for n, c in state['cache'].items()}
  return state, {'tokens': tok.T, 'logprobs': lp.T, 'raw': raw.T, 'emitted': live.T,
                 'top_id': top_id.swapaxes(0, 1), 'top_lp': top_lp.swapaxes(0, 1)}


_PROGRAMS = compiled.Programs()


def _jitted(fn, donate: tuple, **static):
  """One jax.jit per (function, static options), shared by every Engine: a new engine with
  the same model and pool shape compiles nothing. The pool state is donated (updated in place)."""
  return _PROGRAMS.get((fn.__name__, tuple(sorted(static.items()))),
                       lambda: jax.jit(functools.partial(fn, **static), donate_argnums=donate))


_ROW_FIELDS = {'pos': np.int32, 'n_gen': np.int32, 'max_new': np.int32, 'min_new': np.int32,
               'done': bool, 'greedy': bool, 'temperature': np.float32, 'top_p': np.float32,
               'top_k': np.int32, 'min_p': np.float32, 'want_top': bool}


@dataclasses.dataclass
class _Live:
  req: Request
  tokens: list = dataclasses.field(default_factory=list)
  logprobs: list = dataclasses.field(default_factory=list)
  raw: list = dataclasses.field(default_factory=list)
  top: list = dataclasses.field(default_factory=list)


class Engine:
  """A pool of `slots` cache rows of `max_len` columns (default the model context).

  submit / cancel are thread-safe; step (and generate, which loops it) runs in one thread.
  """

  def __init__(self, params, cfg: ModelConfig, *, slots: int = 8, max_len: int | None = None,
               sync_every: int = 4, unsampleable=None, detokenize: Callable | None = None,
               prefix_cache: int = 8):
    if cfg.arch != 'decoder' or not cfg.causal:
      raise ConfigError('The engine serves causal decoder-only models (model.arch=decoder).')
    if 'soft_prompt' in params:
      raise ConfigError('The engine does not serve prompt-tuned params (a soft prompt); merge '
                        'or drop it first.')
    self.params, self.cfg, self.slots = params, cfg, slots
    self.width = min(max_len or cfg.max_seq_len, cfg.max_seq_len)
    self.sync_every, self.detokenize = sync_every, detokenize
    self.prefix_cache = max(1, prefix_cache)
    self._ban = decode._ban_mask(cfg, unsampleable)
    self._prefill = _jitted(_prefill, (), cfg=cfg)
    self._insert = _jitted(_insert, (0,))
    self._state = self._empty_state()
    self._rows: list[_Live | None] = [None] * slots
    self._kill = np.zeros(slots, bool)   # rows the host ended (stop string, cancel)
    self._lru: collections.OrderedDict = collections.OrderedDict()
    self._lock = threading.Lock()
    self._waiting: collections.deque = collections.deque()
    self._cancelled: set = set()
    self._next_id = 0
    self.work = threading.Event()        # set when something is waiting (the server's loop)
    self.results: dict[int, Result] = {}
    self.stats = collections.Counter()

  def _empty_row(self, batch=1):
    return decode.init_cache(self.cfg, batch, self.width)

  def _empty_state(self):
    b = self.slots
    rows = {n: np.zeros(b, dt) for n, dt in _ROW_FIELDS.items()}
    rows.update(done=np.ones(b, bool), temperature=np.ones(b, np.float32),
                top_p=np.ones(b, np.float32))
    return {**jax.tree.map(jnp.asarray, rows), 'cache': self._empty_row(b),
            'logits': jnp.zeros((b, self.cfg.padded_vocab), jnp.float32),
            'keys': jnp.zeros((b, 2), jnp.uint32), 'eos': jnp.full((b, MAX_EOS), -1, jnp.int32)}

  # Requests -----------------------------------------------------------------------------------
  def submit(self, req: Request) -> int:
    """Queue a request (ConfigError with one sentence if it cannot run); returns its id."""
    validate(req, self.cfg, self.width, self.detokenize)
    with self._lock:
      req.id = self._next_id
      self._next_id += 1
      self._waiting.append(req)
    self.work.set()
    return req.id

  def cancel(self, request_id: int) -> None:
    with self._lock:
      self._cancelled.add(request_id)
    self.work.set()

  def fail_all(self) -> None:
    """After an error inside step: end every queued and running request with finish_reason
    'error' and start from an empty pool (the engine thread then goes on serving)."""
    with self._lock:
      waiting, self._waiting = list(self._waiting), collections.deque()
    live = [x for x in self._rows if x is not None] + [_Live(q) for q in waiting]
    self._rows, self._kill[:] = [None] * self.slots, False
    self._state = self._empty_state()
    for x in live:
      self._finish(None, x, 'error', '')

  def busy(self) -> bool:
    return bool(self._waiting) or any(r is not None for r in self._rows)

  def generate(self, requests: Sequence[Request]) -> list[Result]:
    """Run requests to completion (with whatever else is queued); results in their order."""
    ids = [self.submit(r) for r in requests]
    while any(i not in self.results for i in ids):
      self.step()
    return [self.results.pop(i) for i in ids]

  # The loop -----------------------------------------------------------------------------------
  def step(self) -> bool:
    """Admit, decode sync_every tokens per row, deliver; False when there was nothing to do."""
    self._apply_cancels()
    self._admit()
    if not any(r is not None for r in self._rows):
      return False
    # The window: every live row's next sync_every columns, bucketed (few programs).
    reach = max(len(x.req.prompt) + len(x.tokens) for x in self._rows if x is not None)
    window = min(decode._bucket(reach + self.sync_every), self.width)
    chunk = _jitted(_decode_chunk, (1,), cfg=self.cfg, steps=self.sync_every, window=window)
    self._state, out = chunk(self.params, self._state, self._ban, self._kill)
    self._kill[:] = False
    self.stats['decode_calls'] += 1
    out = jax.tree.map(np.asarray, out)
    for r, live in enumerate(self._rows):
      if live is not None:
        self._deliver(r, live, out)
    return True

  def _apply_cancels(self):
    with self._lock:
      cancelled, self._cancelled = self._cancelled, set()
      kept = [q for q in self._waiting if q.id not in cancelled]
      dropped = [q for q in self._waiting if q.id in cancelled]
      self._waiting = collections.deque(kept)
    for q in dropped:
      self._finish(None, _Live(q), 'cancelled')
    for r, live in enumerate(self._rows):
      if live is not None and live.req.id in cancelled:
        self._finish(r, live, 'cancelled')

  def _admit(self):
    for r in range(self.slots):
      if self._rows[r] is not None:
        continue
      with self._lock:
        if not self._waiting:
          self.work.clear()
          return
        req = self._waiting.popleft()
      cache, logits = self._prompt_state(list(req.prompt), req.prefix_len)
      self._state = self._insert(self._state, cache, logits, np.int32(r), self._fields(req))
      self._rows[r], self._kill[r] = _Live(req), False

  def _fields(self, req: Request) -> dict:
    greedy = req.temperature == 0
    eos = np.full(MAX_EOS, -1, np.int32)
    eos[:len(req.eos_ids)] = list(req.eos_ids)
    vals = dict(pos=len(req.prompt), n_gen=0, max_new=req.max_tokens, min_new=req.min_tokens,
                done=False, greedy=greedy, temperature=1.0 if greedy else req.temperature,
                top_p=req.top_p, top_k=req.top_k, min_p=req.min_p, want_top=req.top_logprobs > 0)
    out = {n: np.asarray(v, _ROW_FIELDS[n]) for n, v in vals.items()}
    # A legacy uint32[2] key: folded with the token index on device, whatever the batch.
    out['keys'] = np.asarray(jax.random.PRNGKey(req.seed % 2**32), np.uint32)
    out['eos'] = eos
    return out

  def _prompt_state(self, prompt: list, prefix_len: int):
    """(batch-1 cache, last logits) of a prompt, from the LRU when it was prefilled recently;
    a shared head (prefix_len) is prefilled once and each tail continues from its KV."""
    key = tuple(prompt)
    if key in self._lru:
      self._lru.move_to_end(key)
      self.stats['prefix_hits'] += 1
      return self._lru[key]
    cache, start = self._empty_row(), 0
    if 0 < prefix_len < len(prompt):
      head = tuple(prompt[:prefix_len])
      if head not in self._lru:
        self._remember(head, self._run_prefill(self._empty_row(), list(head), 0))
      else:   # refreshed, or the prompts' own entries would evict it every prefix_cache prompts
        self._lru.move_to_end(head)
        self.stats['prefix_hits'] += 1
      cache, start = self._lru[head][0], prefix_len
    entry = self._run_prefill(cache, prompt, start)
    self._remember(key, entry)
    return entry

  def _remember(self, key, entry):
    self._lru[key] = entry
    self._lru.move_to_end(key)
    while len(self._lru) > self.prefix_cache:
      self._lru.popitem(last=False)

  def _run_prefill(self, cache, prompt: list, start: int):
    """Prefill prompt[start:] after columns 0..start-1 (already in `cache`). The length is a
    bucket; near the end of the row the window moves left and recomputes a few cached tokens
    (the same KV again) rather than compiling an odd length."""
    n = len(prompt)
    length = min(decode._bucket(n - start), self.width)
    start = min(start, self.width - length)
    tokens = np.zeros((1, length), np.int32)
    tokens[0, :n - start] = prompt[start:]
    self.stats['prefill_calls'] += 1
    self.stats['prefill_tokens'] += n - start
    return self._prefill(self.params, cache, tokens, np.int32(start), np.int32(n - start))

  def _deliver(self, r: int, live: _Live, out: dict):
    req, old = live.req, len(live.tokens)
    keep = out['emitted'][r]
    live.tokens += out['tokens'][r][keep].tolist()
    live.logprobs += out['logprobs'][r][keep].tolist()
    live.raw += out['raw'][r][keep].tolist()
    if req.top_logprobs:
      k = req.top_logprobs
      live.top += [list(zip(i[:k].tolist(), v[:k].tolist()))
                   for i, v in zip(out['top_id'][r][keep], out['top_lp'][r][keep])]
    reason, text = None, None
    if live.tokens and (live.tokens[-1] in req.eos_ids):
      reason = 'stop'
    elif len(live.tokens) >= req.max_tokens:
      reason = 'length'
    if req.stop:
      for j in range(old + 1, len(live.tokens) + 1):
        cut = stop_cut(self.detokenize(live.tokens[:j]), req.stop)
        if cut is not None:
          del live.tokens[j:], live.logprobs[j:], live.raw[j:], live.top[j:]
          reason, text = 'stop', cut
          break
    new = slice(old, len(live.tokens))
    if req.on_update is not None and (new.stop > old or reason):
      req.on_update(live.tokens[new], live.raw[new], live.top[new], None)
    if reason:
      self._finish(r, live, reason, text)

  def _finish(self, r, live: _Live, reason: str, text: str | None = None):
    if r is not None:
      self._rows[r] = None
      # The device only knows EOS / max_tokens: end the row there too (a stop string, cancel).
      self._kill[r] = reason == 'cancelled' or text is not None
    if text is None and self.detokenize is not None:
      text = self.detokenize(live.tokens)
    res = Result(tokens=live.tokens, logprobs=live.logprobs, raw_logprobs=live.raw,
                 finish_reason=reason, text=text, prompt_tokens=len(live.req.prompt),
                 top_logprobs=live.top if live.req.top_logprobs else None)
    self.stats['tokens_out'] += len(live.tokens)
    self.stats[f'finished_{reason}'] += 1
    if live.req.on_update is not None:
      live.req.on_update([], [], [], res)
    else:
      self.results[live.req.id] = res


def stop_cut(text: str, stop: Sequence[str]) -> str | None:
  """The text before its first stop string, or None when none occurs."""
  cuts = [text.find(s) for s in stop if s and s in text]
  return text[:min(cuts)] if cuts else None
