"""Mixture of experts: equals the dense MLP with one expert, routes within capacity,
its losses match hand computation, and trains identically on 1 and 8 devices."""
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lm import model, moe, objectives, sharding, train
from lm.config import ModelConfig

DENSE = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, max_seq_len=16, init_std=0.2)


@pytest.mark.parametrize('activation', ['gelu', 'swiglu'])
def test_one_expert_top1_equals_the_dense_mlp(activation):
  dense = dataclasses.replace(DENSE, activation=activation, use_bias=False)
  sparse = dataclasses.replace(dense, moe_experts=1, moe_top_k=1, moe_capacity_factor=1.0)
  p_dense = model.init(dense, jax.random.key(0))
  p_moe = model.init(sparse, jax.random.key(1))
  mlp = p_dense['layers']['mlp']
  p_moe = dict(p_dense, layers=dict(p_dense['layers'], mlp=dict(
      router=p_moe['layers']['mlp']['router'], **{k: v[:, None] for k, v in mlp.items()})))
  toks = jax.random.randint(jax.random.key(2), (2, 16), 0, 64)
  a, _ = model.forward(p_dense, toks, dense)
  b, _, aux = model.forward(p_moe, toks, sparse, return_aux=True)
  np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)
  assert float(aux['moe_dropped_fraction']) == 0.0


def test_routing_respects_capacity_and_priority():
  logits = jnp.log(jnp.array([[0.7, 0.2, 0.1], [0.6, 0.3, 0.1], [0.5, 0.1, 0.4], [0.1, 0.8, 0.1]]))
  dispatch, combine, aux = moe.route(logits, k=1, cap=1)
  d = np.asarray(dispatch)
  assert d.sum(axis=(0, 2)).tolist() == [1, 1, 0]        # expert 0 keeps only its first token
  assert d[0, 0, 0] and d[3, 1, 0] and not d[1].any() and not d[2].any()
  assert float(aux['moe_dropped_fraction']) == pytest.approx(0.5)
  np.testing.assert_allclose(np.asarray(combine)[0, 0, 0], 0.7, rtol=1e-6)
  # Switch balance loss by hand: E * sum_e f_e P_e, with top-1 fractions f = (3/4, 1/4, 0)
  probs = np.exp(np.asarray(logits))
  expected = 3 * np.sum(np.array([0.75, 0.25, 0.0]) * probs.mean(0))
  assert float(aux['moe_balance_loss']) == pytest.approx(expected, rel=1e-5)
  z = np.mean(np.log(np.exp(np.asarray(logits)).sum(1)) ** 2)
  assert float(aux['moe_z_loss']) == pytest.approx(z, abs=1e-6)


def test_top2_second_choices_queue_after_first_choices():
  logits = jnp.log(jnp.array([[0.5, 0.4, 0.1], [0.45, 0.1, 0.45]]))
  dispatch, _, _ = moe.route(logits, k=2, cap=2)
  d = np.asarray(dispatch)
  assert d[0, 0, 0] and d[1, 0, 1]      # both first choices of expert 0, in token order
  assert d[0, 1].any() and d[1, 2].any()


MOE = dataclasses.replace(DENSE, init_std=0.02, moe_experts=4, moe_top_k=2, n_kv_heads=2)
OPTIM = dict(lr=3e-3, min_lr=3e-4, warmup_steps=2, b1=0.9, b2=0.99, weight_decay=0.1, grad_clip=1.0)


def _losses(mesh, steps=6):
  axes = model.logical_axes(MOE)
  tx, sched = train.make_optimizer(OPTIM, axes, steps)
  state, sh = train.init_train_state(functools.partial(model.init, MOE), axes, tx, mesh, jax.random.key(0))
  spec = {k: jax.ShapeDtypeStruct((8, 16), d) for k, d in
          (('inputs', jnp.int32), ('targets', jnp.int32), ('weights', jnp.float32))}
  bsh = train.batch_shardings(mesh, spec)
  step = train.make_train_step(functools.partial(objectives.next_token_loss, cfg=MOE), tx, mesh, sh, bsh)
  rng = np.random.default_rng(0)
  out = []
  for _ in range(steps):
    t = ((rng.integers(0, 64, (8, 1)) + np.arange(17)) % 64).astype(np.int32)
    b = {'inputs': t[:, :-1], 'targets': t[:, 1:], 'weights': np.ones((8, 16), np.float32)}
    state, m = step(state, {k: jax.device_put(v, bsh[k]) for k, v in b.items()})
    out.append([float(m['loss']), float(m['moe_balance_loss']), float(m['moe_dropped_fraction'])])
  return np.array(out), state


def test_moe_one_device_equals_eight_with_experts_sharded():
  one = sharding.make_mesh({'data': 1}, devices=jax.devices()[:1])
  eight = sharding.make_mesh({'data': 1, 'fsdp': 2, 'tensor': 2, 'expert': 2})
  l1, _ = _losses(one)
  l8, s8 = _losses(eight)
  np.testing.assert_allclose(l8, l1, rtol=2e-5, atol=2e-5)
  assert s8.params['layers']['mlp']['wi'].sharding.spec == jax.sharding.PartitionSpec(None, 'expert', 'fsdp', 'tensor')
  assert l1[:, 0][-1] < l1[:, 0][0]


def test_experts_not_divisible_by_the_expert_axis_fail_clearly():
  cfg = dataclasses.replace(MOE, moe_experts=3)
  mesh = sharding.make_mesh({'data': 4, 'expert': 2})
  shapes = jax.eval_shape(functools.partial(model.init, cfg), jax.random.key(0))
  with pytest.raises(sharding.ShardingError, match="'expert' size 3"):
    sharding.tree_shardings(model.logical_axes(cfg), shapes, mesh)


def test_moe_param_count_matches_leaves():
  params = model.init(MOE, jax.random.key(0))
  n = sum(x.size for x in jax.tree.leaves(params)) - (MOE.padded_vocab - MOE.vocab_size) * MOE.d_model
  assert MOE.num_params() == n
