"""Online, critic-free RL from an SFT policy against a reward model: RLOO and GRPO (`pg`).

One iteration:
  1. rollout   prompts_per_iter training prompts, k samples each (rows prompt-major, so a
               prompt's k responses are adjacent), from the current policy in one jitted
               generation over fixed-width left-padded prompts (one program for the run)
  2. scoring   one jit: rl.rollout.score_rollout (policy and reference log-probs, entropy,
               the RM's normalised score) -> advantages per group of k:
                 rloo  r = score - kl_coef * sum_t (log pi - log ref); A = r - mean of the
                       other k - 1 (Ahmadian et al. 2024: KL in the reward)
                 grpo  A = (score - group mean) / group std; the KL (k3, per token, weight
                       kl_coef) is in the loss, with the clipped ratio (Shao et al. 2024)
  3. update    one jit: a lax.scan over epochs x shuffled minibatches of lm.train.update
               (RLOO: -A * log pi(y); GRPO: rl.pg.grpo_loss with old log-probs from step 2)

Logged per iteration (metrics.jsonl, TensorBoard, tqdm): proxy and gold reward of the
rollouts, KL to the reference (mean per sequence), entropy per token, response length, EOS
rate, loss / clip fraction / grad norm, tokens/s and the time split. Every eval_every
iterations (and before the first, and after the last) experiments.stages.policy.evaluate on the
held-out prompts appends {iteration, gold, proxy, kl, ...} to eval.jsonl (what the
over-optimisation study reads); eval.json holds the first and last of them.

Checkpoints hold the train state, the iteration and the rollout RNG, so a resumed run
continues exactly. A LoRA policy's reference is its base without adapters.
"""
from __future__ import annotations

import dataclasses
import json
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from ml_collections import ConfigDict
from tqdm import tqdm

from experiments.stages import runlog
from experiments.stages import online, policy, stage, trainer
from lm import decode, paths, sharding, train as train_lib
from lm.config import ConfigError
from rl import common, gold, pg, rollout

METHODS = ('rloo', 'grpo')


def check(config: ConfigDict) -> None:
  """Every start-up error of the config (one sentence each), before anything is read."""
  t, l = config.train, config.loss
  if config.method not in METHODS:
    raise ConfigError(f'method={config.method!r} is not known; choose one of {METHODS}.')
  if config.k < 2:
    raise ConfigError(f'k={config.k}: {config.method} compares each response with the other samples '
                      'of its prompt, so it needs k >= 2 samples per prompt.')
  if not config.reward_from:
    raise ConfigError('pg needs --config.reward_from=DIR (the workdir of a finished `reward` run).')
  if config.max_new_tokens < 1 or not config.temperature > 0:
    raise ConfigError('max_new_tokens must be >= 1 and temperature > 0 (samples, not greedy).')
  if l.kl_coef < 0 or not l.clip_eps > 0:
    raise ConfigError(f'loss.kl_coef={l.kl_coef} must be >= 0 and loss.clip_eps={l.clip_eps} > 0.')
  if l.level not in pg.LEVELS:
    raise ConfigError(f'loss.level={l.level!r} is not known; choose one of {pg.LEVELS}.')
  for name in ('iterations', 'prompts_per_iter', 'epochs', 'minibatches'):
    if t[name] < 1:
      raise ConfigError(f'train.{name}={t[name]} must be >= 1.')
  if (t.prompts_per_iter * config.k) % t.minibatches:
    raise ConfigError(f'The {t.prompts_per_iter * config.k} rollouts per iteration (prompts_per_iter x '
                      f'k) do not split into train.minibatches={t.minibatches}; make it a divisor.')


def prompt_indices(n: int, per_iter: int, iteration: int, seed: int) -> np.ndarray:
  """Training prompts of an iteration: consecutive slices of seeded per-epoch permutations
  (pure in (seed, iteration), so a resumed run draws the same prompts)."""
  out, pos = [], iteration * per_iter
  while len(out) < per_iter:
    epoch, i = divmod(pos, n)
    perm = np.random.default_rng([seed, 0x9D, epoch]).permutation(n)
    take = perm[i:i + per_iter - len(out)]
    out.extend(take.tolist())
    pos += len(take)
  return np.asarray(out)


# The two jitted programs -------------------------------------------------------------------
@dataclasses.dataclass
class Programs:
  score: Callable    # (params, frozen, rm_params, tokens, mask) -> (update batch, metrics)
  update: Callable   # (state, batch, frozen, key) -> (state, mean metrics)


def group_advantages(method: str, scores, kl_seq, k: int, kl_coef: float):
  """[P*k] scores and per-sequence KLs -> [P*k] advantages of each method."""
  if method == 'rloo':
    return pg.rloo_advantages((scores - kl_coef * kl_seq).reshape(-1, k)).reshape(-1)
  return pg.grpo_advantages(scores.reshape(-1, k)).reshape(-1)


