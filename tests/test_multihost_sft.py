"""Two local processes (jax.distributed over 127.0.0.1, 4 CPU devices each) run the SFT
stage exactly like one process with 8 devices: init_from restored collectively onto the
2-process mesh, packed instruction rows split by process, the same losses and val losses."""
import json
import os
import sys

import numpy as np

from tests import rl_fixtures
from tests.test_multihost import _rows, run_two_and_one


def _args(source, workdir):
  return [sys.executable, '-m', 'experiments.run', '--config=experiments/configs/rlhf_sft.py',
          f'--workdir={workdir}', f'--config.init_from={source}', '--config.train.steps=6',
          '--config.train.batch_size=8', '--config.train.log_every=1', '--config.eval.every=3',
          '--config.train.checkpoint_every=3', '--config.data.works.n_per_family=200',
          '--config.eval.n_per_family=16', '--config.optim.warmup_steps=2',
          '--config.mesh.data=4', '--config.mesh.fsdp=2']


def test_two_processes_sft_equal_one_process(tmp_path):
  source = rl_fixtures.policy_run(tmp_path / 'base', text=rl_fixtures.works_text())
  multi, single = str(tmp_path / 'multi'), str(tmp_path / 'single')
  run_two_and_one(lambda w: _args(source, w), multi, single, timeout=900)
  a, b = _rows(multi), _rows(single)
  assert [x['step'] for x in a] == [x['step'] for x in b] == list(range(1, 7))
  np.testing.assert_allclose([x['loss'] for x in a], [x['loss'] for x in b], rtol=1e-5)
  va = [x['val_loss'] for x in a if 'val_loss' in x]
  assert len(va) == 2
  np.testing.assert_allclose(va, [x['val_loss'] for x in b if 'val_loss' in x], rtol=1e-5)
  # Training moved the model: the losses are not one repeated number.
  assert abs(a[0]['loss'] - a[-1]['loss']) > 1e-3
  with open(os.path.join(multi, 'config.json')) as f:
    assert json.load(f)['source']['path'] == os.path.abspath(source)
