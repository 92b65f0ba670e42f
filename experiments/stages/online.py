"""The one online-RL loop. PPO, GRPO and RLOO (experiments/ppo.py, grpo.py, rloo.py) are
adapters on it: an algorithm supplies only what differs, and this file owns the rest.

  algorithm supplies             the skeleton owns
  ------------------             -----------------
  check(config)                  policy (init_from) and reward model (reward_from), opened one
  trees(ctx)       role-named    way with one tokenizer check; prompts; the mesh and the batch
  score(...)       in one jit:   checks; stage.build and the checkpointed state; the draw of
                   rollout ->    each iteration's prompts and keys; generation; the update
                   batch+metrics (epochs x shuffled minibatches of lm.train.update, one jit);
  loss_fn(...)     the update's  gold scoring; held-out evaluations; metrics.jsonl, eval.jsonl,
                   objective     results.json, plots; checkpoints and preemption

Trees have role names. Trainable: {'policy': params} (full fine-tuning) or {'adapters': LoRA}
(whose frozen base is the reference), plus an algorithm's own ('value', 'value_head').
Frozen: {'reference': params, 'reward': the reward model's params}. Frozen trees are step
arguments, never constants.

One iteration: `draw` (prompts_per_iter random training prompts, each `samples` times, and
the iteration's keys, all from the checkpointed RNG) -> generate (stages/rollouts.py: lm.decode,
one program per run, or with rollout.engine=True lm/engine, which prefills each prompt once for
its k samples and runs rollout.engine_slots rows at a time, a row joining as another ends) -> score (one jit) -> update (one jit: algorithm.prepare, then the minibatch
scans) -> algorithm.after on the host (e.g. PPO's KL controller). Checkpoints hold the train
state, the algorithm's extras, the RNG and the iteration, so a resumed run continues exactly.
Metrics rows carry the time split: time_generate, time_rules (rule rewards), time_score,
time_update, time_reward (gold), time_iteration.

Dynamic sampling (DAPO; rollout.dynamic_sampling with reward.kind='rules', GRPO and RLOO):
groups whose rewards are all equal (zero advantage, no gradient) are dropped and groups of
fresh training prompts generated, up to rollout.max_refills rounds, until rollout.prompts
informative groups are found; short of them the batch is filled with all-equal groups that
leave the loss (batch['keep'] = 0) and the log says so. Refill round j draws its prompts from
fold_in(fold_in(it_key, 2), j) and its samples from fold_in(fold_in(it_key, 3), j): exact
resume. Rows: groups/all_equal (of every generated group; logged by GRPO and RLOO's jit over
the batch when the switch is off), dynamic/refills, dynamic/extra_rows (generations beyond the
batch), dynamic/informative; reward/* and gold then describe every generated row, the jit's
metrics (proxy, kl, length, ...) the trained batch.

The reward: reward.kind='model' scores rows with the reward model in reward_from (inside the
scoring jit); reward.kind='rules' loads no reward model: after generation the host scores the
decoded responses with reward.rules (rl/rewards.py) against the prompts' example fields
(prompts.source=arith or jsonl) and passes the weighted totals into the scoring jit as the
frozen entry 'rule_scores' (ctx.reward returns them); metrics rows carry reward/<rule>,
reward/total and reward/unparsable. kl.coef = 0 with full fine-tuning holds no reference.
"""
from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
from ml_collections import ConfigDict
from tqdm import tqdm

from experiments.stages import (compiled, gold_model, iterations, online_report, policy, rollouts,
                                sandbox_rules, stage, trainer)
from lm import checkpoint as ckpt_lib
from lm import compiled as programs_lib
from lm import decode, model, paths, peft, sharding, train as train_lib
from lm.config import ConfigError
from rl import common, rewards, rollout

POSTFIX = {'gold': '+.3f', 'proxy': '+.3f', 'kl': '.3f', 'tokens_per_sec': ',.0f'}


@dataclasses.dataclass
class Context:
  """What the skeleton set up before an algorithm builds anything (read-only for adapters)."""
  config: ConfigDict
  pol: policy.Policy
  rm: Any                        # stages.reward_model.RewardModel, on this run's mesh
  mesh: Any
  train_ids: list
  eval_ids: list
  width: int                     # prompts are left-padded to this many tokens
  pcfg: peft.PeftConfig
  train_examples: list = dataclasses.field(default_factory=list)   # prompts' fields (rules)
  eval_examples: list = dataclasses.field(default_factory=list)
  rules: list | None = None      # rl/rewards.Rule list when reward.kind='rules'

  @property
  def rows(self) -> int:
    r = self.config.rollout
    return r.prompts * r.samples

  def reward(self, frozen, tokens, mask):
    """[B] normalised reward-model scores of full rows (usable inside a jit), or the rule
    rewards the host computed for these rows (frozen['rule_scores'])."""
    if 'rule_scores' in frozen:
      return frozen['rule_scores']
    return self.rm.score(frozen['reward'], tokens, mask)


