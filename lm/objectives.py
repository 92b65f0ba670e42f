"""Losses. Each returns (weighted loss sum, total weight, metric sums).

Returning sums rather than means lets `lm.train` accumulate gradients over
microbatches exactly: the step divides by the total weight once, so k microbatches
of b rows give the same update as one batch of k*b rows, however the valid tokens
are spread among them.
"""
from __future__ import annotations

import chex
import jax
import jax.numpy as jnp

from lm import encdec, model
from lm.config import ModelConfig


def token_nll(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """Per-token negative log-likelihood, in float32."""
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  return -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]


TOKEN_KEYS = ('inputs', 'targets', 'positions', 'segment_ids')


def check_batch(batch: dict) -> None:
  """The loss boundary: integer [B, T] tokens, float weights, and targets / weights / positions / segment ids
  of exactly that shape (a [B, 1] weight would silently broadcast). chex looks only at
  shapes and dtypes, so under jit this runs once at trace time and costs the step nothing."""
  chex.assert_rank(batch['inputs'], 2)
  chex.assert_equal_shape([batch[k] for k in (*TOKEN_KEYS, 'weights') if k in batch])
  chex.assert_type([batch[k] for k in TOKEN_KEYS if k in batch], int)
  if 'weights' in batch:
    chex.assert_type(batch['weights'], float)


def _forward(params, tokens, batch, cfg, **kw):
  """Logits plus the auxiliary loss (MoE balance and z-losses; 0 for dense models)."""
  logits, _, aux = model.forward(params, tokens, cfg, positions=batch.get('positions'),
                                 segment_ids=batch.get('segment_ids'), return_aux=True, **kw)
  extra = 0.0
  if aux:
    extra = cfg.moe_balance_weight * aux['moe_balance_loss'] + cfg.moe_z_weight * aux['moe_z_loss']
  return logits, extra, aux


def _sums(nll, logits, targets, w, extra, aux):
  """(loss sum, weight, metric sums); per-batch aux terms are scaled by the weight so that
  dividing by the total weight (lm.train) gives their mean."""
  total = jnp.sum(w)
  correct = (jnp.argmax(logits, -1) == targets).astype(jnp.float32)
  metrics = {'accuracy': jnp.sum(correct * w), **{k: v * total for k, v in aux.items()}}
  return jnp.sum(nll * w) + extra * total, total, metrics


def next_token_loss(params: dict, batch: dict, rng: jax.Array, cfg: ModelConfig):
  """Causal language modelling: predict batch['targets'] from batch['inputs'].

  batch: inputs, targets [B, T] int32; weights [B, T] float32 (0 = no loss there);
  optional segment_ids / positions [B, T] for packed sequences.
  """
  del rng  # deterministic objective (no dropout)
  check_batch(batch)
  logits, extra, aux = _forward(params, batch['inputs'], batch, cfg)
  nll = token_nll(logits, batch['targets'])
  return _sums(nll, logits, batch['targets'], batch['weights'].astype(jnp.float32), extra, aux)


def prefix_lm_loss(params: dict, batch: dict, rng: jax.Array, cfg: ModelConfig):
  """Prefix LM (Raffel et al. 2020; UniLM): each row gets a random prefix length p in
  [1, T-1]; attention is bidirectional over the prefix and causal after it, and only
  tokens after the prefix are predicted. The prefix is drawn from the step's rng, so
  any next-token batch serves.
  """
  check_batch(batch)
  b, t = batch['inputs'].shape
  prefix_len = jax.random.randint(rng, (b,), 1, t)
  logits, extra, aux = _forward(params, batch['inputs'], batch, cfg, prefix_len=prefix_len)
  # input position i predicts token i+1; tokens 1..p-1 are inside the prefix (seen), so
  # the first predicted token is p, from position p-1.
  after = jnp.arange(t)[None, :] >= prefix_len[:, None] - 1
  w = batch['weights'].astype(jnp.float32) * after
  nll = token_nll(logits, batch['targets'])
  return _sums(nll, logits, batch['targets'], w, extra, aux)


