"""Autoregressive decoding: left-padded batches, a KV cache, logits processors, stopping and
beam search, on one device or a mesh.

  gen = generate(params, [np.array([5, 7, 1]), np.array([2])], key, cfg=cfg,
                 sampling=SamplingConfig(temperature=0.7, top_p=0.9, max_new_tokens=64, eos_ids=(2,)))
  gen.tokens [B, N]        new tokens only; pad_id after a row has ended
  gen.mask [B, N]          1 for real new tokens (the EOS included), 0 after
  gen.logprobs [B, N]      log-prob of each token under the processed (sampling) distribution
  gen.raw_logprobs [B, N]  ... under the model itself: log_softmax of the raw logits, float32;
                           equal to a teacher-forced model.forward (what PPO needs)

Layout. Prompts are LEFT-padded to a common length P: row b's real tokens fill slots
P - len_b .. P - 1, so every row's next token goes to the same cache slot and one
dynamic_update_slice writes the whole batch. Positions count real tokens only (cumsum of
the mask - 1), and the cache attention skips pad slots (model.hidden_states' kv_positions /
kv_mask), so a row's continuation does not depend on its padding or on the other rows.

Loop. One forward pass prefills the prompt, then a `lax.while_loop` samples one token per
step until max_new_tokens, or until every row has produced an EOS id (early exit).

Processors are pure functions of the logits, applied in this fixed order:
  0. ban: ids >= cfg.vocab_size, the `unsampleable` ids, and EOS before min_new_tokens
  1. temperature (0 means greedy: the argmax, with log-probs of the other processors at T=1)
  2. repetition penalty (CTRL: seen logits > 0 divided by it, < 0 multiplied; prompt included)
  3. top-k   4. top-p (nucleus; the top token always kept)   5. min-p

Compiled programs. Prompt length, the new-token budget and the batch are rounded up to
buckets (powers of two), and the numeric knobs (temperature, top_p, min_p, penalty,
max/min_new_tokens) are traced values, so a stream of varied requests compiles only one
program per (bucket shape, top_k, which processors are on). `compiled_programs()` counts.

Sliding-window attention (Mistral, Gemma) is a mask on positions, so decoding respects the
window exactly; a model whose every layer is a sliding-window one keeps its KV cache in a ring
of max(prompt, window) slots (cache_slots), however many tokens it generates.

Generation fits the context (check_context); the legacy `sample` keeps a sliding window
beyond it for free-running samples of small models.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lm import compiled, model, sharding
from lm.config import ConfigError, ModelConfig

NEG_INF = -jnp.inf
_TRACES = {'generate': 0, 'beam_search': 0}   # incremented at trace time: one per program


def compiled_programs(kind: str | None = None) -> int:
  """How many decoding programs have been traced (= compiled) in this process."""
  return sum(_TRACES.values()) if kind is None else _TRACES[kind]


# Configuration ----------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class SamplingConfig:
  temperature: float = 1.0          # 0: greedy
  top_k: int = 0                    # 0: off
  top_p: float = 1.0                # 1: off
  min_p: float = 0.0                # 0: off; keeps tokens with p >= min_p * p_max
  repetition_penalty: float = 1.0   # 1: off
  max_new_tokens: int = 64
  min_new_tokens: int = 0           # EOS ids are banned until this many tokens exist
  eos_ids: tuple[int, ...] = ()     # a row ends after producing one of these
  pad_id: int = 0                   # fills tokens after a row has ended

  def __post_init__(self):
    object.__setattr__(self, 'eos_ids', tuple(int(i) for i in self.eos_ids))
    checks = [(self.temperature >= 0, 'temperature must be >= 0 (0 is greedy)'),
              (self.top_k >= 0, 'top_k must be >= 0 (0 turns it off)'),
              (0 < self.top_p <= 1, 'top_p must be in (0, 1]'),
              (0 <= self.min_p <= 1, 'min_p must be in [0, 1]'),
              (self.repetition_penalty > 0, 'repetition_penalty must be > 0 (1 turns it off)'),
              (self.max_new_tokens >= 1, 'max_new_tokens must be >= 1'),
              (0 <= self.min_new_tokens <= self.max_new_tokens,
               'min_new_tokens must be between 0 and max_new_tokens')]
    for ok, msg in checks:
      if not ok:
        raise ConfigError(f'SamplingConfig: {msg}; got {self}.')

  @property
  def greedy(self) -> bool:
    return self.temperature == 0


def _flags(s: SamplingConfig) -> tuple:
  """The static part of a SamplingConfig: what selects a compiled program."""
  return (s.greedy, s.top_k, s.top_p < 1, s.min_p > 0, s.repetition_penalty != 1)


def _knobs(s: SamplingConfig) -> dict:
  """The traced part: changing these values never recompiles."""
  f32 = lambda v: np.float32(v)
  return {'temperature': f32(s.temperature or 1.0), 'top_p': f32(s.top_p), 'min_p': f32(s.min_p),
          'penalty': f32(s.repetition_penalty), 'max_new': np.int32(s.max_new_tokens),
          'min_new': np.int32(s.min_new_tokens)}


def check_context(cfg: ModelConfig, prompt_len: int, max_new_tokens: int) -> None:
  """Generation keeps the whole sequence within model.max_seq_len (the positions it was trained on)."""
  if prompt_len + max_new_tokens > cfg.max_seq_len:
    raise ConfigError(f'A prompt of {prompt_len} tokens plus max_new_tokens={max_new_tokens} '
                      f'exceeds the model context model.max_seq_len={cfg.max_seq_len}; shorten '
                      'the prompt or lower max_new_tokens.')


def check_length(cfg: ModelConfig, prompt_len: int, max_new_tokens: int) -> None:
  """For `sample` (sliding window beyond the context): only the prompt must fit."""
  if prompt_len > cfg.max_seq_len:
    raise ConfigError(f'The prompt has {prompt_len} tokens, more than the model context '
                      f'model.max_seq_len={cfg.max_seq_len}; shorten it.')


def id_mask(ids, cfg: ModelConfig) -> np.ndarray:
  """[padded_vocab] bool from a list of ids or a bool mask (over vocab_size or padded_vocab)."""
  out = np.zeros(cfg.padded_vocab, bool)
  if ids is None:
    return out
  a = np.asarray(ids)
  if a.dtype == bool:
    out[:a.shape[0]] = a
  else:
    if a.size and (a.min() < 0 or a.max() >= cfg.vocab_size):
      raise ConfigError(f'Token ids {a.tolist()} fall outside the vocabulary [0, {cfg.vocab_size}).')
    out[a.astype(int)] = True
  return out


def _ban_mask(cfg: ModelConfig, unsampleable) -> np.ndarray:
  ban = id_mask(unsampleable, cfg)
  ban[cfg.vocab_size:] = True          # the padded vocabulary is never a token
  return ban


# Logits processors (pure; logits [B, V] float32, -inf = removed) ---------------------------
def apply_temperature(logits, temperature):
  return logits / temperature


def apply_repetition_penalty(logits, seen, penalty):
  """CTRL (Keskar et al. 2019): make every already-seen token less likely, whatever its sign."""
  penalised = jnp.where(logits > 0, logits / penalty, logits * penalty)
  return jnp.where(seen, penalised, logits)


def apply_top_k(logits, k: int):
  """Keep the k highest logits (ties with the k-th kept too)."""
  k = min(k, logits.shape[-1])
  kth = jax.lax.top_k(logits, k)[0][..., -1:]
  return jnp.where(logits < kth, NEG_INF, logits)


def apply_top_p(logits, p):
  """Nucleus (Holtzman et al. 2020): keep the smallest set of top tokens whose probability
  reaches p. A token is kept when the mass strictly above it is < p, so the top one always is."""
  srt = -jnp.sort(-logits, axis=-1)
  probs = jax.nn.softmax(srt, axis=-1)
  above = jnp.cumsum(probs, axis=-1) - probs
  kept = jnp.where(above < p, srt, jnp.inf)
  cut = jnp.min(kept, axis=-1, keepdims=True)       # the smallest kept logit
  return jnp.where(logits < cut, NEG_INF, logits)


def apply_min_p(logits, min_p):
  """Min-p (Nguyen et al. 2024): keep tokens with p >= min_p * p_max (the top always kept)."""
  logp = jax.nn.log_softmax(logits, axis=-1)
  top = jnp.max(logp, axis=-1, keepdims=True)
  return jnp.where(logp < top + jnp.log(min_p), NEG_INF, logits)


def process_logits(logits, *, ban, seen, flags: tuple, knobs: dict):
  """All processors in the documented order; `ban` [V] or [B, V] is already resolved."""
  greedy, top_k, use_top_p, use_min_p, use_penalty = flags
  x = jnp.where(ban, NEG_INF, logits.astype(jnp.float32))
  if not greedy:
    x = apply_temperature(x, knobs['temperature'])
  if use_penalty:
    x = apply_repetition_penalty(x, seen, knobs['penalty'])
  if top_k:
    x = apply_top_k(x, top_k)
  if use_top_p:
    x = apply_top_p(x, knobs['top_p'])
  if use_min_p:
    x = apply_min_p(x, knobs['min_p'])
  return x


def _token_logprob(logits, tok):
  return jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), tok[:, None], axis=-1)[:, 0]


# Left padding -----------------------------------------------------------------------------
def _bucket(n: int, minimum: int = 8) -> int:
  return max(minimum, 1 << (max(n, 1) - 1).bit_length())


def _batch_bucket(b: int, mesh) -> int:
  div = 1 if mesh is None else sharding.batch_size_divisor(mesh)
  return -(-_bucket(b, 1) // div) * div


def left_pad(prompts: Sequence[np.ndarray], length: int, batch: int | None = None,
             pad_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """(tokens [batch, length] int32, mask [batch, length] bool), prompts flush right.

  Rows beyond len(prompts) (batch bucketing) hold a single pad token so that no row is empty.
  """
  batch = batch or len(prompts)
  tokens = np.full((batch, length), pad_id, np.int32)
  mask = np.zeros((batch, length), bool)
  for b, p in enumerate(prompts):
    p = np.asarray(p).reshape(-1)
    if len(p):
      tokens[b, length - len(p):] = p
      mask[b, length - len(p):] = True
  mask[len(prompts):, -1] = True
  return tokens, mask


def positions_from_mask(mask):
  """Position of each real token among the real tokens of its row (pads get 0)."""
  return jnp.maximum(jnp.cumsum(mask.astype(jnp.int32), axis=1) - 1, 0)


def _cache_layout(prompt_mask, n_new: int):
  """(positions [B, P], lengths [B], kv_positions [B, P+N], kv_mask [B, P+N])."""
  positions = positions_from_mask(prompt_mask)
  lengths = prompt_mask.sum(1).astype(jnp.int32)
  new_pos = lengths[:, None] + jnp.arange(n_new, dtype=jnp.int32)[None]
  kv_positions = jnp.concatenate([positions, new_pos], axis=1)
  kv_mask = jnp.concatenate([prompt_mask.astype(bool),
                             jnp.ones((prompt_mask.shape[0], n_new), bool)], axis=1)
  return positions, lengths, kv_positions, kv_mask


def init_cache(cfg: ModelConfig, batch: int, max_len: int) -> dict:
  """Per-layer keys/values, stacked like the params: [layers, B, max_len, kv_heads, head_dim]."""
  shape = (cfg.n_layers, batch, max_len, cfg.kv_heads, cfg.head_dim)
  axes = ('layers', 'batch', 'length', 'kv_heads', 'head_dim')
  z = lambda: sharding.constrain(jnp.zeros(shape, cfg.dtype), axes)
  return {'k': z(), 'v': z()}


def cache_slots(cfg: ModelConfig, prompt_len: int, n_new: int, soft: int = 0) -> int:
  """KV cache slots a generation needs: one per token, except that a model whose every layer
  is a sliding-window one (Mistral) keeps only the last max(prompt, window) tokens, in a ring."""
  full = soft + prompt_len + n_new
  if soft or not cfg.sliding_window or not all(cfg.local_layers):
    return full
  return min(full, max(prompt_len, cfg.sliding_window))


def _slot_view(index, last, kv_pos, kv_mask, slots: int):
  """(cache write index, kv_positions [B, slots], kv_mask [B, slots]) for a call that writes the
  tokens from absolute index `index` to `last`. With fewer slots than tokens the cache is a
  ring: slot s holds the latest index j <= last with j % slots == s (none yet if j < 0), and the
  window mask keeps every query to the keys the ring still holds."""
  if slots >= kv_pos.shape[1]:   # static: every token has its own slot
    return index, kv_pos, kv_mask
  s = jnp.arange(slots)
  j = s + slots * ((last - s) // slots)
  jc = jnp.clip(j, 0, kv_pos.shape[1] - 1)
  return index % slots, kv_pos[:, jc], kv_mask[:, jc] & (j >= 0)[None]


def _step_logits(params, tokens, positions, cache, index, kv_positions, kv_mask, cfg):
  """Run tokens [B, T] through the model writing the cache at `index`; last-position logits."""
  h, cache = model.hidden_states(params, tokens, cfg, positions=positions, cache=cache,
                                 cache_index=index, kv_positions=kv_positions, kv_mask=kv_mask)
  return model.logits_from_hidden(params, h[:, -1:], cfg)[:, 0], cache


# Sampling loop ------------------------------------------------------------------------------
@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Generation:
  tokens: jax.Array         # [B, N] int32 new tokens, pad_id after a row ended
  mask: jax.Array           # [B, N] int32, 1 for real new tokens
  logprobs: jax.Array       # [B, N] float32 under the processed distribution, 0 where masked
  raw_logprobs: jax.Array   # [B, N] float32 under the model (log_softmax of raw logits)
  lengths: jax.Array        # [B] int32 new tokens per row
  prompt_tokens: jax.Array  # [B, P] int32, left-padded
  prompt_mask: jax.Array    # [B, P] int32
  steps: jax.Array          # [] int32 loop iterations run (fewer than N after an early exit)

  def sequences(self):
    """(tokens [B, P+N], mask [B, P+N]): prompt and continuation, as a teacher-forced pass sees them."""
    return (jnp.concatenate([self.prompt_tokens, self.tokens], 1),
            jnp.concatenate([self.prompt_mask, self.mask], 1))


def _decode(params, prompt_tokens, prompt_mask, active, key, knobs, ban, eos, *, cfg, flags,
            n_new):
  _TRACES['generate'] += 1
  b, p = prompt_tokens.shape
  pad = knobs['pad']
  positions, lengths, kv_pos, kv_mask = _cache_layout(prompt_mask, n_new)
  # A prompt-tuned model (lm/peft) writes its soft prompt into the first cache slots too.
  soft = params['soft_prompt'].shape[0] if 'soft_prompt' in params else 0
  slots = cache_slots(cfg, p, n_new, soft)
  cache = init_cache(cfg, b, slots)
  logits, cache = _step_logits(params, prompt_tokens, positions, cache,
                               *_slot_view(0, p - 1, kv_pos, kv_mask, slots), cfg)
  use_penalty = flags[4]
  # Tokens the repetition penalty applies to: every real prompt token, then each new one.
  rows = jnp.arange(b)[:, None]
  seen = (jnp.zeros((b, cfg.padded_vocab), bool).at[rows, prompt_tokens].max(prompt_mask.astype(bool))
          if use_penalty else None)
  zeros = lambda dt: jnp.zeros((b, n_new), dt)
  state = dict(i=jnp.int32(0), cache=cache, logits=logits, done=~active.astype(bool), seen=seen,
               tokens=zeros(jnp.int32), mask=zeros(jnp.int32), logprobs=zeros(jnp.float32),
               raw=zeros(jnp.float32))

  def cond(s):
    return (s['i'] < knobs['max_new']) & ~jnp.all(s['done'])

  def body(s):
    i, live = s['i'], ~s['done']
    early = i < knobs['min_new']
    step_ban = ban[None] | (eos[None] & early)
    x = process_logits(s['logits'], ban=step_ban, seen=s['seen'], flags=flags, knobs=knobs)
    if flags[0]:
      tok = jnp.argmax(x, axis=-1).astype(jnp.int32)
    else:
      tok = jax.random.categorical(jax.random.fold_in(key, i), x, axis=-1).astype(jnp.int32)
    lp = jnp.where(live, _token_logprob(x, tok), 0.0)
    raw = jnp.where(live, _token_logprob(s['logits'], tok), 0.0)
    tok = jnp.where(live, tok, pad)
    put = lambda buf, v: jax.lax.dynamic_update_slice_in_dim(buf, v[:, None].astype(buf.dtype), i, 1)
    out = dict(tokens=put(s['tokens'], tok), mask=put(s['mask'], live), logprobs=put(s['logprobs'], lp),
               raw=put(s['raw'], raw))
    done = s['done'] | (live & eos[tok])
    seen = s['seen'].at[jnp.arange(b), tok].set(True) if use_penalty else None
    logits, cache = _step_logits(params, tok[:, None], (lengths + i)[:, None], s['cache'],
                                 *_slot_view(p + i, p + i, kv_pos, kv_mask, slots), cfg)
    return dict(i=i + 1, cache=cache, logits=logits, done=done, seen=seen, **out)

  s = jax.lax.while_loop(cond, body, state)
  return dict(tokens=s['tokens'], mask=s['mask'], logprobs=s['logprobs'], raw_logprobs=s['raw'],
              lengths=s['mask'].sum(1).astype(jnp.int32), steps=s['i'])


def _param_shardings(params, cfg: ModelConfig, mesh):
  return sharding.tree_shardings(model.logical_axes(cfg), params, mesh)


def _with_mesh(fn, mesh):
  """Trace under the mesh so the layers' activation constraints see it (as lm.train does)."""
  @functools.wraps(fn)
  def call(*args):
    with sharding.activation_sharding(mesh):
      return fn(*args)
  return call


