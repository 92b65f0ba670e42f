"""PPO from human (here: gold-labelled) feedback, InstructGPT's step 3 (`ppo` experiment).

  init_from (SFT workdir: the policy and the frozen reference) + reward_from (reward workdir)
  each iteration:  rollout (lm.decode.generate_padded from the current policy: left-padded
                   prompts, EOS stop, truncation at max_new_tokens)
                -> ONE scoring jit (policy / reference log-probs, values, RM score)
                -> ONE update jit (per-token KL rewards -> GAE -> lax.scan over epochs x
                   shuffled minibatches (x microbatches) of clipped surrogate + value loss)
                -> KL controller (fixed beta, or Ziegler et al.'s adaptive one) on the host
  logs          metrics.jsonl / TensorBoard per iteration (gold and proxy reward of the
                rollout, KL, entropy, clip fraction, approx-KL, value error, length, EOS rate,
                beta, seconds in generation / scoring / update)
  eval.jsonl    held-out {iteration, gold, proxy, kl, beta, ...} (experiments.stages.policy.evaluate)
                before training, every eval.every iterations and at the end; ppo.png plots
                gold and proxy against sqrt(KL): the PPO points of the over-optimisation study
  checkpoints   train state + beta + reward moments + rollout RNG + iteration: a resumed run
                continues exactly

Jitted pieces and the trainable / frozen trees: experiments/stages/ppo_step.py.
"""
from __future__ import annotations

import dataclasses
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from ml_collections import ConfigDict
from tqdm import tqdm

from experiments.stages import reward_model
from data import sources, tokenizers
from experiments.stages import runlog
from experiments.stages import policy as policy_lib
from experiments.stages import online, ppo_step, stage, trainer
from lm import checkpoint as ckpt_lib
from lm import decode, heads, model, paths, peft, sharding
from lm.config import ConfigError
from rl import common, gold, ppo, rollout

KL_MODES = ('fixed', 'adaptive')
VALUE_INITS = ('reward', 'policy_head')
SCORE_SCALES = ('none', 'running')
PEFT_METHODS = ('none', 'lora')


# 1. Start-up checks: one sentence each, before any compile ------------------------------------
def check(config: ConfigDict) -> None:
  def one_of(name, value, allowed):
    if value not in allowed:
      raise ConfigError(f'{name}={value!r} is not known; choose one of {allowed}.')
  one_of('kl.mode', config.kl.mode, KL_MODES)
  one_of('reward.kl_estimator', config.reward.kl_estimator, common.KL_ESTIMATORS)
  one_of('reward.score_scale', config.reward.score_scale, SCORE_SCALES)
  one_of('value.init', config.value.init, VALUE_INITS)
  one_of('peft.method', config.peft.method, PEFT_METHODS)
  gold.check(config.gold)
  if config.kl.mode == 'adaptive' and config.kl.target <= 0:
    raise ConfigError(f'kl.target={config.kl.target}: the adaptive KL controller steers towards a '
                      'positive KL (nats per sequence); set kl.target > 0 or kl.mode=fixed.')
  if config.kl.beta < 0 or (config.kl.mode == 'adaptive' and config.kl.horizon <= 0):
    raise ConfigError('kl.beta must be >= 0 and kl.horizon > 0.')
  if not config.reward_from:
    raise ConfigError('ppo needs --config.reward_from=DIR (a reward workdir).')
  r, p = config.rollout, config.ppo
  if r.max_new_tokens < 1 or r.temperature <= 0:
    raise ConfigError('rollout.max_new_tokens must be >= 1 and rollout.temperature > 0.')
  if min(p.epochs, p.minibatches, p.grad_accum) < 1:
    raise ConfigError('ppo.epochs, ppo.minibatches and ppo.grad_accum must be >= 1.')