def bert_masking(rng: jax.Array, tokens: jax.Array, vocab_size: int, mask_id: int,
                 rate: float = 0.15, weights: jax.Array | None = None):
  """BERT's recipe (Devlin et al. 2019): choose `rate` of the tokens; of those, 80% become
  [MASK], 10% a random token, 10% stay. Returns (corrupted tokens, chosen mask)."""
  k1, k2, k3 = jax.random.split(rng, 3)
  chosen = jax.random.uniform(k1, tokens.shape) < rate
  if weights is not None:
    chosen = chosen & (weights > 0)
  action = jax.random.uniform(k2, tokens.shape)
  random_tokens = jax.random.randint(k3, tokens.shape, 0, vocab_size)
  corrupted = jnp.where(chosen & (action < 0.8), mask_id, tokens)
  corrupted = jnp.where(chosen & (action >= 0.8) & (action < 0.9), random_tokens, corrupted)
  return corrupted.astype(tokens.dtype), chosen


def masked_lm_loss(params: dict, batch: dict, rng: jax.Array, cfg: ModelConfig, rate: float = 0.15):
  """Masked LM on a bidirectional model: predict the original tokens at the chosen positions.

  [MASK] is the first id past the tokenizer's vocabulary (a padding row of the embedding,
  never predicted: padded logits are masked).
  """
  check_batch(batch)
  tokens = batch['inputs']
  corrupted, chosen = bert_masking(rng, tokens, cfg.vocab_size, cfg.vocab_size, rate, batch['weights'])
  logits, extra, aux = _forward(params, corrupted, batch, cfg)
  nll = token_nll(logits, tokens)
  return _sums(nll, logits, tokens, chosen.astype(jnp.float32), extra, aux)


# Span corruption (T5) -------------------------------------------------------------------------
def span_counts(length: int, density: float = 0.15, mean_span: float = 3.0) -> tuple[int, int]:
  """(noise tokens, noise spans) for a raw window of `length` tokens, as T5 rounds them."""
  noise = min(max(int(round(length * density)), 1), length - 1)
  return noise, max(int(round(noise / mean_span)), 1)


def span_lengths(length: int, density: float = 0.15, mean_span: float = 3.0) -> tuple[int, int]:
  """(encoder input length, target length) after corrupting `length` tokens: the inputs keep
  the non-noise tokens plus one sentinel per span; the targets hold each span behind its
  sentinel (one sentinel per non-noise span, which precedes each noise span)."""
  noise, spans = span_counts(length, density, mean_span)
  return length - noise + spans, noise + spans


def num_special_ids(length: int, density: float = 0.15, mean_span: float = 3.0) -> int:
  """Ids span corruption reserves past the tokenizer's vocabulary: a decoder start id and
  one sentinel per span."""
  return 1 + span_counts(length, density, mean_span)[1]


def _segment(rng, n: int, k: int) -> jax.Array:
  """Lengths of a uniformly random split of n items into k non-empty runs."""
  first = jax.random.permutation(rng, jnp.arange(n - 1) < k - 1)
  seg = jnp.cumsum(jnp.concatenate([jnp.zeros(1, jnp.int32), first.astype(jnp.int32)]))
  return jax.ops.segment_sum(jnp.ones(n, jnp.int32), seg, num_segments=k)


def noise_mask(rng, length: int, density: float = 0.15, mean_span: float = 3.0) -> jax.Array:
  """T5's random_spans_noise_mask: `spans` noise runs interleaved with as many non-noise
  runs, starting with non-noise; exactly round(density * length) noise tokens."""
  noise, spans = span_counts(length, density, mean_span)
  k1, k2 = jax.random.split(rng)
  runs = jnp.stack([_segment(k1, length - noise, spans), _segment(k2, noise, spans)], 1).reshape(-1)
  starts = jnp.cumsum(runs)[:-1]
  run_id = jnp.cumsum(jnp.zeros(length, jnp.int32).at[starts].set(1))
  return run_id % 2 == 1


