"""GRPO and RLOO (experiments/grpo.py, rloo.py: adapters on experiments/stages/online.py).

The losses and advantages against the papers' formulas in numpy on a small batch (survivors
3 and 4 of issue 21: a KL added to RLOO's reward instead of subtracted, GRPO's old and
reference log-probs swapped); then the whole stage on tiny random-weight workdirs
(tests/rl_fixtures): one iteration's update on 8 fake devices equals 1 device, a resumed or
preempted run continues exactly, start-up errors are one sentence."""
import json
import os
import signal

import jax
import numpy as np
import pytest

from experiments import export, grpo, rloo
from experiments.configs import rlhf_grpo, rlhf_rloo
from experiments.stages import online, stage, trainer
from lm import sharding
from lm.config import ConfigError
from rl import gold, pg
from tests import rl_fixtures, rl_reference as ref


# --- the math against hand arithmetic ---------------------------------------------------------
def test_rloo_reward_subtracts_the_kl_and_leaves_one_out():
  scores = np.array([1.0, 0.0, 2.0, 5.0, 5.0, 5.0], np.float32)
  kl = np.array([0.5, 1.0, 0.0, 2.0, 0.0, 1.0], np.float32)
  r = np.asarray(pg.rloo_rewards(scores, kl, 0.1))
  np.testing.assert_allclose(r, [0.95, -0.1, 2.0, 4.8, 5.0, 4.9], rtol=1e-6)
  adv = np.asarray(pg.rloo_advantages(r.reshape(2, 3))).reshape(-1)
  # group 1: 0.95 - (-0.1 + 2.0)/2 = 0.0, -0.1 - (0.95 + 2.0)/2 = -1.575, 2.0 - 0.425 = 1.575
  np.testing.assert_allclose(adv[:3], [0.0, -1.575, 1.575], atol=1e-6)
  np.testing.assert_allclose(adv[3:], [4.8 - 4.95, 5.0 - 4.85, 4.9 - 4.9], atol=1e-6)


def test_grpo_advantages_by_hand():
  adv = np.asarray(pg.grpo_advantages(np.array([[1.0, 3.0], [2.0, 2.0]], np.float32)))
  std = np.std([1.0, 3.0], ddof=1)                       # sqrt(2)
  np.testing.assert_allclose(adv[0], [-1 / (std + 1e-4), 1 / (std + 1e-4)], rtol=1e-6)
  np.testing.assert_allclose(adv[1], [0.0, 0.0])


def test_rloo_loss_keep_takes_rows_out_of_the_sum_and_the_weight():
  """Dynamic sampling's fillers (keep 0) count for nothing: by hand, rows 0 and 2 kept."""
  logp = np.array([[-1.0, -2.0], [-0.5, -0.5], [-3.0, 0.0]], np.float32)
  mask = np.array([[1, 1], [1, 0], [1, 1]], np.float32)
  adv = np.array([2.0, -1.0, 0.5], np.float32)
  total, weight, m = pg.rloo_loss(logp, adv, mask, np.array([1.0, 0.0, 1.0], np.float32))
  assert float(total) == pytest.approx(-(2.0 * -3.0 + 0.5 * -3.0)) and float(weight) == 2.0
  assert float(m['advantage']) == pytest.approx(2.5)
  total, weight, _ = pg.rloo_loss(logp, adv, mask)                       # no keep: every row
  assert float(total) == pytest.approx(7.5 - 1.0 * 0.5) and float(weight) == 3.0


