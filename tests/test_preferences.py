"""The synthetic labeller: K samples per prompt ranked by gold, written in the K-wise format
the reward stage reads back (drops counted, never silent)."""
import json
import os

import numpy as np
import pytest

from experiments import preferences
from experiments.stages import policy, reward_data
from experiments.configs import rlhf_preferences
from lm.config import ConfigError
from rl import gold
from tests import rl_fixtures


def test_group_drops_empty_and_duplicate_responses():
  counts = {'empty_responses': 0, 'duplicate_responses': 0}
  resp, g = policy.dedup_responses([' so fair', '', ' so fair ', ' foul'], np.array([0.5, 0.0, 0.1, -0.4]),
                              counts)
  assert resp == [' so fair', ' foul'] and g == [0.5, -0.4]
  assert counts == {'empty_responses': 1, 'duplicate_responses': 1}


def test_bad_config_is_one_sentence():
  c = rlhf_preferences.get_config()
  c.rollout.samples = 1
  with pytest.raises(ConfigError, match='at least 2 responses'):
    preferences.check(c)
  c.rollout.samples, c.eval.gold = 4, 'bleu'
  with pytest.raises(ConfigError, match='not a gold reward'):
    preferences.check(c)


def test_preferences_file_reads_back_as_ranked_groups(tmp_path, monkeypatch):
  # A random tiny policy writes no sentiment words (VADER scores 0: every group tied), so a
  # stand-in gold that varies with the text makes the ranking observable.
  fake = lambda texts, kind='vader': np.array([float(len(t) % 7) - 3.0 for t in texts])
  monkeypatch.setattr(gold, 'score', fake)
  src = rl_fixtures.policy_run(tmp_path / 'sft', text=rl_fixtures.works_text())
  c = rlhf_preferences.get_config()
  c.init_from = src
  c.prompts.n_train, c.prompts.n_eval = 6, 4
  c.rollout.update(samples=3, max_new_tokens=6, batch_size=8)
  report = preferences.run(c, str(tmp_path / 'prefs'))
  path = os.path.join(tmp_path, 'prefs', preferences.FILE)
  with open(path) as f:
    rows = [json.loads(l) for l in f]
  n = report['counts']
  assert n['written'] == len(rows) and n['written'] + n['too_few_responses'] == 6
  for r in rows:
    assert r['ranks'] == gold.ranks(r['gold'])             # 0 = best, by gold
    np.testing.assert_allclose(gold.score(r['responses']), r['gold'])
    assert len(set(r['responses'])) == len(r['responses'])
  assert sum(len(set(r['ranks'])) > 1 for r in rows) >= 1      # not a vacuous ranking
  data, rep = reward_data.read(path, 3, 0.0)
  tied = sum(len(set(r['gold'])) == 1 for r in rows)
  assert len(data['train']) == len(rows) - tied and rep['skipped'].get('tie', 0) == tied
  assert report['sft_heldout']['prompts'] == 4 and report['sft_heldout']['kl'] == 0.0
