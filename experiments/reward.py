"""Reward modelling (InstructGPT's step 2): a scalar head on an earlier stage's trunk, trained
to rank preferred responses above the others.

  init_from (an SFT or pretraining workdir, or hf:PATH) -> the trunk + a linear head on the
  last real token (eos), N(0, 1/(d_model + 1)) -> pairwise / K-wise ranking loss on
  [B, K, T] groups (all responses to a prompt in one batch element) -> the shared train loop
  -> eval.json (held-out accuracy beside longer-wins and bag-of-words baselines) and
  reward_norm.json (gain, bias: mean 0 / std 1 on the training responses)

The trainable tree is {'trunk', 'head'}; with peft.method != none it is {'adapters', 'head'}
and the trunk is the frozen argument of the step. `load_reward_model(workdir)` gives the
normalised scoring function later stages (PPO, best-of-n) use.

Ensembles (ensemble.members = M > 1; Coste et al. 2023): every leaf of the trainable tree
gains a leading M axis (replicated; the rules table shards the rest), the trunk (or the PEFT
base) comes from the same init_from, and member m is exactly the single model of seed
config.seed + m: head init key(seed + m), data order RewardData.train_rows(epoch, m) (one
[B, M, K, T] batch of M independently shuffled streams), step rng fold_in(key(seed + m), step).
One jitted step vmaps lm.train.update over the members: the objective is the sum of their
K-wise losses, and since members share no parameter each one's gradient, pair-count
normalisation, clipping, AdamW state and non-finite skip are its own. Held-out metrics per
member and for every combination of the normalised member scores (rl.reward.ensemble);
reward_norm.json holds per-member (gain, bias).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from ml_collections import ConfigDict

from data import pipeline, tokenizers
from experiments.stages import reward_data, reward_eval, reward_model, stage, trainer
from lm import checkpoint as ckpt_lib
from lm import heads, model, paths, peft, sharding, train as train_lib
from lm.config import ConfigError, ModelConfig
from rl import reward as reward_lib


def scores_of(trunk, head, batch, cfg: ModelConfig) -> jax.Array:
  """[B, K, T] groups -> [B, K] float32 scores, read at each row's last real token."""
  b, k, t = batch['tokens'].shape
  lengths = batch['mask'].reshape(b * k, t).sum(-1)   # right-padded: lengths suffice (any PEFT)
  return heads.score(trunk, head, batch['tokens'].reshape(b * k, t), lengths, cfg)[:, 0].reshape(b, k)


def _trees(config, cfg, pcfg, source, mesh):
  """(axes, init_params, initial_params, frozen, frozen_sh) of the trainable tree."""
  head_axes = heads.logical_axes(cfg, 1)
  head = lambda key: heads.init(cfg, 1, jax.random.fold_in(key, 1))
  if pcfg.method == 'none':
    axes = {'trunk': model.logical_axes(cfg), 'head': head_axes}
    init = lambda key: {'trunk': model.init(cfg, key), 'head': head(key)}
    initial = lambda: {'trunk': source.restore_params(mesh, cfg), 'head': head(jax.random.key(config.seed))}
    return axes, init, initial, None, None
  frozen = source.restore_params(mesh, cfg)
  axes = {'adapters': peft.logical_axes(cfg, pcfg), 'head': head_axes}
  init = lambda key: {'adapters': peft.init(cfg, pcfg, key, base_params=frozen), 'head': head(key)}
  return axes, init, None, frozen, jax.tree.map(lambda x: x.sharding, frozen)


def _ensemble_trees(config, cfg, pcfg, source, mesh, m: int):
  """_trees with a leading member axis: member i initialised as the single model of seed + i."""
  axes, init1, initial1, frozen, frozen_sh = _trees(config, cfg, pcfg, source, mesh)
  seeds = config.seed + jnp.arange(m)
  # `key` is build's key(config.seed): each member derives its own from seed + i instead.
  init = lambda key: jax.vmap(lambda s: init1(jax.random.key(s)))(seeds)
  initial = None
  if initial1 is not None:
    def initial():
      trunk = source.restore_params(mesh, cfg)
      head = jax.vmap(lambda s: heads.init(cfg, 1, jax.random.fold_in(jax.random.key(s), 1)))(seeds)
      return {'trunk': jax.tree.map(lambda x: jnp.broadcast_to(x, (m, *x.shape)), trunk), 'head': head}
  return axes, init, initial, frozen, frozen_sh