_PROGRAMS = compiled.Programs()   # unbounded: a handful of (kind, cfg, mesh, options) per run


def _jitted(kind: str, body, params, cfg: ModelConfig, mesh, batch_ndims: tuple, n_replicated: int,
            out_ndims: dict, **static):
  """One jax.jit per (kind, cfg, mesh, static options); jit's own cache handles the shapes.

  On a mesh: params by the rules table, per-row arrays (ndims `batch_ndims`, then
  `n_replicated` replicated args) and every output split over the batch axes.
  """
  def make():
    fn = functools.partial(body, cfg=cfg, **static)
    if mesh is None:
      return jax.jit(fn)
    rows = lambda nd: sharding.batch_sharding(mesh, nd) if nd else sharding.replicated(mesh)
    in_sh = ((_param_shardings(params, cfg, mesh),) + tuple(rows(nd) for nd in batch_ndims)
             + (sharding.replicated(mesh),) * n_replicated)
    out_sh = {k: rows(nd) for k, nd in out_ndims.items()}
    return _with_mesh(jax.jit(fn, in_shardings=in_sh, out_shardings=out_sh), mesh)
  return _PROGRAMS.get((kind, cfg, mesh, tuple(sorted(static.items()))), make)


def _check_decoder(cfg: ModelConfig):
  if cfg.arch != 'decoder' or not cfg.causal:
    raise ConfigError('lm.decode generates with causal decoder-only models (model.arch=decoder, '
                      'model.causal=True).')