class Algorithm:
  """An online RL method. Override what differs; `score` and `loss_fn` are required."""
  name = ''
  adaptive_kl = False            # whether kl.mode=adaptive means something (PPO's controller)
  groups = False                 # k samples per prompt whose all-equal groups carry no gradient
                                 # (GRPO, RLOO): rollout.dynamic_sampling may drop them; the
                                 # loss then reads batch['keep'] [rows] (0: out of the loss)

  def check(self, config: ConfigDict) -> None:
    """Start-up errors of the algorithm's own keys (one sentence each)."""

  def trees(self, ctx: Context) -> policy.Trees:
    return policy_trees(ctx)

  def extras(self, ctx: Context) -> dict:
    """Arrays checkpointed beside the train state (e.g. PPO's beta); {} for none."""
    return {}

  def score(self, ctx: Context, trees: policy.Trees, params, frozen, tokens, mask) -> tuple[dict, dict]:
    """In one jit: a rollout [B, P+N] -> (rows for the update, scalar metrics)."""
    raise NotImplementedError

  def prepare(self, ctx: Context, batch: dict, extras: dict) -> tuple[dict, dict, dict]:
    """In the update jit, before the minibatches: (batch, extras, metrics)."""
    return batch, extras, {}

  def loss_fn(self, ctx: Context, trees: policy.Trees) -> Callable:
    """(params, minibatch, rng, frozen) -> (loss_sum, weight, metric sums)."""
    raise NotImplementedError

  def batch_extras(self, ctx: Context, host_rng: np.random.Generator) -> dict:
    """Host arrays [rows, ...] added to the update batch (e.g. PPO-ptx text)."""
    return {}

  def after(self, ctx: Context, extras: dict, row: dict) -> dict:
    """Host side after the update (e.g. a KL controller); returns the new extras."""
    return extras

  def log_extras(self, extras: dict) -> dict:
    """Scalars of the extras for metrics and eval rows."""
    return {}


# Rule rewards that need the sandbox live in stages/sandbox_rules.py (rl/ imports no experiments/)
response_program, program_rewards = sandbox_rules.response_program, sandbox_rules.program_rewards
FUNCTIONS = sandbox_rules.FUNCTIONS


# Set-up --------------------------------------------------------------------------------------
REWARD_KINDS = ('model', 'rules')


def reward_kind(config: ConfigDict) -> str:
  return config.reward.get('kind', 'model')


def rules_of(config: ConfigDict) -> list:
  """reward.rules parsed (rl/rewards.py); the length rule's max_length defaults to the budget."""
  spec = config.reward.get('rules', None)
  spec = spec.to_dict() if hasattr(spec, 'to_dict') else dict(spec or {})
  return rewards.parse(spec, FUNCTIONS, defaults={'length': {'max_length': config.rollout.max_new_tokens}})


def check(config: ConfigDict, algo: Algorithm) -> None:
  """The skeleton's start-up errors (one sentence each), then the algorithm's."""
  r, t, k = config.rollout, config.train, config.kl
  if reward_kind(config) not in REWARD_KINDS:
    raise ConfigError(f'reward.kind={reward_kind(config)!r} is not known; choose one of {REWARD_KINDS}.')
  if reward_kind(config) == 'rules':
    rules_of(config)
  elif not config.reward_from:
    raise ConfigError(f'{algo.name} needs --config.reward_from=DIR (the workdir of a finished `reward` run) '
                      "or reward.kind='rules'.")
  if r.get('dynamic_sampling', False):
    if not algo.groups:
      raise ConfigError(f'rollout.dynamic_sampling: {algo.name} has no groups of samples whose '
                        'all-equal rewards carry no gradient; it is for GRPO and RLOO.')
    if reward_kind(config) != 'rules':
      raise ConfigError("rollout.dynamic_sampling needs reward.kind='rules' (it drops groups by "
                        'the host rewards of their responses before scoring).')
    if r.get('max_refills', -1) < 0:
      raise ConfigError(f"rollout.max_refills={r.get('max_refills')} must be >= 0 (refill rounds "
                        'of rollout.prompts fresh prompts each).')
  stop = r.get('stop', ())
  if isinstance(stop, str) or not all(isinstance(s, str) and s for s in stop):
    raise ConfigError(f"rollout.stop={stop!r} must be a tuple of non-empty strings, e.g. "
                      "--config.rollout.stop=\"('\\n\\n',)\".")
  if stop and not r.get('engine', False):
    raise ConfigError('rollout.stop needs rollout.engine=True (the static batch ends rows only at EOS).')
  if r.get('engine_slots', 0) < 0:
    raise ConfigError(f"rollout.engine_slots={r.engine_slots} must be >= 0 (0: a slot per rollout row).")
  if r.max_new_tokens < 1 or not r.temperature > 0:
    raise ConfigError('rollout.max_new_tokens must be >= 1 and rollout.temperature > 0 (samples, not greedy).')
  for name in ('prompts', 'samples'):
    if r[name] < 1:
      raise ConfigError(f'rollout.{name}={r[name]} must be >= 1.')
  for name in ('iterations', 'epochs', 'minibatches', 'grad_accum'):
    if t[name] < 1:
      raise ConfigError(f'train.{name}={t[name]} must be >= 1.')
  if k.coef < 0:
    raise ConfigError(f'kl.coef={k.coef} must be >= 0 (0: no KL to the reference).')
  if k.estimator not in common.KL_ESTIMATORS:
    raise ConfigError(f'kl.estimator={k.estimator!r} is not known; choose one of {common.KL_ESTIMATORS}.')
  if k.mode != 'fixed' and not algo.adaptive_kl:
    raise ConfigError(f"kl.mode={k.mode!r}: {algo.name} keeps kl.coef fixed; set kl.mode=fixed.")
  if config.peft.method not in ('none', 'lora'):
    raise ConfigError(f'peft.method={config.peft.method!r}: online RL trains the full policy (none) or '
                      'LoRA (whose reference is the base without adapters); choose none or lora.')
  gold_model.check(config.eval.gold)
  algo.check(config)


