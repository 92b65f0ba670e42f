"""A gs:// workdir: everything a run writes goes through etils.epath (files) or Orbax (the
checkpoints), never through os.path / open(), which would turn the URL into a local
'./gs:/...' folder. Offline, gs:// is served by a stand-in: fsspec's 'gcs' protocol (epath's
backend for gs:// without TensorFlow) mapped onto a local folder; Orbax, which handles
gs:// itself, is checked to receive the URL unchanged and then writes the same folder."""
import json
import os

import sys
import types

import fsspec
import pytest
from etils.epath import backend as epath_backend
from fsspec.implementations.local import LocalFileSystem
from fsspec.utils import stringify_path
import orbax.checkpoint as ocp

from experiments.stages import reward_model
from experiments import pretrain
from lm import checkpoint as ckpt_lib
from lm import paths
from tests.test_pretrain import tiny_config


@pytest.fixture
def bucket(tmp_path, monkeypatch):
  """gs://NAME/... lives in the returned folder; the test runs in an empty cwd, where any
  write that treated the URL as a local path would show up."""
  store = tmp_path / 'gcs'
  store.mkdir()

  class FakeGCS(LocalFileSystem):
    protocol = ('gs', 'gcs')

    def __init__(self, *args, **kwargs):
      super().__init__(auto_mkdir=True)   # an object store has no folders to create first

    @classmethod
    def _strip_protocol(cls, path):
      path = stringify_path(path)
      if path.startswith('gs://'):
        path = f'{store}/{path[len("gs://"):]}'
      return super()._strip_protocol(path)

  registry = sys.modules['fsspec.registry']._registry   # (fsspec.registry is a read-only view)
  saved = dict(registry)
  fsspec.register_implementation('gcs', FakeGCS, clobber=True)
  fsspec.register_implementation('gs', FakeGCS, clobber=True)
  epath_backend.fsspec_backend._get_filesystem.cache_clear()
  # Orbax reads and writes gs:// itself, through TensorStore's gcs driver and
  # google-cloud-storage, which need the real service; the stand-in checks that Orbax is handed
  # the URL unchanged (not os.path.abspath'd), then lets it write the mapped local folder.
  handed = []

  class Manager(ocp.CheckpointManager):
    def __init__(self, directory, *args, **kwargs):
      handed.append(os.fspath(directory))
      if os.fspath(directory).startswith('gs://'):
        directory = f'{store}/{os.fspath(directory)[len("gs://"):]}'
      super().__init__(directory, *args, **kwargs)

  monkeypatch.setattr(ckpt_lib.ocp, 'CheckpointManager', Manager)
  (tmp_path / 'cwd').mkdir()
  monkeypatch.chdir(tmp_path / 'cwd')
  yield types.SimpleNamespace(root=store, handed=handed)
  registry.clear()
  registry.update(saved)
  epath_backend.fsspec_backend._get_filesystem.cache_clear()
  assert not os.listdir(tmp_path / 'cwd'), 'a gs:// path was written as a local path'


def test_checkpointer_keeps_a_url():
  assert os.fspath(paths.absolute('gs://bkt/run/checkpoints')) == 'gs://bkt/run/checkpoints'
  assert os.fspath(paths.absolute('run/checkpoints')) == os.path.abspath('run/checkpoints')


def test_pretraining_in_a_bucket_writes_through_epath_and_resumes(bucket, tiny_corpus, tmp_path,
                                                                    capsys):
  wd = 'gs://bkt/runs/r'
  c = tiny_config(tiny_corpus, steps=6, checkpoint_every=3, eval_every=3, stop_after=3)
  c.data.data_dir = str(tmp_path / 'data')            # the prepared corpus stays local
  pretrain.run(c, wd)
  run = bucket.root / 'bkt' / 'runs' / 'r'
  assert sorted(os.listdir(run / 'checkpoints')) == ['3']
  c.train.stop_after = 0
  capsys.readouterr()
  pretrain.run(c, wd)                                 # the same command again: resumes
  assert 'resuming at step 3' in capsys.readouterr().out
  for name in ('config.json', 'metrics.jsonl', 'tokenizer_ref.json', 'loss.png', 'samples.txt'):
    assert (run / name).stat().st_size > 0, name
  assert any(f.startswith('events') for f in os.listdir(run / 'tensorboard'))
  assert sorted(os.listdir(run / 'checkpoints')) == ['3', '6']
  rows = [json.loads(l) for l in (run / 'metrics.jsonl').read_text().splitlines()]
  assert [r['step'] for r in rows] == [1, 2, 3, 4, 5, 6]
  assert [r['step'] for r in rows if 'val_loss' in r] == [3, 6]
  assert json.loads((run / 'config.json').read_text())['resolved']['seq_len'] == 32
  assert set(bucket.handed) == {'gs://bkt/runs/r/checkpoints'}