# --- the adapters' wiring against the formulas --------------------------------------------------
def test_rloo_adapter_advantages_equal_the_formula():
  ctx, trees, params, frozen, tokens, mask = ref.setup('rloo', rollout={'samples': 2}, kl={'coef': 0.3})
  scores = np.array([0.5, -1.0, 2.0, 0.25], np.float32)
  ctx.reward = lambda fr, t, m: scores
  batch, _ = rloo.RLOO().score(ctx, trees, params, frozen, tokens, mask)
  logp = ref.logprobs(params['policy'], tokens, ctx.pol.cfg)
  ref_logp = ref.logprobs(frozen['reference'], tokens, ctx.pol.cfg)
  r = (scores - 0.3 * (logp - ref_logp).sum(1)).reshape(2, 2)
  want = (r - r[:, ::-1]).reshape(-1)                    # k = 2: the other sample is the baseline
  assert np.abs((logp - ref_logp).sum(1)).min() > 1e-3   # a KL to get the sign of
  np.testing.assert_allclose(np.asarray(batch['adv']), want, rtol=2e-4, atol=2e-5)


def test_grpo_loss_uses_old_logprobs_for_the_ratio_and_the_reference_for_the_kl():
  ctx, trees, params, frozen, tokens, mask = ref.setup(
      'grpo', rollout={'samples': 2}, kl={'coef': 0.5}, loss={'clip_eps': 0.2, 'level': 'sequence'})
  cfg = ctx.pol.cfg
  logp = ref.logprobs(params['policy'], tokens, cfg)
  rng = np.random.default_rng(0)
  old = (logp + rng.uniform(-0.5, 0.5, logp.shape)).astype(np.float32)    # the rollout policy
  ref_logp = (logp + rng.uniform(-1.0, 1.0, logp.shape)).astype(np.float32)  # the reference
  adv = np.array([1.0, -0.5, 2.0, -1.5], np.float32)
  batch = {'tokens': tokens, 'mask': mask, 'old_logp': old, 'ref_logp': ref_logp, 'adv': adv}
  total, weight, _ = grpo.GRPO().loss_fn(ctx, trees)(params, batch, jax.random.key(0), frozen)
  per_token = ref.ppo_clip(logp, old, adv[:, None], 0.2) + 0.5 * ref.k3(logp, ref_logp)
  want = per_token.mean(1).mean()                        # per sequence, then over sequences
  np.testing.assert_allclose(float(total) / float(weight), want, rtol=1e-4)


# --- the GRPO family's switches against their formulas ------------------------------------------
def test_grpo_advantage_scaling_by_hand():
  r = np.array([[1.0, 3.0], [2.0, 2.0], [0.0, 6.0]], np.float32)
  centred = np.array([[-1.0, 1.0], [0.0, 0.0], [-3.0, 3.0]])
  group = centred / (np.array([[np.sqrt(2)], [0.0], [np.sqrt(18)]]) + 1e-4)
  batch = centred / (np.std([1, 3, 2, 2, 0, 6], ddof=1) + 1e-4)        # one std: sqrt(4.4)
  for scale, want in (('group', group), ('batch', batch), ('none', centred)):
    np.testing.assert_allclose(np.asarray(pg.grpo_advantages(r, scale=scale)), want, rtol=1e-5,
                               atol=1e-6, err_msg=scale)
  # the adapter passes loss.scale_rewards through
  for scale, want in (('batch', batch), ('none', centred)):
    ctx, trees, params, frozen, tokens, mask = ref.setup(
        'grpo', rollout={'samples': 2}, loss={'scale_rewards': scale})
    ctx.reward = lambda fr, t, m: r[:2].reshape(-1)
    b, m = grpo.GRPO().score(ctx, trees, params, frozen, tokens, mask)
    np.testing.assert_allclose(np.asarray(b['adv']), (centred[:2] / (
        np.std([1, 3, 2, 2], ddof=1) + 1e-4) if scale == 'batch' else centred[:2]).reshape(-1),
        rtol=1e-5, atol=1e-6)
    assert float(m['groups/all_equal']) == 0.5


