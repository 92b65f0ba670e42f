"""End to end through the launcher's driver: outputs, exact resume, and bad input at start-up."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from data.sources import CorpusError
from experiments import pretrain
from experiments.configs import shakespeare_char
from lm.checkpoint import CheckpointError
from lm.config import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config(corpus, **train):
  c = shakespeare_char.get_config()
  c.data.path = corpus
  c.model.update(d_model=32, n_layers=2, n_heads=2, max_seq_len=32)
  c.train.update(steps=20, batch_size=8, log_every=1, eval_every=10, eval_batches=2,
                 checkpoint_every=5, samples=1, sample_tokens=8)
  c.optim.update(warmup_steps=5)
  c.train.update(train)
  return c


def losses(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    rows = [json.loads(l) for l in f]
  return {r['step']: r['loss'] for r in rows}, rows


def test_run_writes_everything_and_trains(tiny_corpus, tmp_path):
  wd = str(tmp_path / 'run')
  pretrain.run(tiny_config(tiny_corpus), wd)
  for name in ('config.json', 'metrics.jsonl', 'loss.png', 'samples.txt', 'tokenizer.json'):
    assert os.path.getsize(os.path.join(wd, name)) > 0, name
  assert any(f.startswith('events') for f in os.listdir(os.path.join(wd, 'tensorboard')))
  assert sorted(int(s) for s in os.listdir(os.path.join(wd, 'checkpoints')) if s.isdigit())[-1] == 20
  by_step, rows = losses(wd)
  assert sorted(by_step) == list(range(1, 21))
  assert by_step[20] < by_step[1]
  evals = [r for r in rows if 'val_loss' in r]
  assert [r['step'] for r in evals] == [10, 20] and all('loss' in r for r in evals)
  assert all({'lr', 'grad_norm', 'tokens_per_sec', 'mfu'} <= set(r) for r in rows[1:])
  resolved = json.load(open(os.path.join(wd, 'config.json')))['resolved']
  assert resolved['vocab_size'] > 30 and resolved['params'] > 0


def test_interrupted_then_resumed_run_equals_uninterrupted(tiny_corpus, tmp_path):
  full, part = str(tmp_path / 'full'), str(tmp_path / 'part')
  pretrain.run(tiny_config(tiny_corpus, samples=0), full)
  pretrain.run(tiny_config(tiny_corpus, samples=0, stop_after=7), part)   # "killed" after step 7
  assert max(losses(part)[0]) == 7
  pretrain.run(tiny_config(tiny_corpus, samples=0), part)                 # resumes from step 7
  a, rows_a = losses(full)
  b, rows_b = losses(part)
  assert sorted(a) == sorted(b) == list(range(1, 21))
  np.testing.assert_array_equal([a[s] for s in sorted(a)], [b[s] for s in sorted(b)])
  va = [r['val_loss'] for r in rows_a if 'val_loss' in r]
  vb = [r['val_loss'] for r in rows_b if 'val_loss' in r]
  assert va == vb


def test_unreadable_checkpoints_fail_instead_of_restarting(tiny_corpus, tmp_path):
  wd = str(tmp_path / 'run')
  pretrain.run(tiny_config(tiny_corpus, samples=0, steps=5, checkpoint_every=5, eval_every=0), wd)
  ckpt = os.path.join(wd, 'checkpoints', '5')
  for root, _, files in os.walk(ckpt):   # corrupt every file of the only checkpoint
    for f in files:
      with open(os.path.join(root, f), 'wb') as fh:
        fh.write(b'garbage')
  with pytest.raises(CheckpointError, match='none could be read'):
    pretrain.run(tiny_config(tiny_corpus, samples=0, steps=10, eval_every=0), wd)
  assert os.path.isdir(ckpt)  # nothing already saved was deleted


@pytest.mark.parametrize('change,error,match', [
    (dict(seq_len=64), ConfigError, 'longer than the model context'),
    (dict(batch_size=6), ConfigError, 'does not divide over the 8 devices'),
    (dict(grad_accum=3), ConfigError, 'not divisible by train.grad_accum'),
    (dict(vocab_size=100), ConfigError, 'does not match the tokenizer'),
    (dict(path='/nonexistent/corpus.txt'), CorpusError, 'does not exist'),
])
def test_bad_input_fails_at_startup(tiny_corpus, tmp_path, change, error, match):
  c = tiny_config(tiny_corpus)
  for k, v in change.items():
    section = 'data' if k in ('seq_len', 'path') else 'model' if k == 'vocab_size' else 'train'
    c[section][k] = v
  with pytest.raises(error, match=match):
    pretrain.run(c, str(tmp_path / 'run'))
  assert not os.path.exists(tmp_path / 'run' / 'checkpoints' / '1')


ARCHITECTURES = {
    'llama_gqa': dict(norm='rmsnorm', activation='swiglu', positions='rope', use_bias=False,
                      tie_embeddings=False, n_heads=4, n_kv_heads=2),   # 2 query heads per kv head
    'no_positions': dict(positions='none'),
    'post_ln_sinusoidal': dict(norm_position='post', positions='sinusoidal'),
    'sandwich_alibi_bloom': dict(norm_position='sandwich', positions='alibi', embed_norm=True),
    'parallel_geglu': dict(parallel_block=True, activation='geglu', positions='rope'),
    'deepnorm_relu': dict(norm_position='deepnorm', activation='relu'),
    'moe_top2': dict(moe_experts=4, moe_top_k=2),
    'relative_mqa_gelu_tanh': dict(positions='relative', n_kv_heads=1, activation='gelu_tanh'),
    # the encoder-decoder trains with its own objective (see ARCH_OBJECTIVE)
    't5_encoder_decoder': dict(arch='encoder_decoder', n_encoder_layers=1, positions='relative',
                               norm='rmsnorm', activation='relu', use_bias=False, scale_attention=False),
}
ARCH_OBJECTIVE = {'t5_encoder_decoder': 'span_corruption'}


@pytest.mark.parametrize('name', sorted(ARCHITECTURES))
def test_each_architecture_trains_from_the_launcher(tiny_corpus, tmp_path, name):
  c = tiny_config(tiny_corpus, steps=2, eval_every=2, samples=0, checkpoint_every=2,
                  objective=ARCH_OBJECTIVE.get(name, 'next_token'))
  c.model.update(ARCHITECTURES[name])
  pretrain.run(c, str(tmp_path / name))
  rows = losses(str(tmp_path / name))[1]
  assert [r['step'] for r in rows] == [1, 2] and np.isfinite(rows[-1]['val_loss'])


def test_bidirectional_model_is_refused_for_next_token_loss(tiny_corpus, tmp_path):
  c = tiny_config(tiny_corpus)
  c.model.causal = False
  with pytest.raises(ConfigError, match='causal'):
    pretrain.run(c, str(tmp_path / 'run'))


def _cli(*args):
  env = dict(os.environ, XLA_FLAGS='', JAX_PLATFORMS='cpu')
  return subprocess.run([sys.executable, '-m', 'experiments.run',
                         '--config=experiments/configs/shakespeare_char.py', *args],
                        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_cli_rejects_unknown_config_key(tmp_path):
  r = _cli(f'--workdir={tmp_path}', '--config.train.stepz=5')
  assert r.returncode != 0 and 'stepz' in r.stderr


def test_cli_bad_input_is_one_sentence_without_traceback(tmp_path):
  bad = tmp_path / 'latin1.txt'
  bad.write_bytes('Ünïcödé but latin-1'.encode('latin-1'))
  r = _cli(f'--workdir={tmp_path / "w"}', f'--config.data.path={bad}')
  assert r.returncode != 0
  assert 'Traceback' not in r.stderr
  assert 'is not valid UTF-8' in r.stderr.strip().splitlines()[-1]


def test_cli_overrides_reach_the_run(tiny_corpus, tmp_path):
  wd = tmp_path / 'w'
  r = _cli(f'--workdir={wd}', f'--config.data.path={tiny_corpus}', '--config.train.steps=3',
           '--config.train.batch_size=4', '--config.train.eval_every=0', '--config.train.samples=0',
           '--config.model.d_model=32', '--config.model.n_layers=1', '--config.model.max_seq_len=16')
  assert r.returncode == 0, r.stderr[-2000:]
  cfg = json.load(open(wd / 'config.json'))
  assert cfg['train']['steps'] == 3 and cfg['model']['n_layers'] == 1
  assert max(losses(str(wd))[0]) == 3
