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
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from ml_collections import ConfigDict

from data import pipeline, tokenizers
from experiments import reward_data, reward_eval, sft, stage, trainer
from lm import checkpoint as ckpt_lib
from lm import heads, model, peft, sharding, train as train_lib
from lm.config import ConfigError, ModelConfig
from rl import reward as reward_lib

NORM_FILE = 'reward_norm.json'


def scores_of(trunk, head, batch, cfg: ModelConfig) -> jax.Array:
  """[B, K, T] groups -> [B, K] float32 scores, read at each row's last real token."""
  b, k, t = batch['tokens'].shape
  lengths = batch['mask'].reshape(b * k, t).sum(-1)   # right-padded: lengths suffice (any PEFT)
  return heads.score(trunk, head, batch['tokens'].reshape(b * k, t), lengths, cfg)[:, 0].reshape(b, k)


def ranking_loss(scores: jax.Array, batch, margin: float = 0.0):
  """rl.reward.kwise_loss over the group (K = 2 is the pairwise loss) plus the summed margin."""
  loss, n, metrics = reward_lib.kwise_loss(scores, batch['ranks'], margin, batch['valid'])
  v = batch['valid']
  pair = (batch['ranks'][:, :, None] < batch['ranks'][:, None, :]) * v[:, :, None] * v[:, None, :]
  diff = scores[:, :, None] - scores[:, None, :]
  metrics['margin'] = jax.lax.stop_gradient(jnp.sum(diff * pair))
  return loss, n, metrics


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