def test_bucket_workdir_needs_a_local_data_dir(bucket, tiny_corpus):
  from lm.config import ConfigError
  with pytest.raises(ConfigError, match='data.data_dir'):
    pretrain.run(tiny_config(tiny_corpus), 'gs://bkt/runs/r')


def test_stages_chain_through_a_bucket(bucket, tmp_path, capsys):
  """pretrain -> gs://bkt/pre; SFT init_from gs://bkt/pre -> gs://bkt/sft; the reward model
  init_from gs://bkt/sft -> gs://bkt/rm, which loads back from the bucket."""
  import numpy as np
  from experiments import reward, sft
  from experiments.stages import stage
  from tests.conftest import TINY_SHAKESPEARE
  from tests.test_reward import hh, rm_config
  from tests.test_sft import WORDS, sft_config
  local = tmp_path / 'inputs'                    # corpus and instruction / preference files stay local
  local.mkdir()
  (local / 'corpus.txt').write_text(TINY_SHAKESPEARE.read_text(encoding='utf-8')[:30000], encoding='utf-8')
  c = tiny_config(str(local / 'corpus.txt'), steps=2, eval_every=0, checkpoint_every=2, samples=0)
  c.model.update(n_layers=1, max_seq_len=64)
  c.data.data_dir = str(local / 'data')
  pretrain.run(c, 'gs://bkt/pre')
  rng = np.random.default_rng(0)
  inst, pairs = [], []
  for i in range(24):
    a, b = rng.choice(WORDS, 2, replace=False)
    inst.append(json.dumps({'instruction': f'Say {a} then {b}.', 'input': '', 'output': f'{a} {b}'}))
    p = f'tell me of {a.lower()}'
    pairs.append(json.dumps({'chosen': hh(p, f'{b.lower()} kind'), 'rejected': hh(p, b.lower())}))
  (local / 'inst.jsonl').write_text('\n'.join(inst) + '\n', encoding='utf-8')
  (local / 'pairs.jsonl').write_text('\n'.join(pairs) + '\n', encoding='utf-8')

  sft.run(sft_config('gs://bkt/pre', str(local / 'inst.jsonl'), steps=2, checkpoint_every=2),
          'gs://bkt/sft')
  reward.run(rm_config('gs://bkt/sft', str(local / 'pairs.jsonl'), steps=2, checkpoint_every=2),
             'gs://bkt/rm')
  root = bucket.root / 'bkt'
  for run in ('sft', 'rm'):
    for name in ('config.json', 'metrics.jsonl', 'eval.json', 'eval.txt', 'tokenizer_ref.json',
                 'tokenizer_ref.base.json', 'loss.png'):
      assert (root / run / name).stat().st_size > 0, (run, name)
    assert os.listdir(root / run / 'checkpoints') == ['2'], run
    assert json.loads((root / run / 'config.json').read_text())['source']['path'] == \
        {'sft': 'gs://bkt/pre', 'rm': 'gs://bkt/sft'}[run]
  assert (root / 'rm' / reward_model.NORM_FILE).stat().st_size > 0
  assert 'reward_model' in json.loads((root / 'rm' / 'eval.json').read_text())
  # Orbax got the URLs: each stage saves its own and reads its source's params from the bucket.
  # (a read opens the source's Checkpointer and, for params only, a fresh manager: 1 + 2 each)
  assert sorted(set(bucket.handed)) == [f'gs://bkt/{r}/checkpoints' for r in ('pre', 'rm', 'sft')]
  assert [bucket.handed.count(f'gs://bkt/{r}/checkpoints') for r in ('pre', 'sft', 'rm')] == [3, 3, 1]
  # Each stage reads its source back from the bucket: the SFT model has the template's eos id.
  pre, tuned = stage.read_source('gs://bkt/pre'), stage.read_source('gs://bkt/sft')
  assert tuned.tokenizer.vocab_size == pre.tokenizer.vocab_size + 1 == tuned.cfg.vocab_size
  rm = reward_model.load_reward_model('gs://bkt/rm')
  norm = json.loads((root / 'rm' / reward_model.NORM_FILE).read_text())
  assert (rm.gain, rm.bias) == (norm['gain'], norm['bias'])
  assert rm.tokenizer.vocab_size == tuned.tokenizer.vocab_size