def check_mesh(config: ConfigDict, mesh, rows: int) -> None:
  """Rollout rows split into minibatches, microbatches, then over the batch mesh axes."""
  m, a = config.train.minibatches, config.train.grad_accum
  div = sharding.batch_size_divisor(mesh)
  if rows % (m * a) or (rows // (m * a)) % div:
    raise ConfigError(f'The {rows} rollouts per iteration (rollout.prompts x rollout.samples) must '
                      f'split into train.minibatches={m} x train.grad_accum={a} microbatches that '
                      f'divide over the {div} devices of the batch mesh axes; use a multiple of '
                      f'{m * a * div}.')


def open_context(config: ConfigDict, workdir: str, algo: Algorithm, devices=None) -> Context:
  check(config, algo)
  paths.path(workdir).mkdir(parents=True, exist_ok=True)   # a local folder or a gs:// bucket
  r = config.rollout
  pol = policy.open_policy(config.init_from)
  max_prompt = pol.cfg.max_seq_len - r.max_new_tokens
  if max_prompt < 1:
    raise ConfigError(f'rollout.max_new_tokens={r.max_new_tokens} leaves no room for prompts in the '
                      f'model context ({pol.cfg.max_seq_len}).')
  train_ex, eval_ex = policy.prompt_examples(config, 'train'), policy.prompt_examples(config, 'eval')
  train_ids = policy.encode_prompts(pol, [e['prompt'] for e in train_ex], max_prompt)
  eval_ids = policy.encode_prompts(pol, [e['prompt'] for e in eval_ex], max_prompt)
  rules = None
  if reward_kind(config) == 'rules':
    rules = rules_of(config)
    rewards.check_examples(rules, train_ex + eval_ex, FUNCTIONS)
  if r.prompts > len(train_ids):
    raise ConfigError(f'rollout.prompts={r.prompts} exceeds the {len(train_ids)} training prompts; '
                      'raise prompts.n_train or lower rollout.prompts.')
  width = max(len(p) for p in train_ids)           # one prompt width: one program per run
  mesh = sharding.make_mesh(config.mesh.to_dict(), devices)
  check_mesh(config, mesh, r.prompts * r.samples)
  longest = max(width, max(len(p) for p in eval_ids)) + r.max_new_tokens
  rm = policy.open_reward(config.reward_from, pol, mesh, max_len=longest) if rules is None else None
  stage.check_resume_source(workdir, pol.source)
  if jax.process_index() == 0:   # the policy's tokenizer: the run is a source for later stages
    stage.save_tokenizer(pol.tok, workdir)
  return Context(config, pol, rm, mesh, train_ids, eval_ids, width, stage.peft_config(config),
                 train_ex, eval_ex, rules)


def policy_trees(ctx: Context) -> policy.Trees:
  """policy.trees, except that kl.coef = 0 (fixed) with full fine-tuning holds no reference
  model: nothing reads it (its log-probs are taken to be the policy's own, KL 0)."""
  c, pol, mesh = ctx.config, ctx.pol, ctx.mesh
  if not (c.kl.coef == 0 and c.kl.mode == 'fixed' and c.peft.method == 'none'):
    return policy.trees(c, pol, mesh, reward=ctx.rm)
  frozen = {'reward': ctx.rm.params} if ctx.rm is not None else {}
  return policy.Trees({'policy': model.logical_axes(pol.cfg)},
                      lambda k: {'policy': model.init(pol.cfg, k)},
                      lambda: {'policy': pol.source.restore_params(mesh, pol.cfg)}, frozen,
                      jax.tree.map(lambda x: x.sharding, frozen), pol.cfg, stage.peft_config(c))


@dataclasses.dataclass
class Run:
  """A set-up run (tests drive these pieces directly)."""
  ctx: Context
  algo: Algorithm
  trees: policy.Trees
  setup: stage.Setup
  st: dict                       # the checkpointed state: train, extras, rng, iteration
  checkpointer: ckpt_lib.Checkpointer
  score: Callable                # (params, frozen, tokens, mask) -> (batch, metrics)
  update: Callable               # (state, extras, batch, frozen, key) -> (state, extras, metrics)

  @property
  def start(self) -> int:
    return int(self.st['iteration'])


def prepare(config: ConfigDict, workdir: str, algo: Algorithm, devices=None) -> Run:
  ctx = open_context(config, workdir, algo, devices)
  trees = algo.trees(ctx)
  t = config.train
  total = t.iterations * t.epochs * t.minibatches
  setup = stage.build(config, None, ctx.mesh, axes=trees.axes, init_params=trees.init_params,
                      total_steps=total, initial_params=trees.initial)
  rep = sharding.replicated(ctx.mesh)
  st = {'train': setup.state, 'rng': jax.device_put(jax.random.key_data(jax.random.key(config.seed)), rep),
        'iteration': jax.device_put(jnp.int32(0), rep)}
  extras = algo.extras(ctx)
  if extras:
    st['extras'] = jax.device_put(extras, rep)
  ck = ckpt_lib.Checkpointer(paths.path(workdir) / 'checkpoints', t.keep_checkpoints)
  found = ck.restore_or_none(jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), st))
  if found is not None:
    st = found[1]
  trainer.write_config(config, workdir, {
      'source': pol_record(ctx),
      'reward_source': str(paths.absolute(config.reward_from)) if ctx.rm is not None else 'rules',
      'resolved': {'vocab_size': ctx.pol.cfg.vocab_size,
                   # a later stage (init_from), export and evaluate read the policy from here
                   'params_at': ['train', 'params', trees.policy_role],
                   'prompt_width': ctx.width, 'rollouts_per_iter': ctx.rows,
                   'train_prompts': len(ctx.train_ids), 'eval_prompts': len(ctx.eval_ids),
                   'devices': ctx.mesh.size, 'mesh': dict(ctx.mesh.shape), 'updates': total,
                   'policy_params': ctx.pol.cfg.num_params(),
                   'rm_params': ctx.rm.cfg.num_params() if ctx.rm is not None else 0,
                   'reference_held': 'reference' in trees.frozen},
      'model': dataclasses.asdict(ctx.pol.cfg)})
  score, update = programs(ctx, algo, trees, setup)
  return Run(ctx, algo, trees, setup, st, ck, score, update)


