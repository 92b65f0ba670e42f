"""The `pg` stage (RLOO / GRPO) on tiny random-weight policy and RM workdirs (tests/rl_fixtures):
one iteration's update on 8 fake devices equals 1 device; a resumed run continues exactly;
start-up errors (k < 2, an RM with another tokenizer)."""
import json
import os
import signal

import jax
import numpy as np
import pytest

from experiments import export, pg
from experiments.stages import policy, stage, trainer
from experiments.configs import rlhf_grpo, rlhf_rloo
from lm import checkpoint as ckpt_lib
from lm import sharding
from lm.config import ConfigError
from tests import rl_fixtures


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
  d = tmp_path_factory.mktemp('pg')
  pol = rl_fixtures.policy_run(d / 'sft', n_layers=1)   # compile-bound: one layer (as test_ppo_stage)
  return {'dir': d, 'policy': pol, 'rm': rl_fixtures.reward_run(d / 'rm', pol)}


def config(runs, method='rloo', **train):
  c = (rlhf_rloo if method == 'rloo' else rlhf_grpo).get_config()
  c.init_from, c.reward_from = runs['policy'], runs['rm']
  c.k, c.max_new_tokens = 2, 6
  c.prompts.update(n_train=12, n_eval=8)
  c.optim.lr = 1e-2                    # big steps: a lost update shows in the params
  t = dict(iterations=3, prompts_per_iter=4, eval_every=0, checkpoint_every=1)
  if method == 'grpo':           # 2 epochs x 2 shuffled minibatches of 8 rollouts
    t.update(epochs=2, minibatches=2, prompts_per_iter=8)
  c.train.update(**t, **train)
  c.eval.before = False
  return c


def fake_rollout(n_rows, width, n_new, vocab, eos, seed=0):
  """[B, P+N] rows as generation lays them out: left-padded prompts, right-padded responses
  (some ending with eos, some cut at n_new)."""
  r = np.random.default_rng(seed)
  tokens = r.integers(1, vocab - 1, (n_rows, width + n_new)).astype(np.int32)
  mask = np.zeros_like(tokens)
  for i in range(n_rows):
    p, n = r.integers(1, width + 1), r.integers(1, n_new + 1)
    mask[i, width - p:width + n] = 1
    if n < n_new:
      tokens[i, width + n - 1] = eos
  return tokens * mask, mask


def one_iteration(c, mesh):
  """The stage's programs on `mesh`: one scored and updated (fixed) rollout."""
  pol = policy.open_policy(c.init_from)
  trees = policy.trees(c, pol, mesh)
  setup = stage.build(c, None, mesh, axes=trees.axes, init_params=trees.init_params,
                      total_steps=10, initial_params=trees.initial)
  rm, _ = policy.open_reward(c.reward_from, pol)
  rm_params = jax.device_put(rm.params, sharding.replicated(mesh))
  width, rows = 8, c.train.prompts_per_iter * c.k
  progs = pg.make_programs(c, trees, setup.tx, setup.schedule, setup.shardings, mesh, width,
                           rm.score, pol.eos)
  tokens, mask = fake_rollout(rows, width, c.max_new_tokens, pol.cfg.vocab_size, pol.eos)
  batch, m = progs.score(setup.state.params, trees.frozen, rm_params, tokens, mask)
  state, um = progs.update(setup.state, batch, trees.frozen, jax.random.key(5))
  return jax.device_get(state.params), {**jax.device_get(m), **jax.device_get(um)}


@pytest.mark.parametrize('method', ['rloo', 'grpo'])
def test_update_on_8_devices_equals_1(runs, method):
  c = config(runs, method)
  # Adam with eps = 1 moves each weight by ~lr * g (a plain gradient step): no amplified
  # float noise on weights whose gradient is ~0, so the comparison can be tight.
  c.optim.update(lr=1.0, eps=1.0)
  assert jax.device_count() == 8
  p1, m1 = one_iteration(c, one_device())
  p8, m8 = one_iteration(c, sharding.make_mesh({'data': 8}))
  for k in ('proxy', 'kl', 'loss', 'grad_norm'):
    assert m1[k] == pytest.approx(m8[k], rel=1e-4, abs=1e-6), k
  p0 = runs_params(runs)
  d1 = jax.tree.map(lambda a, b: a - b, p1, p0)
  d8 = jax.tree.map(lambda a, b: a - b, p8, p0)
  assert max(np.abs(x).max() for x in jax.tree.leaves(d1)) > 1e-3    # the update did something
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-6), d1, d8)


def one_device():
  return sharding.make_mesh({'data': 1}, jax.devices()[:1])


def runs_params(runs):
  return jax.device_get(stage.read_source(runs['policy']).restore_params(one_device()))


