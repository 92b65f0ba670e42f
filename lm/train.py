"""TrainState, optimizer, sharded state creation, the pure update and its jitted step.

  update(state, batch, rng, frozen, loss_fn=..., tx=...)   pure: loss -> grads -> new state
  make_train_step(loss_fn, tx, mesh, shardings, batch_sh)  the one place jit meets shardings

Post-training splits params into a *trainable* tree (TrainState.params: gradients and
optimizer state) and a *frozen* tree (a LoRA base, a reference policy, a reward model):
an argument of the step, sharded by the same rules, never differentiated, never donated.
A loss_fn is `loss_fn(params, batch, rng) -> (loss_sum, weight, metric_sums)` (see
lm/objectives.py for why sums); one that reads frozen params also takes `frozen=`.
PPO runs several `update`s inside one jit of its own (a scan over minibatches).
"""
from __future__ import annotations

import functools
import re
from typing import Any, Callable, Mapping

import chex
import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from lm import sharding
from lm.config import ConfigError

LossFn = Callable[..., tuple]


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any          # the trainable tree
  opt_state: Any


# Optimizer ---------------------------------------------------------------------------
def lr_schedule(optim: Mapping[str, Any], total_steps: int) -> optax.Schedule:
  """Linear warmup to `lr`, then cosine decay to `min_lr` at `decay_steps` (default: all)."""
  decay_steps = optim.get('decay_steps') or total_steps
  if optim.get('schedule', 'cosine') == 'constant':
    return optax.join_schedules([optax.linear_schedule(0.0, optim['lr'], optim['warmup_steps']),
                                 optax.constant_schedule(optim['lr'])], [optim['warmup_steps']])
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=optim['lr'], warmup_steps=optim['warmup_steps'],
      decay_steps=max(decay_steps, optim['warmup_steps'] + 1), end_value=optim['min_lr'])


def _is_axes(x) -> bool:
  return isinstance(x, tuple) and all(a is None or isinstance(a, str) for a in x)


def decay_mask(axes_tree) -> Any:
  """Weight-decay matrices only (>= 2 dims besides the stacking 'layers' axis), as in GPT-2."""
  return jax.tree.map(lambda ax: len([a for a in ax if a != 'layers']) >= 2, axes_tree,
                      is_leaf=_is_axes)


def param_paths(tree) -> Any:
  """The same tree with each leaf replaced by its '/'-joined path, e.g. 'layers/attn/wq'."""
  def name(path, _):
    return '/'.join(str(getattr(k, 'key', getattr(k, 'name', getattr(k, 'idx', k)))) for k in path)
  return jax.tree_util.tree_map_with_path(name, tree, is_leaf=_is_axes)


def group_labels(axes_tree, groups: Mapping[str, Mapping]) -> Any:
  """Each param's optimizer group: the group whose `match` regex finds its path, else 'default'."""
  paths = param_paths(axes_tree)
  used = {g: 0 for g in groups}

  def label(path):
    hits = [g for g, spec in groups.items() if re.search(spec['match'], path)]
    if len(hits) > 1:
      raise ConfigError(f'Parameter {path} matches several optim.groups {hits}; make their '
                        '`match` patterns disjoint.')
    for g in hits:
      used[g] += 1
    return hits[0] if hits else 'default'
  labels = jax.tree.map(label, paths)
  empty = [g for g, n in used.items() if n == 0]
  if empty:
    raise ConfigError(f'optim.groups {empty} match no parameter (paths look like '
                      f'{jax.tree.leaves(paths)[:3]}); fix their `match` patterns.')
  return labels


def _adamw(optim: Mapping[str, Any], mask, total_steps: int):
  schedule = lr_schedule(optim, total_steps)
  return optax.adamw(schedule, b1=optim['b1'], b2=optim['b2'], eps=optim.get('eps', 1e-8),
                     weight_decay=optim['weight_decay'], mu_dtype=optim.get('mu_dtype') or None,
                     mask=mask), schedule


def make_optimizer(optim: Mapping[str, Any], axes_tree, total_steps: int):
  """AdamW with global-norm clipping over the whole trainable tree. Returns (transform, schedule).

  `optim['groups']` ({name: {'match': regex over param paths, <any optim key>: value}})
  gives matching params their own AdamW settings (e.g. a higher lr for a value head or
  adapters) through optax.multi_transform; the returned schedule is the default group's.
  """
  optim = dict(optim)
  groups = {g: dict(v) for g, v in (optim.pop('groups', None) or {}).items()}
  mask = decay_mask(axes_tree)
  parts = []
  if optim.get('grad_clip', 0) > 0:
    parts.append(optax.clip_by_global_norm(optim['grad_clip']))
  if not groups:
    tx, schedule = _adamw(optim, mask, total_steps)
    return optax.chain(*parts, tx), schedule
  for g, spec in groups.items():
    if 'match' not in spec:
      raise ConfigError(f"optim.groups.{g} needs a 'match' regex over parameter paths.")
    unknown = set(spec) - set(optim) - {'match'}
    if unknown:
      raise ConfigError(f'optim.groups.{g} sets {sorted(unknown)}, which are not optim keys; '
                        f'use some of {sorted(optim)}.')
  txs, schedule = {}, None
  for g, spec in [('default', {}), *groups.items()]:
    merged = {**optim, **{k: v for k, v in spec.items() if k != 'match'}}
    txs[g], sched = _adamw(merged, mask, total_steps)
    schedule = schedule or sched
  parts.append(optax.multi_transform(txs, group_labels(axes_tree, groups)))
  return optax.chain(*parts), schedule


