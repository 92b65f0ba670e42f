"""The `dpo` stage on tiny random-weight policies (tests/rl_fixtures): pairs from a K-wise
record by hand; the jitted step's DPO / IPO / cDPO loss against the formulas applied to
sequence log-probs computed row by row; the reference is the frozen step argument (another
frozen tree gives another loss; training never changes it); counted skips and start-up errors."""
import json

import jax
import numpy as np
import pytest

from experiments import dpo
from experiments.stages import policy, stage
from experiments.configs import rlhf_dpo
from lm import model, sharding, train as train_lib
from lm.config import ConfigError
from tests import rl_fixtures

RECORDS = [{'prompt': 'Of thee', 'responses': ['a sad day', 'a glad day', 'no day', 'a day'],
            'ranks': [2, 0, 3, 1]},
           {'prompt': 'And yet', 'responses': ['we love', 'we hate', 'we go'], 'ranks': [0, 2, 1]},
           {'prompt': 'My lord', 'responses': ['good', 'bad'], 'ranks': [0, 1]}]


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
  d = tmp_path_factory.mktemp('dpo')
  pol = rl_fixtures.policy_run(d / 'sft', n_layers=1)   # compile-bound: one layer (as test_ppo_stage)
  return {'dir': d, 'policy': pol, 'other': rl_fixtures.policy_run(d / 'other', seed=1, n_layers=1),
          'rm': rl_fixtures.reward_run(d / 'rm', pol)}


def config(runs, beta=None, **loss):
  c = rlhf_dpo.get_config()
  c.init_from, c.reward_from = runs['policy'], runs['rm']
  c.data.path = str(runs['dir'] / 'prefs.jsonl')
  c.loss.update(loss)
  if beta is not None:
    c.kl.coef = beta
  c.train.batch_size = 8
  c.prompts.update(n_train=8, n_eval=8)
  return c


def test_pairs_from_a_kwise_record():
  ranks = [1, 0, 2, 0]                         # two responses tie for best
  assert dpo.pairs_of(ranks, 'best') == [(1, 0), (1, 2), (3, 0), (3, 2)]
  assert dpo.pairs_of(ranks, 'all') == [(0, 2), (1, 0), (1, 2), (3, 0), (3, 2)]
  assert dpo.pairs_of([0, 1, 2], 'all') == [(0, 1), (0, 2), (1, 2)]


def test_encoded_pair_rows(runs):
  pol = policy.open_policy(runs['policy'])
  arrays, counts = dpo.encode_pairs(RECORDS[2:], pol, 16, 'best')
  assert counts == {'pairs': 1, 'truncated': 0, 'empty_prompt': 0}
  p, good, bad = (list(pol.tok.encode(x)) for x in ('My lord', 'good', 'bad'))
  for j, resp in enumerate([good, bad]):
    row = p + resp + [pol.eos]
    assert arrays['tokens'][0, j, :len(row)].tolist() == row
    assert arrays['mask'][0, j].tolist() == [1] * len(row) + [0] * (16 - len(row))
    assert arrays['resp'][0, j].tolist() == [0] * len(p) + [1] * (len(resp) + 1) + [0] * (16 - len(row))
  # Too long: the prompt loses its start (one token stays), then the response its end.
  arrays, counts = dpo.encode_pairs(RECORDS[2:], pol, 6, 'best')
  assert counts['truncated'] == 2
  assert arrays['tokens'][0, 0].tolist() == p[-1:] + good + [pol.eos]
  assert arrays['tokens'][0, 1].tolist() == p[-2:] + bad + [pol.eos]
  arrays, counts = dpo.encode_pairs(RECORDS[2:], pol, 4, 'best')
  assert arrays['tokens'][0, 0].tolist() == p[-1:] + good[:3]
  assert arrays['resp'][0, 0].tolist() == [0, 1, 1, 1]


def by_hand_logps(params, cfg, arrays):
  """[N, 2] summed response log-probs: each row on its own through a plain causal forward
  (trailing padding cannot reach earlier positions), summed in a Python loop."""
  forward = jax.jit(lambda p, x: model.forward(p, x, cfg)[0])
  out = np.zeros(arrays['tokens'].shape[:2])
  for i in range(out.shape[0]):
    for j in range(2):
      toks, resp = arrays['tokens'][i, j], arrays['resp'][i, j]
      logits = np.asarray(forward(params, toks[None])[0], np.float64)
      top = logits.max(-1, keepdims=True)
      logp = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
      out[i, j] = sum(logp[t - 1, toks[t]] for t in range(1, len(toks)) if resp[t])
  return out


