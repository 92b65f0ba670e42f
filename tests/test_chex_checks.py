"""chex at the step and loss boundaries: a mis-shaped batch fails while tracing, with chex's
message, and the checks add nothing to the compiled program."""
import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lm import model, objectives, train as train_lib
from lm.config import ModelConfig

CFG = ModelConfig(vocab_size=50, d_model=32, n_layers=1, n_heads=2, max_seq_len=16)


def _batch(rows=6, seed=0):
  toks = np.random.default_rng(seed).integers(0, 50, (rows, 17)).astype(np.int32)
  return {'inputs': jnp.asarray(toks[:, :-1]), 'targets': jnp.asarray(toks[:, 1:]),
          'weights': jnp.ones((rows, 16), jnp.float32)}


def _update_fn(grad_accum):
  loss_fn = lambda p, b, r: objectives.next_token_loss(p, b, r, CFG)
  tx = optax.sgd(0.1)
  state = jax.eval_shape(lambda k: (lambda p: train_lib.TrainState(
      jnp.zeros((), jnp.int32), p, tx.init(p)))(model.init(CFG, k)), jax.random.key(0))
  fn = jax.jit(lambda s, b: train_lib.update(s, b, jax.random.key(0), loss_fn=loss_fn, tx=tx,
                                             grad_accum=grad_accum))
  return fn, state


@pytest.mark.parametrize('bad,grad_accum,match', [
    # a row count that grad_accum does not divide: the microbatch reshape would fail obscurely
    (lambda b: {k: v[:4] for k, v in b.items()}, 3, 'assert_is_divisible'),
    # targets with fewer rows than inputs
    (lambda b: dict(b, targets=b['targets'][:2]), 2, 'assert_equal_shape_prefix'),
    # int weights (a 0/1 mask left as int32) are refused at the loss boundary
    (lambda b: dict(b, weights=b['weights'].astype(jnp.int32)), 1, 'assert_type'),
])
def test_update_refuses_misshaped_batches_while_tracing(bad, grad_accum, match):
  fn, state = _update_fn(grad_accum)
  jax.eval_shape(fn, state, _batch())                       # the well-formed batch traces
  with pytest.raises(AssertionError, match=match):
    jax.eval_shape(fn, state, bad(_batch()))                # shapes only: nothing compiled or run


def test_checks_add_nothing_to_the_compiled_step(monkeypatch):
  """Trace-time only: the lowered step is the same program with the checks switched off."""
  fn, state = _update_fn(2)
  with_checks = fn.lower(state, _batch()).as_text()
  monkeypatch.setattr(train_lib, 'check_batch_rows', lambda *a, **k: None)
  monkeypatch.setattr(objectives, 'check_batch', lambda *a, **k: None)
  fn, state = _update_fn(2)
  assert fn.lower(state, _batch()).as_text() == with_checks


def _naive_next_token(params, batch):
  logits = model.forward(params, batch['inputs'], CFG)[0]
  logp = np.asarray(jax.nn.log_softmax(logits.astype(jnp.float32), -1))
  t, w = np.asarray(batch['targets']), np.asarray(batch['weights'])
  nll = -np.take_along_axis(logp, t[..., None], -1)[..., 0]
  return float((nll * w).sum()), float(w.sum())


class NextTokenLossVariants(chex.TestCase):
  """The loss is the same function under jit and without: sums against a naive reference."""

  @chex.variants(with_jit=True, without_jit=True)
  def test_next_token_sums(self):
    params = model.init(CFG, jax.random.key(0))
    batch = _batch()
    batch['weights'] = batch['weights'].at[:, 10:].set(0.0)
    loss = self.variant(lambda p, b: objectives.next_token_loss(p, b, jax.random.key(0), CFG))
    loss_sum, weight, _ = loss(params, batch)
    ref_sum, ref_weight = _naive_next_token(params, batch)
    np.testing.assert_allclose(float(weight), ref_weight)
    np.testing.assert_allclose(float(loss_sum), ref_sum, rtol=1e-5)

  @chex.variants(with_jit=True, without_jit=True)
  def test_broadcasting_weights_are_refused(self):
    params = model.init(CFG, jax.random.key(0))
    loss = self.variant(lambda p, b: objectives.next_token_loss(p, b, jax.random.key(0), CFG))
    batch = _batch()
    with self.assertRaisesRegex(AssertionError, 'assert_equal_shape'):
      loss(params, dict(batch, weights=batch['weights'][:, :1]))   # [B, 1] would broadcast
