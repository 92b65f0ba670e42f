"""The SFT stage end to end: full and parameter-efficient tuning from a pretraining workdir,
exact resume, frozen base untouched, mesh equality, counted bad records and start-up errors."""
import json
import os

import jax
import numpy as np
import pytest

from experiments import pretrain, sft
from experiments.configs import sft_base
from lm.checkpoint import CheckpointError
from lm.config import ConfigError
from tests.test_pretrain import losses, tiny_config

WORDS = ['ROMEO', 'JULIET', 'king', 'queen', 'lord', 'lady', 'night', 'day', 'love', 'death']


@pytest.fixture(scope='module')
def source(tmp_path_factory):
  """A tiny char-level model pretrained a few steps on tinyshakespeare, and an instruction file."""
  from tests.conftest import TINY_SHAKESPEARE
  d = tmp_path_factory.mktemp('sft_src')
  corpus = d / 'corpus.txt'
  corpus.write_text(TINY_SHAKESPEARE.read_text(encoding='utf-8')[:30000], encoding='utf-8')
  c = tiny_config(str(corpus), steps=4, eval_every=0, checkpoint_every=4, samples=0)
  c.model.max_seq_len = 64
  pretrain.run(c, str(d / 'pt'))
  rng = np.random.default_rng(0)
  lines = []
  for i in range(60):
    a, b = rng.choice(WORDS, 2, replace=False)
    lines.append(json.dumps({'instruction': f'Say {a} then {b}.', 'input': '', 'output': f'{a} {b}'}))
  lines.insert(5, '{"instruction": "no output field"}')          # a bad record: counted skip
  lines.insert(9, 'not json at all')
  (d / 'inst.jsonl').write_text('\n'.join(lines) + '\n', encoding='utf-8')
  return str(d / 'pt'), str(d / 'inst.jsonl')


def sft_config(src, inst, **train):
  c = sft_base.sft()
  c.init_from = src
  c.data.update(source=inst, template='none', val_fraction=0.2)
  c.train.update(steps=6, batch_size=8, log_every=1, checkpoint_every=3)
  c.eval.every = 0
  c.train.update(train)
  c.optim.update(lr=3e-3, warmup_steps=0)
  c.eval.update(before=False, val_examples=16)
  return c


def checkpoint_paths(wd):
  """Tree paths saved in the latest checkpoint's train state (from orbax's metadata file)."""
  from lm.checkpoint import Checkpointer
  step = Checkpointer.steps_in(os.path.join(wd, 'checkpoints'))[-1]
  with open(os.path.join(wd, 'checkpoints', str(step), 'state', '_METADATA')) as f:
    return list(json.load(f)['tree_metadata'])


@pytest.mark.parametrize('method', ['none', 'lora'] + [pytest.param(m, marks=pytest.mark.slow)
                                                       for m in ('prefix', 'prompt', 'adapter')])
def test_sft_trains_and_resumes_exactly(source, tmp_path, method, capsys):
  src, inst = source
  full, part = str(tmp_path / 'full'), str(tmp_path / 'part')
  lr = 0.1 if method == 'prompt' else 3e-3   # soft prompts need a large lr (Lester et al. use 0.3)
  c = sft_config(src, inst)
  c.peft.method = method
  c.optim.lr = lr
  state = sft.run(c, full)
  # The console says what the reader skipped (not just "none dropped"), with where.
  assert '2 of 62 records were skipped while reading: bad_json 1' in capsys.readouterr().out
  c2 = sft_config(src, inst, stop_after=3)
  c2.peft.method = method
  c2.optim.lr = lr
  sft.run(c2, part)
  assert max(losses(part)[0]) == 3
  sft.run(sft_config(src, inst) if method == 'none' else c, part)
  a, b = losses(full)[0], losses(part)[0]
  assert sorted(a) == sorted(b) == list(range(1, 7))
  np.testing.assert_allclose([a[s] for s in range(4, 7)], [b[s] for s in range(4, 7)], rtol=1e-6)
  assert min(a[s] for s in (4, 5, 6)) < a[1]    # batches differ: some later loss below the first
  cfg = json.load(open(os.path.join(full, 'config.json')))
  assert cfg['source']['path'] == os.path.abspath(src)
  from experiments.stages import stage
  # A next stage gets the model trained here: the source's, grown by the template's eos id.
  import dataclasses
  tuned, base = stage.read_source(full), stage.read_source(src)
  assert tuned.cfg == dataclasses.replace(base.cfg, vocab_size=tuned.tokenizer.vocab_size)
  assert tuned.tokenizer.vocab_size == base.tokenizer.vocab_size + 1
  report = cfg['resolved']['data']
  assert sum(report['read']['skipped'].values()) == 2           # the two bad lines, counted
  if method != 'none':
    assert cfg['resolved']['trainable_params'] < cfg['resolved']['params'] // 5
  if method == 'lora':
    # Only the adapters are trained and checkpointed: no base-shaped leaf anywhere in the state.
    n_trained = sum(x.size for x in jax.tree.leaves(state.params))
    assert n_trained == cfg['resolved']['trainable_params'] < cfg['resolved']['params'] // 5
    assert all(c.peft.lora_rank in x.shape for x in jax.tree.leaves(state.params))
    paths = checkpoint_paths(full)
    assert any("'lora'" in p or "'a')" in p for p in paths)
    assert not any("'embed'" in p or "'wi'" in p for p in paths)   # no base weight is stored


