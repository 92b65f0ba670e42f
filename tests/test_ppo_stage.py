"""The `ppo` experiment (experiments/ppo.py, an adapter on experiments/stages/online.py): its
loss against the PPO-clip and clipped-value formulas in numpy (survivors 1 and 2 of issue 21:
the current log-probs used as the old ones, the value clip around the new values); then on
tiny random-weight workdirs (tests/rl_fixtures): sharding invariance, the scanned update
against updates one by one, exact resume, the reward switches, both value models, LoRA's
reference, and the start-up errors."""
import dataclasses as dc
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from data import tokenizers
from experiments import export, ppo
from experiments.configs import rlhf_ppo
from experiments.stages import online, stage
from lm import heads, model, peft, sharding, train as train_lib
from lm.config import ConfigError
from rl import ppo as ppo_lib, rollout
from tests import rl_fixtures, rl_reference as ref


def test_ppo_loss_clips_the_ratio_to_the_old_policy_and_the_value_to_the_old_values():
  ctx, trees, params, frozen, tokens, mask = ref.setup(
      'ppo', value={'init': 'policy_head'}, loss={'clip_eps': 0.2, 'vf_clip_eps': 0.2, 'vf_coef': 0.5,
                                                  'entropy_coef': 0.0})
  cfg, p = ctx.pol.cfg, ref.P
  params['value_head'] = heads.init(cfg, 1, jax.random.key(4), init_std=0.5)
  logp = ref.logprobs(params['policy'], tokens, cfg)
  values = np.asarray(rollout.response_values(params['policy'], params['value_head'], tokens, mask, p,
                                              cfg))
  rng = np.random.default_rng(0)
  old_logp = (logp + rng.uniform(-0.6, 0.6, logp.shape)).astype(np.float32)   # ratios off 1
  old_values = (values + rng.choice([-1.0, 1.0], values.shape)).astype(np.float32)  # clip active
  adv = rng.normal(size=logp.shape).astype(np.float32)
  returns = rng.normal(size=logp.shape).astype(np.float32)
  batch = {'tokens': tokens, 'mask': mask, 'logp': old_logp, 'values': old_values,
           'advantages': adv, 'returns': returns}
  total, weight, m = ppo.PPO().loss_fn(ctx, trees)(params, batch, jax.random.key(0), frozen)
  pg = ref.ppo_clip(logp, old_logp, adv, 0.2)
  v_clip = old_values + np.clip(values - old_values, -0.2, 0.2)
  vf = 0.5 * np.maximum((values - returns) ** 2, (v_clip - returns) ** 2)
  np.testing.assert_allclose(float(m['policy_loss']) / float(weight), pg.mean(), rtol=1e-4)
  np.testing.assert_allclose(float(m['value_loss']) / float(weight), vf.mean(), rtol=1e-4)
  np.testing.assert_allclose(float(total) / float(weight), pg.mean() + 0.5 * vf.mean(), rtol=1e-4)


@pytest.fixture(scope='module')
def dirs(tmp_path_factory):
  root = tmp_path_factory.mktemp('ppo')
  pol = rl_fixtures.policy_run(root / 'sft', n_layers=1)
  return root, pol, rl_fixtures.reward_run(root / 'rm', pol)


def config(dirs, **kw):
  root, pol, rm = dirs
  c = rlhf_ppo.get_config()
  c.init_from, c.reward_from = pol, rm
  c.prompts.update(n_train=64, n_eval=16)
  c.rollout.update(prompts=16, max_new_tokens=8)
  c.train.update(iterations=2, checkpoint_every=1, epochs=2, minibatches=2)
  c.eval.update(every=0, before=False, batch_size=16)
  c.kl.update(mode='adaptive', coef=0.1, target=0.001, horizon=100)   # beta moves visibly
  c.optim.lr = 1e-3
  for section, values in kw.items():
    c[section].update(values)
  return c


def leaves(tree):
  return [np.asarray(x) for x in jax.tree.leaves(tree)]


def assert_trees_close(a, b, atol):
  for x, y in zip(leaves(a), leaves(b), strict=True):
    np.testing.assert_allclose(x, y, atol=atol, rtol=0)


@pytest.fixture(scope='module')
def full_run(dirs):
  """Two iterations straight through (adaptive KL, evaluation at the end)."""
  wd = str(dirs[0] / 'full')
  c = config(dirs, eval={'every': 2})
  return wd, ppo.run(c, wd)