_PROGRAMS: dict = {}


def programs(config: ConfigDict, trees: policy.Trees, setup: stage.Setup, mesh, n_prompt: int,
             rm, eos: int) -> Programs:
  """make_programs, reused by a later run in the same process whose programs would be the
  same (everything they close over is a function of this key): resumes and tests compile once."""
  c = config.to_dict()
  c['train'] = {k: c['train'][k] for k in ('iterations', 'prompts_per_iter', 'epochs', 'minibatches')}
  key = (json.dumps({k: c[k] for k in ('method', 'k', 'temperature', 'loss', 'optim', 'peft', 'train')},
                    sort_keys=True, default=str),
         trees.cfg, mesh, n_prompt, eos, rm.cfg, rm.gain, rm.bias)
  if key not in _PROGRAMS:
    _PROGRAMS.clear()                  # keep one set: compiled programs hold memory
    _PROGRAMS[key] = make_programs(config, trees, setup.tx, setup.schedule, setup.shardings, mesh,
                                   n_prompt, rm.score, eos)
  return _PROGRAMS[key]


def make_programs(config: ConfigDict, trees: policy.Trees, tx, schedule, shardings, mesh,
                  n_prompt: int, rm_score: Callable, eos: int) -> Programs:
  cfg, k, temp, l, t = trees.cfg, config.k, config.temperature, config.loss, config.train
  method = config.method

  def score(params, frozen, rm_params, tokens, mask):
    out = rollout.score_rollout(trees.full(params, frozen), frozen, tokens, mask, n_prompt, cfg,
                                temperature=temp, reward=lambda x, m: rm_score(rm_params, x, m))
    rmask = mask[:, n_prompt:].astype(jnp.float32)
    ended = rollout.has_eos(tokens[:, n_prompt:], rmask, eos)
    scores = out['scores']
    if l.missing_eos_penalty:
      scores = common.apply_missing_eos_penalty(scores, ended, l.missing_eos_penalty)
    kl_seq = jnp.sum((out['logp'] - out['ref_logp']) * rmask, -1)      # k1: log pi - log ref
    adv = group_advantages(method, scores, kl_seq, k, l.kl_coef)
    n_tok = jnp.maximum(jnp.sum(rmask), 1.0)
    metrics = {'proxy': jnp.mean(out['scores']), 'kl': jnp.mean(kl_seq),
               'entropy': jnp.sum(out['entropy']) / n_tok, 'length': jnp.mean(jnp.sum(rmask, -1)),
               'eos_rate': jnp.mean(ended.astype(jnp.float32)),
               'group_std': jnp.mean(jnp.std(scores.reshape(-1, k), -1)),
               'response_tokens': jnp.sum(rmask)}
    batch = {'tokens': tokens, 'mask': mask, 'old_logp': out['logp'], 'ref_logp': out['ref_logp'],
             'adv': adv}
    return batch, metrics

  def loss_fn(params, b, rng, frozen):
    del rng
    logp, _ = rollout.response_logprobs(trees.full(params, frozen), b['tokens'], b['mask'],
                                        n_prompt, cfg, temp)
    rmask = b['mask'][:, n_prompt:]
    if method == 'rloo':
      return pg.rloo_loss(logp, b['adv'], rmask)
    return pg.grpo_loss(logp, b['old_logp'], b['ref_logp'], b['adv'], rmask, l.clip_eps, l.kl_coef,
                        l.level)

  rows = config.train.prompts_per_iter * k
  mb, n_mb = rows // t.minibatches, t.minibatches
  mb_sh = lambda nd: sharding.batch_sharding(mesh, nd)

  def update(state, batch, frozen, key):
    def body(state, i):
      perm = jax.random.permutation(jax.random.fold_in(key, i // n_mb), rows)
      idx = jax.lax.dynamic_slice_in_dim(perm, (i % n_mb) * mb, mb)
      part = {name: jax.lax.with_sharding_constraint(jnp.take(x, idx, axis=0), mb_sh(x.ndim))
              for name, x in batch.items()}
      return train_lib.update(state, part, jax.random.fold_in(key, 1 << 20 | i), frozen,
                              loss_fn=loss_fn, tx=tx, schedule=schedule)
    state, ms = jax.lax.scan(body, state, jnp.arange(t.epochs * n_mb))
    return state, jax.tree.map(jnp.mean, ms)

  spec = {'tokens': 2, 'mask': 2, 'old_logp': 2, 'ref_logp': 2, 'adv': 1}
  batch_sh = {name: mb_sh(nd) for name, nd in spec.items()}
  frozen_sh = jax.tree.map(lambda x: x.sharding, trees.frozen)
  rep = sharding.replicated(mesh)
  update_jit = jax.jit(update, in_shardings=(shardings, batch_sh, frozen_sh, rep),
                       out_shardings=(shardings, rep), donate_argnums=(0,))
  score_jit = jax.jit(score, out_shardings=(batch_sh, rep))

  def on_mesh(fn):
    def call(*args):
      with sharding.activation_sharding(mesh):
        return fn(*args)
    return call
  return Programs(on_mesh(score_jit), on_mesh(update_jit))


# The stage ---------------------------------------------------------------------------------
def run(config: ConfigDict, workdir: str):
  paths.path(workdir).mkdir(parents=True, exist_ok=True)   # a local folder or a gs:// bucket
  t, e = config.train, config.eval
  # 1. Everything a user can get wrong, before any compile.
  check(config)
  pol = policy.open_policy(config.init_from)
  cfg, n_new = pol.cfg, config.max_new_tokens
  max_prompt = cfg.max_seq_len - n_new
  if max_prompt < 1:
    raise ConfigError(f'max_new_tokens={n_new} leaves no room for prompts in the model context '
                      f'({cfg.max_seq_len}).')
  train_ids = policy.encode_prompts(pol, policy.prompt_texts(config, 'train'), max_prompt)
  held_ids = policy.encode_prompts(pol, policy.prompt_texts(config, 'eval'), max_prompt)
  if len(train_ids) < t.prompts_per_iter:
    raise ConfigError(f'{len(train_ids)} training prompts are fewer than train.prompts_per_iter='
                      f'{t.prompts_per_iter}; raise prompts.n_train or lower prompts_per_iter.')
  width = max(len(p) for p in train_ids)           # one prompt width: one program per run
  mesh_cfg = config.mesh.to_dict()
  mesh = sharding.make_mesh(mesh_cfg)
  rows = t.prompts_per_iter * config.k
  div = sharding.batch_size_divisor(mesh)
  if (rows // t.minibatches) % div:
    raise ConfigError(f'A minibatch of {rows // t.minibatches} rollouts (prompts_per_iter x k / '
                      f'minibatches) does not divide over the {div} devices of the batch mesh axes; '
                      f'make it a multiple of {div}.')
  rm, reward = policy.open_reward(config.reward_from, pol, mesh_cfg, max_len=width + n_new)
  stage.check_resume_source(workdir, pol.source)
  if jax.process_index() == 0:
    stage.save_tokenizer(pol.tok, workdir)

  # 2. Trainable tree, reference, state (fresh or resumed with its iteration and RNG).
  trees = policy.trees(config, pol, mesh)
  per_iter = t.epochs * t.minibatches
  setup = stage.build(config, workdir, mesh, axes=trees.axes, init_params=trees.init_params,
                      total_steps=t.iterations * per_iter, initial_params=trees.initial)
  start = int(setup.data_state['iteration']) if setup.data_state else 0
  rng = (jax.random.wrap_key_data(np.asarray(setup.data_state['rng'], np.uint32))
         if setup.data_state else jax.random.key(config.seed))
  trainer.write_config(config, workdir, {
      'model': dataclasses.asdict(cfg),
      'resolved': {'vocab_size': cfg.vocab_size, 'prompt_width': width, 'rollouts_per_iter': rows,
                   'updates_per_iter': per_iter, 'devices': jax.device_count(),
                   'mesh': dict(mesh.shape), 'train_prompts': len(train_ids),
                   'heldout_prompts': len(held_ids)},
      'source': pol.source.record(), 'reward_from': str(paths.absolute(config.reward_from))})
  print(f'{config.method} from {pol.source.path} (step {pol.source.step}) against {config.reward_from}, '
        f'peft {trees.pcfg.method}: {t.prompts_per_iter} prompts x k={config.k} per iteration, '
        f'{per_iter} updates each; {len(train_ids):,} training / {len(held_ids)} held-out prompts; '
        f'mesh {dict(mesh.shape)}; ' + (f'resuming at iteration {start}' if start else 'starting'))

  progs = programs(config, trees, setup, mesh, width, rm, pol.eos)
  s = policy.sampling_config(pol, n_new, config.temperature)
  update_key = jax.random.fold_in(jax.random.key(config.seed), 0x0FD)
  eval_key = jax.random.fold_in(jax.random.key(config.seed), 0xE7A1)   # same draws every time
  evals = online.EvalLog(workdir, start)
  state, frozen = setup.state, trees.frozen

  def held_out(iteration):
    report = policy.evaluate(trees.generation(state.params, frozen), frozen, pol, held_ids, eval_key,
                             max_new_tokens=n_new, gold_kind=e.gold, reward=reward, mesh=mesh,
                             batch=e.batch_size, temperature=config.temperature)
    row = evals.add({'iteration': iteration, **{k: v for k, v in report.items() if k != 'samples'}})
    tqdm.write(f"iteration {iteration}: held-out gold {row['gold']:+.3f}, proxy {row['proxy']:+.3f}, "
               f"KL {row['kl']:.3f}, length {row['length']:.1f}, eos {row['eos_rate']:.2f}")

  def iterate(it):
    nonlocal state, rng
    t0 = time.perf_counter()
    rng, k_sample = jax.random.split(rng)
    idx = prompt_indices(len(train_ids), t.prompts_per_iter, it, config.seed)
    prompts = [train_ids[i] for i in idx for _ in range(config.k)]
    ptoks, pmask = decode.left_pad(prompts, width, rows)
    gen = decode.generate_padded(trees.generation(state.params, frozen), ptoks, pmask, k_sample,
                                 cfg, s, mesh=mesh)
    tokens, mask = gen.sequences()
    jax.block_until_ready(tokens)
    t1 = time.perf_counter()
    batch, m = progs.score(state.params, frozen, rm.params, tokens, mask)
    m = jax.device_get(m)
    t2 = time.perf_counter()
    state, um = progs.update(state, batch, frozen, jax.random.fold_in(update_key, it))
    um = jax.device_get(um)
    t3 = time.perf_counter()
    g = gold.score(policy.texts_of(pol, gen), e.gold)
    t4 = time.perf_counter()
    return {**{k: float(v) for k, v in m.items()}, 'gold': float(g.mean()),
            **{('kl_loss' if k == 'kl' else k): float(v) for k, v in um.items() if k != 'tokens'},
            'time_generate': t1 - t0, 'time_score': t2 - t1, 'time_update': t3 - t2,
            'time_gold': t4 - t3, 'tokens_per_sec': float(m['response_tokens']) / (t4 - t0)}

  def save(done):
    setup.checkpointer.save(done, state, {'iteration': done,
                                          'rng': np.asarray(jax.random.key_data(rng)).tolist()},
                            {'iteration': done})

  end = t.iterations if not t.stop_after else min(t.iterations, start + t.stop_after)
  online.run_iterations(
      workdir, start=start, end=end, total=t.iterations, desc=config.method, iterate=iterate,
      evaluate=held_out, save=save, checkpointer=setup.checkpointer, eval_every=t.eval_every,
      checkpoint_every=t.checkpoint_every, eval_before=e.before,
      postfix={'proxy': '+.3f', 'gold': '+.3f', 'kl': '.3f', 'tokens_per_sec': ',.0f'})
  if jax.process_index() == 0:
    plot(workdir, config.method)
  if end < t.iterations:
    return state
  results = {'method': config.method, 'iterations': t.iterations,
             'before': evals.rows[0] if evals.rows and evals.rows[0]['iteration'] == 0 else None,
             'after': evals.rows[-1] if evals.rows else None}
  if jax.process_index() == 0:
    paths.write_text(paths.path(workdir) / 'eval.json', json.dumps(results, indent=2))
    print(f'{"iteration":>9s} {"gold":>7s} {"proxy":>7s} {"KL":>7s} {"length":>6s} {"eos":>5s}')
    for r in evals.rows:
      print(f"{r['iteration']:9d} {r['gold']:+7.3f} {r.get('proxy', float('nan')):+7.3f} "
            f"{r['kl']:7.3f} {r['length']:6.1f} {r['eos_rate']:5.2f}")
  return state


def plot(workdir: str, title: str) -> None:
  """reward.png: proxy and gold of the rollouts (lines) and of the held-out evaluations
  (markers) against iteration, and the KL to the reference."""
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  path = paths.path(workdir) / 'metrics.jsonl'   # epath: the workdir may be a bucket (gs://)
  if not path.exists():
    return
  rows = runlog.read(path)
  evals = runlog.read(paths.path(workdir) / online.EVAL_FILE)
  fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
  it = [r['step'] for r in rows]
  for name, color in (('proxy', 'C0'), ('gold', 'C1')):
    a.plot(it, [r[name] for r in rows], color=color, label=f'{name} (rollouts)')
    a.plot([r['iteration'] for r in evals if name in r], [r[name] for r in evals if name in r], 'o',
           color=color, label=f'{name} (held-out)')
  b.plot(it, [r['kl'] for r in rows], color='C2', label='KL (rollouts)')
  b.plot([r['iteration'] for r in evals], [r['kl'] for r in evals], 'o', color='C2', label='KL (held-out)')
  for ax, y in ((a, 'reward'), (b, 'KL(pi || ref), nats / sequence')):
    ax.set_xlabel('iteration')
    ax.set_ylabel(y)
    ax.legend()
  fig.suptitle(title)
  fig.tight_layout()
  runlog.save_png(fig, paths.path(workdir) / 'reward.png', dpi=100)