def ensemble_build(config, workdir, mesh, *, axes, init_params, initial_params, total_steps):
  """stage.build for a stacked trainable tree: the optimizer of ONE member (its decay mask and
  groups from the member's axes), vmapped, so each member keeps its own moments, count and
  gradient clipping. Returns (stage.Setup, the member optimizer)."""
  tx1, schedule = train_lib.make_optimizer(config.optim.to_dict(), axes, total_steps)
  tx = optax.GradientTransformation(jax.vmap(tx1.init), jax.vmap(tx1.update))
  key = jax.random.key(config.seed)

  def start(params):
    return train_lib.TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))
  abstract = jax.eval_shape(lambda k: start(init_params(k)), key)
  param_sh = sharding.tree_shardings(reward_model.stacked_axes(axes), abstract.params, mesh)
  masked = lambda x: isinstance(x, optax.MaskedNode)
  # The stacked state has the member optimizer's structure: moments follow the params; the
  # [M] counts are replicated.
  opt_sh = optax.tree_map_params(tx1, lambda p, s: p if masked(p) else s, abstract.opt_state,
                                 param_sh, transform_non_params=lambda _: sharding.replicated(mesh),
                                 is_leaf=masked)
  shardings = train_lib.TrainState(step=sharding.replicated(mesh), params=param_sh, opt_state=opt_sh)

  def fresh():
    if initial_params is None:
      return jax.jit(lambda k: start(init_params(k)), out_shardings=shardings)(key)
    return jax.jit(start, out_shardings=shardings)(initial_params())
  checkpointer = ckpt_lib.Checkpointer(paths.path(workdir) / 'checkpoints',
                                       config.train.get('keep_checkpoints', 3))
  found = checkpointer.restore_or_none(train_lib.abstract_with_shardings(abstract, shardings))
  if found is None:
    return stage.Setup(mesh, tx, schedule, shardings, fresh(), 0, None, {}, checkpointer), tx1
  step, state, data_state, meta = found
  return stage.Setup(mesh, tx, schedule, shardings, state, step, data_state, meta, checkpointer), tx1


def member_metrics(metrics: dict, m: int) -> dict:
  """[M] metrics of one vmapped update -> logged scalars: the objective `loss` (the sum of
  the members' losses), `<name>_m<i>` per member, `<name>` the mean (skipped: any member)."""
  out = {}
  for k, v in metrics.items():
    if k == 'lr':
      out[k] = v[0]
      continue
    out[k] = jnp.max(v) if k == 'skipped' else jnp.sum(v) if k in ('loss', 'tokens') else jnp.mean(v)
    if k in ('loss', 'accuracy', 'margin', 'grad_norm'):
      out.update({f'{k}_m{i}': v[i] for i in range(m)})
  out['loss_mean'] = jnp.mean(metrics['loss'])
  return out