def pol_record(ctx: Context) -> dict:
  return ctx.pol.source.record()


# The two jitted programs ---------------------------------------------------------------------
def minibatches(batch: dict, key, n: int) -> dict:
  """[B, ...] rows -> [n, B/n, ...] after a permutation drawn from `key` (one epoch)."""
  b = jax.tree.leaves(batch)[0].shape[0]
  perm = jax.random.permutation(key, b)
  return jax.tree.map(lambda x: x[perm].reshape(n, b // n, *x.shape[1:]), batch)


def epochs_of_updates(state, batch, key, frozen, *, loss_fn, tx, epochs: int, n_minibatches: int,
                      grad_accum: int, mesh, grad_sh):
  """epochs x minibatches of lm.train.update in nested lax.scans; minibatch i of epoch e
  gets rng fold_in(epoch_key_e, i). Returns (state, per-update metrics [E, M])."""
  upd = functools.partial(train_lib.update, loss_fn=loss_fn, tx=tx, grad_accum=grad_accum, mesh=mesh,
                          grad_sh=grad_sh)

  def constrain(x):
    spec = P(sharding.logical_to_pspec(('batch',), None, mesh)[0], *([None] * (x.ndim - 1)))
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))

  def epoch(state, ek):
    def step(state, xs):
      i, mb = xs
      return upd(state, jax.tree.map(constrain, mb), jax.random.fold_in(ek, i), frozen)
    return jax.lax.scan(step, state, (jnp.arange(n_minibatches), minibatches(batch, ek, n_minibatches)))
  return jax.lax.scan(epoch, state, jax.random.split(key, epochs))


_PROGRAMS = programs_lib.Programs(max_entries=1)   # compiled programs hold memory: one set


