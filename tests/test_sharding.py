"""Mesh construction, the rules table, and 1-device vs 8-device equality of training."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lm import model, objectives, sharding, train
from lm.config import PRESETS, ModelConfig


def test_mesh_shape_fills_minus_one_and_rejects_bad_sizes():
  assert sharding.mesh_shape({'data': -1, 'tensor': 2}, 8) == {'data': 4, 'fsdp': 1, 'tensor': 2, 'expert': 1}
  with pytest.raises(sharding.ShardingError, match='uses 4 devices but 8'):
    sharding.mesh_shape({'data': 2, 'fsdp': 2}, 8)
  with pytest.raises(sharding.ShardingError, match='Only one mesh axis'):
    sharding.mesh_shape({'data': -1, 'fsdp': -1}, 8)
  with pytest.raises(sharding.ShardingError, match='Unknown mesh axes'):
    sharding.mesh_shape({'pipeline': 2}, 8)


def test_logical_rules_errors_name_the_problem():
  mesh = sharding.make_mesh({'data': 2, 'fsdp': 2, 'tensor': 2})
  with pytest.raises(sharding.ShardingError, match='no rule'):
    sharding.logical_to_pspec(('embed', 'bogus'), (8, 8), mesh)
  with pytest.raises(sharding.ShardingError, match="'kv_heads' size 1"):
    sharding.logical_to_pspec(('embed', 'kv_heads', 'head_dim'), (8, 1, 4), mesh, 'wk')


def test_a_mesh_axis_used_twice_goes_to_the_first_dimension_only():
  """The docstring's rule: a PartitionSpec names each mesh axis once, so a later dimension
  whose rule asks for a mesh axis already used keeps it unsharded (here 'heads' and 'mlp'
  both map to 'tensor'; 'batch' and 'embed' share 'fsdp')."""
  mesh = sharding.make_mesh({'data': 2, 'fsdp': 2, 'tensor': 2})
  assert sharding.logical_to_pspec(('heads', 'mlp'), (4, 4), mesh) == jax.sharding.PartitionSpec('tensor', None)
  assert sharding.logical_to_pspec(('batch', 'embed'), (8, 4), mesh) == \
      jax.sharding.PartitionSpec(('data', 'fsdp'), None)
  assert sharding.logical_to_pspec(('embed', 'batch'), (4, 8), mesh) == \
      jax.sharding.PartitionSpec('fsdp', 'data')


CFG = ModelConfig(vocab_size=65, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=16,
                  **PRESETS['llama'])
OPTIM = dict(lr=3e-3, min_lr=3e-4, warmup_steps=5, b1=0.9, b2=0.99, weight_decay=0.1, grad_clip=1.0)


def setup(mesh, cfg=CFG, grad_accum=1):
  axes = model.logical_axes(cfg)
  tx, sched = train.make_optimizer(OPTIM, axes, 20)
  state, sh = train.init_train_state(functools.partial(model.init, cfg), axes, tx, mesh, jax.random.key(0))
  spec = {k: jax.ShapeDtypeStruct((8, 16), d) for k, d in
          (('inputs', jnp.int32), ('targets', jnp.int32), ('weights', jnp.float32))}
  bsh = train.batch_shardings(mesh, spec)
  step = train.make_train_step(functools.partial(objectives.next_token_loss, cfg=cfg), tx, mesh, sh,
                               bsh, grad_accum=grad_accum, schedule=sched)
  return state, sh, bsh, step


def batches(n, seed=0):
  rng = np.random.default_rng(seed)
  for _ in range(n):
    # learnable: each row counts up by a row-specific stride from a random start
    start = rng.integers(0, 65, (8, 1))
    stride = rng.integers(1, 4, (8, 1))
    toks = ((start + stride * np.arange(17)) % 65).astype(np.int32)
    yield {'inputs': toks[:, :-1], 'targets': toks[:, 1:], 'weights': np.ones((8, 16), np.float32)}


def run_losses(mesh, n=20, **kw):
  state, _, bsh, step = setup(mesh, **kw)
  out = []
  for b in batches(n):
    state, m = step(state, {k: jax.device_put(v, bsh[k]) for k, v in b.items()})
    out.append((float(m['loss']), float(m['grad_norm'])))
  return np.array(out), state


def test_params_and_optimizer_state_are_sharded_as_the_rules_say():
  mesh = sharding.make_mesh({'data': 2, 'fsdp': 2, 'tensor': 2})
  state, sh, _, _ = setup(mesh)
  axes = model.logical_axes(CFG)
  flat_axes = jax.tree.leaves(axes, is_leaf=lambda x: isinstance(x, tuple))
  for p, ax in zip(jax.tree.leaves(state.params), flat_axes):
    expected = sharding.logical_to_pspec(ax, p.shape, mesh)
    assert p.sharding.spec == expected
    # the shard really is smaller along every split dimension
    shard = p.addressable_shards[0].data.shape
    for dim, entry in enumerate(expected):
      if entry is not None:
        n = np.prod([mesh.shape[a] for a in (entry if isinstance(entry, tuple) else (entry,))])
        assert shard[dim] == p.shape[dim] // n
  # e.g. the query projection: embed over fsdp, heads over tensor
  assert state.params['layers']['attn']['wq'].sharding.spec == jax.sharding.PartitionSpec(None, 'fsdp', 'tensor', None)
  # Adam moments mirror the params; the step count is replicated on every device
  adam = state.opt_state[1][0]
  for mu, p in zip(jax.tree.leaves(adam.mu), jax.tree.leaves(state.params)):
    assert mu.sharding.spec == p.sharding.spec
  assert adam.count.sharding.is_fully_replicated
  assert sharding.sharded_fraction(state.params, sh.params) > 0.98


def test_one_device_equals_eight_devices_for_20_steps():
  one = sharding.make_mesh({'data': 1}, devices=jax.devices()[:1])
  eight = sharding.make_mesh({'data': 2, 'fsdp': 2, 'tensor': 2})
  l1, s1 = run_losses(one)
  l8, s8 = run_losses(eight)
  assert l1[-1, 0] < l1[0, 0]  # it trains
  np.testing.assert_allclose(l8, l1, rtol=2e-5, atol=2e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=5e-5),
               s1.params, s8.params)


def test_gradient_accumulation_equals_one_big_batch():
  mesh = sharding.make_mesh({'data': 2}, devices=jax.devices()[:2])
  l1, s1 = run_losses(mesh, n=5)
  l4, s4 = run_losses(mesh, n=5, grad_accum=4)
  np.testing.assert_allclose(l4, l1, rtol=1e-5, atol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6),
               s1.params, s4.params)


def test_gradient_accumulation_weights_by_valid_tokens():
  """Microbatches with different numbers of valid tokens: the mean is over all tokens."""
  mesh = sharding.make_mesh({'data': 1}, devices=jax.devices()[:1])
  b = next(batches(1, seed=3))
  b['weights'][0::4, 3:] = 0          # rows of microbatch 0 (rows i::4) lose most tokens
  out = []
  for k in (1, 4):
    state, _, bsh, step = setup(mesh, grad_accum=k)
    _, m = step(state, {n: jax.device_put(v, bsh[n]) for n, v in b.items()})
    out.append((float(m['loss']), float(m['grad_norm']), float(m['tokens'])))
  np.testing.assert_allclose(out[1], out[0], rtol=1e-5)
  assert out[0][2] == b['weights'].sum()