def make_ensemble_step(loss_fn, tx1, mesh, shardings, member_param_sh, batch_sh, *, m: int,
                       frozen_sh=None, grad_accum: int = 1, seed: int = 0, schedule=None):
  """step(state, batch [B, M, ...][, frozen]) -> (state, metrics): lm.train.update vmapped over
  the members (state donated; the frozen tree shared, unbatched)."""
  upd = functools.partial(train_lib.update, loss_fn=loss_fn, tx=tx1, grad_accum=grad_accum,
                          mesh=mesh, grad_sh=member_param_sh, schedule=schedule)
  seeds = seed + jnp.arange(m)

  def step(state, batch, frozen=None):
    keys = jax.vmap(lambda s: jax.random.fold_in(jax.random.key(s), state.step))(seeds)

    def one(params, opt_state, b, key):
      new, metrics = upd(train_lib.TrainState(state.step, params, opt_state), b, key, frozen)
      return new.params, new.opt_state, metrics
    params, opt_state, metrics = jax.vmap(one, in_axes=(0, 0, 1, 0))(
        state.params, state.opt_state, batch, keys)
    return train_lib.TrainState(state.step + 1, params, opt_state), member_metrics(metrics, m)

  in_sh = (shardings, batch_sh) if frozen_sh is None else (shardings, batch_sh, frozen_sh)
  jitted = jax.jit(step, in_shardings=in_sh, out_shardings=(shardings, sharding.replicated(mesh)),
                   donate_argnums=(0,))

  def call(*args):
    with sharding.activation_sharding(mesh):   # layers' activation constraints see the mesh
      return jitted(*args)
  return call


# The stage: check -> prepare -> loop -> finish --------------------------------------------------
@dataclasses.dataclass
class Prepared:
  """A reward run after start-up: everything checked, trees and state built, nothing compiled."""
  config: ConfigDict
  cfg: ModelConfig
  pcfg: peft.PeftConfig
  ens: ConfigDict
  source: stage.Source
  seq_len: int
  data: reward_data.RewardData
  mesh: Any
  setup: stage.Setup
  tx1: Any                   # an ensemble's member optimizer (None for one model)
  axes: Any
  init_params: Callable
  frozen: Any                # the PEFT base (None: full fine-tuning)
  frozen_sh: Any
  batch_sh: dict             # training batches ([B, M, K, T] for an ensemble)
  val_sh: dict               # held-out batches ([B, K, T])
  batches: pipeline.RowBatches
  rows: tuple[int, int]      # this process's rows of a held-out batch

  @property
  def m(self) -> int:
    return self.ens.members

  @property
  def extra(self) -> tuple:
    """The frozen tree as the trailing argument of the jitted functions, if there is one."""
    return () if self.frozen is None else (self.frozen,)

  def local(self, chunk: dict):
    """A held-out chunk -> this process's rows as global arrays."""
    return pipeline.to_global({k: v[self.rows[0]:self.rows[1]] for k, v in chunk.items()},
                              shardings=self.val_sh, global_batch=self.config.train.batch_size)


def check(config: ConfigDict) -> None:
  """The config errors that need nothing read (the rest come in prepare, before any compile)."""
  if not config.init_from:
    raise ConfigError('reward needs --config.init_from=DIR (an SFT or pretraining workdir) or hf:PATH.')
  if config.data.k < 2:
    raise ConfigError(f'data.k={config.data.k}: a reward model learns from comparisons, so each '
                      'prompt needs at least 2 responses; set data.k >= 2.')


def _open(config: ConfigDict, workdir: str):
  """(ens, pcfg, source, cfg, seq_len, data, mesh), each checked; ConfigError at start-up."""
  ens = reward_model.ensemble_config(config)
  pcfg = stage.peft_config(config)
  source = stage.read_source(config.init_from)
  cfg = stage.model_from_source(config, source)
  if cfg.arch != 'decoder' or not cfg.causal:
    raise ConfigError('reward reads the last token of causal decoder-only models; init_from holds a '
                      f'{cfg.arch} model with causal={cfg.causal}.')
  tok = tokenizers.add_special_tokens(source.tokenizer, ['eos'])   # the token the head reads
  cfg = stage.with_tokens(cfg, tok)
  seq_len = config.data.seq_len or cfg.max_seq_len
  if seq_len > cfg.max_seq_len:
    raise ConfigError(f'data.seq_len={seq_len} is longer than the model context {cfg.max_seq_len}.')
  data = reward_data.load(config, tok, seq_len)     # counted skips; ConfigError at start-up
  mesh = sharding.make_mesh(config.mesh.to_dict())
  trainer.check_batch(config, mesh)
  stage.check_resume_source(workdir, source)
  if jax.process_index() == 0:
    stage.save_tokenizer(tok, workdir)
  return ens, pcfg, source, cfg, seq_len, data, mesh