def grpo_formula(logp, old, ref_logp, adv, mask, *, low, high, beta, level='sequence',
                 length_norm=True, ratio='token', keep=None):
  """The family's loss in numpy: GRPO; DAPO's clip-higher, token level and overlong filter
  (rows not kept drop out); Dr. GRPO's constant length divisor; GSPO's sequence ratio
  s_i = exp(mean_t log pi/pi_old), clipped whole."""
  if keep is not None:
    logp, old, ref_logp, adv, mask = (x[keep > 0] for x in (logp, old, ref_logp, adv, mask))
  log_r = logp - old
  if ratio == 'sequence':
    log_r = np.repeat(((log_r * mask).sum(1) / mask.sum(1))[:, None], mask.shape[1], 1)
  rho = np.exp(log_r)
  a = adv[:, None]
  per_token = -np.minimum(rho * a, np.clip(rho, 1 - low, 1 + high) * a) + beta * ref.k3(logp, ref_logp)
  if level == 'token':
    return (per_token * mask).sum() / mask.sum()
  n = mask.sum(1) if length_norm else mask.shape[1]
  return ((per_token * mask).sum(1) / n).mean()


VARIANTS = {
    'grpo': ({}, {}),
    'clip_higher': ({'clip_eps_low': 0.1, 'clip_eps_high': 0.35}, {'low': 0.1, 'high': 0.35}),
    'dr_grpo_length': ({'length_norm': False}, {'length_norm': False}),
    'dapo_token_level': ({'level': 'token'}, {'level': 'token'}),
    'gspo': ({'ratio': 'sequence'}, {'ratio': 'sequence'}),
    'no_kl': ({}, {'beta': 0.0}),
    'overlong_filter': ({'overlong_filter': True}, {'keep': np.array([1.0, 0.0, 1.0, 1.0])}),
}


@pytest.mark.parametrize('variant', list(VARIANTS))
def test_grpo_variant_loss_equals_its_formula(variant):
  loss, want_kw = VARIANTS[variant]
  kl = {'coef': 0.0 if variant == 'no_kl' else 0.5}
  ctx, trees, params, frozen, tokens, mask = ref.setup(
      'grpo', rollout={'samples': 2}, kl=kl, loss={'clip_eps': 0.2, 'level': 'sequence', **loss})
  cfg, n = ctx.pol.cfg, ref.N
  for i, length in enumerate([4, 2, 3, 1]):        # responses of different lengths
    mask[i, ref.P + length:] = 0
  rmask = mask[:, ref.P:].astype(np.float64)
  logp = ref.logprobs(params['policy'], tokens, cfg)
  rng = np.random.default_rng(0)
  old = (logp + rng.uniform(-0.6, 0.6, logp.shape)).astype(np.float32)
  ref_logp = (logp + rng.uniform(-1.0, 1.0, logp.shape)).astype(np.float32)
  adv = np.array([1.0, -0.5, 2.0, -1.5], np.float32)
  batch = {'tokens': tokens, 'mask': mask, 'old_logp': old, 'ref_logp': ref_logp, 'adv': adv}
  if 'keep' in want_kw:
    batch['keep'] = want_kw['keep'].astype(np.float32)
  total, weight, _ = grpo.GRPO().loss_fn(ctx, trees)(params, batch, jax.random.key(0), frozen)
  kw = {'low': 0.2, 'high': 0.2, 'beta': kl['coef'], **want_kw}
  want = grpo_formula(logp, old, ref_logp, adv, rmask, **kw)
  np.testing.assert_allclose(float(total) / float(weight), want, rtol=1e-4)
  if variant != 'grpo':   # the switch changes the loss on this batch (it is not a no-op here)
    base = grpo_formula(logp, old, ref_logp, adv, rmask, low=0.2, high=0.2, beta=0.5)
    assert abs(want - base) > 1e-3, variant


def test_grpo_overlong_filter_keeps_the_rows_that_ended():
  ctx, trees, params, frozen, tokens, mask = ref.setup(
      'grpo', rollout={'samples': 2}, loss={'overlong_filter': True})
  tokens, mask = tokens.copy(), mask.copy()
  tokens[0, ref.P + 1] = tokens[2, -1] = ctx.pol.eos      # rows 0 and 2 end with eos
  mask[0, ref.P + 2:] = 0                                 # (row 0 after its eos: padding)
  ctx.reward = lambda fr, t, m: np.array([1.0, 0.0, 2.0, 0.5], np.float32)
  b, m = grpo.GRPO().score(ctx, trees, params, frozen, tokens, mask)
  np.testing.assert_array_equal(np.asarray(b['keep']), [1, 0, 1, 0])
  assert float(m['overlong_filtered']) == 0.5
  ctx.config.loss.overlong_filter = False
  assert 'keep' not in grpo.GRPO().score(ctx, trees, params, frozen, tokens, mask)[0]


