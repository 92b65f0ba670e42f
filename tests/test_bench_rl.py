"""bench_rl on a tiny random policy + RM: the table, bench.json's fields, and that the time
split adds up (PPO iteration = generation + scoring + update + host; overhead against the
pieces timed alone; GRPO and DPO tokens/s = tokens / seconds). TRL's column is skipped here (its
absence prints a line); the full comparison is the experiment itself."""
import builtins
import json

import pytest

from experiments import bench_rl
from experiments.configs import bench_rl as bench_config
from lm.config import ConfigError


def tiny(**kw):
  c = bench_config.get_config()
  c.model.update(d_model=32, n_layers=1, n_heads=2)
  c.update({**dict(batch_size=8, max_new_tokens=6, ppo_epochs=1, ppo_minibatches=1, grpo_k=2,
                   warmup=0, iterations=1, repeats=1), **kw})
  return c


def no_trl_run(wd, **kw):
  real_import = builtins.__import__

  def no_trl(name, *a, **k):     # as if trl were not installed
    if name == 'trl':
      raise ImportError('no trl')
    return real_import(name, *a, **k)
  with pytest.MonkeyPatch.context() as m:
    m.setattr(builtins, '__import__', no_trl)
    out = bench_rl.run(tiny(**kw), str(wd))
  return wd, out


@pytest.fixture(scope='module')
def bench(tmp_path_factory):
  """PPO only: the GRPO programs compile for another ~30 s (the slow test below)."""
  return no_trl_run(tmp_path_factory.mktemp('bench_rl'), grpo=False, grpo_rules=False, ppo_epochs=2)


def test_ppo_time_split_adds_up(bench):
  wd, out = bench
  r = out['ppo']
  assert r['iterations'] == 1 and r['batch'] == 8 and r['max_new_tokens'] == 6
  for k in ('gen_s', 'score_s', 'update_s', 'iteration_s'):
    assert r[k] > 0
  parts = r['gen_s'] + r['score_s'] + r['update_s']
  assert parts <= r['iteration_s'] + 1e-6
  assert r['host_s'] == pytest.approx(r['iteration_s'] - parts, abs=1e-9)
  assert r['host_s'] < 0.5 * r['iteration_s']      # the host adds little to the jitted pieces
  a = r['alone']
  assert a['fwd_bwd_passes'] == 2        # epochs x minibatches
  assert a['sum_s'] == pytest.approx(a['gen_s'] + a['score_s'] + 2 * a['fwd_bwd_s'])
  assert r['overhead'] == pytest.approx(r['iteration_s'] / a['sum_s'] - 1)
  tokens = r['per_iteration'][0]['tokens']
  assert 0 < tokens <= 8 * 6
  assert r['tokens_per_s'] == pytest.approx(tokens / r['iteration_s'])
  assert json.loads((wd / 'bench.json').read_text())['ppo']['overhead'] == pytest.approx(r['overhead'])


@pytest.mark.slow
def test_grpo_and_trl_skipped(tmp_path):
  wd, out = no_trl_run(tmp_path)
  g = out['grpo']
  assert (g['rows'], g['k'], g['iterations']) == (8, 2, 1)
  assert g['iteration_s'] == pytest.approx(g['gen_s'] + g['score_s'] + g['update_s'])
  assert 0 < g['response_tokens'] <= 8 * 6
  assert g['tokens_per_s'] == pytest.approx(g['response_tokens'] / g['iteration_s'])
  assert out['trl_grpo'] is None and 'grpo_ratio' not in out
  assert 'trl is not installed' in out['trl_skipped']
  saved = json.loads((wd / 'bench.json').read_text())
  assert saved['trl_skipped'] == out['trl_skipped'] and saved['trl_grpo'] is None
  d = out['dpo']
  assert (d['pairs'], d['steps']) == (8, 1) and out['trl_dpo'] is None
  assert 0 < d['tokens'] <= 8 * 2 * d['seq_len']
  assert d['tokens_per_s'] == pytest.approx(d['tokens'] / d['step_s'])
  assert out['grpo_rules']['rows'] == 8 and out['trl_grpo_rules'] is None


