"""Offline preference optimisation from an SFT policy: DPO, IPO and conservative DPO.

  init_from (SFT workdir) -> preference records (the testbed's K-wise preferences.jsonl, or
  hh-rlhf chosen / rejected) -> (chosen, rejected) pairs -> rl.preference loss on summed
  response log-probs of the policy and of the frozen reference -> the shared train loop
  (metrics.jsonl, TensorBoard, checkpoints, resume) -> results.json

Pairs from a K-wise record (config data.pairs): 'best' pairs the best-ranked response with
each worse one (K - 1 pairs); 'all' takes every ranked pair (C(K, 2) minus ties). Records are
read by experiments.stages.reward_data (ties, empty responses, missing fields and identical
responses are counted skips) and split into train / held-out by prompt.

A pair is two rows [prompt | response + eos] (prompt as the SFT template laid it out, cut
from the left to fit data.seq_len); only response tokens are scored. The reference
log-probs come from the frozen tree, an argument of the jitted step computed once per batch
under stop_gradient, never a constant: full fine-tuning trains a copy of init_from against
the original; LoRA trains adapters and the reference is the base without them.

Metrics: loss and implicit-reward accuracy / margin / chosen / rejected (beta * log-ratio)
on training batches, and the same on held-out pairs (val_*) every eval.every steps. At the
end, results.json (the policy stages' one schema) holds the held-out pair metrics and experiments.stages.policy.evaluate's gold /
proxy / KL of one sample per held-out prompt (the point on the over-optimisation axes),
beside the same evaluation of the reference policy.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import numpy as np
from ml_collections import ConfigDict

from data import formats, pipeline, sources
from experiments.stages import gold_model, online_report, policy, reward_data, stage, trainer
from experiments.stages.preference_loss import make_loss
from lm import paths, sharding, train as train_lib
from lm.config import ConfigError

KINDS = ('dpo', 'ipo', 'cdpo')
PAIRINGS = ('best', 'all')


def check(config: ConfigDict) -> None:
  """Every start-up error of the config (one sentence each), before anything is read."""
  l, d = config.loss, config.data
  if l.kind not in KINDS:
    raise ConfigError(f'loss.kind={l.kind!r} is not known; choose one of {KINDS}.')
  if not config.kl.coef > 0:
    raise ConfigError(f'kl.coef={config.kl.coef}: the KL strength (DPO: beta, IPO: tau) must be > 0.')
  if l.kind == 'cdpo' and not 0 < l.label_smoothing < 0.5:
    raise ConfigError(f'loss.label_smoothing={l.label_smoothing}: conservative DPO flips labels with '
                      'probability eps in (0, 0.5).')
  if l.kind != 'cdpo' and l.label_smoothing:
    raise ConfigError(f'loss.label_smoothing={l.label_smoothing} is only used by loss.kind=cdpo; set '
                      'it to 0 or use cdpo.')
  if d.pairs not in PAIRINGS:
    raise ConfigError(f'data.pairs={d.pairs!r} is not known; choose one of {PAIRINGS}.')
  if d.max_k < 2:
    raise ConfigError(f'data.max_k={d.max_k}: a preference needs at least 2 responses per prompt.')
  if not d.path:
    raise ConfigError('dpo needs --config.data.path=FILE (preferences.jsonl or hh-rlhf JSON lines).')
  gold_model.check(config.eval.gold)


# Pairs -------------------------------------------------------------------------------------
def pairs_of(ranks, pairing: str) -> list[tuple[int, int]]:
  """(chosen, rejected) response indices of one K-wise record (rank 0 = best; ties unpaired)."""
  n = len(ranks)
  if pairing == 'best':
    best = min(ranks)
    return [(i, j) for i in range(n) if ranks[i] == best for j in range(n) if ranks[j] > best]
  if pairing == 'all':
    return [(i, j) for i in range(n) for j in range(n) if ranks[i] < ranks[j]]
  raise ValueError(f'unknown pairing {pairing!r}; choose one of {PAIRINGS}')


def _row(prompt: np.ndarray, resp: np.ndarray, seq_len: int):
  """(tokens, response mask, truncated?) of one row, prompt cut from the left (at least one
  prompt token stays: the first response token is predicted from it), then the response
  from the right."""
  cut = len(resp) > seq_len - 1
  resp = resp[:seq_len - 1]
  keep = seq_len - len(resp)
  cut = cut or len(prompt) > keep
  ids = np.concatenate([prompt[-keep:], resp])
  learn = np.concatenate([np.zeros(len(ids) - len(resp)), np.ones(len(resp))])
  return ids, learn, cut


def encode_pairs(records: list[dict], pol: policy.Policy, seq_len: int, pairing: str):
  """{'tokens', 'mask', 'resp': [N, 2, T] int32} (index 0 chosen, 1 rejected), right-padded,
  and counts {'pairs', 'truncated', 'empty_prompt'}."""
  tok = pol.tok
  rows, counts = [], {'pairs': 0, 'truncated': 0, 'empty_prompt': 0}
  for r in records:
    prompt = formats.prompt_tokens({'instruction': '', 'input': r['prompt']}, pol.template, tok)
    if len(prompt) == 0:
      counts['empty_prompt'] += 1       # nothing to predict the first response token from
      continue
    resp = [np.concatenate([tok.encode(x), [pol.eos]]).astype(np.int32) for x in r['responses']]
    for i, j in pairs_of(r['ranks'], pairing):
      rows.append([_row(np.asarray(prompt, np.int32), resp[i], seq_len),
                   _row(np.asarray(prompt, np.int32), resp[j], seq_len)])
  n = len(rows)
  out = {k: np.zeros((n, 2, seq_len), np.int32) for k in ('tokens', 'mask', 'resp')}
  for a, pair in enumerate(rows):
    for b, (ids, learn, cut) in enumerate(pair):
      out['tokens'][a, b, :len(ids)] = ids
      out['mask'][a, b, :len(ids)] = 1
      out['resp'][a, b, :len(ids)] = learn
      counts['truncated'] += cut
  counts['pairs'] = n
  return out, counts


def load_pairs(config: ConfigDict, pol: policy.Policy, seq_len: int):
  """(train arrays, held-out arrays, report); ConfigError at start-up when unusable."""
  d = config.data
  if not 0 <= d.val_fraction < 1:
    raise ConfigError(f'data.val_fraction={d.val_fraction} must be in [0, 1).')
  try:
    split, report = reward_data.read(d.path, d.max_k, d.val_fraction)
  except sources.CorpusError as e:
    raise ConfigError(str(e)) from None
  train, t_counts = encode_pairs(split['train'], pol, seq_len, d.pairs)
  val, v_counts = encode_pairs(split['validation'], pol, seq_len, d.pairs)
  b = config.train.batch_size
  if t_counts['pairs'] < b:
    raise ConfigError(f'{d.path} gave {t_counts["pairs"]} training pairs (skipped records: '
                      f'{report["skipped"] or "none"}), fewer than one batch of {b}; lower '
                      'train.batch_size or add data.')
  # Held-out pairs in whole batches (the loss has no per-pair weights to mask padding).
  n_val = min(v_counts['pairs'], d.max_val or v_counts['pairs']) // b * b
  val = {k: v[:n_val] for k, v in val.items()}
  report.update(path=d.path, pairing=d.pairs, seq_len=seq_len,
                pairs={'train': t_counts['pairs'], 'validation': n_val},
                truncated={'train': t_counts['truncated'], 'validation': v_counts['truncated']},
                empty_prompt=t_counts['empty_prompt'] + v_counts['empty_prompt'])
  return train, val, report


def _rows(data: dict, seed: int):
  def make(epoch):
    order = np.random.default_rng([seed, 0xD90, epoch]).permutation(len(data['tokens']))
    return {k: v[order] for k, v in data.items()}
  return make


# The stage: check -> prepare -> loop -> finish --------------------------------------------------
@dataclasses.dataclass
class Prepared:
  """A DPO run after start-up: everything checked, pairs encoded, trees and state built."""
  config: ConfigDict
  pol: policy.Policy
  seq_len: int
  held_ids: Any              # the held-out prompts, encoded
  mesh: Any
  reward: Callable | None    # (tokens, mask) -> proxy reward, with reward_from
  train_data: dict
  val_data: dict
  report: dict
  trees: Any                 # policy.trees: trainable policy (full or LoRA), frozen reference
  batch_sh: dict
  rows: tuple[int, int]      # this process's rows of a batch
  batches: pipeline.RowBatches
  setup: stage.Setup


def prepare(config: ConfigDict, workdir: str) -> Prepared:
  """Open and check the policy, prompts, reward model and pairs (ConfigError before any
  compile), then the trainable tree (full or LoRA), the frozen reference and the state."""
  t = config.train
  pol = policy.open_policy(config.init_from)
  cfg = pol.cfg
  seq_len = config.data.seq_len or cfg.max_seq_len
  if seq_len > cfg.max_seq_len:
    raise ConfigError(f'data.seq_len={seq_len} is longer than the model context {cfg.max_seq_len}.')
  held_ids = policy.encode_prompts(pol, policy.prompt_texts(config, 'eval'),
                                   cfg.max_seq_len - config.rollout.max_new_tokens)
  mesh = sharding.make_mesh(config.mesh.to_dict())
  rm = policy.open_reward(config.reward_from, pol, mesh) if config.reward_from else None
  reward = (lambda tokens, mask: rm.score(rm.params, tokens, mask)) if rm is not None else None
  train_data, val_data, report = load_pairs(config, pol, seq_len)
  trainer.check_batch(config, mesh)
  stage.check_resume_source(workdir, pol.source)
  if jax.process_index() == 0:
    stage.save_tokenizer(pol.tok, workdir)

  trees = policy.trees(config, pol, mesh)
  spec = {k: jax.ShapeDtypeStruct(v.shape[1:], v.dtype) for k, v in train_data.items()}
  batch_sh = train_lib.batch_shardings(mesh, spec)
  rows = pipeline.local_rows(sharding.batch_sharding(mesh, 2), t.batch_size, 2)
  batches = pipeline.RowBatches(_rows(train_data, config.seed), t.batch_size, rows)
  setup = stage.build(config, workdir, mesh, axes=trees.axes, init_params=trees.init_params,
                      total_steps=t.steps, initial_params=trees.initial)
  if setup.data_state is not None:
    batches.restore(setup.data_state)
  p = Prepared(config, pol, seq_len, held_ids, mesh, reward, train_data, val_data, report, trees,
               batch_sh, rows, batches, setup)
  _announce(p, workdir)
  return p


def _announce(p: Prepared, workdir: str) -> None:
  config, cfg, report, mesh = p.config, p.pol.cfg, p.report, p.mesh
  trainer.write_config(config, workdir, {
      'model': dataclasses.asdict(cfg),
      'resolved': {'vocab_size': cfg.vocab_size, 'seq_len': p.seq_len, 'params': cfg.num_params(),
                   # a later stage (init_from), export and evaluate read the policy from here
                   'params_at': ['params', p.trees.policy_role],
                   'devices': jax.device_count(), 'mesh': dict(mesh.shape), 'data': report},
      'source': p.pol.source.record()})
  print(f'dpo ({config.loss.kind}, beta={config.kl.coef}) from {p.pol.source.path} (step '
        f'{p.pol.source.step}), peft {p.trees.pcfg.method}: {report["pairs"]["train"]:,} training / '
        f'{report["pairs"]["validation"]:,} held-out pairs ({config.data.pairs}) from '
        f'{sum(report["records"].values()):,} records (skipped: {report["skipped"] or "none"}; '
        f'truncated: {report["truncated"]["train"]}); mesh {dict(mesh.shape)}; '
        + (f'resuming at step {p.setup.start}' if p.setup.start else 'starting'))


def loop(p: Prepared, workdir: str):
  """(state, held-out pair metrics function or None): the shared train loop, the frozen
  reference an argument of the step."""
  config, t, trees, setup, mesh = p.config, p.config.train, p.trees, p.setup, p.mesh
  loss_fn = make_loss(trees, config.loss.kind, config.kl.coef, config.loss.label_smoothing)
  step_fn = train_lib.make_train_step(loss_fn, setup.tx, mesh, setup.shardings, p.batch_sh,
                                      frozen_sh=trees.frozen_sh, grad_accum=t.grad_accum,
                                      seed=config.seed, schedule=setup.schedule)
  step_fn = functools.partial(trainer.with_frozen, step_fn, trees.frozen)
  to_global = functools.partial(pipeline.to_global, shardings=p.batch_sh, global_batch=t.batch_size)
  evaluate = None
  if len(p.val_data['tokens']):
    eval_step = train_lib.make_eval_step(loss_fn, mesh, setup.shardings.params, p.batch_sh,
                                         trees.frozen_sh)
    val = [{k: v[i:i + t.batch_size][p.rows[0]:p.rows[1]] for k, v in p.val_data.items()}
           for i in range(0, len(p.val_data['tokens']), t.batch_size)]
    evaluate = trainer.eval_fn(lambda q, b: eval_step(q, b, trees.frozen), val, to_global)
  state = trainer.train(trainer.Run(
      config=config, workdir=workdir, mesh=mesh, state=setup.state, start_step=setup.start,
      step_fn=step_fn, batches=p.batches, to_global=to_global,
      evaluate=evaluate if config.eval.every else None, checkpointer=setup.checkpointer,
      flops_per_token=p.pol.cfg.flops_per_token(p.seq_len) * 4 / 3,
      tokens_per_step=t.batch_size * 2 * p.seq_len))
  setup.checkpointer.close()
  return state, evaluate


def finish(p: Prepared, state, evaluate, workdir: str) -> None:
  """Held-out pairs, then the testbed evaluation of the policy and of its reference."""
  config, t, e, trees = p.config, p.config.train, p.config.eval, p.trees
  results = {'loss': {'kind': config.loss.kind, 'beta': config.kl.coef,
                      'label_smoothing': config.loss.label_smoothing}, 'data': p.report}
  if evaluate is not None:
    results['pairs'] = evaluate(state.params)
  key = jax.random.fold_in(jax.random.key(config.seed), 0xE7A1)   # same prompts & draws for both
  common = dict(max_new_tokens=config.rollout.max_new_tokens, gold_kind=e.gold, reward=p.reward,
                mesh=p.mesh, batch=e.batch_size, temperature=config.rollout.temperature)
  gen_params = trees.generation(state.params, trees.frozen)
  ref = trees.reference(trees.frozen)
  held_out = lambda params, r, it: _eval_row(
      policy.evaluate(params, r, p.pol, p.held_ids, key, **common), it)
  results['after'] = held_out(gen_params, ref, t.steps)
  results['before'] = held_out(ref, None, 0) if e.before else None
  results.update(stage='dpo', iterations=t.steps, started_at=0, seconds_per_iteration={},
                 tokens_per_sec=None,
                 evals=[r for r in (results['before'], results['after']) if r is not None])
  write(workdir, results)


def run(config: ConfigDict, workdir: str):
  paths.path(workdir).mkdir(parents=True, exist_ok=True)   # a local folder or a gs:// bucket
  check(config)
  p = prepare(config, workdir)
  state, evaluate = loop(p, workdir)
  if int(state.step) >= config.train.steps:
    finish(p, state, evaluate, workdir)
  return state


def _eval_row(report: dict, iteration: int) -> dict:
  """A held-out report as a row of the policy stages' results.json (online_report)."""
  return {'iteration': iteration, **{k: v for k, v in report.items() if k != 'samples'},
          'sqrt_kl': float(max(report['kl'], 0.0) ** 0.5), 'samples': report['samples']}


def write(workdir: str, results: dict) -> None:
  if jax.process_index() != 0:
    return
  online_report.write(workdir, results)   # results.json, the policy stages' one schema (gs:// too)
  fmt = lambda r: (f"gold {r['gold']:+.3f} ± {r['gold_stderr']:.3f}, "
                   + (f"proxy {r['proxy']:+.3f}, " if 'proxy' in r else '')
                   + f"KL {r['kl']:.3f}, length {r['length']:.1f}, eos {r['eos_rate']:.2f}")
  print('held-out prompts (one sample each):')
  for name in ('before', 'after'):
    if results.get(name):
      print(f'  {name:6s} {fmt(results[name])}')
  if 'pairs' in results:
    p = results['pairs']
    print(f"  held-out pairs: loss {p['val_loss']:.4f}, implicit-reward accuracy "
          f"{p['val_rewards/accuracy']:.3f}, margin {p['val_rewards/margin']:+.3f}")