def test_run_writes_logs_evals_and_the_adaptive_controller_moves_beta(full_run, dirs):
  wd, out = full_run
  rows = [json.loads(l) for l in open(os.path.join(wd, 'metrics.jsonl'))]
  assert [r['step'] for r in rows] == [1, 2]
  for k in ('loss', 'gold', 'proxy', 'kl', 'entropy', 'clipfrac', 'approx_kl', 'value_error',
            'length', 'eos_rate', 'beta', 'time_generate', 'time_score', 'time_update',
            'tokens_per_sec'):
    assert all(np.isfinite(r[k]) for r in rows), k
  # Ziegler et al.: beta <- beta * (1 + clip(KL / target - 1, +-0.2) * B / horizon)
  c = config(dirs)
  e = np.clip(rows[0]['kl'] / c.kl.target - 1, -0.2, 0.2)
  np.testing.assert_allclose(rows[1]['beta'], rows[0]['beta'] * (1 + e * 16 / 100), rtol=1e-6)
  assert rows[0]['beta'] == pytest.approx(0.1) and rows[1]['beta'] != rows[0]['beta']
  assert rows[0]['kl'] == pytest.approx(0.0, abs=1e-5)      # the policy starts at the reference
  evals = json.load(open(os.path.join(wd, 'results.json')))['evals']
  assert [e['iteration'] for e in evals] == [2]
  assert set(evals[0]) >= {'iteration', 'gold', 'proxy', 'kl', 'sqrt_kl', 'beta'}
  assert os.path.exists(os.path.join(wd, 'gold_vs_kl.png'))
  # The held-out evaluation after iteration 2 reports the beta that iteration's KL led to.
  e = np.clip(rows[1]['kl'] / c.kl.target - 1, -0.2, 0.2)
  np.testing.assert_allclose(evals[0]['beta'], rows[1]['beta'] * (1 + e * 16 / 100), rtol=1e-6)
  np.testing.assert_allclose(evals[0]['sqrt_kl'], np.sqrt(evals[0]['kl']), rtol=1e-6)
  assert_rows_add_up(rows, c)
  # The fixed controller keeps beta.
  assert ppo.next_beta(config(dirs, kl={'mode': 'fixed'}).kl, 0.1, 5.0, 16) == 0.1


def assert_rows_add_up(rows, c):
  """Each logged iteration against hand arithmetic on its own numbers and the config: the
  reward is the score less beta x KL (k1, no EOS penalty, clip, scaling or whitening in this
  config), the loss is policy + vf_coef x value (no entropy bonus), the response token count is
  the mean length over the batch's rows, and the time split and throughput add up."""
  n = c.rollout.prompts * c.rollout.samples
  assert (c.kl.estimator, c.reward.missing_eos_penalty, c.reward.score_clip, c.reward.score_scale,
          c.reward.whiten, c.loss.entropy_coef) == ('k1', 0.0, 0.0, 'none', False, 0.0)
  for r in rows:
    np.testing.assert_allclose(r['kl_penalty'], r['beta'] * r['kl'], rtol=1e-5, atol=1e-9)
    np.testing.assert_allclose(r['reward_total'], r['proxy'] - r['kl_penalty'], rtol=1e-5)
    np.testing.assert_allclose(r['loss'], r['policy_loss'] + c.loss.vf_coef * r['value_loss'],
                               rtol=1e-5)
    assert r['response_tokens'] == pytest.approx(r['length'] * n, abs=1e-3)
    assert r['length'] <= c.rollout.max_new_tokens
    assert r['eos_rate'] * n == pytest.approx(round(r['eos_rate'] * n), abs=1e-4)   # whole rows
    parts = sum(r[f'time_{k}'] for k in ('generate', 'rules', 'score', 'update', 'reward'))
    assert r['time_iteration'] == pytest.approx(parts, rel=1e-9)
    assert r['tokens_per_sec'] == pytest.approx(r['response_tokens'] / r['time_iteration'], rel=1e-9)


