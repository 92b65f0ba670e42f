"""DAPO's dynamic sampling in the online-RL loop (rollout.dynamic_sampling, stages/online.py):
groups whose rewards are all equal are dropped and fresh prompts' groups drawn until the batch
has rollout.prompts informative groups or rollout.max_refills rounds are spent; the counts are
logged; the update sees exactly the chosen rows (fillers out of the loss); 8 devices equal 1;
a stopped and resumed run continues exactly."""
import dataclasses
import json
import os

import jax
import numpy as np
import pytest

from experiments import grpo, ppo
from experiments.configs import rlvr_arith
from experiments.stages import online, rollouts
from lm.config import ConfigError
from rl import rewards
from tests import rl_fixtures

P, K = 4, 2


@pytest.fixture(scope='module')
def policy(tmp_path_factory):
  return rl_fixtures.arith_policy_run(tmp_path_factory.mktemp('dyn') / 'sft')


def config(policy, **rollout):
  c = rlvr_arith.get_config()
  c.init_from = policy
  c.prompts.update(n_train=12, n_eval=4, steps=(1, 1), digits=(1, 1))
  c.rollout.update(prompts=P, samples=K, max_new_tokens=6, dynamic_sampling=True, **rollout)
  c.train.update(iterations=2, minibatches=1, checkpoint_every=2)
  c.optim.update(lr=1e-2, eps=1e-3)
  c.eval.update(before=False, every=0)
  return c


# Per round, each group all-equal ('e') or informative ('i'). An informative group's rewards
# are (10 r + g, 10 r + g + 0.5), an all-equal one's (100 + 10 r + g) twice: values name rows.
ROUNDS = ['eiei', 'eeie', 'iiee']


def scripted(calls):
  def rule_scores(ctx, texts, examples, lengths):
    r = len(calls)
    calls.append([e['prompt'] for e in examples])
    vals = []
    for g, kind in enumerate(ROUNDS[r]):
      vals += [10 * r + g, 10 * r + g + 0.5] if kind == 'i' else [100 + 10 * r + g] * 2
    total = np.array(vals, np.float64)
    return rewards.Scores(total, {'answer': total}, {'unparsable': 0})
  return rule_scores


def fake_rows(run, params, idx, key):
  """Rows made from the prompts' indices alone (no generation): deterministic on any mesh."""
  w, n = run.ctx.width, run.ctx.config.rollout.max_new_tokens
  tokens = np.zeros((len(idx), w + n), np.int32)
  mask = np.zeros_like(tokens)
  vocab = run.ctx.pol.cfg.vocab_size
  for row, i in enumerate(idx):
    p = run.ctx.train_ids[i]
    tokens[row, w - len(p):w], mask[row, w - len(p):w] = p, 1
    m = 2 + (i + row) % (n - 1)
    tokens[row, w:w + m] = (np.arange(m) * 7 + 3 * i + row) % (vocab - 2) + 1
    mask[row, w:w + m] = 1
  return rollouts.Rollout(tokens, mask, mask[:, w:].sum(1).astype(np.int32))


def one_iteration(policy, workdir, devices, monkeypatch, **rollout):
  calls, seen = [], {}
  monkeypatch.setattr(online, 'rule_scores', scripted(calls))
  seen['generated'] = []
  monkeypatch.setattr(online, 'generate_rows', lambda *a: seen['generated'].append(fake_rows(*a))
                      or seen['generated'][-1])
  c = config(policy, **rollout)
  c.mesh.data = len(devices)
  r = online.prepare(c, workdir, grpo.GRPO(), devices=devices)
  r.checkpointer.close()

  def score(params, frozen, tokens, mask):
    seen['scores'], seen['tokens'] = np.asarray(frozen['rule_scores']), np.asarray(tokens)
    return r.score(params, frozen, tokens, mask)

  def update(state, extras, batch, frozen, key):
    seen['keep'] = np.asarray(batch['keep'])
    return r.update(state, extras, batch, frozen, key)
  run = dataclasses.replace(r, score=score, update=update)
  st = r.st
  state, _, _, row = online.iterate(run, st['train'], {}, jax.random.wrap_key_data(st['rng']),
                                    r.trees.frozen)
  return run, calls, seen, row, jax.device_get(state.params)