def check_batch(config: ConfigDict, mesh) -> None:
  """Rollout rows split into minibatches, microbatches, then over the batch mesh axes."""
  b, m, k = config.rollout.batch_size, config.ppo.minibatches, config.ppo.grad_accum
  div = sharding.batch_size_divisor(mesh)
  if b % (m * k) or (b // (m * k)) % div or b % div:
    raise ConfigError(f'rollout.batch_size={b} must split into ppo.minibatches={m} x '
                      f'ppo.grad_accum={k} microbatches that divide over the {div} devices of the '
                      f'batch mesh axes; use a multiple of {m * k * div}.')


def check_tokenizers(pol_tok, rm_tok) -> None:
  if not policy_lib.same_tokenizer(tokenizers.add_special_tokens(rm_tok, ['eos']), pol_tok):
    raise ConfigError('The reward model (reward_from) uses a different tokenizer from the policy '
                      '(init_from); train the reward model from this policy\'s SFT or pretraining run.')


# 2. Trees ------------------------------------------------------------------------------------
def _plain(tree):
  """A trunk with any LoRA folded in (a LoRA reward model's trunk as a trainable value trunk)."""
  def fold(w):
    n, r = w.a.shape[0], w.a.shape[-1]
    d = jnp.matmul(w.a.reshape(n, -1, r), w.b.reshape(n, r, -1), precision='highest')
    return (w.w + w.scale * d.reshape(w.w.shape)).astype(w.w.dtype)
  return jax.tree.map(lambda x: fold(x) if isinstance(x, peft.LoRAWeight) else x, tree,
                      is_leaf=lambda x: isinstance(x, peft.LoRAWeight))


def build_trees(config, s: ppo_step.Settings, pol, rm, mesh):
  """(axes, init_params, initial_params, frozen) of the trainable / frozen trees."""
  cfg, rm_cfg, pcfg = s.cfg, s.rm_cfg, s.pcfg
  rep = sharding.replicated(mesh)
  # load_reward_model places the RM on its own mesh; move it onto this one (same specs).
  onto = lambda t: jax.tree.map(lambda x: jax.device_put(x, NamedSharding(mesh, x.sharding.spec)), t)
  rm_params = onto(rm.params)
  frozen_rm = {'trunk': rm_params['trunk'], 'head': rm_params['head'],
               'gain': jax.device_put(jnp.float32(rm.gain), rep),
               'bias': jax.device_put(jnp.float32(rm.bias), rep)}
  if s.value_init == 'reward':
    v_axes = {'value': {'trunk': model.logical_axes(rm_cfg), 'head': heads.logical_axes(rm_cfg, 1)}}
    v_init = lambda k: {'value': {'trunk': model.init(rm_cfg, k), 'head': heads.init(rm_cfg, 1, k)}}
    # (stage.build copies initial params into the train state: no buffer is shared)
    v_initial = lambda: {'value': {'trunk': _plain(rm_params['trunk']), 'head': rm_params['head']}}
  else:
    v_axes = {'value_head': heads.logical_axes(cfg, 1)}
    v_init = lambda k: {'value_head': heads.init(cfg, 1, k, init_std=0.0)}
    v_initial = lambda: v_init(jax.random.key(0))
  if pcfg.method == 'none':
    frozen = {'ref': pol.source.restore_params(mesh, cfg), 'rm': frozen_rm}
    axes = {'policy': model.logical_axes(cfg), **v_axes}
    init = lambda k: {'policy': model.init(cfg, k), **v_init(k)}
    initial = lambda: {'policy': frozen['ref'], **v_initial()}
  else:
    frozen = {'base': pol.source.restore_params(mesh, cfg), 'rm': frozen_rm}
    axes = {'adapters': peft.logical_axes(cfg, pcfg), **v_axes}
    init = lambda k: {'adapters': peft.init(cfg, pcfg, k, base_params=frozen['base']), **v_init(k)}
    initial = lambda: {'adapters': peft.init(cfg, pcfg, jax.random.key(config.seed),
                                             base_params=frozen['base']), **v_initial()}
  return axes, init, initial, frozen


def settings(config, pol, rm_cfg, n_prompt: int) -> ppo_step.Settings:
  p, r = config.ppo, config.reward
  return ppo_step.Settings(
      cfg=pol.cfg, rm_cfg=rm_cfg, pcfg=stage.peft_config(config), n_prompt=n_prompt,
      temperature=float(config.rollout.temperature), value_init=config.value.init,
      kl_estimator=r.kl_estimator, missing_eos_penalty=float(r.missing_eos_penalty),
      score_clip=float(r.score_clip), score_scale=r.score_scale, whiten_rewards=bool(r.whiten),
      whiten_advantages=bool(p.whiten_advantages), gamma=float(p.gamma), lam=float(p.lam),
      clip_eps=float(p.clip_eps), vf_clip_eps=float(p.vf_clip_eps), vf_coef=float(p.vf_coef),
      entropy_coef=float(p.entropy_coef), epochs=int(p.epochs), minibatches=int(p.minibatches),
      grad_accum=int(p.grad_accum), ptx_coef=float(config.ptx.coef))


_UPDATES: dict = {}


def update_fn(s, setup, mesh, optim: dict, total_steps: int):
  """The jitted update, cached per (settings, optimizer, mesh): reruns in a process reuse it."""
  key = (s, json.dumps(optim, sort_keys=True, default=str), total_steps, mesh)
  if key not in _UPDATES:
    _UPDATES[key] = ppo_step.make_update(s, setup.tx, mesh, setup.shardings)
  return _UPDATES[key]


# 3. PPO-ptx data -----------------------------------------------------------------------------
def ptx_tokens(config, tok) -> np.ndarray:
  """Token ids of the first ptx.chars characters of the pretraining corpus (works text)."""
  text, left = [], config.ptx.chars
  for path in sources.resolve_files(config.ptx.corpus):
    with open(path, encoding='utf-8') as f:
      text.append(f.read(left))
    left -= len(text[-1])
    if left <= 0:
      break
  ids = np.asarray(tok.encode(''.join(text)), np.int32)
  if len(ids) <= config.ptx.seq_len + 1:
    raise ConfigError(f'ptx.corpus={config.ptx.corpus!r} gives {len(ids)} tokens, fewer than '
                      f'ptx.seq_len={config.ptx.seq_len}; raise ptx.chars or lower ptx.seq_len.')
  return ids


def ptx_batch(ids: np.ndarray, rows: int, seq_len: int, rng: np.random.Generator) -> dict:
  starts = rng.integers(0, len(ids) - seq_len - 1, rows)
  w = np.stack([ids[i:i + seq_len + 1] for i in starts])
  return {'ptx_inputs': w[:, :-1], 'ptx_targets': w[:, 1:],
          'ptx_weights': np.ones((rows, seq_len), np.float32)}


# 4. The run ----------------------------------------------------------------------------------
@dataclasses.dataclass
class Pieces:
  """Everything a run sets up before its first compile (tests drive these directly)."""
  config: ConfigDict
  pol: policy_lib.Policy
  rm: reward_model.RewardModel
  s: ppo_step.Settings
  mesh: object
  setup: stage.Setup
  frozen: dict
  st: dict                 # the checkpointed state: train, beta, moments, rng, iteration
  checkpointer: ckpt_lib.Checkpointer
  train_ids: list
  eval_ids: list
  ptx_ids: np.ndarray | None
  score: object            # the scoring jit
  update: object           # the update jit

  @property
  def start(self) -> int:
    return int(self.st['iteration'])


def prepare(config: ConfigDict, workdir: str, devices=None) -> Pieces:
  check(config)
  paths.path(workdir).mkdir(parents=True, exist_ok=True)   # a local folder or a gs:// bucket
  pol = policy_lib.open_policy(config.init_from)
  check_tokenizers(pol.tok, policy_lib.reward_tokenizer(config.reward_from))
  rm_saved = json.loads(paths.read_text(paths.path(config.reward_from) / 'config.json'))
  r = config.rollout
  max_prompt = pol.cfg.max_seq_len - r.max_new_tokens
  train_ids = policy_lib.encode_prompts(pol, policy_lib.prompt_texts(config, 'train'), max_prompt)
  eval_ids = policy_lib.encode_prompts(pol, policy_lib.prompt_texts(config, 'eval'), max_prompt)
  n_prompt = max(len(p) for p in train_ids)
  rm_len = min(rm_saved['model']['max_seq_len'], rm_saved['resolved']['seq_len'])
  if max(n_prompt, max(len(p) for p in eval_ids)) + r.max_new_tokens > rm_len:
    raise ConfigError(f'Prompts of up to {n_prompt} tokens plus rollout.max_new_tokens='
                      f'{r.max_new_tokens} exceed the reward model\'s {rm_len}-token context; '
                      'lower max_new_tokens.')
  if r.batch_size > len(train_ids):
    raise ConfigError(f'rollout.batch_size={r.batch_size} exceeds the {len(train_ids)} training '
                      'prompts; raise prompts.n_train.')
  mesh = sharding.make_mesh(config.mesh.to_dict(), devices)
  check_batch(config, mesh)
  stage.check_resume_source(workdir, pol.source)
  if jax.process_index() == 0:   # the policy's tokenizer: the run is a source for later stages
    stage.save_tokenizer(pol.tok, workdir)

  # (on all devices; build_trees moves it onto `mesh`, which may use fewer)
  rm = reward_model.load_reward_model(config.reward_from, None if devices else config.mesh.to_dict())
  s = settings(config, pol, rm.cfg, n_prompt)
  ptx_ids = ptx_tokens(config, pol.tok) if s.ptx_coef > 0 else None
  axes, init, initial, frozen = build_trees(config, s, pol, rm, mesh)
  total = config.train.iterations * s.epochs * s.minibatches
  setup = stage.build(config, None, mesh, axes=axes, init_params=init, total_steps=total,
                      initial_params=initial)
  rep = sharding.replicated(mesh)
  st = {'train': setup.state, 'beta': jax.device_put(jnp.float32(config.kl.beta), rep),
        'moments': jax.device_put(ppo.running_moments()._asdict(), rep),
        'rng': jax.device_put(jax.random.key_data(jax.random.key(config.seed)), rep),
        'iteration': jax.device_put(jnp.int32(0), rep)}
  ck = ckpt_lib.Checkpointer(paths.path(workdir) / 'checkpoints', config.train.keep_checkpoints)
  found = ck.restore_or_none(jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), st))
  if found is not None:
    st = found[1]
  trainer.write_config(config, workdir, {
      'source': pol.source.record(), 'reward_source': str(paths.absolute(config.reward_from)),
      'resolved': {'vocab_size': pol.cfg.vocab_size,
                   # a later stage (init_from), export and evaluate read the policy from here
                   'params_at': ['train', 'params', 'policy' if s.pcfg.method == 'none' else 'adapters'],
                   'n_prompt': n_prompt, 'train_prompts': len(train_ids),
                   'eval_prompts': len(eval_ids), 'devices': mesh.size,
                   'mesh': dict(mesh.shape), 'updates': total,
                   'policy_params': pol.cfg.num_params(), 'rm_params': rm.cfg.num_params()},
      'model': dataclasses.asdict(pol.cfg)})
  return Pieces(config, pol, rm, s, mesh, setup, frozen, st, ck, train_ids, eval_ids, ptx_ids,
                ppo_step.make_score(s, mesh), update_fn(s, setup, mesh, config.optim.to_dict(), total))