def test_resumed_run_continues_exactly(full_run, dirs):
  wd_full, out = full_run
  wd = str(dirs[0] / 'resumed')
  c = config(dirs, train={'stop_after': 1}, eval={'every': 2})
  first = ppo.run(c, wd)
  assert first['iterations'] == 1
  second = ppo.run(c, wd)
  # It picked up at iteration 1 (KL controller, reward moments, rollout RNG restored) and
  # ran only the second iteration, landing on the uninterrupted run's params.
  assert second['started_at'] == 1 and second['iterations'] == 2
  assert_trees_close(second['state'].params, out['state'].params, atol=0)
  full = [json.loads(l) for l in open(os.path.join(wd_full, 'metrics.jsonl'))]
  resumed = [json.loads(l) for l in open(os.path.join(wd, 'metrics.jsonl'))]
  for a, b in zip(full, resumed, strict=True):
    assert a['beta'] == b['beta'] and a['loss'] == b['loss'] and a['gold'] == b['gold']


def collect(p, key):
  """One rollout of the run's policy, scored: the update's input batch."""
  prompts, it_key, _, _ = online.draw(p, key)
  from lm import decode
  toks, pmask = decode.left_pad(prompts, p.ctx.width)
  s = online.policy.sampling_config(p.ctx.pol, 8, 1.0)
  gen = decode.generate_padded(p.trees.generation(p.st['train'].params, p.trees.frozen), toks, pmask,
                               it_key, p.ctx.pol.cfg, s, mesh=p.ctx.mesh)
  batch, _ = p.score(p.st['train'].params, p.trees.frozen, *gen.sequences())
  return batch


@pytest.fixture(scope='module')
def pieces(dirs):
  """The 8-device setup of the full run's configuration plus one scored rollout."""
  p = ppo.prepare(config(dirs), str(dirs[0] / 'pieces'))
  return p, collect(p, jax.random.key(7))


def _copy(state):
  return jax.tree.map(jnp.copy, state)


def extras(beta, moments=None):
  return {'beta': jnp.float32(beta), 'moments': (moments or ppo_lib.running_moments())._asdict()}


def with_config(p, **sections):
  """p.ctx with some config sections changed (the switches the update reads)."""
  c = p.ctx.config.copy_and_resolve_references()
  for name, values in sections.items():
    c[name].update(values)
  return dc.replace(p.ctx, config=c)


def prepared(p, ro, beta, moments=None, **sections):
  """PPO's advantages (the update jit's first half) as one jitted program on host arrays: run
  op by op on the 8-device arrays it dispatches dozens of small collective programs at once,
  which XLA:CPU's rendezvous can abort on (seen once in a full run)."""
  ctx = with_config(p, **sections)
  return jax.jit(lambda r, e: ppo.PPO().prepare(ctx, r, e))(jax.device_get(ro), extras(beta, moments))


def test_scanned_update_equals_updates_one_by_one(pieces):
  p, ro = pieces
  key, t = jax.random.key(11), p.ctx.config.train
  frozen = p.trees.frozen
  scanned, _, _ = p.update(_copy(p.st['train']), extras(0.1), ro, frozen, key)
  batch, _, _ = prepared(p, ro, 0.1)
  loss_fn = p.algo.loss_fn(p.ctx, p.trees)
  one = jax.jit(lambda st, mb, k, f: train_lib.update(st, mb, k, f, loss_fn=loss_fn, tx=p.setup.tx))
  state = _copy(p.st['train'])
  n = 0
  for ek in jax.random.split(key, t.epochs):
    mbs = online.minibatches(batch, ek, t.minibatches)
    for i in range(t.minibatches):
      state, _ = one(state, jax.tree.map(lambda x: x[i], mbs), jax.random.fold_in(ek, i), frozen)
      n += 1
  assert n == 4 and int(state.step) == int(scanned.step) == 4
  assert_trees_close(scanned.params, state.params, atol=2e-6)
  moved = max(np.abs(a - b).max() for a, b in zip(leaves(state.params), leaves(p.st['train'].params)))
  assert moved > 1e-4                                     # the updates did something