def formula(kind, h, beta, eps):
  log_sig = lambda z: -np.logaddexp(0.0, -z)
  if kind == 'ipo':
    return np.mean((h - 1 / (2 * beta)) ** 2)
  return np.mean(-(1 - eps) * log_sig(beta * h) - eps * log_sig(-beta * h))


@pytest.fixture(scope='module')
def pairs(runs):
  """A batch of 8 pairs on the 8-device mesh, the trees (policy = init_from), another model as
  a reference, and the pairs' log-probs under both computed by hand."""
  mesh = sharding.make_mesh({'data': -1})
  pol = policy.open_policy(runs['policy'])
  trees = policy.trees(config(runs), pol, mesh)
  other = {'reference': stage.read_source(runs['other']).restore_params(mesh, pol.cfg)}
  arrays, _ = dpo.encode_pairs(RECORDS * 2, pol, 24, 'best')
  arrays = {k: v[:8] for k, v in arrays.items()}
  batch_sh = train_lib.batch_shardings(mesh, {k: jax.ShapeDtypeStruct(v.shape[1:], v.dtype)
                                              for k, v in arrays.items()})
  pi = by_hand_logps(jax.device_get(trees.frozen['reference']), pol.cfg, arrays)
  ref = by_hand_logps(jax.device_get(other['reference']), pol.cfg, arrays)
  return dict(mesh=mesh, trees=trees, other=other, batch_sh=batch_sh, pi=pi, ref=ref,
              batch={k: jax.device_put(v, batch_sh[k]) for k, v in arrays.items()})


def test_dpo_step_reference_is_the_frozen_argument(runs, pairs):
  c = config(runs, kind='dpo', beta=0.5)
  trees, other, batch, mesh = pairs['trees'], pairs['other'], pairs['batch'], pairs['mesh']
  setup = stage.build(c, None, mesh, axes=trees.axes, init_params=trees.init_params,
                      total_steps=10, initial_params=trees.initial)
  loss_fn = dpo.make_loss(trees, 'dpo', 0.5)
  step = train_lib.make_train_step(loss_fn, setup.tx, mesh, setup.shardings, pairs['batch_sh'],
                                   frozen_sh=trees.frozen_sh)
  evaluate = train_lib.make_eval_step(loss_fn, mesh, setup.shardings.params, pairs['batch_sh'],
                                      trees.frozen_sh)
  pi, ref = pairs['pi'], pairs['ref']
  h = (pi[:, 0] - ref[:, 0]) - (pi[:, 1] - ref[:, 1])
  before = jax.device_get(other)
  # With itself as the reference every log-ratio is 0: loss log 2. Another frozen tree gives
  # another loss: the reference is the step's argument, not a constant baked into it.
  same = float(evaluate(setup.state.params, batch, trees.frozen)[0]) / 8
  assert same == pytest.approx(np.log(2.0), rel=1e-6)
  state, m = step(setup.state, batch, other)
  assert float(m['loss']) == pytest.approx(formula('dpo', h, 0.5, 0.0), rel=1e-4)
  assert float(m['loss']) != pytest.approx(same, rel=1e-3)
  acc = np.mean(pi[:, 0] - ref[:, 0] > pi[:, 1] - ref[:, 1])
  assert float(m['rewards/accuracy']) == pytest.approx(acc)
  assert float(m['rewards/margin']) == pytest.approx(0.5 * h.mean(), rel=1e-4, abs=1e-6)
  # Training moves the policy; the reference stays as it was.
  for _ in range(2):
    state, m2 = step(state, batch, other)
  assert float(m2['loss']) < float(m['loss'])
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(other), before)
  moved = jax.tree.map(lambda a, b: np.abs(a - b).max(), jax.device_get(state.params['policy']),
                       jax.device_get(trees.frozen['reference']))
  assert max(jax.tree.leaves(moved)) > 0