def programs(ctx: Context, algo: Algorithm, trees: policy.Trees, setup: stage.Setup):
  """The scoring and update jits, cached on what they close over (a rerun in the process,
  e.g. a resume or a test, compiles nothing new)."""
  c = ctx.config
  rm = ctx.rm      # its score closes over the normaliser and the ensemble combination
  rm_key = (rm.cfg, str(rm.gain), str(rm.bias), rm.members, rm.combine, rm.lam) if rm is not None else ()
  key = (type(algo), trees.cfg, trees.pcfg, ctx.width, ctx.mesh, ctx.pol.eos, *rm_key,
         compiled.frozen_config(c, ('rollout', 'kl', 'loss', 'reward', 'value', 'ptx', 'optim', 'train')))
  return _PROGRAMS.get(key, lambda: _make_programs(ctx, algo, trees, setup))


def _make_programs(ctx: Context, algo: Algorithm, trees: policy.Trees, setup: stage.Setup):
  t, mesh = ctx.config.train, ctx.mesh
  rep = sharding.replicated(mesh)
  rows = lambda x: sharding.batch_sharding(mesh, x.ndim)
  score = functools.partial(algo.score, ctx, trees)
  loss_fn = algo.loss_fn(ctx, trees)

  def update(state, extras, batch, frozen, key):
    batch, extras, metrics = algo.prepare(ctx, batch, extras)
    state, per = epochs_of_updates(state, batch, key, frozen, loss_fn=loss_fn, tx=setup.tx,
                                   epochs=t.epochs, n_minibatches=t.minibatches,
                                   grad_accum=t.grad_accum, mesh=mesh, grad_sh=setup.shardings.params)
    metrics.update({k: jnp.mean(v) for k, v in per.items() if k != 'lr'})
    return state, extras, metrics

  jitted = {}

  def score_jit(params, frozen, tokens, mask):
    if 'score' not in jitted:    # the output shardings follow the algorithm's output shapes
      shapes = jax.eval_shape(score, params, frozen, tokens, mask)
      out_sh = (jax.tree.map(rows, shapes[0]), jax.tree.map(lambda _: rep, shapes[1]))
      jitted['score'] = jax.jit(score, out_shardings=out_sh)
    return jitted['score'](params, frozen, tokens, mask)
  update_jit = jax.jit(update, out_shardings=(setup.shardings, rep, rep), donate_argnums=(0,))
  return train_lib.with_mesh(score_jit, mesh), train_lib.with_mesh(update_jit, mesh)


# One iteration -------------------------------------------------------------------------------
def draw(run: Run, rng):
  """The iteration's prompts (rollout.prompts random training prompts without replacement,
  each rollout.samples times, adjacent) and keys, all from the checkpointed RNG."""
  idx, it_key, host_rng, rng = draw_indices(run, rng)
  return [run.ctx.train_ids[i] for i in idx], it_key, host_rng, rng


def draw_indices(run: Run, rng):
  """draw, with each row's index into the training prompts instead of its tokens."""
  r = run.ctx.config.rollout
  it_key, rng = jax.random.split(rng)
  host_rng = np.random.default_rng(np.asarray(jax.random.key_data(it_key)))
  idx = host_rng.choice(len(run.ctx.train_ids), r.prompts, replace=False)
  return [int(i) for i in idx for _ in range(r.samples)], it_key, host_rng, rng


def rule_scores(ctx: Context, texts: list[str], examples: list[dict], lengths) -> rewards.Scores:
  """The host's rule rewards of decoded responses (one per row, examples in row order)."""
  return rewards.score(ctx.rules, [e['prompt'] for e in examples], texts, examples,
                       tokens=[int(n) for n in np.asarray(lengths)], functions=FUNCTIONS)


def generate_rows(run: Run, params, idx: list, key) -> rollouts.Rollout:
  """The rows of training prompts `idx` (rollout.engine: through lm/engine, else lm.decode)."""
  ctx, r = run.ctx, run.ctx.config.rollout
  return rollouts.generate(params, [ctx.train_ids[i] for i in idx], key, cfg=ctx.pol.cfg, width=ctx.width,
                           max_new_tokens=r.max_new_tokens, temperature=r.temperature, eos=ctx.pol.eos,
                           use_engine=bool(r.get('engine', False)), mesh=ctx.mesh,
                           slots=int(r.get('engine_slots', 0)), stop=tuple(r.get('stop', ())),
                           detokenize=ctx.pol.tok.decode)


def refill_indices(run: Run, it_key, round_: int, used: set) -> list | None:
  """Dynamic sampling's refill `round_` (>= 1): rollout.prompts training prompts not drawn yet
  this iteration, each rollout.samples times, from fold_in(fold_in(it_key, 2), round_) (a pure
  function of the checkpointed RNG); None when fewer are left."""
  r, n = run.ctx.config.rollout, len(run.ctx.train_ids)
  left = np.array(sorted(set(range(n)) - used), np.int64)
  if len(left) < r.prompts:
    return None
  key = jax.random.fold_in(jax.random.fold_in(it_key, 2), round_)
  idx = np.random.default_rng(np.asarray(jax.random.key_data(key))).choice(left, r.prompts, replace=False)
  return [int(i) for i in idx for _ in range(r.samples)]