def test_update_on_8_devices_equals_1_device(pieces, dirs):
  p8, ro = pieces
  p1 = ppo.prepare(config(dirs, mesh={'data': 1}), str(dirs[0] / 'one'), devices=jax.devices()[:1])
  assert p8.ctx.mesh.size == 8 and p1.ctx.mesh.size == 1
  key = jax.random.key(3)
  out = {}
  for name, p in (('8', p8), ('1', p1)):
    one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    r = {k: v for k, v in ro.items()}
    if p is p1:
      r = jax.device_put(jax.device_get(r), one)
    scored, _ = p.score(p.st['train'].params, p.trees.frozen, r['tokens'], r['mask'])
    state, _, m = p.update(_copy(p.st['train']), extras(0.1), scored, p.trees.frozen, key)
    out[name] = (jax.device_get(state.params), jax.device_get(m), jax.device_get(scored))
  assert_trees_close(out['8'][2], out['1'][2], atol=2e-5)
  assert_trees_close(out['8'][0], out['1'][0], atol=2e-5)
  np.testing.assert_allclose(out['8'][1]['loss'], out['1'][1]['loss'], rtol=1e-4)


def test_kl_estimator_and_reward_switches(pieces):
  p, ro = pieces
  n, beta = p.ctx.width, 0.5
  ro = jax.device_get(ro)
  ro = dict(ro, ref_logp=ro['ref_logp'] - 0.3 * ro['mask'][:, n:])   # a KL to penalise
  rmask = np.asarray(ro['mask'][:, n:], np.float32)
  log_r = np.asarray(ro['ref_logp'] - ro['logp'])
  def rewards(**kw):
    return prepared(p, ro, beta, **kw)[2]
  m1, m3 = rewards(kl={'estimator': 'k1'}), rewards(kl={'estimator': 'k3'})
  # Per sequence: sum_t R_t = score - beta * sum_t KL_t, with KL_t by the chosen estimator.
  k1 = (-log_r * rmask).sum(1)
  k3 = ((np.expm1(log_r) - log_r) * rmask).sum(1)
  np.testing.assert_allclose(float(m1['kl_penalty']), beta * k1.mean(), rtol=1e-5)
  np.testing.assert_allclose(float(m3['kl_penalty']), beta * k3.mean(), rtol=1e-5)
  np.testing.assert_allclose(float(m1['reward_total'] - m3['reward_total']),
                             -beta * (k1 - k3).mean(), rtol=1e-4)
  # The missing-EOS penalty lowers exactly the truncated rows' total reward.
  mp = rewards(reward={'missing_eos_penalty': 2.0})
  truncated = 1 - np.asarray(ro['has_eos'], np.float32)
  np.testing.assert_allclose(float(mp['reward_total'] - m1['reward_total']), -2.0 * truncated.mean(),
                             atol=1e-5)
  # Running score scaling divides by the running std and updates the moments.
  _, new, ms = prepared(p, ro, 0.0, reward={'score_scale': 'running'})
  sc = np.asarray(ro['scores'])
  assert float(new['moments']['count']) == 16
  np.testing.assert_allclose(float(ms['reward_total']), (sc / np.sqrt(sc.var() + 1e-8)).mean(),
                             rtol=1e-4)
  # Clipping the score bounds each row's terminal reward.
  _, _, mc = prepared(p, ro, 0.0, reward={'score_clip': 0.1})
  np.testing.assert_allclose(float(mc['reward_total']), np.clip(sc, -0.1, 0.1).mean(), rtol=1e-5)


def test_lora_policy_head_and_ptx_variant(dirs, tmp_path):
  """LoRA policy with a value head on its trunk, k3 KL and PPO-ptx: one iteration runs; the
  reference is the base itself and the first rollout's KL is exactly 0 (B = 0 at init)."""
  corpus = tmp_path / 'works.txt'
  corpus.write_text('Now is the winter of our discontent, made glorious summer.\n' * 40)
  c = config(dirs, peft={'method': 'lora', 'lora_rank': 2}, value={'init': 'policy_head'},
             ptx={'coef': 0.5, 'chars': 5000, 'seq_len': 16, 'corpus': str(corpus)},
             kl={'mode': 'fixed', 'estimator': 'k3'}, train={'iterations': 1})
  wd = str(dirs[0] / 'lora')
  p = ppo.prepare(c, wd)
  assert set(p.trees.frozen) == {'reference', 'reward'}    # the base is the reference: no copy
  assert set(p.st['train'].params) == {'adapters', 'value_head'}
  assert not np.any(leaves(p.st['train'].params['value_head'])[0])     # zero-init head
  p.checkpointer.close()
  out = ppo.run(c, wd)
  row = json.loads(open(os.path.join(wd, 'metrics.jsonl')).readline())
  assert row['kl'] == 0.0 and np.isfinite(row['ptx_loss']) and row['ptx_loss'] > 0
  assert out['iterations'] == 1
  # export folds the trained adapters into the SFT base (the value head stays behind)
  mesh = sharding.make_mesh({'data': -1})
  _, _, merged = export.load_merged(wd, mesh)
  cfg = stage.read_source(wd).cfg
  base = stage.read_source(dirs[1]).restore_params(mesh, cfg)
  assert_trees_close(merged, peft.merge(base, out['state'].params['adapters'], cfg, p.ctx.pcfg), atol=0)
  assert any(np.any(a != b) for a, b in zip(leaves(merged), leaves(base)))