_OUT_NDIMS = {'tokens': 2, 'mask': 2, 'logprobs': 2, 'raw_logprobs': 2, 'lengths': 1, 'steps': 0}


def generate_padded(params, prompt_tokens, prompt_mask, key, cfg: ModelConfig,
                    sampling: SamplingConfig, *, mesh=None, unsampleable=None,
                    active=None) -> Generation:
  """The jitted core on left-padded arrays [B, P] (B divisible by the mesh's batch axes).

  Returns a Generation with N = max_new_tokens (the program itself runs a bucketed N).
  `active` [B] marks real rows; inactive ones (batch padding) count as done from the start.
  """
  _check_decoder(cfg)
  b = prompt_tokens.shape[0]
  if mesh is not None and b % sharding.batch_size_divisor(mesh):
    raise ConfigError(f'A batch of {b} rows does not divide the mesh batch axes '
                      f'({sharding.batch_size_divisor(mesh)} ways); pad it (generate() does).')
  fn = _jitted('generate', _decode, params, cfg, mesh, (2, 2, 1), 4, _OUT_NDIMS,
               flags=_flags(sampling), n_new=_bucket(sampling.max_new_tokens))
  active = np.ones(b, bool) if active is None else active
  knobs = {**_knobs(sampling), 'pad': np.int32(sampling.pad_id)}
  out = fn(params, prompt_tokens, prompt_mask, active, key, knobs,
           _ban_mask(cfg, unsampleable), id_mask(sampling.eos_ids, cfg))
  n = sampling.max_new_tokens
  return Generation(tokens=out['tokens'][:, :n], mask=out['mask'][:, :n],
                    logprobs=out['logprobs'][:, :n], raw_logprobs=out['raw_logprobs'][:, :n],
                    lengths=out['lengths'], prompt_tokens=jnp.asarray(prompt_tokens),
                    prompt_mask=jnp.asarray(prompt_mask).astype(jnp.int32), steps=out['steps'])