@pytest.mark.parametrize('kind,eps', [('ipo', 0.0), ('cdpo', 0.2)])
def test_ipo_and_cdpo_switches(pairs, kind, eps):
  trees, mesh = pairs['trees'], pairs['mesh']
  loss_fn = dpo.make_loss(trees, kind, 0.5, eps)
  policy_params = {'policy': trees.frozen['reference']}     # the policy at init_from's weights
  param_sh = jax.tree.map(lambda x: x.sharding, policy_params)
  evaluate = train_lib.make_eval_step(loss_fn, mesh, param_sh, pairs['batch_sh'], trees.frozen_sh)
  pi, ref = pairs['pi'], pairs['ref']
  h = (pi[:, 0] - ref[:, 0]) - (pi[:, 1] - ref[:, 1])
  loss = float(evaluate(policy_params, pairs['batch'], pairs['other'])[0]) / 8
  assert loss == pytest.approx(formula(kind, h, 0.5, eps), rel=1e-4)
  assert loss != pytest.approx(formula('dpo', h, 0.5, 0.0), rel=1e-3)


def test_lora_reference_is_the_base(runs):
  c = config(runs)
  c.peft.method = 'lora'
  mesh = sharding.make_mesh({'data': -1})
  pol = policy.open_policy(runs['policy'])
  trees = policy.trees(c, pol, mesh)
  adapters = trees.init_params(jax.random.key(0))        # LoRA b = 0: policy == base
  arrays, _ = dpo.encode_pairs(RECORDS * 2, pol, 24, 'best')
  arrays = {k: v[:8] for k, v in arrays.items()}
  loss, n, _ = jax.jit(dpo.make_loss(trees, 'dpo', 0.1))(adapters, arrays, None, trees.frozen)
  assert float(loss / n) == pytest.approx(np.log(2.0), rel=1e-6)


def write(path, lines):
  with open(path, 'w') as f:
    f.writelines((l if isinstance(l, str) else json.dumps(l)) + '\n' for l in lines)


def test_bad_records_are_counted_skips(runs):
  c = config(runs)
  c.data.val_fraction = 0.0
  write(c.data.path, RECORDS * 3 + [
      {'prompt': 'Tie', 'responses': ['a', 'b'], 'ranks': [0, 0]},
      {'prompt': 'Empty', 'responses': ['a', ' '], 'ranks': [0, 1]},
      {'prompt': 'Missing', 'responses': ['a', 'b']},
      {'prompt': 'Same', 'responses': ['a', 'a'], 'ranks': [0, 1]},
      {'chosen': '\n\nHuman: hi\n\nAssistant: yes', 'rejected': '\n\nHuman: hi\n\nAssistant: yes'},
      {'chosen': '\n\nHuman: hi\n\nAssistant: yes', 'rejected': '\n\nHuman: hi\n\nAssistant: no'},
      'not json'])
  pol = policy.open_policy(runs['policy'])
  train, val, report = dpo.load_pairs(c, pol, 32)
  skipped = report['skipped']
  assert skipped.get('tie') == 1 and skipped.get('empty_response') == 1
  assert skipped.get('missing_field') == 1 or skipped.get('bad_ranks') == 1
  assert sum(v for k, v in skipped.items() if 'identical' in k) == 2
  assert sum(skipped.values()) == 6
  assert report['pairs']['train'] == 3 * (3 + 2 + 1) + 1 == len(train['tokens'])


def test_start_up_errors(runs, tmp_path):
  write(str(runs['dir'] / 'prefs.jsonl'), RECORDS * 4)
  for loss, match in [({'beta': 0.0}, 'kl.coef'), ({'beta': -1.0}, 'kl.coef'), ({'kind': 'kto'}, 'kind'),
                      ({'kind': 'cdpo'}, 'label_smoothing'), ({'label_smoothing': 0.1}, 'cdpo')]:
    with pytest.raises(ConfigError, match=match):
      dpo.run(config(runs, **loss), str(tmp_path / 'a'))
  c = config(runs)
  c.data.pairs = 'some'
  with pytest.raises(ConfigError, match='data.pairs'):
    dpo.run(c, str(tmp_path / 'b'))
  c = config(runs)
  c.train.batch_size = 64                    # more than the file's pairs
  with pytest.raises(ConfigError, match='fewer than one batch'):
    dpo.run(c, str(tmp_path / 'c'))
  other = rl_fixtures.reward_run_other_tokenizer(tmp_path / 'rm2', runs['policy'])
  c = config(runs)
  c.reward_from = other
  with pytest.raises(ConfigError, match='different tokenizer'):
    dpo.run(c, str(tmp_path / 'd'))