_MERGE: dict = {}


def sampling_params(p: Pieces, params):
  """What the sampler runs: the policy's params, or LoRA merged into the base (lm.decode
  shards plain params; the merged copy lives only while sampling)."""
  if p.s.pcfg.method == 'none':
    return params['policy']
  if p.s not in _MERGE:
    _MERGE[p.s] = jax.jit(lambda a, base: peft.merge(base, a, p.s.cfg, p.s.pcfg))
  return _MERGE[p.s](params['adapters'], p.frozen['base'])


def collect(p: Pieces, params, it_key) -> tuple:
  """One rollout and its scoring: (generation, rollout dict for the update, gen s, score s).
  The prompts come from `it_key` too, so the checkpointed RNG fixes the whole iteration."""
  r = p.config.rollout
  host_rng = np.random.default_rng(np.asarray(jax.random.key_data(it_key)))
  idx = host_rng.choice(len(p.train_ids), r.batch_size, replace=False)
  toks, pmask = decode.left_pad([p.train_ids[i] for i in idx], p.s.n_prompt)
  sampling = policy_lib.sampling_config(p.pol, r.max_new_tokens, r.temperature)
  t0 = time.perf_counter()
  gen = decode.generate_padded(sampling_params(p, params), toks, pmask,
                               jax.random.fold_in(it_key, 0), p.pol.cfg, sampling, mesh=p.mesh)
  tokens, mask = jax.block_until_ready(gen.sequences())
  t1 = time.perf_counter()
  scored = jax.block_until_ready(p.score(params, p.frozen, tokens, mask))
  t2 = time.perf_counter()
  ro = {'tokens': tokens, 'mask': mask, 'has_eos': rollout.has_eos(gen.tokens, gen.mask, p.pol.eos),
        **scored}
  if p.ptx_ids is not None:
    batch_sh = sharding.batch_sharding(p.mesh, 2)
    ro.update({k: jax.device_put(v, batch_sh) for k, v in
               ptx_batch(p.ptx_ids, r.batch_size, p.config.ptx.seq_len, host_rng).items()})
  return gen, ro, t1 - t0, t2 - t1