def _as_prompt_list(prompts, prompt_lengths=None) -> list[np.ndarray]:
  if isinstance(prompts, (list, tuple)):
    return [np.asarray(p).reshape(-1) for p in prompts]
  arr = np.asarray(prompts)
  if arr.ndim == 1:
    return [arr]
  if prompt_lengths is None:
    return list(arr)
  return [row[:int(n)] for row, n in zip(arr, np.asarray(prompt_lengths))]


def generate(params, prompts, key, *, cfg: ModelConfig, sampling: SamplingConfig | None = None,
             mesh=None, unsampleable=None, prompt_lengths=None, max_new_tokens=None,
             temperature=None, top_k=None):
  """Continue each prompt; returns a Generation with rows in the order of `prompts`.

  prompts: a list of 1-D token arrays (any lengths), or a [B, P] array whose rows are all
  prompts, or a right-padded [B, P] array with `prompt_lengths` [B]. Prompt length, batch
  and max_new_tokens are bucketed (few programs); the batch bucket divides the mesh.
  `unsampleable`: ids (or a bool mask) never sampled, e.g. pad / BOS / special tokens.

  Legacy form (no `sampling`, max_new_tokens/temperature/top_k given): `sample(...)`.
  """
  if sampling is None:
    if max_new_tokens is None:
      raise ConfigError('generate needs sampling=SamplingConfig(...) (or the legacy max_new_tokens=).')
    return sample(params, prompts, key, cfg, max_new_tokens,
                  1.0 if temperature is None else temperature, top_k or 0)
  rows = _as_prompt_list(prompts, prompt_lengths)
  lengths = [len(r) for r in rows]
  if not rows or min(lengths) == 0:
    raise ConfigError('Every prompt needs at least one token (start empty prompts with a BOS id).')
  check_context(cfg, max(lengths), sampling.max_new_tokens)
  # Extra left padding is free: positions come from the mask, not from the slots.
  p = _bucket(max(lengths))
  b = _batch_bucket(len(rows), mesh)
  tokens, mask = left_pad(rows, p, b, sampling.pad_id)
  active = np.arange(b) < len(rows)
  gen = generate_padded(params, tokens, mask, key, cfg, sampling, mesh=mesh,
                        unsampleable=unsampleable, active=active)
  n = len(rows)
  return jax.tree.map(lambda x: x[:n] if x.ndim else x, gen)


