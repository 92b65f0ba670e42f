"""TrainState, optimizer, sharded state creation and the one jitted train step.

`make_train_step(loss_fn, ...)` is the only place where jit meets shardings for
training. Pretraining passes the next-token loss; reward modelling and PPO pass
theirs. A loss_fn is `loss_fn(params, batch, rng) -> (loss_sum, weight, metric_sums)`
(see lm/objectives.py for why sums).
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Mapping

import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from lm import sharding

LossFn = Callable[[Any, Mapping[str, jax.Array], jax.Array], tuple]


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
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


def decay_mask(axes_tree) -> Any:
  """Weight-decay matrices only (>= 2 dims besides the stacking 'layers' axis), as in GPT-2."""
  return jax.tree.map(lambda ax: len([a for a in ax if a != 'layers']) >= 2, axes_tree,
                      is_leaf=lambda x: isinstance(x, tuple))


def make_optimizer(optim: Mapping[str, Any], axes_tree, total_steps: int):
  """AdamW with global-norm clipping. Returns (optax transform, lr schedule)."""
  schedule = lr_schedule(optim, total_steps)
  parts = []
  if optim.get('grad_clip', 0) > 0:
    parts.append(optax.clip_by_global_norm(optim['grad_clip']))
  mu_dtype = optim.get('mu_dtype') or None
  parts.append(optax.adamw(schedule, b1=optim['b1'], b2=optim['b2'], eps=optim.get('eps', 1e-8),
                           weight_decay=optim['weight_decay'], mu_dtype=mu_dtype,
                           mask=decay_mask(axes_tree)))
  return optax.chain(*parts), schedule


# Sharded state ------------------------------------------------------------------------
def state_shardings(init_params: Callable, axes_tree, tx, mesh: Mesh, key: jax.Array):
  """(abstract TrainState, its shardings), derived from logical names without allocating."""
  def init_state(k):
    params = init_params(k)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))
  abstract = jax.eval_shape(init_state, key)
  param_sh = sharding.tree_shardings(axes_tree, abstract.params, mesh)
  # Optimizer moments mirror the params leaf for leaf; scalars (counts) are replicated.
  opt_sh = optax.tree_map_params(tx, lambda _, s: s, abstract.opt_state, param_sh,
                                 transform_non_params=lambda _: sharding.replicated(mesh))
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


# The step -----------------------------------------------------------------------------
def _split_microbatches(batch, k: int, mesh: Mesh):
  """[B, ...] -> [k, B/k, ...] taking rows i::k into microbatch i.

  The strided split keeps every device's rows on that device (each device holds whole
  groups of k consecutive rows), so accumulation adds no communication.
  """
  def split(x):
    x = x.reshape(x.shape[0] // k, k, *x.shape[1:]).swapaxes(0, 1)
    spec = P(None, sharding.logical_to_pspec(('batch',), None, mesh)[0], *([None] * (x.ndim - 2)))
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))
  return jax.tree.map(split, batch)


def _grads(loss_fn: LossFn, params, batch, rng):
  def f(p):
    loss_sum, weight, aux = loss_fn(p, batch, rng)
    return loss_sum, (weight, aux)
  (loss_sum, (weight, aux)), grads = jax.value_and_grad(f, has_aux=True)(params)
  return loss_sum, weight, aux, grads


def make_train_step(loss_fn: LossFn, tx, mesh: Mesh, shardings: TrainState, batch_sh, *,
                    grad_accum: int = 1, seed: int = 0,
                    schedule: optax.Schedule | None = None) -> Callable:
  """step(state, batch) -> (state, metrics), jitted with explicit shardings, state donated.

  Gradients are accumulated over `grad_accum` microbatches in a lax.scan and weighted
  by each microbatch's total loss weight (valid tokens), so the update equals that of
  one big batch. The step's rng is fold_in(seed, step): resumes replay it exactly.
  """
  base_key = jax.random.key(seed)

  def step(state: TrainState, batch):
    rng = jax.random.fold_in(base_key, state.step)
    if grad_accum == 1:
      loss_sum, weight, aux, grads = _grads(loss_fn, state.params, batch, rng)
    else:
      micro = _split_microbatches(batch, grad_accum, mesh)
      zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), state.params)
      zeros = jax.lax.with_sharding_constraint(zeros, shardings.params)

      def body(carry, xs):
        i, mb = xs
        loss_sum, weight, aux, grads = _grads(loss_fn, state.params, mb, jax.random.fold_in(rng, i))
        acc = jax.tree.map(jnp.add, carry, (loss_sum, weight, aux, grads))
        acc = (*acc[:3], jax.lax.with_sharding_constraint(acc[3], shardings.params))
        return acc, None

      _, _, aux_shape, _ = jax.eval_shape(
          lambda: _grads(loss_fn, state.params, jax.tree.map(lambda x: x[0], micro), rng))
      init = (jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32),
              jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), aux_shape), zeros)
      (loss_sum, weight, aux, grads), _ = jax.lax.scan(body, init, (jnp.arange(grad_accum), micro))

    denom = jnp.where(weight > 0, weight, 1.0)
    grads = jax.tree.map(lambda g, p: (g / denom).astype(p.dtype), grads, state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {'loss': loss_sum / denom, 'grad_norm': optax.tree.norm(grads), 'tokens': weight}
    metrics.update({k: v / denom for k, v in aux.items()})
    if schedule is not None:
      metrics['lr'] = schedule(state.step)
    return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics

  jitted = jax.jit(step, in_shardings=(shardings, batch_sh),
                   out_shardings=(shardings, sharding.replicated(mesh)), donate_argnums=(0,))
  return _with_mesh(jitted, mesh)


def make_eval_step(loss_fn: LossFn, mesh: Mesh, param_sh, batch_sh) -> Callable:
  """eval(params, batch) -> (loss_sum, weight, metric_sums), replicated scalars."""
  def evaluate(params, batch):
    return loss_fn(params, batch, jax.random.key(0))
  jitted = jax.jit(evaluate, in_shardings=(param_sh, batch_sh),
                   out_shardings=sharding.replicated(mesh))
  return _with_mesh(jitted, mesh)


def _with_mesh(jitted, mesh):
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