def prepare(config: ConfigDict, workdir: str) -> Prepared:
  """Open and check everything, then the trainable and frozen trees, sharded by the rules
  table, and the fresh or restored state. Ensembles: a leading member axis on the params,
  and on the batch after its batch axis."""
  t = config.train
  ens, pcfg, source, cfg, seq_len, data, mesh = _open(config, workdir)
  m = ens.members
  spec = {k: jax.ShapeDtypeStruct(v.shape[1:], v.dtype) for k, v in data.train.items()}
  val_sh = train_lib.batch_shardings(mesh, spec)
  if m == 1:
    axes, init_params, initial, frozen, frozen_sh = _trees(config, cfg, pcfg, source, mesh)
    batch_sh = val_sh
    batches = pipeline.RowBatches(data.train_rows, t.batch_size,
                                  pipeline.local_rows(batch_sh['ranks'], t.batch_size, config.data.k))
    setup = stage.build(config, workdir, mesh, axes=axes, init_params=init_params,
                        total_steps=t.steps, initial_params=initial)
    tx1 = None
  else:
    axes, init_params, initial, frozen, frozen_sh = _ensemble_trees(config, cfg, pcfg, source, mesh, m)
    batch_sh = train_lib.batch_shardings(
        mesh, {k: jax.ShapeDtypeStruct((m, *v.shape), v.dtype) for k, v in spec.items()})
    batches = pipeline.RowBatches(lambda e: data.ensemble_rows(e, m), t.batch_size,
                                  pipeline.local_rows(batch_sh['ranks'], t.batch_size, m))
    setup, tx1 = ensemble_build(config, workdir, mesh, axes=axes, init_params=init_params,
                                initial_params=initial, total_steps=t.steps)
  rows = pipeline.local_rows(val_sh['ranks'], t.batch_size, config.data.k)
  if setup.data_state is not None:
    batches.restore(setup.data_state)
  p = Prepared(config, cfg, pcfg, ens, source, seq_len, data, mesh, setup, tx1, axes, init_params,
               frozen, frozen_sh, batch_sh, val_sh, batches, rows)
  _announce(p, workdir)
  return p


def _announce(p: Prepared, workdir: str) -> None:
  """config.json (with the network itself, so load_reward_model needs no source) and a line."""
  config, cfg, m, mesh, setup = p.config, p.cfg, p.m, p.mesh, p.setup
  trainable = (stage.peft_counts(cfg, p.pcfg)['trainable'] + cfg.d_model + 1) * m
  trainer.write_config(config, workdir, {
      'model': dataclasses.asdict(cfg),
      'resolved': {'vocab_size': cfg.vocab_size, 'seq_len': p.seq_len, 'params': cfg.num_params(),
                   'trainable_params': trainable, 'devices': jax.device_count(),
                   'mesh': dict(mesh.shape), 'data': p.data.report},
      'source': p.source.record()})
  rep = p.data.report
  print(f'reward from {p.source.path} (step {p.source.step}): {cfg.num_params():,} params, '
        f'{trainable:,} trainable ({p.pcfg.method}' + (f', ensemble of {m}' if m > 1 else '') +
        f'); {rep["used"]["train"]:,} training / '
        f'{rep["used"]["validation"]:,} held-out groups of K={config.data.k} '
        f'(skipped: {rep["skipped"] or "none"}; truncated: {rep["truncated"]["train"]}); '
        f'mesh {dict(mesh.shape)}; ' + (f'resuming at step {setup.start}' if setup.start else 'starting'))


def _trunk_of(params, frozen, cfg: ModelConfig, pcfg: peft.PeftConfig):
  return params['trunk'] if frozen is None else peft.combine(frozen, params['adapters'], cfg, pcfg)


