"""The bursty in-context-learning testbed (Chan et al. 2022; Olsson et al. 2022): sequences,
the model trained on them, and the probes the `icl_induction` and `icl_sweep` experiments read."""
from __future__ import annotations

import functools
import json
import os
import time
import jax
import jax.numpy as jnp
import numpy as np
from ml_collections import ConfigDict
from data import corpora
from experiments.stages import stage
from data import tokenizers
from lm import model, objectives, probe, sharding, train as train_lib
from lm.config import ConfigError, ModelConfig


LETTERS = 'abcdefghijklmnopqrstuvwxyz'


DIGITS = '0123456789'


# Repeated segments draw from every printable character: with a large alphabet a segment rarely
# repeats a character, so "copy what followed this token last time" is rarely ambiguous.
ALPHABET = LETTERS + DIGITS + ' ' + LETTERS.upper() + '!"#$%&\'()*+,-./:;<=>?@[\\]^_`{|}~'


def tokenizer() -> tokenizers.CharTokenizer:
  return tokenizers.CharTokenizer(ALPHABET)


# Synthetic data --------------------------------------------------------------------------------
def random_word(rng: np.random.Generator, n: int) -> str:
  return ''.join(rng.choice(list(LETTERS), n))


def pair_text(distractor: str, entity: str, label: str) -> str:
  """One bursty item: 'nn eeL'. The label follows the entity's last character directly, so
  a one-token induction head (copy what followed this character before) can answer it."""
  return f'{distractor} {entity}{label}'


def bursty_sequence(rng: np.random.Generator, length: int, s: ConfigDict) -> tuple[str, list[tuple[int, bool]]]:
  """One bursty row as text (>= length chars) and [(label char index, entity seen before?)];
  the readable twin of `bursty_tokens` (same layout)."""
  n = int(rng.integers(s.min_entities, s.max_entities + 1))
  entities = []
  while len(entities) < n:   # distinct last characters: the label is determined by one token
    e = random_word(rng, s.word_len)
    if all(e[-1] != f[-1] for f in entities):
      entities.append(e)
  labels = rng.choice(list(DIGITS[:s.n_labels]), n)
  text, marks, seen = '', [], set()
  while len(text) < length:
    i = int(rng.integers(n))
    item = pair_text(random_word(rng, s.word_len), entities[i], labels[i])
    marks.append((len(text) + len(item) - 1, i in seen))
    seen.add(i)
    text += item + ' '
  return text, marks