# Beam search ---------------------------------------------------------------------------------
@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Beams:
  tokens: jax.Array     # [B, K, N] int32, best hypothesis first; pad_id after its end
  mask: jax.Array       # [B, K, N] int32
  lengths: jax.Array    # [B, K] int32 new tokens (an ending EOS included)
  scores: jax.Array     # [B, K] float32 sum_logprob / length ** length_penalty
  logprobs: jax.Array   # [B, K] float32 sum of the tokens' model log-probs


def _penalised(sum_logprob, length, alpha):
  return sum_logprob / jnp.asarray(length, jnp.float32) ** alpha


def _merge(pool: dict, new: dict, k: int) -> dict:
  """The k best of two sets of hypotheses (per row, by score; the pool wins ties)."""
  cat = {n: jnp.concatenate([pool[n], new[n]], axis=1) for n in pool}
  _, idx = jax.lax.top_k(cat['scores'], k)
  return {n: jnp.take_along_axis(v, idx.reshape(idx.shape + (1,) * (v.ndim - 2)), axis=1)
          for n, v in cat.items()}


def _beam_search(params, prompt_tokens, prompt_mask, ban, eos, alpha, *, cfg, num_beams, n_new,
                 early_stopping, pad_id):
  _TRACES['beam_search'] += 1
  b, p = prompt_tokens.shape
  k, v = num_beams, cfg.padded_vocab
  positions, lengths, kv_pos, kv_mask = _cache_layout(prompt_mask, n_new)
  # A prompt-tuned model (lm/peft) writes its soft prompt into the first cache slots too.
  soft = params['soft_prompt'].shape[0] if 'soft_prompt' in params else 0
  slots = cache_slots(cfg, p, n_new, soft)
  cache = init_cache(cfg, b, slots)
  logits, cache = _step_logits(params, prompt_tokens, positions, cache,
                               *_slot_view(0, p - 1, kv_pos, kv_mask, slots), cfg)
  # Prefill once per prompt, then give every beam its own copy of the rows: [B * K, ...].
  rep = lambda x, axis=0: jnp.repeat(x, k, axis=axis)
  cache = jax.tree.map(lambda c: rep(c, 1), cache)
  logits, lengths, kv_pos, kv_mask = rep(logits), rep(lengths), rep(kv_pos), rep(kv_mask)
  # Only beam 0 is alive at first, so the first step draws k distinct tokens.
  alive = {'tokens': jnp.full((b, k, n_new), pad_id, jnp.int32),
           'sums': jnp.where(jnp.arange(k) == 0, 0.0, NEG_INF) * jnp.ones((b, 1))}
  empty = lambda: {'scores': jnp.full((b, k), NEG_INF), 'logprobs': jnp.full((b, k), NEG_INF),
                   'lengths': jnp.zeros((b, k), jnp.int32),
                   'tokens': jnp.full((b, k, n_new), pad_id, jnp.int32)}
  state = dict(t=jnp.int32(0), cache=cache, logits=logits, alive=alive, pool=empty(),
               done=jnp.zeros(b, bool))

  def cond(s):
    return (s['t'] < n_new) & ~jnp.all(s['done'])

  def body(s):
    t, alive, pool = s['t'], s['alive'], s['pool']
    logp = jnp.where(ban, NEG_INF, jax.nn.log_softmax(s['logits'], axis=-1)).reshape(b, k, v)
    cand = (alive['sums'][:, :, None] + logp).reshape(b, k * v)
    extend = lambda idx: jnp.take_along_axis(alive['tokens'], (idx // v)[:, :, None], axis=1).at[
        :, :, t].set((idx % v).astype(jnp.int32))
    # Hypotheses that end here: an EOS among the k best candidates of this step (as in HF, so
    # one beam with early stopping is exactly greedy decoding).
    kth = jax.lax.top_k(cand, k)[0][:, -1:]
    is_eos = jnp.tile(eos, k)[None]
    ended = jnp.where(is_eos & (cand >= kth), cand, NEG_INF)
    e_sum, e_idx = jax.lax.top_k(ended, k)
    new = {'scores': _penalised(e_sum, t + 1, alpha), 'logprobs': e_sum,
           'lengths': jnp.full((b, k), t + 1, jnp.int32), 'tokens': extend(e_idx)}
    merged = _merge(pool, new, k)
    keep = s['done'][:, None]
    pool = {n: jnp.where(keep.reshape(keep.shape + (1,) * (x.ndim - 2)), pool[n], x)
            for n, x in merged.items()}
    # The k best continuations that do not end.
    a_sum, a_idx = jax.lax.top_k(jnp.where(is_eos, NEG_INF, cand), k)
    alive = {'tokens': extend(a_idx), 'sums': a_sum}
    parent = (jnp.arange(b)[:, None] * k + a_idx // v).reshape(-1)
    cache = jax.tree.map(lambda c: c[:, parent], s['cache'])
    tok = (a_idx % v).reshape(-1).astype(jnp.int32)
    logits, cache = _step_logits(params, tok[:, None], (lengths + t)[:, None], cache,
                                 *_slot_view(p + t, p + t, kv_pos, kv_mask, slots), cfg)
    # Stop a row once k hypotheses have ended and (early_stopping) or no alive beam can still
    # beat the worst of them: its sum only falls, and its best length is the longest (alpha > 0)
    # or the shortest (alpha <= 0) still possible. That bound makes the stop exact.
    best = a_sum[:, 0]
    length = jnp.where(alpha > 0, n_new, t + 2)
    hopeless = (pool['scores'][:, -1] >= _penalised(best, length, alpha)) | (best == NEG_INF)
    full = pool['scores'][:, -1] > NEG_INF
    done = s['done'] | (full & (early_stopping | hopeless)) | (best == NEG_INF)
    return dict(t=t + 1, cache=cache, logits=logits, alive=alive, pool=pool, done=done)

  s = jax.lax.while_loop(cond, body, state)
  # Rows still searching at max_new_tokens: their alive beams end there too.
  alive = s['alive']
  last = {'scores': _penalised(alive['sums'], n_new, alpha), 'logprobs': alive['sums'],
          'lengths': jnp.full((b, k), n_new, jnp.int32), 'tokens': alive['tokens']}
  fin = _merge(s['pool'], last, k)
  pool = {n: jnp.where(s['done'].reshape((b,) + (1,) * (x.ndim - 1)), s['pool'][n], x)
          for n, x in fin.items()}
  mask = (jnp.arange(n_new) < pool['lengths'][..., None]).astype(jnp.int32)
  return dict(tokens=jnp.where(mask > 0, pool['tokens'], pad_id), mask=mask,
              lengths=pool['lengths'], scores=pool['scores'], logprobs=pool['logprobs'])


def beam_search(params, prompt, *, cfg: ModelConfig, num_beams: int, max_new_tokens: int,
                length_penalty: float = 1.0, eos_ids: Sequence[int] = (), early_stopping=False,
                unsampleable=None, pad_id: int = 0, mesh=None) -> Beams:
  """Beam search (GNMT / HF scoring: sum_logprob / length ** length_penalty) for one prompt
  (1-D) or a list of prompts; returns each prompt's num_beams best hypotheses, best first.

  A beam that produces an EOS id is finished and kept (among the num_beams best ending
  hypotheses of each row); beams still going at max_new_tokens end there. The search stops
  early once num_beams hypotheses have ended and either `early_stopping` or (exactly) no
  live beam can beat them. With num_beams=1 and early_stopping it is greedy decoding.
  """
  _check_decoder(cfg)
  rows = _as_prompt_list(prompt)
  if min(len(r) for r in rows) == 0:
    raise ConfigError('Every prompt needs at least one token (start empty prompts with a BOS id).')
  if num_beams < 1:
    raise ConfigError(f'num_beams must be >= 1, got {num_beams}.')
  check_context(cfg, max(len(r) for r in rows), max_new_tokens)
  b = _batch_bucket(len(rows), mesh)
  tokens, mask = left_pad(rows, _bucket(max(len(r) for r in rows)), b, pad_id)
  out_ndims = {'tokens': 3, 'mask': 3, 'lengths': 2, 'scores': 2, 'logprobs': 2}
  fn = _jitted('beam_search', _beam_search, params, cfg, mesh, (2, 2), 3, out_ndims,
               num_beams=num_beams, n_new=max_new_tokens, early_stopping=bool(early_stopping),
               pad_id=pad_id)
  out = fn(params, tokens, mask, _ban_mask(cfg, unsampleable), id_mask(tuple(eos_ids), cfg),
           np.float32(length_penalty))
  return Beams(**{n: x[:len(rows)] for n, x in out.items()})


# Stop strings (host side) -------------------------------------------------------------------
def truncate_at_stop(texts: Sequence[str], stop_strings: Sequence[str]) -> tuple[list[str], np.ndarray]:
  """Cut each decoded text before its first stop string; also which rows contained one.

  Stop strings live on the host: a string may span several tokens, or part of one, so no
  token id test inside the loop can find it. Rows whose `hit` is False never produced any
  (they ran to max_new_tokens or ended on an EOS id).
  """
  out, hit = [], np.zeros(len(texts), bool)
  for i, t in enumerate(texts):
    cuts = [t.find(s) for s in stop_strings if s and s in t]
    if cuts:
      hit[i] = True
      t = t[:min(cuts)]
    out.append(t)
  return out, hit


# Legacy sampler (free-running samples during pretraining) ----------------------------------
def sample_logits(logits: jax.Array, key: jax.Array, temperature: float = 1.0,
                  top_k: int = 0) -> jax.Array:
  """Greedy (temperature 0), or sampling from softmax(logits / T) restricted to the top k."""
  if temperature == 0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits / temperature
  if top_k:
    logits = apply_top_k(logits, top_k)
  return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def sample(params: dict, prompt, key: jax.Array, cfg: ModelConfig, max_new_tokens: int,
           temperature: float = 1.0, top_k: int = 0) -> jax.Array:
  """prompt [B, P] (all rows full) -> [B, P + max_new_tokens]: the prompt, then new tokens.

  Within the context this is `generate_padded`; beyond it, like nanoGPT's sampler, each
  token is predicted from the last max_seq_len tokens by a full forward pass (a sliding
  window; slower, but any length works).
  """
  prompt = jnp.asarray(prompt, jnp.int32)
  b, p = prompt.shape
  if p + max_new_tokens > cfg.max_seq_len:
    return _generate_sliding(params, prompt, key, cfg, max_new_tokens, temperature, top_k)
  s = SamplingConfig(temperature=temperature, top_k=top_k, max_new_tokens=max_new_tokens)
  gen = generate_padded(params, prompt, jnp.ones((b, p), bool), key, cfg, s)
  return jnp.concatenate([prompt, gen.tokens], axis=1)


@functools.partial(jax.jit, static_argnums=(3, 4, 5, 6))
def _generate_sliding(params, prompt, key, cfg, max_new_tokens, temperature, top_k):
  b, p = prompt.shape
  w = cfg.max_seq_len
  # Left-pad into a window buffer; `filled` counts real tokens so padding is never attended.
  buf = jnp.zeros((b, w), prompt.dtype)
  keep = min(p, w)
  buf = buf.at[:, w - keep:].set(prompt[:, p - keep:])

  def step(carry, i):
    buf, filled = carry
    start = w - filled
    pos = jnp.broadcast_to(jnp.maximum(jnp.arange(w) - start, 0), (b, w))
    seg = jnp.broadcast_to((jnp.arange(w) >= start).astype(jnp.int32), (b, w))
    logits, _ = model.forward(params, buf, cfg, positions=pos, segment_ids=seg)
    nxt = sample_logits(logits[:, -1], jax.random.fold_in(key, i), temperature, top_k)
    buf = jnp.concatenate([buf[:, 1:], nxt[:, None]], axis=1)
    return (buf, jnp.minimum(filled + 1, w)), nxt

  _, new = jax.lax.scan(step, (buf, jnp.int32(keep)), jnp.arange(max_new_tokens))
  return jnp.concatenate([prompt, new.T], axis=1)