def final_params(workdir, policy_dir):
  """(step, params) of a pg workdir's newest checkpoint."""
  like = stage.read_source(policy_dir).restore_params(one_device())
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), like)
  ck = ckpt_lib.Checkpointer(os.path.join(workdir, 'checkpoints'), async_save=False)
  try:
    step = ck.steps()[-1]
    return step, jax.device_get(ck.restore_params(step, abstract))
  finally:
    ck.close()


def rows(workdir):
  return [json.loads(l) for l in open(os.path.join(workdir, 'metrics.jsonl'))]


@pytest.fixture(scope='module')
def straight(runs):
  """Three iterations without a stop."""
  wd = str(runs['dir'] / 'straight')
  pg.run(config(runs), wd)
  return wd


def test_resumed_run_continues_exactly(runs, straight):
  halves = str(runs['dir'] / 'halves')
  pg.run(config(runs, stop_after=2), halves)            # stopped (preempted) after 2 iterations
  assert [r['step'] for r in rows(halves)] == [1, 2]
  pg.run(config(runs, stop_after=2), halves)            # resumes at 2: only one more to go
  a, b = rows(straight), rows(halves)
  assert [r['step'] for r in b] == [1, 2, 3]
  for x, y in zip(a, b):   # same rollouts (RNG restored), same updates (state restored)
    for k in ('proxy', 'kl', 'loss', 'length', 'gold'):
      assert x[k] == pytest.approx(y[k], rel=1e-5, abs=1e-6), (x['step'], k)
  sa, pa = final_params(straight, runs['policy'])
  sb, pb = final_params(halves, runs['policy'])
  assert sa == sb == 3
  jax.tree.map(lambda u, v: np.testing.assert_allclose(u, v, rtol=1e-5, atol=1e-7), pa, pb)
  # the trained policy is what a later stage (init_from) and export read from the workdir
  src = stage.read_source(straight)
  assert src.step == 3
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(src.restore_params(one_device())), pa)
  jax.tree.map(np.testing.assert_array_equal,
               jax.device_get(export.load_merged(straight, one_device())[2]), pa)
  data = json.load(open(os.path.join(halves, 'eval.json')))
  assert data['method'] == 'rloo' and data['after']['iteration'] == 3
  assert os.path.exists(os.path.join(halves, 'reward.png'))


def test_sigterm_mid_run_saves_and_the_rerun_continues_exactly(runs, straight, monkeypatch):
  """A real SIGTERM during iteration 2 (experiments/stages/online.py): the run saves at 2 and exits
  143; the same command again runs only iteration 3 and ends where the straight run did."""
  wd = str(runs['dir'] / 'preempted')
  real, calls = pg.gold.score, []

  def score(texts, kind):   # the gold of each iteration's rollouts (no held-out evals here)
    calls.append(kind)
    if len(calls) == 2:
      os.kill(os.getpid(), signal.SIGTERM)
    return real(texts, kind)
  monkeypatch.setattr(pg.gold, 'score', score)
  with pytest.raises(trainer.Preempted) as e:
    pg.run(config(runs), wd)
  assert e.value.code == 143 and e.value.step == 2
  assert final_params(wd, runs['policy'])[0] == 2 and [r['step'] for r in rows(wd)] == [1, 2]
  monkeypatch.undo()
  pg.run(config(runs), wd)
  assert [r['step'] for r in rows(wd)] == [1, 2, 3]
  (sa, pa), (sb, pb) = final_params(straight, runs['policy']), final_params(wd, runs['policy'])
  assert sa == sb == 3
  jax.tree.map(lambda u, v: np.testing.assert_allclose(u, v, rtol=1e-5, atol=1e-7), pa, pb)


def test_start_up_errors(runs, tmp_path):
  c = config(runs)
  c.k = 1
  with pytest.raises(ConfigError, match='k >= 2'):
    pg.run(c, str(tmp_path / 'a'))
  c = config(runs)
  c.loss.kl_coef = -0.1
  with pytest.raises(ConfigError, match='kl_coef'):
    pg.run(c, str(tmp_path / 'b'))
  # A reward model whose tokenizer is not the policy's: one sentence before anything compiles.
  other = rl_fixtures.reward_run_other_tokenizer(tmp_path / 'rm2', runs['policy'])
  c = config(runs)
  c.reward_from = other
  with pytest.raises(ConfigError, match='different tokenizer'):
    pg.run(c, str(tmp_path / 'c'))
  # Minibatches that do not divide over the devices of the mesh.
  c = config(runs, minibatches=4)
  with pytest.raises(ConfigError, match='multiple of 8'):
    pg.run(c, str(tmp_path / 'd'))