def bursty_tokens(rng: np.random.Generator, rows: int, length: int, s: ConfigDict):
  """Vectorised bursty rows: (alphabet indices [rows, length], label mask [rows, length] with 1
  where a label's entity came earlier in the row, 2 where it is new). Each row has its own
  entities (distinct last letters) and labels; items are 'nn eeL ' as in pair_text."""
  w, n_max = s.word_len, s.max_entities
  width = 2 * w + 3                                   # 'nn' ' ' 'ee' 'L' ' '
  pairs = -(-length // width)
  n = rng.integers(s.min_entities, n_max + 1, rows)
  last = rng.random((rows, 26)).argsort(1)[:, :n_max]                     # distinct last letters
  ent = np.concatenate([rng.integers(0, 26, (rows, n_max, w - 1)), last[..., None]], -1)
  lab = rng.integers(0, s.n_labels, (rows, n_max)) + 26                  # digits follow letters
  pick = (rng.random((rows, pairs)) * n[:, None]).astype(int)             # which entity per item
  space = ALPHABET.index(' ')
  item = np.concatenate([rng.integers(0, 26, (rows, pairs, w)), np.full((rows, pairs, 1), space),
                         ent[np.arange(rows)[:, None], pick],
                         np.take_along_axis(lab, pick, 1)[..., None],
                         np.full((rows, pairs, 1), space)], -1)
  seen = (pick[:, :, None] == pick[:, None, :]) & np.tril(np.ones((pairs, pairs), bool), -1)[None]
  mask = np.zeros((rows, pairs, width), np.int32)
  mask[:, :, 2 * w + 1] = np.where(seen.any(-1), 1, 2)
  return item.reshape(rows, -1)[:, :length], mask.reshape(rows, -1)[:, :length]


def repeat_sequence(rng: np.random.Generator, length: int, s: ConfigDict) -> str:
  period = int(rng.integers(s.min_period, max(s.min_period, length // 2) + 1))
  seg = ''.join(rng.choice(list(ALPHABET), period))
  return (seg * (length // period + 1))[:length]


def repeat_tokens(rng: np.random.Generator, rows: int, length: int, s: ConfigDict) -> np.ndarray:
  """Vectorised repeat rows: alphabet indices [rows, length], a random segment repeated."""
  period = rng.integers(s.min_period, max(s.min_period, length // 2) + 1, rows)
  seg = rng.integers(0, len(ALPHABET), (rows, int(period.max())))
  return seg[np.arange(rows)[:, None], np.arange(length)[None] % period[:, None]]


def batch(rng: np.random.Generator, tok, rows: int, length: int, s: ConfigDict):
  """Token rows [rows, length + 1], kinds [rows] (1 = bursty), and label masks [rows, length]
  on the *target* index of each label: 1 its entity came before in the row, 2 first time."""
  ids = tok.encode(ALPHABET)                           # alphabet index -> token id
  kinds = (rng.random(rows) >= s.repeat_fraction).astype(np.int32)
  rep = repeat_tokens(rng, rows, length + 1, s)
  bur, marks = bursty_tokens(rng, rows, length + 1, s)
  toks = ids[np.where(kinds[:, None] == 1, bur, rep)].astype(np.int32)
  labels = np.where(kinds[:, None] == 1, marks, 0)[:, 1:].astype(np.int32)
  return toks, kinds, labels


def as_batch(toks: np.ndarray) -> dict:
  return {'inputs': toks[:, :-1], 'targets': toks[:, 1:],
          'weights': np.ones(toks[:, 1:].shape, np.float32)}


# Config ----------------------------------------------------------------------------------------
def check(config: ConfigDict) -> None:
  s, p = config.synthetic, config.probe
  if not 0.0 <= s.repeat_fraction <= 1.0:
    raise ConfigError(f'synthetic.repeat_fraction={s.repeat_fraction} must be in [0, 1].')
  if not 1 <= s.min_entities <= s.max_entities <= len(LETTERS):
    raise ConfigError('synthetic needs 1 <= min_entities <= max_entities <= 26 (distinct last letters).')
  if not 2 <= s.n_labels <= len(DIGITS):
    raise ConfigError(f'synthetic.n_labels={s.n_labels} must be in [2, 10] (label digits).')
  if s.word_len < 1 or s.min_period < 2:
    raise ConfigError('synthetic.word_len must be >= 1 and synthetic.min_period >= 2.')
  if p.every < 1 or p.batch < 1:
    raise ConfigError('probe.every and probe.batch must be >= 1.')
  if config.train.steps < 1 and not config.init_from:
    raise ConfigError('train.steps must be >= 1 (or give init_from to probe a checkpoint).')


def model_config(config: ConfigDict, vocab_size: int) -> ModelConfig:
  m = config.model.to_dict()
  m['vocab_size'] = m['vocab_size'] or vocab_size
  if m['vocab_size'] != vocab_size:
    raise ConfigError(f'model.vocab_size={m["vocab_size"]} does not match the {vocab_size} '
                      'synthetic characters; set it to 0.')
  return ModelConfig.from_dict(m)


# Probes ----------------------------------------------------------------------------------------
def make_probe(cfg: ModelConfig, period: int, early: int, late: int, window: int):
  """jit(params, repeated, held_out, label_mask) -> scalars and per-head score arrays."""
  def fn(params, repeated, held_out, label_mask):
    probs = probe.attention_probs(params, repeated, cfg)
    ind = probe.induction_scores(probs, period)
    prev = probe.previous_token_scores(probs)
    logits, _ = model.forward(params, held_out[:, :-1], cfg)
    logp = jax.nn.log_softmax(logits, -1)
    losses = -jnp.take_along_axis(logp, held_out[:, 1:, None], -1)[..., 0]
    correct = (jnp.argmax(logits, -1) == held_out[:, 1:]).astype(jnp.float32)
    seen = (label_mask == 1).astype(jnp.float32)
    first = (label_mask == 2).astype(jnp.float32)
    return {'induction': ind, 'previous_token': prev, 'losses': losses,
            'label_acc_seen': (correct * seen).sum() / jnp.maximum(seen.sum(), 1),
            'label_acc_first': (correct * first).sum() / jnp.maximum(first.sum(), 1)}
  return jax.jit(fn)


def summarize(out: dict, early: int, late: int, window: int, kinds: np.ndarray) -> dict:
  losses = np.asarray(out['losses'])
  ind, prev = np.asarray(out['induction']), np.asarray(out['previous_token'])
  row = {'induction_max': float(ind.max()), 'previous_token_max': float(prev.max()),
         'induction': ind.round(4).tolist(), 'previous_token': prev.round(4).tolist(),
         'icl_score': probe.icl_score(losses, early, late, window),
         'held_out_loss': float(losses.mean()),
         'label_acc_seen': float(out['label_acc_seen']),
         'label_acc_first': float(out['label_acc_first'])}
  for name, k in (('repeat', 0), ('bursty', 1)):
    if (kinds == k).any():
      row[f'icl_score_{name}'] = probe.icl_score(losses[kinds == k], early, late, window)
  return row


def rise_step(rows: list[dict], key: str, threshold: float) -> int | None:
  """First probed step at which rows[key] reaches threshold."""
  return next((r['step'] for r in rows if r[key] >= threshold), None)


def plot(rows: list[dict], path: str, threshold: float) -> None:
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  steps = [r['step'] for r in rows]
  fig, axes = plt.subplots(1, 3, figsize=(15, 4))
  ind = np.asarray([r['induction'] for r in rows])            # [steps, L, H]
  for layer in range(ind.shape[1]):
    for h in range(ind.shape[2]):
      axes[0].plot(steps, ind[:, layer, h], lw=1, label=f'L{layer}H{h}')
  axes[0].axhline(threshold, ls=':', c='gray')
  axes[0].set(xlabel='step', ylabel='induction (prefix-matching) score', title='per-head induction score')
  axes[0].legend(fontsize=6, ncol=2)
  axes[1].plot(steps, [r['icl_score'] for r in rows], label='all held-out')
  for k in ('icl_score_repeat', 'icl_score_bursty'):
    if k in rows[0]:
      axes[1].plot(steps, [r[k] for r in rows], label=k.replace('icl_score_', ''))
  axes[1].set(xlabel='step', ylabel='loss(late) - loss(early), nats', title='in-context-learning score')
  axes[1].legend()
  axes[2].plot(steps, [r['label_acc_seen'] for r in rows], label='label, entity seen before')
  axes[2].plot(steps, [r['label_acc_first'] for r in rows], label='label, first occurrence')
  axes[2].plot(steps, [r['previous_token_max'] for r in rows], label='max previous-token score')
  axes[2].set(xlabel='step', title='bursty labels: accuracy', ylim=(0, 1.02))
  axes[2].legend()
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


# Training --------------------------------------------------------------------------------------
def save_run(config: ConfigDict, workdir: str, cfg: ModelConfig, tok, setup, state, step: int) -> None:
  """A workdir read_source understands: config.json (model + resolved vocab), the tokenizer
  pointer and a checkpoint of the final state."""
  tok.save(os.path.join(workdir, tokenizers.RUN_FILE))
  with open(os.path.join(workdir, 'config.json'), 'w') as f:
    json.dump({**config.to_dict(), 'resolved': {'vocab_size': cfg.vocab_size}}, f, indent=2, default=str)
  setup.checkpointer.save(step, state, {}, {}, force=True)
  setup.checkpointer.wait()


def train_model(config: ConfigDict, workdir: str, log=print) -> tuple[dict, ModelConfig, object, list]:
  """Train the synthetic model into workdir (resuming a finished one: no steps), probing as it
  goes. Returns (params on the host, cfg, tokenizer, probe rows)."""
  os.makedirs(workdir, exist_ok=True)
  tok = tokenizer()
  cfg = model_config(config, tok.vocab_size)
  t, s, p = config.train, config.synthetic, config.probe
  length = cfg.max_seq_len
  mesh = sharding.make_mesh(config.mesh.to_dict())
  div = sharding.batch_size_divisor(mesh)
  if t.batch_size % div or p.batch % div:
    raise ConfigError(f'train.batch_size={t.batch_size} and probe.batch={p.batch} must divide over '
                      f'the {div} devices of the batch mesh axes.')
  setup = stage.build(config, workdir, mesh, axes=model.logical_axes(cfg),
                      init_params=functools.partial(model.init, cfg), total_steps=t.steps)
  spec = {k: jax.ShapeDtypeStruct(v.shape, v.dtype)
          for k, v in as_batch(np.zeros((t.batch_size, length + 1), np.int32)).items()}
  batch_sh = train_lib.batch_shardings(mesh, spec)
  loss_fn = functools.partial(objectives.next_token_loss, cfg=cfg)
  step_fn = train_lib.make_train_step(loss_fn, setup.tx, mesh, setup.shardings, batch_sh,
                                      seed=config.seed, schedule=setup.schedule)
  # held-out probes, fixed for the whole run (their own seed stream)
  prng = np.random.default_rng([config.seed, 1])
  period = p.period or length // 2
  repeated = probe.repeated_tokens(jax.random.key(config.seed + 1), p.batch, period, tok.vocab_size,
                                   repeats=-(-length // period))[:, :length]
  held, kinds, label_mask = batch(prng, tok, p.batch, length, s)
  early, late = probe.icl_indices(length) if not p.early else (p.early, p.late)
  probe_fn = make_probe(cfg, period, early, late, p.window)
  put = lambda x: jax.device_put(x, sharding.batch_sharding(mesh, x.ndim))
  args = (put(np.asarray(repeated)), put(held), put(label_mask))
  rows, state = [], setup.state
  metrics_path = os.path.join(workdir, 'metrics.jsonl')
  mode = 'a' if setup.start else 'w'
  drng = lambda step: np.random.default_rng([config.seed, 0, step])   # batch i: f(seed, i)
  t0 = time.perf_counter()
  with open(metrics_path, mode) as f:
    def probe_at(step, loss):
      with sharding.activation_sharding(mesh):
        out = jax.device_get(probe_fn(state.params, *args))
      row = {'step': step, 'train_loss': loss, 'seconds': time.perf_counter() - t0,
             **summarize(out, early, late, p.window, kinds)}
      rows.append(row)
      f.write(json.dumps(row) + '\n')
      f.flush()
      log(f'step {step:5d}  loss {loss if loss is None else round(loss, 3)}  induction '
          f'{row["induction_max"]:.3f}  prev-token {row["previous_token_max"]:.3f}  ICL score '
          f'{row["icl_score"]:+.3f}  label acc (seen) {row["label_acc_seen"]:.3f}')
    if setup.start == 0:
      probe_at(0, None)
    for step in range(setup.start, t.steps):
      toks, _, _ = batch(drng(step), tok, t.batch_size, length, s)
      b = {k: put(v) for k, v in as_batch(toks).items()}
      state, m = step_fn(state, b)
      if (step + 1) % p.every == 0 or step + 1 == t.steps:
        probe_at(step + 1, float(m['loss']))
  if setup.start < t.steps:
    save_run(config, workdir, cfg, tok, setup, state, t.steps)
  setup.checkpointer.close()
  if not rows and os.path.exists(metrics_path):     # resumed a finished run: its rows
    with open(metrics_path) as f:
      rows = [json.loads(line) for line in f if line.strip()]
  return jax.device_get(state.params), cfg, tok, rows


def probe_checkpoint(config: ConfigDict, workdir: str) -> dict:
  """Scores of an existing model (init_from): per-head induction / previous-token / copying
  scores on repeated random tokens, and the ICL score on windows of tinyshakespeare."""
  source = stage.read_source(config.init_from)
  cfg = source.cfg
  mesh = sharding.make_mesh(config.mesh.to_dict())
  params = source.restore_params(mesh, cfg)
  p = config.probe
  length = min(p.length or cfg.max_seq_len, cfg.max_seq_len)
  period = p.period or length // 2
  reps = -(-length // period)
  repeated = probe.repeated_tokens(jax.random.key(config.seed), p.batch, period, cfg.vocab_size,
                                   repeats=reps)[:, :length]
  with open(corpora.path('tinyshakespeare'), encoding='utf-8') as f:
    raw = f.read()[:200_000]
  if hasattr(source.tokenizer, 'chars'):   # a character vocabulary: unknown characters -> spaces
    known = set(source.tokenizer.chars)
    raw = ''.join(ch if ch in known else ' ' for ch in raw)
  ids = np.asarray(source.tokenizer.encode(raw), np.int32)
  if len(ids) < length * p.batch:
    raise ConfigError('tinyshakespeare is too short for probe.batch windows of this length.')
  starts = np.random.default_rng(config.seed).choice(len(ids) - length, p.batch, replace=False)
  text = np.stack([ids[s:s + length] for s in starts])
  early, late = probe.icl_indices(length - 1) if not p.early else (p.early, p.late)
  with sharding.activation_sharding(mesh):
    probs = jax.jit(functools.partial(probe.attention_probs, cfg=cfg))(params, repeated)
    losses = jax.jit(functools.partial(probe.token_losses, cfg=cfg))(params, jnp.asarray(text))
  ind = np.asarray(probe.induction_scores(probs, period))
  res = {'model': source.record(), 'period': period, 'length': length,
         'induction': ind.round(4).tolist(),
         'previous_token': np.asarray(probe.previous_token_scores(probs)).round(4).tolist(),
         'copying': np.asarray(probe.copying_scores(jax.device_get(params), cfg)).round(4).tolist(),
         'icl_score': probe.icl_score(np.asarray(losses), early, late, p.window),
         'icl_indices': [early, late]}
  print(f'ICL score (loss at token {late} - token {early}): {res["icl_score"]:+.4f}')
  print('layer head  induction  prev-token  copying')
  for layer in range(cfg.n_layers):
    for h in range(cfg.n_heads):
      print(f'{layer:5d} {h:4d}  {res["induction"][layer][h]:9.4f}  '
            f'{res["previous_token"][layer][h]:10.4f}  {res["copying"][layer][h]:7.4f}')
  return res