def all_equal_groups(ctx: Context, totals: np.ndarray, ro: rollouts.Rollout) -> np.ndarray:
  """[groups] whether a group's rewards (as the advantage sees them: less the missing-EOS
  penalty) are all equal: its advantages are all 0, it carries no gradient."""
  p = ctx.config.reward.missing_eos_penalty
  scores = np.where(rollouts.has_eos(ro, ctx.width, ctx.pol.eos), totals, totals - p) if p else totals
  g = np.asarray(scores, np.float32).reshape(-1, ctx.config.rollout.samples)
  return np.all(g == g[:, :1], axis=1)


@dataclasses.dataclass
class Sampled:
  """An iteration's rows for the update, and what every generated row scored."""
  ro: rollouts.Rollout           # the update's rows (rollout.prompts x samples)
  totals: np.ndarray | None      # [rows] their rule totals (None: reward model)
  keep: np.ndarray | None        # [rows] 0 for all-equal groups that only fill the batch
  texts: list                    # every generated response (all rounds)
  idx: list                      # each of those rows' training prompt (index into train_ids)
  scores: rewards.Scores | None  # every generated row's rule rewards
  stats: dict                    # dynamic sampling's counts
  time_generate: float = 0.0
  time_rules: float = 0.0


def sample_rows(run: Run, params, idx: list, it_key) -> Sampled:
  """Generate and rule-score the drawn rows. With rollout.dynamic_sampling (DAPO, Yu et al.
  2025) groups whose rewards are all equal are dropped and fresh prompts' groups drawn
  (refill_indices), at most rollout.max_refills rounds, until rollout.prompts informative
  groups are found; the batch is the first of those in draw order. Short of them, it trains
  on what there is: all-equal groups fill the rest with keep 0 (out of the loss), and says so."""
  ctx, r = run.ctx, run.ctx.config.rollout
  dynamic = bool(r.get('dynamic_sampling', False))
  parts, used, round_, times, all_idx = [], set(), 0, [0.0, 0.0], []
  while True:
    t0 = time.perf_counter()
    # round 0 keeps the key it always had; refills' from fold_in(it_key, 3)
    key = jax.random.fold_in(it_key, 0) if not round_ else jax.random.fold_in(jax.random.fold_in(it_key, 3), round_)
    ro = generate_rows(run, params, idx, key)
    t1 = time.perf_counter()
    texts = rollouts.texts(ctx.pol, ro, ctx.width)
    sc = rule_scores(ctx, texts, [ctx.train_examples[i] for i in idx], ro.lengths) if ctx.rules else None
    times[0], times[1] = times[0] + t1 - t0, times[1] + time.perf_counter() - t1
    parts.append((ro, texts, sc, all_equal_groups(ctx, sc.total, ro) if dynamic else None))
    used.update(idx)
    all_idx += idx
    if not dynamic or sum(int((~p[3]).sum()) for p in parts) >= r.prompts or round_ >= r.max_refills:
      break
    round_ += 1
    idx = refill_indices(run, it_key, round_, used)
    if idx is None:
      break
  all_texts = [t for p in parts for t in p[1]]
  scores = merge_scores([p[2] for p in parts]) if ctx.rules else None
  if not dynamic:
    ro, _, sc, _ = parts[0]
    return Sampled(ro, None if sc is None else sc.total, None, all_texts, all_idx, scores, {}, *times)
  k = r.samples
  ro_all = rollouts.Rollout.concat([p[0] for p in parts])
  equal = np.concatenate([p[3] for p in parts])
  groups = list(np.flatnonzero(~equal)[:r.prompts])
  n_inf = len(groups)
  groups += list(np.flatnonzero(equal)[:r.prompts - n_inf])       # fillers, out of the loss
  rows = np.array([g * k + j for g in groups for j in range(k)])
  keep = np.repeat((np.arange(len(groups)) < n_inf).astype(np.float32), k)
  stats = {'groups/all_equal': float(equal.mean()), 'dynamic/refills': round_,
           'dynamic/extra_rows': (len(parts) - 1) * r.prompts * k, 'dynamic/informative': n_inf}
  if n_inf < r.prompts:
    tqdm.write(f'dynamic sampling: {n_inf} of {r.prompts} groups informative after {round_} refill '
               f'rounds (rollout.max_refills={r.max_refills}); training on those {n_inf}, the '
               f'{r.prompts - n_inf} all-equal groups that fill the batch leave the loss.')
  return Sampled(ro_all.take(rows), scores.total[rows], keep, all_texts, all_idx, scores, stats, *times)


def merge_scores(parts: list) -> rewards.Scores:
  return rewards.Scores(np.concatenate([s.total for s in parts]),
                        {k: np.concatenate([s.values[k] for s in parts]) for k in parts[0].values},
                        {k: sum(s.counts[k] for s in parts) for k in parts[0].counts})


