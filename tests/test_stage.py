"""Stage chaining: init_from a finished run (params only, onto another mesh) or a Hugging Face
folder; the model comes from the source; bad sources fail with one sentence."""
import json
import os
import shutil

import jax
import numpy as np
import pytest

from experiments import pretrain
from experiments.stages import stage
from experiments.configs import base
from lm import sharding
from lm.checkpoint import CheckpointError, Checkpointer
from lm.config import ConfigError
from tests.test_pretrain import losses, tiny_config


def leaves(tree):
  return [np.asarray(x) for x in jax.tree.leaves(tree)]


@pytest.fixture(scope='module')
def source_run(tmp_path_factory):
  from tests.conftest import TINY_SHAKESPEARE
  d = tmp_path_factory.mktemp('src')
  corpus = d / 'corpus.txt'
  corpus.write_text(TINY_SHAKESPEARE.read_text(encoding='utf-8')[:30000], encoding='utf-8')
  wd = str(d / 'pretrain')
  c = tiny_config(str(corpus), steps=6, eval_every=0, checkpoint_every=3, samples=0)  # steps 3, 6
  c.optim.update(lr=1e-2, warmup_steps=0)
  c.mesh.update(data=8)
  state = pretrain.run(c, wd)
  return str(corpus), wd, jax.tree.map(np.asarray, state.params)


def test_init_from_restores_params_onto_another_mesh_with_a_fresh_optimizer(source_run, tmp_path):
  corpus, src, trained = source_run
  source = stage.read_source(src)
  assert Checkpointer.steps_in(os.path.join(src, 'checkpoints')) == [3, 6]
  assert source.step == 6                                        # the newest, not the oldest
  mesh = sharding.make_mesh({'data': 2, 'fsdp': 2, 'tensor': 2})
  params = source.restore_params(mesh)
  for a, b in zip(leaves(trained), leaves(params)):
    np.testing.assert_array_equal(a, b)
  wq = params['layers']['attn']['wq']
  assert wq.sharding.spec != jax.sharding.PartitionSpec()       # laid out by the rules table
  # A second stage started from it: lr 0 keeps the weights, so its checkpoint holds them exactly,
  # its optimizer restarts at step 0, and it starts far below a random init's loss.
  c = tiny_config(corpus, steps=1, eval_every=0, checkpoint_every=1, samples=0)
  c.init_from = src
  c.optim.update(lr=0.0, min_lr=0.0, warmup_steps=0)
  c.mesh.update(data=2, fsdp=2, tensor=2)
  wd = str(tmp_path / 'next')
  state = pretrain.run(c, wd)
  assert int(state.step) == 1
  for a, b in zip(leaves(trained), leaves(state.params)):
    np.testing.assert_array_equal(a, b)
  # Same seed and data: its first batch is the source's first batch, seen by trained weights.
  assert losses(wd)[0][1] < losses(src)[0][1] - 0.05
  record = json.load(open(os.path.join(wd, 'config.json')))['source']
  assert record['path'] == os.path.abspath(src) and record['step'] == 6
  assert record['config_hash'] == source.config_hash and len(record['config_hash']) == 12