@pytest.mark.parametrize('max_refills', [3, 1])
def test_all_equal_groups_are_dropped_and_refilled(policy, tmp_path, monkeypatch, capsys, max_refills):
  run, calls, seen, row, params = one_iteration(policy, str(tmp_path / 'a'), jax.devices(), monkeypatch,
                                                max_refills=max_refills)
  # every round draws P fresh prompts (none drawn twice in the iteration), each K times adjacent
  assert all(p[::K] == p[1::K] for p in calls)
  firsts = [q for p in calls for q in p[::K]]
  assert len(firsts) == len(set(firsts)) == P * len(calls)
  if max_refills == 3:
    # informative: round 0 groups 1, 3; round 1 group 2; round 2 groups 0 (and 1, not needed)
    assert len(calls) == 3
    want = [1, 1.5, 3, 3.5, 12, 12.5, 20, 20.5]
    want_keep = [1] * 8
    stats = {'dynamic/refills': 2, 'dynamic/extra_rows': 16, 'dynamic/informative': 4,
             'groups/all_equal': 7 / 12}
  else:
    # the bound: 3 informative groups after 1 refill; round 0's group 0 fills, out of the loss
    assert len(calls) == 2
    want = [1, 1.5, 3, 3.5, 12, 12.5, 100, 100]
    want_keep = [1, 1, 1, 1, 1, 1, 0, 0]
    stats = {'dynamic/refills': 1, 'dynamic/extra_rows': 8, 'dynamic/informative': 3,
             'groups/all_equal': 5 / 8}
    assert '3 of 4 groups informative after 1 refill' in capsys.readouterr().out
  np.testing.assert_array_equal(seen['scores'], want)
  np.testing.assert_array_equal(seen['keep'], want_keep)
  for k, v in stats.items():
    assert row[k] == pytest.approx(v), k
  # the rows the jit scored are the chosen groups' rows: round r's row j is generated row 8 r + j
  gen_rows = rollouts.Rollout.concat(seen['generated'])
  chosen = [2, 3, 6, 7, 12, 13, 16, 17] if max_refills == 3 else [2, 3, 6, 7, 12, 13, 0, 1]
  np.testing.assert_array_equal(seen['tokens'], gen_rows.tokens[chosen])
  # reward/* describe every generated row (an unbiased view of the policy), not the batch
  every = [v for r in range(len(calls)) for g, kind in enumerate(ROUNDS[r])
           for v in ([10 * r + g, 10 * r + g + 0.5] if kind == 'i' else [100 + 10 * r + g] * 2)]
  assert row['reward/total'] == pytest.approx(np.mean(every))
  if max_refills == 1:   # the update on 1 device equals 8 (fillers' keep 0 included)
    _, _, seen1, _, params1 = one_iteration(policy, str(tmp_path / 'b'), jax.devices()[:1], monkeypatch,
                                            max_refills=max_refills)
    np.testing.assert_array_equal(seen1['keep'], want_keep)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-6), params, params1)


def test_dynamic_sampling_resumes_exactly(policy, tmp_path):
  """Real generation (through the engine: its per-row seeds come from the checkpointed key)
  and rules, refills drawn: stopped after iteration 1 and resumed, the run logs what the
  straight run logged."""
  def rows(wd):
    return [json.loads(l) for l in open(os.path.join(wd, 'metrics.jsonl'))]
  c = config(policy, max_refills=2, engine=True)
  c.reward.rules = {'format': {'weight': 1.0, 'pattern': '[13579]$'}}   # some groups equal, some not
  straight, halves = str(tmp_path / 's'), str(tmp_path / 'h')
  grpo.run(c, straight)
  c.train.stop_after = 1
  grpo.run(c, halves)
  grpo.run(c, halves)
  a, b = rows(straight), rows(halves)
  assert [r['step'] for r in b] == [1, 2]
  assert sum(r['dynamic/refills'] for r in a) > 0      # refills happened
  for x, y in zip(a, b):
    for k in ('dynamic/refills', 'dynamic/extra_rows', 'dynamic/informative', 'groups/all_equal',
              'reward/total', 'proxy', 'loss', 'entropy'):
      assert x[k] == pytest.approx(y[k], rel=1e-5, abs=1e-6), (x['step'], k)


def test_start_up_errors(policy):
  c = config(policy, max_refills=-1)
  with pytest.raises(ConfigError, match='rollout.max_refills=-1 must be >= 0'):
    online.check(c, grpo.GRPO())
  c = config(policy)
  c.reward.kind = 'model'
  c.reward_from = 'somewhere'
  with pytest.raises(ConfigError, match="dynamic_sampling needs reward.kind='rules'"):
    online.check(c, grpo.GRPO())
  with pytest.raises(ConfigError, match='ppo has no groups of samples'):
    online.check(config(policy), ppo.ALGORITHM())