def iterate(run: Run, state, extras, rng, frozen):
  """One rollout -> score -> update; returns (state, extras, rng, metrics row). Time split:
  time_generate (every round of generation), time_rules (rule rewards), time_score (the
  scoring jit), time_update, time_reward (gold)."""
  ctx = run.ctx
  idx, it_key, host_rng, rng = draw_indices(run, rng)
  s = sample_rows(run, run.trees.generation(state.params, frozen), idx, it_key)
  rows_sh = lambda x: sharding.batch_sharding(ctx.mesh, x.ndim)
  if s.totals is not None:     # host rule rewards, passed into the scoring jit
    frozen = {**frozen, 'rule_scores': jax.device_put(s.totals.astype(np.float32), rows_sh(s.totals))}
  t1 = time.perf_counter()
  batch, m = run.score(state.params, frozen, s.ro.tokens, s.ro.mask)
  frozen = {k: v for k, v in frozen.items() if k != 'rule_scores'}
  m = jax.device_get(m)
  t2 = time.perf_counter()
  if s.keep is not None:       # dynamic sampling's fillers leave the loss (as overlong rows do)
    keep = jax.device_put(s.keep, rows_sh(s.keep))
    batch['keep'] = batch['keep'] * keep if 'keep' in batch else keep
  batch.update({k: jax.device_put(v, rows_sh(v)) for k, v in run.algo.batch_extras(ctx, host_rng).items()})
  state, extras, um = run.update(state, extras, batch, frozen, jax.random.fold_in(it_key, 1))
  um = jax.device_get(um)
  t3 = time.perf_counter()
  g = gold_model.scorer(ctx.config.eval.gold, ctx.mesh)(
      [ctx.train_examples[i]['prompt'] for i in s.idx], s.texts)
  t4 = time.perf_counter()
  total = s.time_generate + s.time_rules + (t4 - t1)
  row = {**{k: float(v) for k, v in m.items()}, 'gold': float(g.mean()),
         **(s.scores.metrics() if s.scores is not None else {}), **s.stats,
         **{(f'{k}_loss' if k in m else k): float(v) for k, v in um.items() if k != 'tokens'},
         **run.algo.log_extras(extras),
         'time_generate': s.time_generate, 'time_rules': s.time_rules, 'time_score': t2 - t1,
         'time_update': t3 - t2, 'time_reward': t4 - t3, 'time_iteration': total,
         'tokens_per_sec': float(m['response_tokens']) / total}
  return state, extras, rng, row


def penalised_scores(ctx: Context, out: dict):
  """[B] the reward of each rollout, less reward.missing_eos_penalty for rows that never ended."""
  p = ctx.config.reward.missing_eos_penalty
  return common.apply_missing_eos_penalty(out['scores'], out['has_eos'], p) if p else out['scores']


def common_scores(ctx: Context, trees: policy.Trees, params, frozen, tokens, mask, *, values=None):
  """What every algorithm's score starts from (inside its jit): policy and reference
  log-probs and entropy [B, N], the reward model's normalised scores and EOS flags [B], the
  k1 sequence KL, and the shared metrics. `values(policy_params)` adds the critic's [B, N]."""
  n_prompt, cfg = ctx.width, ctx.pol.cfg
  pol = trees.full(params, frozen)
  temp = ctx.config.rollout.temperature
  if 'reference' in frozen:
    out = rollout.score_rollout(pol, trees.reference(frozen), tokens, mask, n_prompt, cfg,
                                temperature=temp, reward=lambda x, m: ctx.reward(frozen, x, m))
  else:      # no reference held (kl.coef = 0): its log-probs are the policy's own
    logp, ent = rollout.response_logprobs(pol, tokens, mask, n_prompt, cfg, temp, True)
    out = jax.tree.map(jax.lax.stop_gradient, {'logp': logp, 'ref_logp': logp, 'entropy': ent,
                                               'scores': ctx.reward(frozen, tokens, mask)})
  if values is not None:
    out['values'] = jax.lax.stop_gradient(values(pol))
  rmask = mask[:, n_prompt:].astype(jnp.float32)
  out['has_eos'] = rollout.has_eos(tokens[:, n_prompt:], rmask, ctx.pol.eos)
  out['kl_seq'] = jnp.sum((out['logp'] - out['ref_logp']) * rmask, -1)      # k1: log pi - log ref
  metrics = {'proxy': jnp.mean(out['scores']), 'kl': jnp.mean(out['kl_seq']),
             'entropy': jnp.sum(out['entropy']) / jnp.maximum(jnp.sum(rmask), 1.0),
             'length': jnp.mean(jnp.sum(rmask, -1)),
             'eos_rate': jnp.mean(out['has_eos'].astype(jnp.float32)), 'response_tokens': jnp.sum(rmask)}
  return out, metrics


