"""Checkpoints under stress: a damaged newest step, and restoring onto another mesh."""
import functools
import json
import os

import jax
import numpy as np

from experiments import pretrain
from experiments.stages import stage
from experiments.configs import shakespeare_char
from lm import model, sharding
from lm.checkpoint import Checkpointer


def tiny_config(corpus, **train):
  c = shakespeare_char.get_config()
  c.data.path = corpus
  c.model.update(d_model=32, n_layers=2, n_heads=2, max_seq_len=32)
  c.train.update(steps=10, batch_size=8, log_every=1, checkpoint_every=5, samples=0)
  c.eval.every = 0
  c.optim.update(warmup_steps=5)
  c.train.update(train)
  return c


def rows(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(l) for l in f if l.strip()]


def test_damaged_newest_checkpoint_resumes_from_the_one_before_and_says_so(tiny_corpus, tmp_path,
                                                                          capsys):
  wd = str(tmp_path / 'run')
  pretrain.run(tiny_config(tiny_corpus), wd)
  before = rows(wd)
  ckpts = os.path.join(wd, 'checkpoints')
  assert Checkpointer.steps_in(ckpts) == [5, 10]
  for root, _, files in os.walk(os.path.join(ckpts, '10', 'state')):  # truncate step 10's arrays
    for f in files:
      p = os.path.join(root, f)
      with open(p, 'r+b') as fh:
        fh.truncate(os.path.getsize(p) // 2)
  capsys.readouterr()
  pretrain.run(tiny_config(tiny_corpus), wd)   # the same command again
  out = capsys.readouterr()
  assert 'could not be read' in out.err and 'resuming from step 5' in out.err
  assert 'resuming at step 5' in out.out
  assert Checkpointer.steps_in(ckpts) == [5, 10]             # step 10 written again, readable
  assert os.path.isdir(os.path.join(ckpts, '10.unreadable'))  # the damaged one kept aside
  after = rows(wd)
  # Steps 6..10 were replayed from step 5 exactly as the first time.
  assert [(r['step'], r['loss']) for r in after] == [(r['step'], r['loss']) for r in before]
  pretrain.run(tiny_config(tiny_corpus), wd)   # the rewritten step 10 is the one resumed now
  out = capsys.readouterr()
  assert 'could not be read' not in out.err and 'resuming at step 10' in out.out


def _restored_params(config, workdir, mesh_shape):
  mesh = sharding.make_mesh(mesh_shape)
  vocab = json.load(open(os.path.join(workdir, 'config.json')))['resolved']['vocab_size']
  cfg = pretrain.model_config(config, vocab)
  setup = stage.build(config, workdir, mesh, axes=model.logical_axes(cfg),
                      init_params=functools.partial(model.init, cfg), total_steps=config.train.steps)
  setup.checkpointer.close()
  assert setup.start == 6
  return setup.state.params, mesh


def test_checkpoint_written_on_one_mesh_restores_and_trains_on_others(tiny_corpus, tmp_path, capsys):
  wd = str(tmp_path / 'run')
  c = tiny_config(tiny_corpus, steps=6, checkpoint_every=6)
  c.model.n_heads = 4    # splits over tensor=4
  c.mesh.update(data=1, fsdp=8)
  pretrain.run(c, wd)
  ref, _ = _restored_params(c, wd, {'data': 1, 'fsdp': 8})
  ref = jax.device_get(ref)
  for shape in ({'data': 2, 'tensor': 4}, {'data': 8}):
    params, mesh = _restored_params(c, wd, shape)
    leaf = params['layers']['mlp']['wi']
    assert dict(leaf.sharding.mesh.shape) == dict(mesh.shape)   # laid out on the new mesh
    assert ('tensor' in leaf.sharding.spec) == ('tensor' in shape)
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(params), ref)
  # Training continues on another mesh from the step it was written at.
  # (a longer schedule than the steps taken: a resume accepts it only when told to)
  c2 = tiny_config(tiny_corpus, steps=8, checkpoint_every=6, allow_changed_optim=True)
  c2.model.n_heads = 4
  c2.mesh.update(data=2, fsdp=1, tensor=4)
  capsys.readouterr()
  pretrain.run(c2, wd)
  assert 'resuming at step 6' in capsys.readouterr().out
  r = rows(wd)
  assert [x['step'] for x in r] == list(range(1, 9)) and all(np.isfinite(x['loss']) for x in r)
  assert abs(r[6]['loss'] - r[5]['loss']) < 0.5   # continues the same trajectory