# --- the stage -------------------------------------------------------------------------------
@pytest.fixture(scope='module')
def runs(tmp_path_factory):
  d = tmp_path_factory.mktemp('pg')
  pol = rl_fixtures.policy_run(d / 'sft', n_layers=1)   # compile-bound: one layer (as test_ppo_stage)
  return {'dir': d, 'policy': pol, 'rm': rl_fixtures.reward_run(d / 'rm', pol)}


def config(runs, method='rloo', **train):
  c = (rlhf_rloo if method == 'rloo' else rlhf_grpo).get_config()
  c.init_from, c.reward_from = runs['policy'], runs['rm']
  c.rollout.update(samples=2, max_new_tokens=6, prompts=4)
  c.prompts.update(n_train=12, n_eval=8)
  c.optim.lr = 1e-2                    # big steps: a lost update shows in the params
  t = dict(iterations=3, checkpoint_every=1)
  if method == 'grpo':           # 2 epochs x 2 shuffled minibatches of 8 rollouts
    t.update(epochs=2, minibatches=2)
    c.rollout.prompts = 8
  c.train.update(**t, **train)
  c.eval.update(before=False, every=0)
  return c


ALGOS = {'rloo': rloo.RLOO, 'grpo': grpo.GRPO}


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


def one_iteration(c, method, workdir, devices):
  """The stage's two programs on a mesh of `devices`: one scored and updated (fixed) rollout."""
  r = online.prepare(c, workdir, ALGOS[method](), devices=devices)
  r.checkpointer.close()
  pol, frozen = r.ctx.pol, r.trees.frozen
  tokens, mask = fake_rollout(r.ctx.rows, r.ctx.width, c.rollout.max_new_tokens, pol.cfg.vocab_size,
                              pol.eos)
  batch, m = r.score(r.st['train'].params, frozen, tokens, mask)
  state, _, um = r.update(r.st['train'], {}, batch, frozen, jax.random.key(5))
  return jax.device_get(state.params), {**jax.device_get(m), **jax.device_get(um)}


@pytest.mark.parametrize('method', ['rloo', 'grpo'])
def test_update_on_8_devices_equals_1(runs, method, tmp_path):
  p0 = jax.device_get({'policy': stage.read_source(runs['policy']).restore_params(one_device())})
  # Adam's eps at 1e-3: with 1e-8 its first step is lr * g / |g| even where the true gradient
  # is 0 or ~1e-10 (the key bias: softmax ignores a shift shared by every key), which turns
  # the reduction order's rounding into lr-sized differences. The comparison is of the
  # gradients' sharding invariance, so it runs where the update is near-linear in them.
  c1, c8 = config(runs, method), config(runs, method)
  c1.optim.eps = c8.optim.eps = 1e-3
  c1.mesh.data = 1
  p8, m8 = one_iteration(c8, method, str(tmp_path / '8'), None)
  p1, m1 = one_iteration(c1, method, str(tmp_path / '1'), jax.devices()[:1])
  assert m8['proxy'] == pytest.approx(m1['proxy'], rel=1e-5)
  d1 = jax.tree.map(lambda a, b: a - b, p1, p0)
  d8 = jax.tree.map(lambda a, b: a - b, p8, p0)
  assert max(np.abs(x).max() for x in jax.tree.leaves(d1)) > 1e-3    # the update did something
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-6), d1, d8)


def one_device():
  return sharding.make_mesh({'data': 1}, jax.devices()[:1])


def final_params(workdir, policy_dir):
  """(iteration, policy params) of an online workdir's newest checkpoint."""
  src = stage.read_source(workdir)
  assert src.params_at == ('train', 'params', 'policy')
  return src.step, jax.device_get(src.restore_params(one_device()))


