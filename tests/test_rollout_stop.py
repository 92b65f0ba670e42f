"""rollout.stop through the online loop: the rule rewards (training and held-out) read each
response up to and including its first stop string, the logged lengths are the cut rows', and
bad values are one sentence at start-up."""
import json
import os

import numpy as np
import pytest

from experiments import grpo
from experiments.configs import rlvr_arith
from experiments.stages import online
from lm.config import ConfigError
from tests import rl_fixtures

STOP = 'A'          # a character the random policy writes often, so some rows stop early
N_NEW = 12


@pytest.fixture(scope='module')
def policy(tmp_path_factory):
  return rl_fixtures.arith_policy_run(tmp_path_factory.mktemp('stop') / 'sft')


def config(policy, **rollout):
  c = rlvr_arith.get_config()
  c.init_from = policy
  c.prompts.update(n_train=12, n_eval=4, steps=(1, 1), digits=(1, 1), template='{question}')
  c.rollout.update({'prompts': 4, 'samples': 2, 'max_new_tokens': N_NEW, 'engine': True,
                    'stop': (STOP,), **rollout})
  c.train.update(iterations=1, minibatches=1, checkpoint_every=1)
  c.eval.update(before=True, every=1, batch_size=4)
  return c


def test_rewards_and_lengths_see_rows_cut_at_the_stop_string(policy, tmp_path, monkeypatch):
  seen = []
  real = online.rule_scores

  def spy(ctx, texts, examples, lengths):
    seen.append((list(texts), [int(n) for n in lengths]))
    return real(ctx, texts, examples, lengths)
  monkeypatch.setattr(online, 'rule_scores', spy)
  grpo.run(config(policy), str(tmp_path))
  held_before, train, held_after = seen      # eval before, the iteration, eval after
  texts, lengths = train
  for t, n in zip(texts, lengths):           # the rule sees exactly the kept tokens (char model)
    assert STOP not in t[:-1], t
    if t.endswith(STOP):
      assert len(t) == n, (t, n)
    else:                                    # ran out, or ended with eos (not in the text)
      assert n == N_NEW or len(t) == n - 1, (t, n)
  assert any(t.endswith(STOP) for t in texts) and any(n == N_NEW for n in lengths)
  for t in held_before[0] + held_after[0]:   # the static batch's samples, cut by hand's rule
    assert STOP not in t[:-1]
  with open(os.path.join(tmp_path, 'metrics.jsonl')) as f:
    row = json.loads(f.readline())
  assert row['length'] == pytest.approx(np.mean(lengths))


def test_bad_stop_values_are_one_sentence(policy):
  with pytest.raises(ConfigError, match=r'rollout.stop needs rollout.engine=True'):
    online.check(config(policy, engine=False), grpo.GRPO())
  with pytest.raises(ConfigError, match=r"must be a tuple of non-empty strings"):
    online.check(config(policy, stop=('',)), grpo.GRPO())