# Sharded state ------------------------------------------------------------------------
def state_shardings(init_params: Callable, axes_tree, tx, mesh: Mesh, key: jax.Array):
  """(init_state(key), abstract TrainState, its shardings), derived from logical names
  without allocating. init_params builds the trainable tree."""
  def init_state(k):
    params = init_params(k)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))
  abstract = jax.eval_shape(init_state, key)
  param_sh = sharding.tree_shardings(axes_tree, abstract.params, mesh)
  # Optimizer moments mirror the params leaf for leaf; scalars (counts) are replicated.
  # (optim.groups: each group's moments hold MaskedNode placeholders for the other groups.)
  masked = lambda x: isinstance(x, optax.MaskedNode)
  opt_sh = optax.tree_map_params(tx, lambda p, s: p if masked(p) else s, abstract.opt_state,
                                 param_sh, transform_non_params=lambda _: sharding.replicated(mesh),
                                 is_leaf=masked)
  shardings = TrainState(step=sharding.replicated(mesh), params=param_sh, opt_state=opt_sh)
  return init_state, abstract, shardings


def init_train_state(init_params: Callable, axes_tree, tx, mesh: Mesh, key: jax.Array):
  """A TrainState created directly in its sharded layout (no host copy of the full model)."""
  init_state, _, shardings = state_shardings(init_params, axes_tree, tx, mesh, key)
  state = jax.jit(init_state, out_shardings=shardings)(key)
  return state, shardings


def abstract_with_shardings(abstract, shardings):
  """ShapeDtypeStructs carrying their target sharding: what a checkpoint restores into."""
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      abstract, shardings)


def batch_shardings(mesh: Mesh, batch_spec: Mapping[str, Any]) -> dict:
  """Every batch leaf is split along its leading (batch) dimension."""
  return {k: sharding.batch_sharding(mesh, len(v.shape)) for k, v in batch_spec.items()}


# The pure update ----------------------------------------------------------------------
def _split_microbatches(batch, k: int, mesh: Mesh | None):
  """[B, ...] -> [k, B/k, ...] taking rows i::k into microbatch i.

  The strided split keeps every device's rows on that device (each device holds whole
  groups of k consecutive rows), so accumulation adds no communication.
  """
  def split(x):
    x = x.reshape(x.shape[0] // k, k, *x.shape[1:]).swapaxes(0, 1)
    if mesh is None:
      return x
    spec = P(None, sharding.logical_to_pspec(('batch',), None, mesh)[0], *([None] * (x.ndim - 2)))
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))
  return jax.tree.map(split, batch)


def _grads(loss_fn: LossFn, params, batch, rng, frozen):
  extra = {} if frozen is None else {'frozen': frozen}

  def f(p):
    loss_sum, weight, aux = loss_fn(p, batch, rng, **extra)
    return loss_sum, (weight, aux)
  (loss_sum, (weight, aux)), grads = jax.value_and_grad(f, has_aux=True)(params)
  return loss_sum, weight, aux, grads


def check_batch_rows(batch, grad_accum: int = 1) -> None:
  """The step boundary: every batch array has the same number of rows, and grad_accum divides
  it (else the microbatch reshape fails obscurely, or mismatched rows pair silently). chex
  reads only static shapes: under jit this runs once, at trace time, and adds no op."""
  leaves = jax.tree.leaves(batch)
  chex.assert_equal_shape_prefix(leaves, 1)
  chex.assert_is_divisible(leaves[0].shape[0], grad_accum)