def _loss_fn(p: Prepared) -> Callable:
  """The ranking loss on the combined params (one model's tree)."""
  cfg, pcfg, margin = p.cfg, p.pcfg, p.config.data.margin

  def loss_fn(params, batch, rng, frozen=None):
    scores = scores_of(_trunk_of(params, frozen, cfg, pcfg), params['head'], batch, cfg)
    return reward_lib.kwise_loss(scores, batch['ranks'], margin, batch['valid'])
  return loss_fn


def _step_fn(p: Prepared, loss_fn: Callable) -> Callable:
  """The jitted update: lm.train's step, or its vmap over the members of an ensemble."""
  t, s = p.config.train, p.setup
  if p.m == 1:
    step_fn = train_lib.make_train_step(loss_fn, s.tx, p.mesh, s.shardings, p.batch_sh,
                                        frozen_sh=p.frozen_sh, grad_accum=t.grad_accum,
                                        seed=p.config.seed, schedule=s.schedule)
  else:
    member_sh = sharding.tree_shardings(p.axes, jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape[1:], x.dtype),
        jax.eval_shape(p.init_params, jax.random.key(0))), p.mesh)
    step_fn = make_ensemble_step(loss_fn, p.tx1, p.mesh, s.shardings, member_sh, p.batch_sh, m=p.m,
                                 frozen_sh=p.frozen_sh, grad_accum=t.grad_accum, seed=p.config.seed,
                                 schedule=s.schedule)
  if p.frozen is not None:
    step_fn = functools.partial(trainer.with_frozen, step_fn, p.frozen)
  return step_fn


def _evaluate(p: Prepared, loss_fn: Callable):
  """The held-out loss every eval.every steps (an ensemble: summed over members), or None."""
  t = p.config.train
  if not (p.config.eval.every and len(p.data.val['ranks'])):
    return None

  def ensemble_loss(params, batch, rng, frozen=None):
    """Held-out loss of all members on the same batch: sums over members (val_* = member mean)."""
    out = jax.vmap(lambda q: loss_fn(q, batch, rng, frozen))(params)
    return jax.tree.map(lambda x: jnp.sum(x, 0), out)
  eval_step = train_lib.make_eval_step(loss_fn if p.m == 1 else ensemble_loss, p.mesh,
                                       p.setup.shardings.params, p.val_sh, p.frozen_sh)
  val = [c for c, _ in reward_eval.chunks(p.data.val, t.batch_size)]
  return trainer.eval_fn(lambda q, b: eval_step(q, b, *p.extra), val, p.local)


def loop(p: Prepared, workdir: str):
  """The shared train loop on the ranking loss; the state it reached."""
  config, t = p.config, p.config.train
  loss_fn = _loss_fn(p)
  step_fn = _step_fn(p, loss_fn)
  to_global = functools.partial(pipeline.to_global, shardings=p.batch_sh, global_batch=t.batch_size)
  evaluate = _evaluate(p, loss_fn)
  state = trainer.train(trainer.Run(
      config=config, workdir=workdir, mesh=p.mesh, state=p.setup.state, start_step=p.setup.start,
      step_fn=step_fn, batches=p.batches, to_global=to_global, evaluate=evaluate,
      checkpointer=p.setup.checkpointer, flops_per_token=p.cfg.flops_per_token(p.seq_len),
      tokens_per_step=t.batch_size * config.data.k * p.seq_len * p.m))
  p.setup.checkpointer.close()
  return state


def finish(p: Prepared, state, workdir: str) -> None:
  """Held-out evaluation beside the baselines; the normaliser on the training responses."""
  cfg, pcfg, m = p.cfg, p.pcfg, p.m

  def group_scores(q, b, *f):
    trunk_of = lambda r: _trunk_of(r, f[0] if f else None, cfg, pcfg)
    if m == 1:
      return scores_of(trunk_of(q), q['head'], b, cfg)
    per = jax.vmap(lambda r: scores_of(trunk_of(r), r['head'], b, cfg))(q)   # [M, B, K]
    return jnp.swapaxes(per, 0, 1)                                           # [B, M, K]
  score_jit = jax.jit(group_scores,
                      in_shardings=(p.setup.shardings.params, p.val_sh,
                                    *([p.frozen_sh] if p.extra else [])),
                      out_shardings=sharding.replicated(p.mesh))

  def score_fn(chunk):
    with sharding.activation_sharding(p.mesh):
      return score_jit(state.params, p.local(chunk), *p.extra)
  results = evaluate_pairs(p.config, p.data, functools.partial(reward_eval.scores, score_fn,
                                                               b=p.config.train.batch_size), p.ens)
  results['data'] = p.data.report
  reward_model.write_norm(workdir, results['norm'])
  reward_eval.write(workdir, results)