def run(config: ConfigDict, workdir: str):
  os.makedirs(workdir, exist_ok=True)
  t = config.train
  # 1. Everything a user can get wrong, before any compile.
  if not config.init_from:
    raise ConfigError('reward needs --config.init_from=DIR (an SFT or pretraining workdir) or hf:PATH.')
  if config.data.k < 2:
    raise ConfigError(f'data.k={config.data.k}: a reward model learns from comparisons, so each '
                      'prompt needs at least 2 responses; set data.k >= 2.')
  pcfg = sft.peft_config(config)
  source = stage.read_source(config.init_from)
  cfg = stage.model_from_source(config, source)
  if cfg.arch != 'decoder' or not cfg.causal:
    raise ConfigError('reward reads the last token of causal decoder-only models; init_from holds a '
                      f'{cfg.arch} model with causal={cfg.causal}.')
  tok = tokenizers.add_special_tokens(source.tokenizer, ['eos'])   # the token the head reads
  cfg = sft.with_tokens(cfg, tok)
  seq_len = config.data.seq_len or cfg.max_seq_len
  if seq_len > cfg.max_seq_len:
    raise ConfigError(f'data.seq_len={seq_len} is longer than the model context {cfg.max_seq_len}.')
  data = reward_data.load(config, tok, seq_len)     # counted skips; ConfigError at start-up
  mesh = sharding.make_mesh(config.mesh.to_dict())
  trainer.check_batch(config, mesh)
  sft.check_resume_source(workdir, source)
  if jax.process_index() == 0:
    tok.save(os.path.join(workdir, tokenizers.RUN_FILE))

  # 2. Trainable and frozen trees, sharded by the rules table.
  axes, init_params, initial, frozen, frozen_sh = _trees(config, cfg, pcfg, source, mesh)
  spec = {k: jax.ShapeDtypeStruct(v.shape[1:], v.dtype) for k, v in data.train.items()}
  batch_sh = train_lib.batch_shardings(mesh, spec)
  rows = pipeline.local_rows(batch_sh['ranks'], t.batch_size, config.data.k)
  batches = pipeline.RowBatches(data.train_rows, t.batch_size, rows)
  setup = stage.build(config, workdir, mesh, axes=axes, init_params=init_params,
                      total_steps=t.steps, initial_params=initial)
  if setup.data_state is not None:
    batches.restore(setup.data_state)
  trainable = sft.peft_counts(cfg, pcfg)['trainable'] + cfg.d_model + 1
  trainer.write_config(config, workdir, {
      'model': dataclasses.asdict(cfg),   # the network itself, so load_reward_model needs no source
      'resolved': {'vocab_size': cfg.vocab_size, 'seq_len': seq_len, 'params': cfg.num_params(),
                   'trainable_params': trainable, 'devices': jax.device_count(),
                   'mesh': dict(mesh.shape), 'data': data.report},
      'source': source.record()})
  rep = data.report
  print(f'reward from {source.path} (step {source.step}): {cfg.num_params():,} params, '
        f'{trainable:,} trainable ({pcfg.method}); {rep["used"]["train"]:,} training / '
        f'{rep["used"]["validation"]:,} held-out groups of K={config.data.k} '
        f'(skipped: {rep["skipped"] or "none"}; truncated: {rep["truncated"]["train"]}); '
        f'mesh {dict(mesh.shape)}; ' + (f'resuming at step {setup.start}' if setup.start else 'starting'))

  # 3. The ranking loss on the combined params.
  margin = config.data.margin

  def trunk_of(params, frozen=None):
    return params['trunk'] if frozen is None else peft.combine(frozen, params['adapters'], cfg, pcfg)

  def loss_fn(params, batch, rng, frozen=None):
    return ranking_loss(scores_of(trunk_of(params, frozen), params['head'], batch, cfg), batch, margin)

  step_fn = train_lib.make_train_step(loss_fn, setup.tx, mesh, setup.shardings, batch_sh,
                                      frozen_sh=frozen_sh, grad_accum=t.grad_accum,
                                      seed=config.seed, schedule=setup.schedule)
  extra = () if frozen is None else (frozen,)
  if frozen is not None:
    step_fn = functools.partial(sft._with_frozen, step_fn, frozen)
  to_global = functools.partial(pipeline.to_global, shardings=batch_sh, global_batch=t.batch_size)
  local = lambda c: to_global({k: v[rows[0]:rows[1]] for k, v in c.items()})
  evaluate = None
  if t.eval_every and len(data.val['ranks']):
    eval_step = train_lib.make_eval_step(loss_fn, mesh, setup.shardings.params, batch_sh, frozen_sh)
    val = [c for c, _ in reward_eval.chunks(data.val, t.batch_size)]
    evaluate = trainer.eval_fn(lambda p, b: eval_step(p, b, *extra), val, local)
  state = trainer.train(trainer.Run(
      config=config, workdir=workdir, mesh=mesh, state=setup.state, start_step=setup.start,
      step_fn=step_fn, batches=batches, to_global=to_global, evaluate=evaluate,
      checkpointer=setup.checkpointer, flops_per_token=cfg.flops_per_token(seq_len),
      tokens_per_step=t.batch_size * config.data.k * seq_len))
  setup.checkpointer.close()
  if int(state.step) < t.steps:
    return state

  # 4. Held-out evaluation beside the baselines; the normaliser on the training responses.
  score_jit = jax.jit(lambda p, b, *f: scores_of(trunk_of(p, *f), p['head'], b, cfg),
                      in_shardings=(setup.shardings.params, batch_sh, *([frozen_sh] if extra else [])),
                      out_shardings=sharding.replicated(mesh))

  def score_fn(chunk):
    with sharding.activation_sharding(mesh):
      return score_jit(state.params, local(chunk), *extra)
  results = evaluate_pairs(config, data, functools.partial(reward_eval.scores, score_fn,
                                                           b=t.batch_size))
  results['data'] = data.report
  write_norm(workdir, results['norm'])
  reward_eval.write(workdir, results)
  return state


