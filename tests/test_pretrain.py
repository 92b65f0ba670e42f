"""End to end through the launcher's driver: outputs, exact resume, and bad input at start-up."""
import dataclasses
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from experiments import pretrain
from experiments.stages import trainer
from experiments.configs import shakespeare_char
from lm.checkpoint import Checkpointer, CheckpointError
from lm.config import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config(corpus, **train):
  c = shakespeare_char.get_config()
  c.data.path = corpus
  c.model.update(d_model=32, n_layers=2, n_heads=2, max_seq_len=32)
  c.eval.every = train.pop('eval_every', 10)
  c.train.update(steps=20, batch_size=8, log_every=1, eval_batches=2,
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
  for name in ('config.json', 'metrics.jsonl', 'loss.png', 'samples.txt', 'tokenizer_ref.json'):
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


def run_counted(config, workdir, monkeypatch):
  """pretrain.run, returning the TrainState.step each call of the jitted step started from."""
  started = []
  orig = trainer.train

  def counted_train(run):
    def step_fn(state, batch):
      started.append(int(state.step))
      return run.step_fn(state, batch)
    return orig(dataclasses.replace(run, step_fn=step_fn))
  with monkeypatch.context() as m:
    m.setattr(trainer, 'train', counted_train)
    pretrain.run(config, workdir)
  return started


# masked_lm draws its masks from the per-step rng (next-token loss never reads it), so a
# resume that restored the params but not the step (rng) would show up in its losses.
@pytest.mark.parametrize('objective', ['next_token', 'masked_lm'])
def test_interrupted_then_resumed_run_equals_uninterrupted(tiny_corpus, tmp_path, monkeypatch,
                                                           capsys, objective):
  def config(**kw):
    c = tiny_config(tiny_corpus, samples=0, steps=12, eval_every=6, checkpoint_every=3,
                    objective=objective, **kw)
    c.model.causal = objective == 'next_token'
    return c
  full, part = str(tmp_path / 'full'), str(tmp_path / 'part')
  assert run_counted(config(), full, monkeypatch) == list(range(12))
  assert run_counted(config(stop_after=7), part, monkeypatch) == list(range(7))  # "killed" at 7
  assert max(losses(part)[0]) == 7
  capsys.readouterr()
  # The second invocation restores step 7 and runs only steps 8..12.
  assert run_counted(config(), part, monkeypatch) == list(range(7, 12))
  assert 'resuming at step 7' in capsys.readouterr().out
  a, rows_a = losses(full)
  b, rows_b = losses(part)
  assert sorted(a) == sorted(b) == list(range(1, 13))
  np.testing.assert_array_equal([a[s] for s in sorted(a)], [b[s] for s in sorted(b)])
  va = [r['val_loss'] for r in rows_a if 'val_loss' in r]
  vb = [r['val_loss'] for r in rows_b if 'val_loss' in r]
  assert va == vb and len(va) == 2


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


def test_8_device_mesh_runs_to_the_end_through_the_launcher(tiny_corpus, tmp_path):
  """data x fsdp x tensor = 2 x 2 x 2 on fake CPU devices, through the final eval over the
  whole validation split (~90 batches: XLA:CPU's collectives deadlocked when they were all
  dispatched at once), the final checkpoint and the samples (beyond the context)."""
  wd = tmp_path / 'w'
  r = _cli(f'--workdir={wd}', f'--config.data.path={tiny_corpus}', '--config.train.steps=10',
           '--config.train.batch_size=8', '--config.eval.every=10', '--config.train.eval_batches=0',
           '--config.train.eval_batch_size=8', '--config.data.seq_len=8', '--config.train.log_every=1',
           '--config.train.checkpoint_every=5', '--config.train.samples=2', '--config.train.sample_tokens=40',
           '--config.model.d_model=32', '--config.model.n_layers=2', '--config.model.n_heads=2',
           '--config.model.max_seq_len=32', '--config.mesh.data=2', '--config.mesh.fsdp=2',
           '--config.mesh.tensor=2', devices=8, production_compile=True)
  assert r.returncode == 0, r.stderr[-3000:]
  by_step, rows = losses(str(wd))
  assert sorted(by_step) == list(range(1, 11))
  assert [r['step'] for r in rows if 'val_loss' in r] == [10] and rows[-1]['val_tokens'] > 5000
  assert Checkpointer.steps_in(str(wd / 'checkpoints')) == [5, 10]
  assert (wd / 'samples.txt').read_text().count('-----') == 1
  assert json.load(open(wd / 'config.json'))['resolved']['mesh'] == {'data': 2, 'fsdp': 2, 'tensor': 2, 'expert': 1}


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


# By default the launcher trains the three variants that change the driver's path (GQA weights,
# MoE's auxiliary loss, the encoder-decoder objective); the others differ only inside the model,
# whose numerics test_model checks against naive references, so they run with -m slow.
DRIVER_VARIANTS = ('llama_gqa', 'moe_top2', 't5_encoder_decoder')


@pytest.mark.parametrize('name', [n if n in DRIVER_VARIANTS else pytest.param(n, marks=pytest.mark.slow)
                                  for n in sorted(ARCHITECTURES)])
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


def _cli(*args, devices=1, timeout=300, production_compile=False):
  # conftest's compile-time flags (LLVM -O0, no fusion emitters) unless the production compile
  # is what is tested (the 8-device run: its collectives once deadlocked)
  keep = [] if production_compile else [f for f in os.environ.get('XLA_FLAGS', '').split()
                                        if not f.startswith('--xla_force_host_platform_device_count')]
  env = dict(os.environ, JAX_PLATFORMS='cpu', JAX_LOG_COMPILES='1',
             XLA_FLAGS=' '.join(keep + ([f'--xla_force_host_platform_device_count={devices}']
                                        if devices > 1 else [])))
  return subprocess.run([sys.executable, '-m', 'experiments.run',
                         '--config=experiments/configs/shakespeare_char.py', *args],
                        cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def _fake_checkpoint(workdir):
  """A step directory orbax lists but cannot read (as a write killed halfway leaves it)."""
  d = workdir / 'checkpoints' / '5'
  (d / 'state').mkdir(parents=True)
  (d / 'state' / 'x').write_bytes(b'garbage')
  (d / '_CHECKPOINT_METADATA').write_text('{}')


def _file(tmp, name, content: bytes) -> str:
  (tmp / name).write_bytes(content)
  return str(tmp / name)


# case -> (extra flags: a function of tmp_path, what the one error line says, a workdir setup)
BAD_INPUT = {
    'unknown_key': (lambda t: ['--config.train.stepz=5'], 'stepz', None),
    'bad_value': (lambda t: ['--config.train.steps=many'], 'many', None),
    'missing_corpus': (lambda t: ['--config.data.path=/nonexistent/corpus.txt'], 'does not exist', None),
    'empty_corpus': (lambda t: [f'--config.data.path={_file(t, "empty.txt", b"")}'], 'empty', None),
    'non_utf8_corpus': (lambda t: [f'--config.data.path={_file(t, "l1.txt", "Ünïcödé".encode("latin-1"))}'],
                        'is not valid UTF-8', None),
    'seq_len_over_context': (lambda t: ['--config.data.seq_len=128'], 'longer than the model context', None),
    'batch_not_dividing_mesh': (lambda t: ['--config.train.batch_size=6'], 'does not divide over the 8 devices', None),
    'grad_accum': (lambda t: ['--config.train.grad_accum=3'], 'not divisible by train.grad_accum', None),
    'vocab_mismatch': (lambda t: ['--config.model.vocab_size=100'], 'does not match the tokenizer', None),
    'unreadable_checkpoints': (lambda t: [], 'none could be read', _fake_checkpoint),
    'init_from_not_a_run': (lambda t: [f'--config.init_from={t}'], 'holds no config.json', None),
}


@pytest.mark.parametrize('case', sorted(BAD_INPUT))
def test_cli_bad_input_is_one_sentence_before_any_compile(tiny_corpus, tmp_path, case):
  extra, match, setup = BAD_INPUT[case]
  wd = tmp_path / 'w'
  if setup:
    setup(wd)
  r = _cli(f'--workdir={wd}', f'--config.data.path={tiny_corpus}', '--config.train.batch_size=8',
           '--config.model.d_model=32', '--config.model.n_layers=1', *extra(tmp_path), devices=8)
  assert r.returncode != 0
  last = r.stderr.strip().splitlines()[-1]
  assert last.startswith('error: ') and match in last, r.stderr[-2000:]
  assert 'Traceback' not in r.stderr, r.stderr[-2000:]
  # Nothing of the model was compiled (JAX_LOG_COMPILES names every program), nothing trained.
  assert not re.search(r'Compiling jit\((step|evaluate|init_state|start)\)', r.stderr)
  assert not (wd / 'metrics.jsonl').exists()
  assert Checkpointer.steps_in(str(wd / 'checkpoints')) == ([5] if setup else [])


def test_cli_overrides_reach_the_run(tiny_corpus, tmp_path):
  wd = tmp_path / 'w'
  r = _cli(f'--workdir={wd}', f'--config.data.path={tiny_corpus}', '--config.train.steps=3',
           '--config.train.batch_size=4', '--config.eval.every=0', '--config.train.samples=0',
           '--config.model.d_model=32', '--config.model.n_layers=1', '--config.model.max_seq_len=16')
  assert r.returncode == 0, r.stderr[-2000:]
  cfg = json.load(open(wd / 'config.json'))
  assert cfg['train']['steps'] == 3 and cfg['model']['n_layers'] == 1
  assert max(losses(str(wd))[0]) == 3


def test_a_config_key_that_is_a_python_keyword_gets_its_subscript_spelling(tmp_path):
  """The task family `continue` is a mixture weight; ml_collections cannot parse `.continue`.
  The error says how to write it, and that spelling is accepted (the run goes on to its next
  check: here, that init_from is not a finished run)."""
  def cli(flag):
    return subprocess.run([sys.executable, '-m', 'experiments.run', '--config=experiments/configs/sft_works.py',
                           f'--workdir={tmp_path / "w"}', f'--config.init_from={tmp_path}', flag],
                          cwd=ROOT, env=dict(os.environ, JAX_PLATFORMS='cpu'), capture_output=True,
                          text=True, timeout=120)
  r = cli('--config.data.mixture.weights.continue=0.5')
  assert r.returncode != 0 and 'Traceback' not in r.stderr, r.stderr[-2000:]
  fixed = "--config.data.mixture.weights['continue']=0.5"
  assert r.stderr.strip().splitlines()[-1].startswith('error: ') and f'"{fixed}"' in r.stderr, r.stderr
  r = cli(fixed)
  assert 'holds no config.json' in r.stderr.strip().splitlines()[-1], r.stderr[-2000:]