def test_grpo_rules_row_scores_with_the_answer_rule(tmp_path, monkeypatch):
  """Ours only: the rule row's reward is the `answer` rule's (a recording stand-in here: its
  value is the response's length), called strict on every generated row, against the arith
  problem the row's prompt states, laid out as the CoT query."""
  from experiments.stages import online
  from rl import rewards
  calls = []

  def fake(prompt, response, example, *, extract, field, **_):
    calls.append((prompt, response, example, extract, field))
    return float(len(response))
  monkeypatch.setitem(online.FUNCTIONS, 'answer', rewards.Function(
      fake, {'extract': 'strict', 'field': 'answer'}, lambda p: (p['field'],)))
  c = tiny(grpo=False, trl=False)
  out = {}
  bench_rl.bench_grpo_rules(c, str(tmp_path), use_trl=False, out=out)
  g = out['grpo_rules']
  assert (g['rows'], g['k'], g['iterations']) == (8, 2, 1) and out['trl_grpo_rules'] is None
  assert len(calls) == 8                                   # every row of the one iteration
  assert {(x[3], x[4]) for x in calls} == {('strict', 'answer')}
  for prompt, _, ex, _, _ in calls:
    assert prompt == f"Q: {ex['question']}\nA:\n"
    assert ex['answer'].endswith(f"#### {ex['final']}")
  assert len({x[0] for x in calls}) <= 4 and [x[0] for x in calls[::2]] == [x[0] for x in calls[1::2]]
  assert g['reward/answer'] == pytest.approx(sum(len(x[1]) for x in calls) / 8)
  assert g['reward/total'] == pytest.approx(g['reward/answer'])
  assert 0 <= g['rules_s'] < g['iteration_s']
  assert g['iteration_s'] == pytest.approx(g['gen_s'] + g['rules_s'] + g['score_s'] + g['update_s'])
  assert g['tokens_per_s'] == pytest.approx(g['response_tokens'] / g['iteration_s'])


def test_trl_side_reward_is_our_strict_answer_rule():
  """TRL's reward function: the `answer` rule, strict ('#### N' only; a flexible extractor
  would take the bare 3), each completion against its own problem's answer."""
  spent = []
  f = bench_rl.rules_reward(bench_rl.grpo_rules_config(tiny(), ''), spent)
  got = f(prompts=['Q: a\nA:\n'] * 4, completions=['so #### 5', '#### 4', 'it is 3', '#### 7\n'],
          answer=['5 - 0 = 5\n#### 5', '#### 5', '#### 3', '#### 7'])
  assert got == [1.0, 0.0, 0.0, 1.0] and len(spent) == 1


def test_rules_policy_must_hold_the_arith_prompts(bench, tmp_path, monkeypatch):
  """rules_init_from whose context (64) cannot hold an arith prompt + the response: one
  sentence at start-up, before any run is written or compiled."""
  def too_late(*a, **k):
    raise AssertionError('got past start-up')
  monkeypatch.setattr(bench_rl, 'tiny_runs', too_late)
  with pytest.raises(ConfigError, match='more than'):
    bench_rl.run(tiny(rules_init_from=str(bench[0] / 'runs' / 'policy')), str(tmp_path))


def test_table_rows(bench):
  out = bench[1]
  t = bench_rl.ppo_table(out['ppo'])
  for word in ('generation', 'scoring', 'update', 'iteration', 'tokens/s', 'overhead'):
    assert word in t
  grpo = {'rows': 8, 'k': 2, 'max_new_tokens': 6, 'iteration_s': 0.5, 'response_tokens': 40.0,
          'tokens_per_s': 80.0}
  g = bench_rl.grpo_table({'grpo': grpo, 'trl_grpo': None})
  assert 'tokens/s' in g and 'ratio ours' not in g
  with_trl = dict(grpo=grpo, trl_grpo={'step_s': 2.0, 'response_tokens': 40.0, 'tokens_per_s': 20.0},
                  grpo_ratio=3.5)
  assert 'ratio ours / TRL: 3.50x' in bench_rl.grpo_table(with_trl)
  dpo = {'dpo': {'pairs': 8, 'step_s': 0.1, 'tokens_per_s': 6000.0}, 'dpo_ratio': 17.5,
         'trl_dpo': {'step_s': 2.0, 'tokens_per_s': 300.0}}
  rules = dict(grpo, rules_s=0.01, **{'reward/total': 0.0})
  r = bench_rl.grpo_rules_table({'grpo_rules': rules, 'trl_grpo_rules': dict(
      step_s=4.0, response_tokens=40.0, tokens_per_s=10.0, rules_s=0.02, reward=0.0),
      'grpo_rules_ratio': 8.0})
  assert 'rules' in r and '0.0200' in r and r.endswith('ratio ours / TRL: 8.00x (goal >= 2x)')
  assert '17.50x' in bench_rl.dpo_table(dpo) and 'TRL' not in bench_rl.dpo_table(dict(dpo, trl_dpo=None))


@pytest.mark.parametrize('kw', [{'iterations': 0}, {'grpo_k': 3}, {'ppo_minibatches': 3}])
def test_bad_config(tmp_path, kw):
  with pytest.raises(ConfigError):
    bench_rl.run(tiny(**kw), str(tmp_path))


def test_algorithms_come_from_the_registry():
  """bench_rl runs the online loop with the adapters' classes got through the registry (no
  driver import): each online experiment names its ALGORITHM; others and unknown names fail."""
  from experiments import registry
  for name in ('ppo', 'grpo', 'rloo'):
    assert registry.algorithm(name).name == name
  for name in ('export', 'no_such_experiment'):
    with pytest.raises(KeyError):
      registry.algorithm(name)