def run(config: ConfigDict, workdir: str):
  paths.path(workdir).mkdir(parents=True, exist_ok=True)   # a local folder or a gs:// bucket
  check(config)
  p = prepare(config, workdir)
  state = loop(p, workdir)
  if int(state.step) >= config.train.steps:
    finish(p, state, workdir)
  return state


def evaluate_pairs(config, data: reward_data.RewardData, scores: Callable[[dict], np.ndarray],
                   ens: ConfigDict | None = None) -> dict:
  """Held-out metrics, baselines, and reward_norm's gain and bias (returned under 'norm').

  `scores(arrays)` gives [N, K] (one model) or [N, M, K] (an ensemble) raw scores. An
  ensemble reports each member ('members', raw units), every combination of the normalised
  member scores ('combined'), and under 'reward_model' the one ensemble.combine names."""
  ens = ens or reward_model.ensemble_config(config)
  val = scores(data.val)
  g, w, l = reward_eval.pair_index(data.val['ranks'], data.val['valid'])
  held = reward_eval.record_pairs(data.val_records)
  train_pairs = reward_eval.record_pairs(data.train_records)
  bow = reward_eval.BagOfWords(config.eval.bow_words, config.eval.bow_l2).fit(train_pairs)
  n = config.eval.norm_groups or len(data.train['ranks'])
  sub = {k: v[:n] for k, v in data.train.items()}
  train_scores = scores(sub)
  out = {'longer_wins': reward_eval.longer_wins(held), 'bag_of_words': bow.evaluate(held)}
  margin = config.data.margin
  if ens.members == 1:
    train_scores = train_scores[sub['valid'] > 0]
    gain, bias = (float(x) for x in reward_lib.normalizer(jnp.asarray(train_scores)))
    out['reward_model'] = reward_eval.pair_metrics(val[g, w] - val[g, l], margin)
    out['norm'] = {'gain': gain, 'bias': bias, 'responses': int(train_scores.size),
                   'raw_mean': float(train_scores.mean()), 'raw_std': float(train_scores.std())}
    return out
  m = ens.members
  val = val.reshape(len(val), m, -1)               # (an empty held-out split comes back [0, K])
  per = [train_scores[:, i][sub['valid'] > 0] for i in range(m)]       # [responses] per member
  gb = [tuple(float(x) for x in reward_lib.normalizer(jnp.asarray(p))) for p in per]
  gain, bias = np.asarray([x[0] for x in gb]), np.asarray([x[1] for x in gb])
  out['members'] = [reward_eval.pair_metrics(val[g, i, w] - val[g, i, l], margin) for i in range(m)]
  normed = val * gain[None, :, None] + bias[None, :, None]             # [N, M, K]
  out['combined'] = {}
  for how in reward_lib.ENSEMBLES:
    c = np.asarray(reward_lib.ensemble(jnp.moveaxis(jnp.asarray(normed), 1, 0), how, ens.lam))
    out['combined'][how] = reward_eval.pair_metrics(c[g, w] - c[g, l], margin)
  out['reward_model'] = out['combined'][ens.combine]
  out['norm'] = {'gain': gain.tolist(), 'bias': bias.tolist(), 'members': m,
                 'combine': ens.combine, 'lam': float(ens.lam), 'responses': int(per[0].size),
                 'raw_mean': [float(p.mean()) for p in per], 'raw_std': [float(p.std()) for p in per]}
  return out