def evaluate_pairs(config, data: reward_data.RewardData, scores: Callable[[dict], np.ndarray]) -> dict:
  """Held-out metrics, baselines, and reward_norm's gain and bias (returned under 'norm')."""
  val = scores(data.val)
  g, w, l = reward_eval.pair_index(data.val['ranks'], data.val['valid'])
  rm = reward_eval.pair_metrics(val[g, w] - val[g, l], config.data.margin)
  held = reward_eval.record_pairs(data.val_records)
  train_pairs = reward_eval.record_pairs(data.train_records)
  bow = reward_eval.BagOfWords(config.eval.bow_words, config.eval.bow_l2).fit(train_pairs)
  n = config.eval.norm_groups or len(data.train['ranks'])
  sub = {k: v[:n] for k, v in data.train.items()}
  train_scores = scores(sub)[sub['valid'] > 0]
  gain, bias = (float(x) for x in reward_lib.normalizer(jnp.asarray(train_scores)))
  return {'reward_model': rm, 'longer_wins': reward_eval.longer_wins(held),
          'bag_of_words': bow.evaluate(held),
          'norm': {'gain': gain, 'bias': bias, 'responses': int(train_scores.size),
                   'raw_mean': float(train_scores.mean()), 'raw_std': float(train_scores.std())}}


def write_norm(workdir: str, norm: dict) -> None:
  if jax.process_index() == 0:
    with open(os.path.join(workdir, NORM_FILE), 'w') as f:
      json.dump(norm, f, indent=2)


@dataclasses.dataclass
class RewardModel:
  """A trained reward model: `score(params, tokens, mask)` -> [B] normalised rewards for
  [B, T] token rows (any padding, left or right, 1 = real token; end each row with eos)."""
  params: Any                 # {'trunk': params for model.forward (adapters hooked in), 'head'}
  score: Callable
  cfg: ModelConfig
  tokenizer: Any
  gain: float
  bias: float
  seq_len: int


def load_reward_model(workdir: str, mesh_cfg: dict | None = None) -> RewardModel:
  with open(os.path.join(workdir, 'config.json')) as f:
    saved = json.load(f)
  norm_path = os.path.join(workdir, NORM_FILE)
  if not os.path.exists(norm_path):
    raise ckpt_lib.CheckpointError(f'{workdir} has no {NORM_FILE}: the reward run did not finish; '
                                   'rerun it to train.steps.')
  with open(norm_path) as f:
    norm = json.load(f)
  cfg = ModelConfig.from_dict(saved['model'])
  pcfg = peft.PeftConfig.from_dict(saved['peft'])
  mesh = sharding.make_mesh(mesh_cfg or {'data': -1})
  if pcfg.method == 'none':
    axes = {'trunk': model.logical_axes(cfg), 'head': heads.logical_axes(cfg, 1)}
    init = lambda k: {'trunk': model.init(cfg, k), 'head': heads.init(cfg, 1, k)}
  else:
    axes = {'adapters': peft.logical_axes(cfg, pcfg), 'head': heads.logical_axes(cfg, 1)}
    init = lambda k: {'adapters': peft.init(cfg, pcfg, k), 'head': heads.init(cfg, 1, k)}
  abstract = jax.eval_shape(init, jax.random.key(0))
  target = train_lib.abstract_with_shardings(abstract, sharding.tree_shardings(axes, abstract, mesh))
  ck = ckpt_lib.Checkpointer(os.path.join(workdir, 'checkpoints'), async_save=False)
  try:
    params = ck.restore_params(ckpt_lib.Checkpointer.steps_in(ck.directory)[-1], target)
  finally:
    ck.close()
  if pcfg.method != 'none':
    src = saved['source']
    base = stage.read_source(src['path']).restore_params(mesh, cfg)
    params = {'trunk': peft.combine(base, params['adapters'], cfg, pcfg), 'head': params['head']}
  gain, bias = norm['gain'], norm['bias']

  @jax.jit
  def score(p, tokens, mask):
    raw = heads.score(p['trunk'], p['head'], tokens, mask, cfg)[:, 0]
    return reward_lib.normalize(raw, gain, bias)
  tok = tokenizers.load(tokenizers.run_file(workdir))
  return RewardModel(params, score, cfg, tok, gain, bias, saved['resolved']['seq_len'])