def _sentinelise(tokens, mask, first_sentinel: int, out_len: int):
  """Each run of masked tokens becomes one sentinel (first_sentinel + run index); the other
  masked tokens are removed and the rest shift left (static output length)."""
  prev = jnp.concatenate([jnp.zeros(1, bool), mask[:-1]])
  first = mask & ~prev
  out = jnp.where(first, first_sentinel + jnp.cumsum(first) - 1, tokens)
  keep = ~(mask & prev)
  dest = jnp.where(keep, jnp.cumsum(keep) - 1, out_len)
  return jnp.zeros(out_len, tokens.dtype).at[dest].set(out, mode='drop')


def span_corrupt(rng, tokens: jax.Array, first_special: int, density: float = 0.15,
                 mean_span: float = 3.0) -> dict[str, jax.Array]:
  """T5 span corruption of [B, L] windows (Raffel et al. 2020, section 3.1.4).

  Ids first_special (decoder start) and first_special + 1 + i (sentinel i) lie past the
  tokenizer's vocabulary. Returns inputs [B, Le], targets [B, Ld] and decoder_inputs
  (targets shifted right behind the start id), with (Le, Ld) = span_lengths(L).
  """
  b, length = tokens.shape
  le, ld = span_lengths(length, density, mean_span)
  masks = jax.vmap(lambda k: noise_mask(k, length, density, mean_span))(jax.random.split(rng, b))
  sentinel = first_special + 1
  inputs = jax.vmap(lambda t, m: _sentinelise(t, m, sentinel, le))(tokens, masks)
  targets = jax.vmap(lambda t, m: _sentinelise(t, ~m, sentinel, ld))(tokens, masks)
  start = jnp.full((b, 1), first_special, tokens.dtype)
  return {'inputs': inputs, 'targets': targets,
          'decoder_inputs': jnp.concatenate([start, targets[:, :-1]], 1), 'noise_mask': masks}


def decoder_span_length(window: int, density: float = 0.15, mean_span: float = 3.0) -> int:
  """The longest raw length whose corrupted inputs + targets fit one decoder window."""
  n = window
  while n > 2 and sum(span_lengths(n, density, mean_span)) > window:
    n -= 1
  return n


def span_corruption_loss(params: dict, batch: dict, rng: jax.Array, cfg: ModelConfig,
                         density: float = 0.15, mean_span: float = 3.0):
  """Span corruption: predict the dropped spans, each behind its sentinel.

  The special ids are the top num_special_ids(...) of cfg.vocab_size (the pretraining
  driver adds them to the tokenizer's vocabulary). An encoder-decoder reads the corrupted
  inputs and decodes the targets; a decoder-only model reads [inputs, start, targets] as
  one prefix-LM sequence (bidirectional over inputs + start) and is scored on the
  targets only. The window is treated as one sequence (packing boundaries are ignored).
  """
  check_batch(batch)
  tokens = batch['inputs']
  t = tokens.shape[1]
  raw = t if cfg.arch == 'encoder_decoder' else decoder_span_length(t, density, mean_span)
  first_special = cfg.vocab_size - num_special_ids(raw, density, mean_span)
  c = span_corrupt(rng, tokens[:, :raw], first_special, density, mean_span)
  targets = c['targets']
  w = jnp.ones(targets.shape, jnp.float32)
  if cfg.arch == 'encoder_decoder':
    logits, aux = encdec.forward(params, c['inputs'], c['decoder_inputs'], cfg)
    return _sums(token_nll(logits, targets), logits, targets, w, 0.0, aux)
  le = c['inputs'].shape[1]
  seq = jnp.concatenate([c['inputs'], c['decoder_inputs']], 1)
  prefix = jnp.full((seq.shape[0],), le + 1, jnp.int32)
  logits, extra, aux = _forward(params, seq, {}, cfg, prefix_len=prefix)
  logits = logits[:, le:]       # position le (the start id) predicts targets[0]
  return _sums(token_nll(logits, targets), logits, targets, w, extra, aux)


OBJECTIVES = {'next_token': next_token_loss, 'prefix_lm': prefix_lm_loss, 'masked_lm': masked_lm_loss,
              'span_corruption': span_corruption_loss}