@pytest.mark.parametrize('method', ['adapter', 'lora'])
def test_base_params_are_bitwise_unchanged_by_peft_training(source, tmp_path, method):
  src, inst = source
  from experiments.stages import stage
  from lm import sharding
  mesh = sharding.make_mesh({'data': -1})
  before = jax.tree.map(np.asarray, stage.read_source(src).restore_params(mesh))
  c = sft_config(src, inst, steps=3, checkpoint_every=3)
  c.peft.method = method
  state = sft.run(c, str(tmp_path / 'a'))
  after = jax.tree.map(np.asarray, stage.read_source(src).restore_params(mesh))
  for x, y in zip(jax.tree.leaves(before), jax.tree.leaves(after)):
    np.testing.assert_array_equal(x, y)
  if method != 'lora':
    return
  # The tuned model a next stage reads is the untouched base plus alpha/r * A @ B on the targeted
  # matrices (numpy, scale from the config by hand), and the base bitwise everywhere else.
  tuned = jax.tree.map(np.asarray, stage.read_source(str(tmp_path / 'a')).restore_params(mesh))
  ab = jax.tree.map(np.asarray, state.params)['layers']
  scale = c.peft.lora_alpha / c.peft.lora_rank
  flat_b = jax.tree_util.tree_flatten_with_path(before)[0]
  flat_t = dict(jax.tree_util.tree_flatten_with_path(tuned)[0])
  targeted = 0
  for path, w in flat_b:
    keys = [getattr(k, 'key', None) for k in path]
    got = flat_t[path]
    if keys[0] == 'layers' and keys[1] in ab and keys[2] in ab[keys[1]]:
      a, b = ab[keys[1]][keys[2]]['a'], ab[keys[1]][keys[2]]['b']
      n, r = a.shape[0], a.shape[-1]
      delta = np.matmul(a.reshape(n, -1, r).astype(np.float64), b.reshape(n, r, -1).astype(np.float64))
      np.testing.assert_allclose(got, w + scale * delta.reshape(w.shape), rtol=1e-5, atol=1e-6)
      assert np.abs(delta).max() > 0
      targeted += 1
    else:
      np.testing.assert_array_equal(got, w)
  assert targeted == len(c.peft.lora_targets)


def test_lora_sft_on_an_8_device_mesh_equals_data_parallel(source, tmp_path):
  src, inst = source
  runs = {}
  for name, mesh in (('dp', dict(data=8)), ('3d', dict(data=2, fsdp=2, tensor=2))):
    c = sft_config(src, inst, steps=3, checkpoint_every=0)
    c.peft.method = 'lora'
    c.mesh.update(data=1, fsdp=1, tensor=1, expert=1)
    c.mesh.update(mesh)
    sft.run(c, str(tmp_path / name))
    runs[name] = losses(str(tmp_path / name))[0]
  np.testing.assert_allclose([runs['dp'][s] for s in (1, 2, 3)], [runs['3d'][s] for s in (1, 2, 3)],
                             rtol=2e-5)


def test_resume_refuses_a_changed_base(source, tmp_path):
  src, inst = source
  c = sft_config(src, inst, steps=3, stop_after=1)
  c.peft.method = 'lora'
  wd = str(tmp_path / 'r')
  sft.run(c, wd)
  cfg_path = os.path.join(wd, 'config.json')
  saved = json.load(open(cfg_path))
  saved['source']['config_hash'] = 'something-else'
  json.dump(saved, open(cfg_path, 'w'))
  with pytest.raises(CheckpointError, match='was trained on'):
    sft.run(c, wd)


def test_bad_sft_input_is_one_sentence_before_any_work(source, tmp_path):
  src, inst = source
  cases = [
      (dict(init_from=''), ConfigError, 'needs --config.init_from'),
      (dict(init_from=str(tmp_path / 'nope')), ConfigError, 'holds no config.json'),
      (dict(peft={'method': 'bitfit'}), ConfigError, 'peft.method'),
      (dict(peft={'method': 'lora', 'lora_targets': ('nothing',)}), ConfigError, 'lora_targets'),
      (dict(model={'d_model': 48}), ConfigError, 'conflicts'),
      (dict(data={'source': str(tmp_path / 'missing.jsonl')}), ConfigError, 'neither works'),
      (dict(data={'seq_len': 4096}), ConfigError, 'longer than the model context'),
      (dict(data={'template': 'alpaca_v2'}), Exception, 'Unknown template'),
  ]
  for i, (overrides, err, match) in enumerate(cases):
    c = sft_config(src, inst)
    for k, v in overrides.items():
      if isinstance(v, dict):
        c[k].update(v)
      else:
        c[k] = v
    wd = tmp_path / f'bad{i}'
    with pytest.raises(err, match=match):
      sft.run(c, str(wd))
    assert not (wd / 'checkpoints').exists(), overrides


def test_skipped_records_line():
  read = {'lines': 13, 'skipped': {'bad_json': 1, 'missing_field': 0, 'undecodable': 2},
          'first_skipped': {'bad_json': 'f.jsonl:11', 'undecodable': 'f.jsonl:12'}}
  assert sft.skipped_records(read) == ('note: 3 of 13 records were skipped while reading: bad_json 1 '
                                       '(first at f.jsonl:11), undecodable 2 (first at f.jsonl:12).')
  assert sft.skipped_records({'lines': 5, 'skipped': {'bad_json': 0}}) is None
  assert sft.skipped_records(None) is None