def test_the_trained_policy_is_a_source_for_later_stages_and_export(full_run):
  """init_from=PPO_WORKDIR (evaluate, sample, another stage) and export read the policy out
  of the PPO state (train/params/policy), not the SFT model it started from."""
  wd, out = full_run
  mesh = sharding.make_mesh({'data': -1})
  src = stage.read_source(wd)
  assert src.params_at == ('train', 'params', 'policy') and src.step == 2
  trained = out['state'].params['policy']
  assert_trees_close(src.restore_params(mesh), trained, atol=0)
  _, tok, exported = export.load_merged(wd, mesh)
  assert_trees_close(exported, trained, atol=0)
  assert tok.vocab_size <= src.cfg.vocab_size
  sft_params = stage.read_source(src.config.init_from).restore_params(mesh, src.cfg)
  assert any(np.any(a != b) for a, b in zip(leaves(trained), leaves(sft_params)))


def test_logprobs_and_values_in_one_pass_match_the_separate_functions():
  cfg = rl_fixtures.tiny_cfg(40)
  params = model.init(cfg, jax.random.key(0))
  head = heads.init(cfg, 1, jax.random.key(1), init_std=0.5)
  tokens = jax.random.randint(jax.random.key(2), (3, 12), 1, 40)
  mask = jnp.ones((3, 12), jnp.int32).at[0, :3].set(0).at[1, 10:].set(0)
  @jax.jit   # one compile, not one per eager op
  def both(params, head, tokens, mask):
    one = rollout.response_logprobs_values(params, head, tokens, mask, 5, cfg, 0.7, True)
    lp, ent = rollout.response_logprobs(params, tokens, mask, 5, cfg, 0.7, True)
    return one, (lp, ent, rollout.response_values(params, head, tokens, mask, 5, cfg))
  got, want = both(params, head, tokens, mask)
  for a, b in zip(got, want, strict=True):
    np.testing.assert_allclose(a, b, atol=1e-6)


def test_bad_input_is_one_sentence_at_start_up(dirs, tmp_path):
  root, pol, rm = dirs
  other_rm = str(tmp_path / 'rm_other')
  shutil.copytree(rm, other_rm)
  tok = tokenizers.add_special_tokens(tokenizers.CharTokenizer.from_texts(['xyz abc']), ['eos'])
  tok.save(tokenizers.run_file(other_rm))
  cases = [
      (dict(kl={'target': 0.0}), 'kl.target=0.0'),
      (dict(kl={'mode': 'pid'}), "kl.mode='pid' is not known"),
      (dict(kl={'estimator': 'k2'}), "kl.estimator='k2' is not known"),
      (dict(reward={'score_scale': 'batch'}), "reward.score_scale='batch' is not known"),
      (dict(value={'init': 'random'}), "value.init='random' is not known"),
      (dict(peft={'method': 'prefix'}), "peft.method='prefix': online RL trains"),
      (dict(rollout={'max_new_tokens': 60}), 'more than the'),            # prompt > context
      (dict(rollout={'prompts': 12}), 'rollouts per iteration .* must split'),
      (dict(train={'minibatches': 3}), 'must split'),
  ]
  for kw, match in cases:
    with pytest.raises(ConfigError, match=match):
      ppo.prepare(config(dirs, **kw), str(tmp_path / 'bad'))
  c = config(dirs)
  c.reward_from = other_rm
  with pytest.raises(ConfigError, match='different tokenizer'):
    ppo.prepare(c, str(tmp_path / 'bad'))
  assert not os.path.exists(tmp_path / 'bad' / 'checkpoints')    # nothing built