def next_beta(config, beta, kl: float, n: int):
  if config.kl.mode != 'adaptive':
    return beta
  ctl = ppo.KLController(beta, jnp.float32(config.kl.target), jnp.float32(config.kl.horizon))
  return ppo.update_kl_controller(ctl, kl, n).beta


def run(config: ConfigDict, workdir: str):
  p = prepare(config, workdir)
  r, t, s, mesh, pol = config.rollout, config.train, p.s, p.mesh, p.pol
  start = p.start
  print(f'ppo from {pol.source.path} with reward {config.reward_from}: policy '
        f'{pol.cfg.num_params():,} params ({s.pcfg.method}), value {s.value_init}, '
        f'{len(p.train_ids):,} train / {len(p.eval_ids):,} held-out prompts, rollout '
        f'{r.batch_size} x {s.n_prompt}+{r.max_new_tokens} tokens; mesh {dict(mesh.shape)}; '
        + (f'resuming at iteration {start}' if start else 'starting'), flush=True)
  ref = ppo_step.reference_params(p.frozen, s)
  rm_score = lambda tk, m: p.rm.score(p.frozen['rm'], tk, m)
  eval_key = jax.random.fold_in(jax.random.key(config.seed), 1 << 20)
  rep = sharding.replicated(mesh)

  evals = online.EvalLog(workdir, start)
  state, beta = p.st['train'], p.st['beta']
  moments = ppo.RunningMoments(**p.st['moments'])
  rng = jax.random.wrap_key_data(p.st['rng'])

  def evaluate(it):
    e = policy_lib.evaluate(sampling_params(p, state.params), ref, pol, p.eval_ids, eval_key,
                            max_new_tokens=config.eval.max_new_tokens or r.max_new_tokens,
                            gold_kind=config.gold, reward=rm_score, mesh=mesh,
                            batch=config.eval.batch_size, temperature=r.temperature)
    row = evals.add({'iteration': it, 'gold': e['gold'], 'proxy': e['proxy'], 'kl': e['kl'],
                     'beta': float(beta), 'sqrt_kl': float(np.sqrt(max(e['kl'], 0.0))),
                     'gold_stderr': e['gold_stderr'], 'length': e['length'],
                     'eos_rate': e['eos_rate']})
    tqdm.write(f'eval @ {it}: gold {row["gold"]:+.4f} proxy {row["proxy"]:+.3f} kl {row["kl"]:.3f}'
               f' | {e["samples"][0]!r}')

  def iterate(it):
    nonlocal state, moments, beta, rng
    it_key, rng = jax.random.split(rng)
    gen, ro, gen_s, score_s = collect(p, state.params, it_key)
    t0 = time.perf_counter()
    state, moments, um = p.update(state, p.frozen, ro, beta, moments, jax.random.fold_in(it_key, 1))
    um = jax.device_get(um)
    update_s = time.perf_counter() - t0
    # Host side: gold of the rollout, KL per sequence, the KL controller.
    kl_seq = np.asarray(jnp.sum(ro['logp'] - ro['ref_logp'], axis=1))
    rmask = np.asarray(gen.mask, np.float32)
    texts = policy_lib.texts_of(pol, gen)
    row = {'loss': um['loss'], 'gold': float(gold.score(texts, config.gold).mean()),
           'proxy': float(np.mean(ro['scores'])), 'kl': float(kl_seq.mean()),
           'entropy': float((np.asarray(ro['entropy']) * rmask).sum() / max(rmask.sum(), 1)),
           'length': float(np.asarray(gen.lengths).mean()),
           'eos_rate': float(np.mean(ro['has_eos'])), 'beta': float(beta),
           'gen_s': gen_s, 'score_s': score_s, 'update_s': update_s,
           'tokens_per_sec': float(rmask.sum()) / (gen_s + score_s + update_s),
           **{k: um[k] for k in ('clipfrac', 'approx_kl', 'value_error', 'value_loss',
                                 'vf_clipfrac', 'grad_norm', 'skipped', 'reward_total',
                                 'ptx_loss') if k in um}}
    beta = jax.device_put(next_beta(config, beta, row['kl'], r.batch_size), rep)
    return row

  def save(it):
    p.checkpointer.save(it, {'train': state, 'beta': beta, 'moments': moments._asdict(),
                             'rng': jax.random.key_data(rng), 'iteration': jnp.int32(it)},
                        {}, {'iteration': it})

  end = t.iterations if not t.stop_after else min(t.iterations, start + t.stop_after)
  it = online.run_iterations(
      workdir, start=start, end=end, total=t.iterations, desc='ppo', iterate=iterate,
      evaluate=evaluate, save=save, checkpointer=p.checkpointer,
      eval_every=config.eval.every, checkpoint_every=t.checkpoint_every,
      eval_before=config.eval.before,
      postfix={'gold': '+.3f', 'proxy': '+.2f', 'kl': '.2f', 'tokens_per_sec': ',.0f'})
  return finish(workdir, state, start, it, evals.rows)