def test_url_init_from_errors_are_one_sentence(bucket):
  from experiments.stages import stage
  from lm.config import ConfigError
  with pytest.raises(ConfigError, match=r'init_from=gs://bkt/none holds no config.json'):
    stage.read_source('gs://bkt/none')


def test_dpo_in_a_bucket(bucket, tmp_path):
  """DPO from a policy in the bucket into gs://bkt/dpo (the policy is written straight into the
  stand-in's folder, as the SFT stage would have put it there)."""
  from experiments import dpo
  from experiments.configs import rlhf_dpo
  from tests import rl_fixtures
  from tests.test_dpo_stage import RECORDS
  rl_fixtures.policy_run(bucket.root / 'bkt' / 'sft', n_layers=1)
  c = rlhf_dpo.get_config()
  c.init_from, c.reward_from = 'gs://bkt/sft', ''
  c.data.path = str(tmp_path / 'prefs.jsonl')
  (tmp_path / 'prefs.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in RECORDS * 4))
  c.train.update(steps=2, batch_size=8, log_every=1, checkpoint_every=2)
  c.eval.every = 0
  c.prompts.update(n_train=8, n_eval=8)
  c.rollout.max_new_tokens = 4
  c.eval.update(before=False, batch_size=8)
  dpo.run(c, 'gs://bkt/dpo')
  run = bucket.root / 'bkt' / 'dpo'
  for name in ('config.json', 'metrics.jsonl', 'results.json', 'tokenizer_ref.json',
               'tokenizer_ref.base.json', 'loss.png'):
    assert (run / name).stat().st_size > 0, name
  assert os.listdir(run / 'checkpoints') == ['2']
  assert json.loads((run / 'config.json').read_text())['source']['path'] == 'gs://bkt/sft'
  assert json.loads((run / 'results.json').read_text())['after']['iteration'] == 2
  assert {'gs://bkt/sft/checkpoints', 'gs://bkt/dpo/checkpoints'} <= set(bucket.handed)
  assert all(h.startswith(('gs://', str(bucket.root))) for h in bucket.handed)


def _rl_runs(bucket):
  """A policy (SFT-like) and a reward run written straight into the stand-in bucket."""
  from tests import rl_fixtures
  pol = rl_fixtures.policy_run(bucket.root / 'bkt' / 'sft', n_layers=1)
  rl_fixtures.reward_run(bucket.root / 'bkt' / 'rm', pol)
  return 'gs://bkt/sft', 'gs://bkt/rm'


def _assert_rl_bucket_run(bucket, run, names, source_key):
  d = bucket.root / 'bkt' / run
  for name in names:
    assert (d / name).stat().st_size > 0, (run, name)
  assert sorted(os.listdir(d / 'checkpoints')) == ['1', '2'], run
  assert any(f.startswith('events') for f in os.listdir(d / 'tensorboard'))
  saved = json.loads((d / 'config.json').read_text())
  assert saved['source']['path'] == 'gs://bkt/sft' and saved[source_key] == 'gs://bkt/rm'
  # Orbax was handed the URLs: the policy's and the RM's to read, the run's own to write.
  assert {'gs://bkt/sft/checkpoints', 'gs://bkt/rm/checkpoints', f'gs://bkt/{run}/checkpoints'} \
      <= set(bucket.handed)
  assert all(h.startswith(('gs://', str(bucket.root))) for h in bucket.handed)


def test_grpo_in_a_bucket(bucket):
  """GRPO with init_from, reward_from and the workdir all in the bucket."""
  from experiments import grpo
  from experiments.configs import rlhf_grpo
  c = rlhf_grpo.get_config()
  c.init_from, c.reward_from = _rl_runs(bucket)
  c.rollout.update(samples=2, max_new_tokens=6, prompts=4)
  c.prompts.update(n_train=12, n_eval=8)
  c.train.update(iterations=2, epochs=1, minibatches=1, checkpoint_every=1)
  c.eval.update(before=False, every=2)
  grpo.run(c, 'gs://bkt/grpo')
  _assert_rl_bucket_run(bucket, 'grpo', ('config.json', 'metrics.jsonl', 'eval.jsonl', 'results.json',
                                         'reward.png', 'gold_vs_kl.png', 'tokenizer_ref.json',
                                         'tokenizer_ref.base.json'), 'reward_from')
  d = bucket.root / 'bkt' / 'grpo'
  assert [json.loads(l)['step'] for l in (d / 'metrics.jsonl').read_text().splitlines()] == [1, 2]
  assert json.loads((d / 'results.json').read_text())['after']['iteration'] == 2


def test_ppo_in_a_bucket(bucket):
  """PPO with init_from, reward_from and the workdir all in the bucket."""
  from experiments import ppo
  from experiments.configs import rlhf_ppo
  c = rlhf_ppo.get_config()
  c.init_from, c.reward_from = _rl_runs(bucket)
  c.prompts.update(n_train=16, n_eval=8)
  c.rollout.update(prompts=8, max_new_tokens=6)
  c.train.update(iterations=2, checkpoint_every=1, epochs=1, minibatches=1)
  c.eval.update(every=2, before=False, batch_size=8)
  out = ppo.run(c, 'gs://bkt/ppo')
  assert out['iterations'] == 2
  _assert_rl_bucket_run(bucket, 'ppo', ('config.json', 'metrics.jsonl', 'eval.jsonl', 'results.json',
                                        'gold_vs_kl.png'), 'reward_source')
  d = bucket.root / 'bkt' / 'ppo'
  assert json.loads((d / 'results.json').read_text())['after']['iteration'] == 2
  assert [e['iteration'] for e in json.loads((d / 'results.json').read_text())['evals']] == [2]


def test_bpe_pretraining_in_a_bucket_keeps_its_model_file(bucket, tmp_path, capsys):
  """A subword tokenizer built for a bucket workdir: its .model goes to the bucket beside the
  pointer (nothing to a local './gs:/...'), the rerun resumes with it and the next stage
  reads it back from the bucket."""
  from data import tokenizers
  from experiments.stages import stage
  from tests.conftest import TINY_SHAKESPEARE
  text = TINY_SHAKESPEARE.read_text(encoding='utf-8')[:8000]
  (tmp_path / 'bpe.txt').write_text(text, encoding='utf-8')
  c = tiny_config(str(tmp_path / 'bpe.txt'), steps=2, eval_every=0, checkpoint_every=1, samples=0,
                  stop_after=1)
  c.data.update(tokenizer='bpe', vocab_size=400, data_dir=str(tmp_path / 'data'))
  c.model.update(n_layers=1)
  pretrain.run(c, 'gs://bkt/bpe')
  run = bucket.root / 'bkt' / 'bpe'
  pointer = json.loads((run / tokenizers.RUN_FILE).read_text())
  assert pointer['kind'] == tokenizers.SentencePieceTokenizer.kind and (run / pointer['model']).stat().st_size > 0
  model_bytes = (run / pointer['model']).read_bytes()
  c.train.stop_after = 0
  capsys.readouterr()
  pretrain.run(c, 'gs://bkt/bpe')                     # the rerun loads the bucket's tokenizer
  assert 'resuming at step 1' in capsys.readouterr().out
  assert (run / pointer['model']).read_bytes() == model_bytes
  assert sorted(os.listdir(run / 'checkpoints')) == ['1', '2']
  tok = stage.read_source('gs://bkt/bpe').tokenizer  # what the next stage starts from
  assert isinstance(tok, tokenizers.SentencePieceTokenizer) and tok.vocab_size == 400
  assert tok.decode(tok.encode(text[:500])) == text[:500]
  assert set(bucket.handed) == {'gs://bkt/bpe/checkpoints'}


def test_bon_in_a_bucket(bucket, capsys):
  """Best-of-n from a policy and an RM in the bucket into gs://bkt/bon."""
  import numpy as np
  from experiments import bon
  from tests.test_bon_stage import tiny
  pol, rm = _rl_runs(bucket)
  bon.run(tiny(pol, rm), 'gs://bkt/bon')
  assert 'best-of-n on 4 held-out prompts x 8 samples' in capsys.readouterr().out
  d = bucket.root / 'bkt' / 'bon'
  for name in ('config.json', 'results.json', 'scores.npz', 'bon.png'):
    assert (d / name).stat().st_size > 0, name
  saved = json.loads((d / 'results.json').read_text())
  assert list(saved['series']) == ['rm'] and saved['series']['rm']['reward_from'] == 'gs://bkt/rm'
  assert np.load(d / 'scores.npz')['gold'].shape == (4, 8)
  assert {'gs://bkt/sft/checkpoints', 'gs://bkt/rm/checkpoints'} <= set(bucket.handed)
  assert all(h.startswith(('gs://', str(bucket.root))) for h in bucket.handed)
