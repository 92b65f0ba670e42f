"""Resume and the record of settings: a rerun whose optimizer or schedule differ from the steps
already taken is refused (one sentence naming the keys and the override), and config.json keeps
every invocation's settings under 'history'."""
import json
import os

import pytest

from experiments import pretrain
from experiments.stages import stage
from lm.checkpoint import Checkpointer
from lm.config import ConfigError
from tests.test_checkpoint import rows, tiny_config


def _config(corpus, lr=1e-3, **train):
  c = tiny_config(corpus, **{'steps': 4, 'checkpoint_every': 1, **train})
  c.optim.lr = lr
  return c


def test_resume_with_changed_optimizer_is_refused_unless_allowed_and_history_is_kept(tiny_corpus,
                                                                                     tmp_path):
  wd = str(tmp_path / 'run')
  pretrain.run(_config(tiny_corpus, stop_after=1), wd)
  hash_1 = stage.read_source(wd).config_hash
  pretrain.run(_config(tiny_corpus, stop_after=1), wd)          # same settings: resumes
  assert max(r['step'] for r in rows(wd)) == 2
  # the record of invocations is not part of the run's settings: same hash for a next stage
  assert stage.read_source(wd).config_hash == hash_1
  for bad, names in [(_config(tiny_corpus, lr=5e-3), ['optim.lr 0.001 -> 0.005']),
                     (_config(tiny_corpus, steps=8), ['train.steps 4 -> 8'])]:
    with pytest.raises(ConfigError) as e:
      pretrain.run(bad, wd)
    msg = str(e.value)
    assert all(n in msg for n in names) and '--config.train.allow_changed_optim=True' in msg
    assert len(msg.splitlines()) == 1 and 'resumes from step 2' in msg
    assert max(r['step'] for r in rows(wd)) == 2                # no step was taken
    assert Checkpointer.steps_in(os.path.join(wd, 'checkpoints'))[-1] == 2
  pretrain.run(_config(tiny_corpus, lr=5e-3, allow_changed_optim=True), wd)
  assert max(r['step'] for r in rows(wd)) == 4
  saved = json.load(open(os.path.join(wd, 'config.json')))
  assert saved['optim']['lr'] == 5e-3 and saved['resumed_from_step'] == 2
  hist = saved['history']
  assert len(hist) == 2 and [h['optim']['lr'] for h in hist] == [1e-3, 1e-3]
  assert [h['resumed_from_step'] for h in hist] == [0, 1]
  assert all('history' not in h and h['written_at'] for h in hist)


def test_a_fresh_workdir_with_an_old_config_but_no_checkpoints_is_not_a_resume(tiny_corpus, tmp_path):
  """A run stopped before its first checkpoint took no steps to stay consistent with."""
  wd = tmp_path / 'run'
  wd.mkdir()
  (wd / 'config.json').write_text(json.dumps({'optim': {'lr': 0.5}, 'train': {'steps': 99}}))
  pretrain.run(_config(tiny_corpus, steps=2), str(wd))
  saved = json.load(open(wd / 'config.json'))
  assert saved['history'] == [{'optim': {'lr': 0.5}, 'train': {'steps': 99}}]