def rows(workdir):
  return [json.loads(l) for l in open(os.path.join(workdir, 'metrics.jsonl'))]


@pytest.fixture(scope='module')
def straight(runs):
  """Three iterations without a stop."""
  wd = str(runs['dir'] / 'straight')
  rloo.run(config(runs), wd)
  return wd


def test_resumed_run_continues_exactly(runs, straight):
  halves = str(runs['dir'] / 'halves')
  rloo.run(config(runs, stop_after=2), halves)          # stopped (preempted) after 2 iterations
  assert [r['step'] for r in rows(halves)] == [1, 2]
  rloo.run(config(runs, stop_after=2), halves)          # resumes at 2: only one more to go
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
  jax.tree.map(np.testing.assert_array_equal,
               jax.device_get(export.load_merged(straight, one_device())[2]), pa)
  data = json.load(open(os.path.join(halves, 'results.json')))
  assert data['stage'] == 'rloo' and data['iterations'] == 3 and data['after']['iteration'] == 3
  assert os.path.exists(os.path.join(halves, 'reward.png'))


def test_sigterm_mid_run_saves_and_the_rerun_continues_exactly(runs, straight, monkeypatch):
  """A real SIGTERM during iteration 2: the run saves at 2 and exits 143; the same command
  again runs only iteration 3 and ends where the straight run did."""
  wd = str(runs['dir'] / 'preempted')
  real, calls = gold.score, []

  def score(texts, kind):   # the gold of each iteration's rollouts (no held-out evals here)
    calls.append(kind)
    if len(calls) == 2:
      os.kill(os.getpid(), signal.SIGTERM)
    return real(texts, kind)
  monkeypatch.setattr(gold, 'score', score)   # the VADER gold (experiments/stages/gold_model.py) calls it
  with pytest.raises(trainer.Preempted) as e:
    rloo.run(config(runs), wd)
  assert e.value.code == 143 and e.value.step == 2
  assert final_params(wd, runs['policy'])[0] == 2 and [r['step'] for r in rows(wd)] == [1, 2]
  monkeypatch.undo()
  rloo.run(config(runs), wd)
  assert [r['step'] for r in rows(wd)] == [1, 2, 3]
  (sa, pa), (sb, pb) = final_params(straight, runs['policy']), final_params(wd, runs['policy'])
  assert sa == sb == 3
  jax.tree.map(lambda u, v: np.testing.assert_allclose(u, v, rtol=1e-5, atol=1e-7), pa, pb)


def test_start_up_errors(runs, tmp_path):
  c = config(runs)
  c.rollout.samples = 1
  with pytest.raises(ConfigError, match='at least 2 per prompt'):
    rloo.run(c, str(tmp_path / 'a'))
  c = config(runs)
  c.kl.coef = -0.1
  with pytest.raises(ConfigError, match='kl.coef'):
    rloo.run(c, str(tmp_path / 'b'))
  c = config(runs, 'grpo')
  c.kl.mode = 'adaptive'
  with pytest.raises(ConfigError, match='kl.mode'):
    grpo.run(c, str(tmp_path / 'b2'))
  # A reward model whose tokenizer is not the policy's: one sentence before anything compiles.
  other = rl_fixtures.reward_run_other_tokenizer(tmp_path / 'rm2', runs['policy'])
  c = config(runs)
  c.reward_from = other
  with pytest.raises(ConfigError, match='different tokenizer'):
    rloo.run(c, str(tmp_path / 'c'))
  # Minibatches that do not divide over the devices of the mesh.
  c = config(runs, minibatches=4)
  with pytest.raises(ConfigError, match='multiple of 32'):
    rloo.run(c, str(tmp_path / 'd'))
  assert not os.path.exists(tmp_path / 'd' / 'checkpoints')