def read_evals(workdir: str) -> list[dict]:
  return runlog.read(paths.path(workdir) / online.EVAL_FILE)


def finish(workdir: str, state, start: int, it: int, evals: list[dict]) -> dict:
  """report.json (held-out before / after, mean seconds per iteration by phase), plots, table."""
  rows = runlog.read(paths.path(workdir) / 'metrics.jsonl')
  timed = rows[1:] or rows          # the first iteration compiles
  split = {k: float(np.mean([r[k] for r in timed])) for k in ('gen_s', 'score_s', 'update_s')} if rows else {}
  report = {'iterations': it, 'started_at': start, 'before': evals[0] if evals else None,
            'after': evals[-1] if evals else None, 'seconds_per_iteration': split,
            'tokens_per_sec': float(np.mean([r['tokens_per_sec'] for r in timed])) if rows else None}
  if jax.process_index() == 0:
    paths.write_text(paths.path(workdir) / 'report.json', json.dumps(report, indent=2))
    if evals:
      plot(evals, paths.path(workdir) / 'ppo.png', paths.absolute(workdir).name)
    print(f'{"iteration":>9} {"gold":>8} {"proxy":>8} {"kl":>8} {"beta":>7}')
    for e in evals:
      print(f'{e["iteration"]:>9} {e["gold"]:>+8.4f} {e["proxy"]:>+8.3f} {e["kl"]:>8.3f} {e["beta"]:>7.4f}')
    if split:
      print('seconds per iteration: ' + ', '.join(f'{k[:-2]} {v:.3f}' for k, v in split.items()))
  report['state'] = state
  return report


def plot(evals: list[dict], path: str, title: str = '') -> str:
  """Held-out gold and proxy reward against sqrt(KL to the reference) (Gao et al.'s axes)."""
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  d = [np.sqrt(max(e['kl'], 0.0)) for e in evals]
  fig, ax = plt.subplots(figsize=(6, 4))
  ax.plot(d, [e['gold'] for e in evals], 'o-', label='gold (VADER)', ms=3)
  ax2 = ax.twinx()
  ax2.plot(d, [e['proxy'] for e in evals], 's--', color='tab:orange', label='proxy (RM)', ms=3)
  ax.set_xlabel('sqrt(KL(pi || pi_ref)) (nats^0.5)')
  ax.set_ylabel('gold reward')
  ax2.set_ylabel('proxy reward (normalised)')
  ax.set_title(title)
  ax.grid(alpha=0.3)
  lines = ax.get_lines() + ax2.get_lines()
  ax.legend(lines, [l.get_label() for l in lines], loc='upper left')
  fig.tight_layout()
  return runlog.save_png(fig, path, dpi=120)