def test_a_corrupt_newest_checkpoint_points_at_the_intact_earlier_one(source_run, tmp_path):
  corpus, src, trained = source_run
  copy = str(tmp_path / 'copy')
  shutil.copytree(src, copy)
  step6 = os.path.join(copy, 'checkpoints', '6')
  for root, _, files in os.walk(os.path.join(step6, 'state')):   # truncate step 6's arrays
    for f in files:
      p = os.path.join(root, f)
      with open(p, 'r+b') as fh:
        fh.truncate(os.path.getsize(p) // 2)
  mesh = sharding.make_mesh({'data': 8})
  with pytest.raises(CheckpointError) as e:
    stage.read_source(copy).restore_params(mesh)
  msg = str(e.value)
  assert 'step 3 before it is intact' in msg and f'mv {step6} {step6}.unreadable' in msg
  assert len(msg.splitlines()) == 1
  os.rename(step6, step6 + '.unreadable')        # what the sentence says to do
  source = stage.read_source(copy)
  assert source.step == 3
  params = source.restore_params(mesh)
  assert any(not np.array_equal(a, b) for a, b in zip(leaves(trained), leaves(params)))  # step 3's


def test_the_model_comes_from_the_source_and_conflicts_fail(source_run, tmp_path):
  corpus, src, _ = source_run
  c = tiny_config(corpus, steps=1)
  c.init_from = src
  c.model.update(d_model=32, n_layers=2, n_heads=2, max_seq_len=32)   # same as the source: fine
  c.model.dtype = 'bfloat16'                                          # a runtime field: fine
  cfg = stage.model_from_source(c, stage.read_source(src))
  assert cfg.dtype == 'bfloat16' and cfg.d_model == 32
  c.model.d_model = 64
  with pytest.raises(ConfigError, match='model.d_model=64 conflicts'):
    pretrain.run(c, str(tmp_path / 'x'))
  assert not os.path.exists(tmp_path / 'x' / 'checkpoints')


def test_bad_init_from_is_one_sentence(tmp_path):
  with pytest.raises(ConfigError, match='holds no config.json'):
    stage.read_source(str(tmp_path / 'nowhere'))
  (tmp_path / 'empty').mkdir()
  (tmp_path / 'empty' / 'config.json').write_text(json.dumps({'model': {}}))
  with pytest.raises(CheckpointError, match='no checkpoints'):
    stage.read_source(str(tmp_path / 'empty'))
  with pytest.raises(ConfigError, match='no config.json'):
    stage.read_source('hf:' + str(tmp_path / 'nowhere'))


def test_a_hugging_face_folder_without_hf_prefix_names_the_prefix(tmp_path):
  hf = tmp_path / 'gpt2'
  hf.mkdir()
  (hf / 'config.json').write_text(json.dumps({'model_type': 'gpt2', 'n_embd': 32}))
  (hf / 'model.safetensors').write_bytes(b'')
  with pytest.raises(ConfigError) as e:
    stage.read_source(str(hf))
  msg = str(e.value)
  assert 'looks like a Hugging Face model folder' in msg and f'init_from=hf:{hf}' in msg
  assert 'train it first' not in msg and len(msg.splitlines()) == 1
  (hf / 'config.json').write_text(json.dumps({'architectures': ['X']}))   # either HF marker
  with pytest.raises(ConfigError, match='looks like a Hugging Face'):
    stage.read_source(str(hf))


def test_init_from_a_hugging_face_folder(tmp_path):
  torch = pytest.importorskip('torch')
  transformers = pytest.importorskip('transformers')
  from tokenizers import Tokenizer, models, pre_tokenizers, trainers
  from lm import convert
  from tests.conftest import TINY_SHAKESPEARE
  text = TINY_SHAKESPEARE.read_text(encoding='utf-8')[:20000]
  corpus = tmp_path / 'corpus.txt'
  corpus.write_text(text, encoding='utf-8')
  tok = Tokenizer(models.BPE(unk_token='[UNK]'))
  tok.pre_tokenizer = pre_tokenizers.ByteLevel()
  tok.train_from_iterator([text], trainers.BpeTrainer(vocab_size=300, special_tokens=['[UNK]']))
  hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(
      vocab_size=tok.get_vocab_size(), n_embd=32, n_layer=2, n_head=2, n_positions=32))
  folder = tmp_path / 'hf'
  hf.save_pretrained(folder, safe_serialization=True)
  tok.save(str(folder / 'tokenizer.json'))
  want, _ = convert.import_hf(str(folder))
  c = tiny_config(str(corpus), steps=1, eval_every=0, checkpoint_every=1, samples=0)
  c.init_from = 'hf:' + str(folder)
  c.model = base.model()             # defaults: the architecture comes from the source
  c.optim.update(lr=0.0, min_lr=0.0, warmup_steps=0)
  c.data.tokenizer = 'char'          # replaced by the source's tokenizer
  wd = str(tmp_path / 'run')
  state = pretrain.run(c, wd)
  for a, b in zip(leaves(want), leaves(state.params)):
    np.testing.assert_allclose(a, b, rtol=0, atol=0)
  assert json.load(open(os.path.join(wd, 'config.json')))['source']['kind'] == 'hf'
  with pytest.raises(ConfigError, match=f'write init_from=hf:{folder}'):   # a real HF folder
    stage.read_source(str(folder))