# --- rule rewards (reward.kind='rules') end to end ----------------------------------------------
def test_grpo_with_rule_rewards_on_arith_prompts(tmp_path, monkeypatch):
  """GRPO through grpo.run with reward.kind='rules' on generated arithmetic prompts: no reward
  model, no reference (kl.coef=0); every metrics row carries the per-rule values, the total
  (which is what the scoring jit saw: proxy) and the unparsable count; held-out rows too; each
  row is scored against the example whose prompt it was generated from."""
  seen = {'prompts': [], 'examples': []}
  real_gen, real_rules = online.decode.generate_padded, online.rule_scores

  def generate_padded(params, toks, pmask, *a, **k):
    seen['prompts'].append((np.asarray(toks), np.asarray(pmask)))
    return real_gen(params, toks, pmask, *a, **k)

  def rule_scores(ctx, texts, examples, lengths):
    seen['examples'].append((ctx.pol.tok, [e['prompt'] for e in examples]))
    return real_rules(ctx, texts, examples, lengths)
  monkeypatch.setattr(online.decode, 'generate_padded', generate_padded)
  monkeypatch.setattr(online, 'rule_scores', rule_scores)
  from experiments.configs import rlvr_arith
  pol = rl_fixtures.arith_policy_run(tmp_path / 'sft')
  c = rlvr_arith.get_config()
  c.init_from = pol
  c.prompts.update(n_train=12, n_eval=4, steps=(1, 1), digits=(1, 1))
  c.reward.rules = {'answer': {'weight': 1.0, 'extract': 'flexible'},
                    'format': {'weight': 0.5, 'pattern': '[aeiou]'},
                    'length': {'weight': 0.25, 'cache': 4}}
  c.rollout.update(prompts=4, samples=2, max_new_tokens=8, engine=False)   # the static path's prompts
  c.train.update(iterations=2, minibatches=1, checkpoint_every=2)
  c.eval.update(before=False, every=2, batch_size=4)
  wd = str(tmp_path / 'rlvr')
  grpo.run(c, wd)
  got = rows(wd)
  assert [r['step'] for r in got] == [1, 2]
  for r in got:
    for k in ('reward/answer', 'reward/format', 'reward/length', 'reward/total', 'reward/unparsable'):
      assert k in r, k
    assert 0 <= r['reward/answer'] <= 1 and 0 <= r['reward/unparsable'] <= 8
    assert r['reward/total'] == pytest.approx(
        r['reward/answer'] + 0.5 * r['reward/format'] + 0.25 * r['reward/length'], abs=1e-6)
    assert r['proxy'] == pytest.approx(r['reward/total'], abs=1e-5)   # the jit scored the rules
  assert any(0 < r['reward/format'] < 1 for r in got)     # varied rewards: advantages not all 0
  ev = [json.loads(l) for l in open(os.path.join(wd, 'eval.jsonl'))]
  assert ev[-1]['iteration'] == 2 and 'reward/answer' in ev[-1]
  assert ev[-1]['proxy'] == pytest.approx(ev[-1]['reward/total'], abs=1e-6)
  # no reference is held while training (kl.coef=0), yet the held-out KL is measured against
  # the starting policy, not taken as 0 (the over-optimisation plots' x axis)
  assert ev[-1]['kl'] > 0 and ev[-1]['sqrt_kl'] == pytest.approx(np.sqrt(ev[-1]['kl']))
  gens = [g for g in seen['prompts'] if len(g[0]) == 8][:2]   # the 2 iterations' 8 rows (then evals)
  for (toks, pmask), (tok, prompts) in zip(gens, seen['examples'][:2]):
    assert [tok.decode([int(t) for t, m in zip(r, mr) if m]) for r, mr in zip(toks, pmask)] == prompts
  assert len(gens) == 2 and len(set(seen['examples'][0][1])) == 4
  resolved = json.load(open(os.path.join(wd, 'config.json')))['resolved']
  assert resolved['reference_held'] is False and resolved['rm_params'] == 0
  # a run stopped after iteration 1 and resumed continues exactly (rules are pure functions)
  monkeypatch.undo()
  halves = str(tmp_path / 'halves')
  c.train.stop_after = 1
  grpo.run(c, halves)
  grpo.run(c, halves)
  for x, y in zip(got, rows(halves)):
    for k in ('reward/total', 'reward/format', 'reward/length', 'proxy', 'loss', 'entropy'):
      assert x[k] == pytest.approx(y[k], rel=1e-5, abs=1e-6), (x['step'], k)
  assert [r['step'] for r in rows(halves)] == [1, 2]