# The stage -----------------------------------------------------------------------------------
def run(config: ConfigDict, workdir: str, algo: Algorithm) -> dict:
  """check -> prepare -> loop -> finish: results.json, eval.jsonl, plots."""
  r = prepare(config, workdir, algo)
  ctx, t, e = r.ctx, config.train, config.eval
  start = r.start
  against = config.reward_from if ctx.rules is None else 'rules ' + ', '.join(
      f'{x.weight:g} x {x.name}' for x in ctx.rules)
  print(f'{algo.name} from {ctx.pol.source.path} (step {ctx.pol.source.step}) against '
        f'{against}, peft {ctx.pcfg.method}: {config.rollout.prompts} prompts x '
        f'{config.rollout.samples} samples per iteration, {t.epochs * t.minibatches} updates each; '
        f'{len(ctx.train_ids):,} training / {len(ctx.eval_ids)} held-out prompts; mesh '
        f'{dict(ctx.mesh.shape)}; ' + (f'resuming at iteration {start}' if start else 'starting'),
        flush=True)
  eval_key = jax.random.fold_in(jax.random.key(config.seed), 1 << 20)   # same draws every time
  evals = iterations.EvalLog(workdir, start)
  frozen = r.trees.frozen
  live = {'state': r.st['train'], 'extras': r.st.get('extras', {}),
          'rng': jax.random.wrap_key_data(r.st['rng'])}

  def held_out(it):
    params = live['state'].params
    n_new = e.max_new_tokens or config.rollout.max_new_tokens
    reward, ruled = held_out_reward(ctx, frozen, n_new)
    # kl.coef = 0 holds no reference while training; the held-out KL (the over-optimisation
    # plots' x axis) still needs it: restored for the evaluation only, then dropped.
    ref = frozen.get('reference')
    if ref is None:
      ref = ctx.pol.source.restore_params(ctx.mesh, ctx.pol.cfg)
    rep = policy.evaluate(r.trees.generation(params, frozen), ref, ctx.pol,
                          ctx.eval_ids, eval_key, max_new_tokens=n_new, gold_kind=e.gold,
                          reward=reward, mesh=ctx.mesh, batch=e.batch_size,
                          temperature=config.rollout.temperature)
    row = evals.add({'iteration': it, **{k: v for k, v in rep.items() if k != 'samples'}, **ruled(),
                     'sqrt_kl': float(np.sqrt(max(rep['kl'], 0.0))), **algo.log_extras(live['extras'])})
    tqdm.write(f"iteration {it}: held-out gold {row['gold']:+.3f}, proxy {row['proxy']:+.3f}, "
               f"KL {row['kl']:.3f}, length {row['length']:.1f}, eos {row['eos_rate']:.2f} | "
               f"{rep['samples'][0]!r}")

  def one(it):
    live['state'], extras, live['rng'], row = iterate(r, live['state'], live['extras'], live['rng'], frozen)
    live['extras'] = algo.after(ctx, extras, row)
    return row

  def save(it):
    st = {'train': live['state'], 'rng': jax.random.key_data(live['rng']), 'iteration': jnp.int32(it)}
    if live['extras']:
      st['extras'] = live['extras']
    r.checkpointer.save(it, st, {}, {'iteration': it})

  end = t.iterations if not t.stop_after else min(t.iterations, start + t.stop_after)
  it = iterations.run_iterations(
      workdir, start=start, end=end, total=t.iterations, desc=algo.name, iterate=one,
      evaluate=held_out, save=save, checkpointer=r.checkpointer, eval_every=e.every,
      checkpoint_every=t.checkpoint_every, eval_before=e.before, postfix=POSTFIX)
  out = online_report.finish(workdir, algo.name, start, it, t.iterations, evals.rows)
  out['state'] = live['state']
  return out


def held_out_reward(ctx: Context, frozen, n_new: int):
  """(reward for policy.evaluate, () -> the rule metrics of the held-out samples). With rules,
  evaluate's chunks come in prompt order: each chunk's responses (the last n_new tokens) are
  decoded and scored against the next held-out examples."""
  if ctx.rules is None:
    return (lambda tk, m: ctx.reward(frozen, tk, m)), dict
  seen, stop = [], tuple(ctx.config.rollout.get('stop', ()))

  def reward(tokens, mask):
    toks, m = np.asarray(tokens)[:, -n_new:], np.asarray(mask)[:, -n_new:]
    texts = [ctx.pol.tok.decode([int(t) for t, on in zip(row, mr) if on and int(t) != ctx.pol.eos])
             for row, mr in zip(toks, m)]
    # held-out samples come from the static batch: cut them where a training rollout would end
    texts = [rollouts.through_stop(t, stop) for t in texts]
    start = sum(len(s.total) for s in seen)
    seen.append(rule_scores(ctx, texts, ctx.eval_examples[start:start + len(texts)], m.sum(1)))
    return seen[-1].total

  def metrics():
    if not seen:
      return {}
    return merge_scores(seen).metrics()
  return reward, metrics
