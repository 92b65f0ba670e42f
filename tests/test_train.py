"""The generalised step: trainable/frozen trees, the pure update, per-group optimizer settings,
skipped non-finite updates."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lm import sharding, train
from lm.config import ConfigError

OPTIM = dict(lr=1e-2, min_lr=1e-2, warmup_steps=0, decay_steps=0, schedule='constant', b1=0.9,
             b2=0.99, eps=1e-8, weight_decay=0.0, grad_clip=0.0)
AXES = {'w': ('embed', 'mlp'), 'head': {'v': ('embed', None)}}


def init_params(key):
  k1, k2 = jax.random.split(key)
  return {'w': jax.random.normal(k1, (8, 16)) * 0.3, 'head': {'v': jax.random.normal(k2, (8, 1)) * 0.3}}


def batch_of(seed, n=8):
  rng = np.random.default_rng(seed)
  return {'x': rng.normal(size=(n, 8)).astype(np.float32),
          'y': rng.normal(size=(n, 1)).astype(np.float32)}


def loss_with_frozen(params, batch, rng, frozen):
  """A regression whose first layer is frozen (`frozen['w']`) and whose head is trained."""
  h = jnp.tanh(batch['x'] @ frozen['w']) @ params['proj']
  err = (h - batch['y']) ** 2
  return err.sum(), jnp.float32(err.size), {}


def plain_loss(params, batch, rng):
  h = jnp.tanh(batch['x'] @ params['w'][:, :8]) @ params['head']['v']
  err = (h - batch['y']) ** 2
  return err.sum(), jnp.float32(err.size), {'abs': jnp.abs(h - batch['y']).sum()}


def mesh8():
  return sharding.make_mesh({'data': 2, 'fsdp': 2, 'tensor': 2})


def test_frozen_tree_is_an_argument_with_no_grads_or_optimizer_state():
  mesh = mesh8()
  frozen_axes = {'w': ('embed', 'mlp')}
  trainable_axes = {'proj': ('mlp', None)}
  tx, _ = train.make_optimizer(OPTIM, trainable_axes, 10)
  state, sh = train.init_train_state(lambda k: {'proj': jax.random.normal(k, (16, 1)) * 0.1},
                                     trainable_axes, tx, mesh, jax.random.key(0))
  frozen = {'w': jax.random.normal(jax.random.key(1), (8, 16))}
  frozen_sh = sharding.tree_shardings(frozen_axes, frozen, mesh)
  frozen = jax.device_put(frozen, frozen_sh)
  bsh = train.batch_shardings(mesh, batch_of(0))
  step = train.make_train_step(loss_with_frozen, tx, mesh, sh, bsh, frozen_sh=frozen_sh)
  # Optimizer state mirrors the trainable tree only.
  mus = [s for s in jax.tree.leaves(state.opt_state) if getattr(s, 'shape', ()) == (16, 1)]
  assert len(mus) == 2 and not any(getattr(s, 'shape', ()) == (8, 16) for s in jax.tree.leaves(state.opt_state))
  before = np.asarray(frozen['w']).copy()
  s1, m1 = step(state, jax.device_put(batch_of(0), bsh), frozen)
  np.testing.assert_array_equal(np.asarray(frozen['w']), before)   # not donated, not changed
  assert float(m1['grad_norm']) > 0
  # Frozen weights are an argument, not a constant: other values change the result, and the
  # same compiled program serves them.
  other = jax.device_put({'w': frozen['w'] * 2.0}, frozen_sh)
  state2, _ = train.init_train_state(lambda k: {'proj': jax.random.normal(k, (16, 1)) * 0.1},
                                     trainable_axes, tx, mesh, jax.random.key(0))
  s2, m2 = step(state2, jax.device_put(batch_of(0), bsh), other)
  assert abs(float(m1['loss']) - float(m2['loss'])) > 1e-4
  assert step.__wrapped__._cache_size() == 1


def test_update_scanned_inside_one_jit_equals_jitted_steps():
  """PPO's pattern: several pure updates in one compiled call give the same params as steps."""
  mesh = sharding.make_mesh({'data': -1})
  tx, schedule = train.make_optimizer(OPTIM, AXES, 10)
  state, sh = train.init_train_state(init_params, AXES, tx, mesh, jax.random.key(0))
  batches = [batch_of(i) for i in range(3)]
  bsh = train.batch_shardings(mesh, batches[0])
  step = train.make_train_step(plain_loss, tx, mesh, sh, bsh, seed=3, schedule=schedule)
  s = jax.tree.map(jnp.copy, state)
  for b in batches:
    s, m = step(s, jax.device_put(b, bsh))

  @jax.jit
  def many(state, stacked):
    def body(st, b):
      return train.update(st, b, jax.random.fold_in(jax.random.key(3), st.step), loss_fn=plain_loss,
                          tx=tx, schedule=schedule)
    return jax.lax.scan(body, state, stacked)
  stacked = jax.tree.map(lambda *x: np.stack(x), *batches)
  s_scan, ms = many(state, stacked)
  for a, b in zip(jax.tree.leaves(s.params), jax.tree.leaves(s_scan.params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
  assert int(s_scan.step) == 3 and ms['lr'].shape == (3,)
  np.testing.assert_allclose(float(ms['loss'][-1]), float(m['loss']), rtol=1e-5)


def test_optimizer_groups_get_their_own_settings():
  groups = {'head': {'match': r'^head/', 'lr': 1e-3}}
  tx, schedule = train.make_optimizer({**OPTIM, 'groups': groups}, AXES, 10)
  params = init_params(jax.random.key(0))
  grads = jax.tree.map(jnp.ones_like, params)
  updates, _ = tx.update(grads, tx.init(params), params)
  # Adam's first step moves every coordinate by lr (gradients all one, no decay).
  np.testing.assert_allclose(np.asarray(updates['w']), -1e-2, rtol=1e-4)
  np.testing.assert_allclose(np.asarray(updates['head']['v']), -1e-3, rtol=1e-4)
  assert float(schedule(0)) == pytest.approx(1e-2)       # the default group's schedule is logged
  with pytest.raises(ConfigError, match='match no parameter'):
    train.make_optimizer({**OPTIM, 'groups': {'x': {'match': 'value_head'}}}, AXES, 10)
  with pytest.raises(ConfigError, match='several optim.groups'):
    train.make_optimizer({**OPTIM, 'groups': {'a': {'match': 'head'}, 'b': {'match': 'v$'}}}, AXES, 10)
  with pytest.raises(ConfigError, match='not optim keys'):
    train.make_optimizer({**OPTIM, 'groups': {'a': {'match': 'head', 'learning_rate': 1}}}, AXES, 10)


def test_optimizer_group_state_is_sharded_like_its_params():
  mesh = mesh8()
  tx, _ = train.make_optimizer({**OPTIM, 'groups': {'head': {'match': '^head/', 'lr': 1e-3}}}, AXES, 10)
  state, sh = train.init_train_state(init_params, AXES, tx, mesh, jax.random.key(0))
  want = sh.params['w'].spec
  specs = [x.sharding.spec for x in jax.tree.leaves(state.opt_state) if x.shape == (8, 16)]
  assert specs and all(s == want for s in specs) and want != jax.sharding.PartitionSpec()


def test_non_finite_update_is_skipped_and_counted():
  mesh = sharding.make_mesh({'data': -1})
  tx, _ = train.make_optimizer(OPTIM, AXES, 10)
  state, sh = train.init_train_state(init_params, AXES, tx, mesh, jax.random.key(0))
  bad = batch_of(0)
  bad['y'][3, 0] = np.nan
  bsh = train.batch_shardings(mesh, bad)
  step = train.make_train_step(plain_loss, tx, mesh, sh, bsh)
  before = jax.tree.map(np.asarray, state.params)
  s1, m1 = step(state, jax.device_put(bad, bsh))
  assert float(m1['skipped']) == 1.0 and int(s1.step) == 1
  for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(s1.params)):
    np.testing.assert_array_equal(a, np.asarray(b))
  s2, m2 = step(s1, jax.device_put(batch_of(1), bsh))
  assert float(m2['skipped']) == 0.0
  assert not np.allclose(before['w'], np.asarray(s2.params['w']))