def test_rule_reward_start_up_errors(tmp_path):
  from experiments.configs import rlvr_arith
  c = rlvr_arith.get_config()
  c.init_from = rl_fixtures.policy_run(tmp_path / 'sft', n_layers=1)
  c.reward.rules = {'corect': {'weight': 1.0}}
  with pytest.raises(ConfigError, match="reward.rules.corect: unknown reward function 'corect'"):
    grpo.run(c, str(tmp_path / 'a'))
  c = rlvr_arith.get_config()
  c.reward.kind = 'rule'
  with pytest.raises(ConfigError, match="reward.kind='rule' is not known"):
    grpo.run(c, str(tmp_path / 'b'))
  c = rlvr_arith.get_config()        # openings carry no 'answer' field
  c.init_from = rl_fixtures.policy_run(tmp_path / 'sft2', text=rl_fixtures.works_text(), n_layers=1)
  c.prompts = rlhf_grpo.get_config().prompts
  c.prompts.update(n_train=4, n_eval=2)
  c.rollout.max_new_tokens = 8
  with pytest.raises(ConfigError, match=r"'answer' \(answer\) needs the field 'answer', which example"):
    grpo.run(c, str(tmp_path / 'c'))


def test_prompt_sources_arith_and_jsonl(tmp_path):
  from data import arith
  from experiments.configs import rlvr_arith
  from experiments.stages import policy
  c = rlvr_arith.get_config()
  c.prompts.update(n_train=20, n_eval=5)
  train, held = policy.prompt_examples(c, 'train'), policy.prompt_examples(c, 'eval')
  assert len(train) == 20 and len(held) == 5
  assert not {e['question'] for e in train} & {e['question'] for e in held}
  assert train[0]['prompt'] == f"Q: {train[0]['question']}\nA:\n" and '####' in train[0]['answer']
  path = tmp_path / 'gsm.jsonl'
  recs = arith.to_gsm8k(arith.generate(6, seed=1))
  path.write_text(''.join(json.dumps(r) + '\n' for r in recs))
  c.prompts.update(source='jsonl', path=str(path), n_train=3, n_eval=2)
  train, held = policy.prompt_examples(c, 'train'), policy.prompt_examples(c, 'eval')
  assert [e['question'] for e in train] == [r['question'] for r in recs[:3]]
  assert [e['question'] for e in held] == [r['question'] for r in recs[4:]]
  assert held[0]['answer'] == recs[4]['answer'] and held[0]['id'] == 'eval-0'
  c.prompts.path = str(tmp_path / 'missing.jsonl')
  with pytest.raises(ConfigError, match='prompts.source=jsonl needs prompts.path'):
    policy.prompt_examples(c, 'train')
  c.prompts.source = 'gsm'
  with pytest.raises(ConfigError, match="prompts.source='gsm' is not known"):
    policy.prompt_examples(c, 'train')