def accumulate_grads(loss_fn: LossFn, params, batch, rng, frozen=None, *, grad_accum: int = 1,
                     mesh: Mesh | None = None, grad_sh=None):
  """(loss_sum, weight, metric_sums, grad_sum) over `grad_accum` microbatches (a lax.scan)."""
  check_batch_rows(batch, grad_accum)
  if grad_accum == 1:
    return _grads(loss_fn, params, batch, rng, frozen)
  micro = _split_microbatches(batch, grad_accum, mesh)
  constrain = ((lambda t: jax.lax.with_sharding_constraint(t, grad_sh)) if grad_sh is not None
               else (lambda t: t))
  zeros = constrain(jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params))

  def body(carry, xs):
    i, mb = xs
    out = _grads(loss_fn, params, mb, jax.random.fold_in(rng, i), frozen)
    acc = jax.tree.map(jnp.add, carry, out)
    return (*acc[:3], constrain(acc[3])), None

  _, _, aux_shape, _ = jax.eval_shape(
      lambda: _grads(loss_fn, params, jax.tree.map(lambda x: x[0], micro), rng, frozen))
  init = (jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32),
          jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), aux_shape), zeros)
  out, _ = jax.lax.scan(body, init, (jnp.arange(grad_accum), micro))
  return out


def update(state: TrainState, batch, rng: jax.Array, frozen=None, *, loss_fn: LossFn, tx,
           grad_accum: int = 1, mesh: Mesh | None = None, grad_sh=None,
           schedule: optax.Schedule | None = None) -> tuple[TrainState, dict]:
  """One optimizer update of the trainable tree: pure, no jit, no shardings required.

  Gradients are weighted by each microbatch's total loss weight (valid tokens), so the
  update equals that of one big batch. A non-finite loss or gradient norm skips the
  update (params and optimizer state kept) and reports `skipped=1`, without a host sync.
  """
  loss_sum, weight, aux, grads = accumulate_grads(loss_fn, state.params, batch, rng, frozen,
                                                  grad_accum=grad_accum, mesh=mesh, grad_sh=grad_sh)
  denom = jnp.where(weight > 0, weight, 1.0)
  grads = jax.tree.map(lambda g, p: (g / denom).astype(p.dtype), grads, state.params)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  grad_norm = optax.tree.norm(grads)
  finite = jnp.isfinite(loss_sum) & jnp.isfinite(grad_norm)
  keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
  metrics = {'loss': loss_sum / denom, 'grad_norm': grad_norm, 'tokens': weight,
             'skipped': 1.0 - finite.astype(jnp.float32)}
  metrics.update({k: v / denom for k, v in aux.items()})
  if schedule is not None:
    metrics['lr'] = schedule(state.step)
  new = TrainState(step=state.step + 1, params=keep(params, state.params),
                   opt_state=keep(opt_state, state.opt_state))
  return new, metrics


# The jitted step ----------------------------------------------------------------------
def make_train_step(loss_fn: LossFn, tx, mesh: Mesh, shardings: TrainState, batch_sh, *,
                    frozen_sh=None, grad_accum: int = 1, seed: int = 0,
                    schedule: optax.Schedule | None = None) -> Callable:
  """step(state, batch[, frozen]) -> (state, metrics), jitted with explicit shardings.

  The state is donated; the frozen tree (given when `frozen_sh` is) is an argument, never
  a closed-over constant, so one compiled step serves any frozen weights of that shape.
  The step's rng is fold_in(seed, step): resumes replay it exactly.
  """
  base_key = jax.random.key(seed)
  upd = functools.partial(update, loss_fn=loss_fn, tx=tx, grad_accum=grad_accum, mesh=mesh,
                          grad_sh=shardings.params, schedule=schedule)

  def step(state: TrainState, batch, frozen=None):
    return upd(state, batch, jax.random.fold_in(base_key, state.step), frozen)

  in_sh = (shardings, batch_sh) if frozen_sh is None else (shardings, batch_sh, frozen_sh)
  jitted = jax.jit(step, in_shardings=in_sh,
                   out_shardings=(shardings, sharding.replicated(mesh)), donate_argnums=(0,))
  return with_mesh(jitted, mesh)


def make_eval_step(loss_fn: LossFn, mesh: Mesh, param_sh, batch_sh, frozen_sh=None) -> Callable:
  """eval(params, batch[, frozen]) -> (loss_sum, weight, metric_sums), replicated scalars."""
  def evaluate(params, batch, frozen=None):
    extra = {} if frozen is None else {'frozen': frozen}
    return loss_fn(params, batch, jax.random.key(0), **extra)
  in_sh = (param_sh, batch_sh) if frozen_sh is None else (param_sh, batch_sh, frozen_sh)
  jitted = jax.jit(evaluate, in_shardings=in_sh, out_shardings=sharding.replicated(mesh))
  return with_mesh(jitted, mesh)


def with_mesh(jitted, mesh):
  """Trace under the mesh so that layers' activation constraints see it (T5X-style)."""
  @functools.wraps(jitted)
  def call(*args):
    with sharding.activation_sharding(mesh):
      return jitted(*args)
  call.lower = lambda *a: _lower(jitted, mesh, *a)
  return call


def _lower(jitted, mesh, *args):
  with sharding.activation_sharding(mesh):
    return jitted.lower(*args)