def test_prompt_shots_are_the_labs_demonstrations_and_never_trained_on(tmp_path):
  """prompts.shots=k: the first k training problems, written out by hand here in the CoT
  testbed's layout, precede every train and held-out prompt; the RL prompts are the problems
  after them; the same k-shot prompt the reasoning lab builds (prompt.k=k)."""
  from data import arith
  from experiments.configs import rlvr_arith
  from experiments.evaluation import prompting
  from experiments.stages import policy
  c = rlvr_arith.get_config()
  c.prompts.update(n_train=20, n_eval=5, shots=2)
  train, held = policy.prompt_examples(c, 'train'), policy.prompt_examples(c, 'eval')
  probs = arith.generate(22, seed=0, split='train', steps=(1, 3), digits=(1, 1))
  demo = ''.join(f"Q: {p['question']}\nA:\n{p['rationale']}\n#### {p['final']}\n\n" for p in probs[:2])
  assert [e['question'] for e in train] == [p['question'] for p in probs[2:]]
  assert train[0]['prompt'] == demo + f"Q: {probs[2]['question']}\nA:\n"
  assert all(e['prompt'] == demo + f"Q: {e['question']}\nA:\n" for e in held)
  assert not {p['question'] for p in probs[:2]} & {e['question'] for e in held}
  lab, _ = prompting.build_prompt(None, prompting.Format(), probs[:2], held[0], 'cot', 96)
  assert held[0]['prompt'] == lab
  path = tmp_path / 'gsm.jsonl'
  recs = arith.to_gsm8k(arith.generate(6, seed=1))
  path.write_text(''.join(json.dumps(r) + '\n' for r in recs))
  c.prompts.update(source='jsonl', path=str(path), n_train=3, n_eval=2, shots=1)
  train, held = policy.prompt_examples(c, 'train'), policy.prompt_examples(c, 'eval')
  r0 = recs[0]['answer'].rsplit('####', 1)
  assert [e['question'] for e in train] == [r['question'] for r in recs[1:4]]
  assert held[1]['prompt'] == (f"Q: {recs[0]['question']}\nA:\n{r0[0].strip()}\n#### {r0[1].strip()}\n\n"
                               + c.prompts.template.format(question=recs[5]['question']))
  c.prompts.update(source='openings')
  with pytest.raises(ConfigError, match='prompts.shots=1: use 0, or a positive count'):
    policy.prompt_examples(c, 'train')


def test_rule_reward_update_on_8_devices_equals_1(tmp_path):
  """reward.kind='rules': the host's scores enter the scoring jit as frozen['rule_scores'];
  one scored and updated rollout on 8 devices equals 1 (as for the reward-model runs)."""
  from experiments.configs import rlvr_arith
  pol = rl_fixtures.arith_policy_run(tmp_path / 'sft')
  out = {}
  for n in (8, 1):
    c = rlvr_arith.get_config()
    c.init_from = pol
    c.prompts.update(n_train=12, n_eval=4, steps=(1, 1), digits=(1, 1))
    c.rollout.update(prompts=4, samples=2, max_new_tokens=6)
    c.train.update(iterations=1, minibatches=1)
    c.optim.update(lr=1e-2, eps=1e-3)
    c.mesh.data = n
    r = online.prepare(c, str(tmp_path / f'd{n}'), grpo.GRPO(), devices=jax.devices()[:n])
    r.checkpointer.close()
    assert 'reference' not in r.trees.frozen and r.ctx.rm is None
    tokens, mask = fake_rollout(8, r.ctx.width, 6, r.ctx.pol.cfg.vocab_size, r.ctx.pol.eos)
    scores = np.array([1.0, 0.0, 0.5, 0.5, 0.0, 1.1, 2.0, -1.0], np.float32)
    frozen = {**r.trees.frozen, 'rule_scores': scores}
    batch, m = r.score(r.st['train'].params, frozen, tokens, mask)
    state, _, um = r.update(r.st['train'], {}, batch, r.trees.frozen, jax.random.key(5))
    out[n] = (jax.device_get(state.params), jax.device_get(batch['adv']), float(m['proxy']))
  assert out[1][2] == out[8][2] == pytest.approx(scores.mean())
  np.testing.assert_allclose(out[1][1], out[8][1], rtol=1e-6)
  assert abs(out[1][1][2]) < 1e-6 and out[1][1][0] > 0.5        # an all-equal group: advantage 0
  p0 = jax.device_get({'policy': stage.read_source(pol).restore_params(one_device())})
  d1 = jax.tree.map(lambda a, b: a - b, out[1][0], p0)
  d8 = jax.tree.map(lambda a, b: a - b, out[8][0], p0)
  assert max(np.abs(x).max() for x in jax.tree.leaves(d1)) > 1e-3
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-6), d1, d8)
