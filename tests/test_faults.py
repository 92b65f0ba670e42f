"""Faults a long run must survive, each caused on purpose: preemption (a real SIGTERM), a
SIGKILL mid-save, non-finite updates, loss spikes (PaLM's restart-and-skip)."""
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from experiments import pretrain
from experiments.stages import trainer
from experiments.configs import shakespeare_char
from lm.checkpoint import Checkpointer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TINY = {'model.d_model': 32, 'model.n_layers': 2, 'model.n_heads': 2, 'model.max_seq_len': 32,
        'train.batch_size': 8, 'train.log_every': 1, 'eval.every': 0, 'train.samples': 0,
        'optim.warmup_steps': 5}


def config(corpus, **over):
  c = shakespeare_char.get_config()
  c.data.path = corpus
  for k, v in {**TINY, **over}.items():
    section, key = k.split('.')
    c[section][key] = v
  return c


def rows(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(l) for l in f if l.strip()]


def run_with_hook(c, workdir, hook, monkeypatch):
  """pretrain.run with `hook(step, batch, batches_drawn) -> batch` applied to every batch."""
  orig = trainer.train

  def hooked(run):
    def transform(step, batch):
      return hook(step, batch, run.batches.state()['batches_drawn'])
    return orig(dataclasses.replace(run, transform_batch=transform))
  with monkeypatch.context() as m:
    m.setattr(trainer, 'train', hooked)
    return pretrain.run(c, workdir)


# Preemption ----------------------------------------------------------------------------------
# The launcher, with a hook that sends the process a real SIGTERM just before step SIGNAL_AT runs:
# the handler's flag is set at a known step, whatever the machine's load (no wall-clock race).
SIGNAL_AT = 7
SIGNALLING_LAUNCHER = f'''
import dataclasses, os, signal
from experiments import run
from experiments.stages import trainer
orig = trainer.train
def signalled(r):
  def hook(step, batch):
    if step == {SIGNAL_AT}:
      os.kill(os.getpid(), signal.SIGTERM)
    return batch
  return orig(dataclasses.replace(r, transform_batch=hook))
trainer.train = signalled
run.app.run(run.main, flags_parser=run.parse_flags)
'''


def flags(corpus, workdir, **over):
  return [f'--config=experiments/configs/shakespeare_char.py', f'--workdir={workdir}',
          f'--config.data.path={corpus}'] + [f'--config.{k}={v}' for k, v in {**TINY, **over}.items()]


def test_sigterm_saves_at_the_step_reached_and_the_rerun_continues_exactly(tiny_corpus, tmp_path):
  over = {'train.steps': 24, 'train.checkpoint_every': 10}
  wd = str(tmp_path / 'preempted')
  env = dict(os.environ, JAX_PLATFORMS='cpu')   # conftest's 8 fake devices, as in-process
  p = subprocess.run([sys.executable, '-c', SIGNALLING_LAUNCHER, *flags(tiny_corpus, wd, **over)],
                     cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  out, err = p.stdout, p.stderr
  assert p.returncode == 128 + signal.SIGTERM, err[-3000:]
  assert 'Traceback' not in err
  # The step in flight when the signal came (step 7) finishes, is checkpointed, and is the last.
  assert f'SIGTERM received: saved a checkpoint at step {SIGNAL_AT};' in out
  assert Checkpointer.steps_in(os.path.join(wd, 'checkpoints')) == [SIGNAL_AT]
  assert max(r['step'] for r in rows(wd)) == SIGNAL_AT
  reached = SIGNAL_AT
  # Rerun the same command (without the hook): it finishes the remaining steps only.
  r = subprocess.run([sys.executable, '-m', 'experiments.run', *flags(tiny_corpus, wd, **over)],
                     cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stderr[-3000:]
  assert f'resuming at step {reached}' in r.stdout
  full = str(tmp_path / 'full')
  pretrain.run(config(tiny_corpus, **over), full)
  a, b = rows(full), rows(wd)
  assert [x['step'] for x in a] == [x['step'] for x in b] == list(range(1, 25))
  np.testing.assert_array_equal([x['loss'] for x in a], [x['loss'] for x in b])


# Non-finite updates --------------------------------------------------------------------------
def test_non_finite_steps_are_skipped_counted_and_stop_the_run_when_consecutive(tiny_corpus,
                                                                                tmp_path, monkeypatch):
  nan_steps = {4, 5} | set(range(9, 30))

  def poison(step, batch, drawn):
    if step in nan_steps:   # a NaN weight makes the loss and every gradient NaN
      batch = dict(batch, weights=np.full_like(batch['weights'], np.nan))
    return batch
  c = config(tiny_corpus, **{'train.steps': 20, 'train.max_consecutive_skips': 3,
                             'train.checkpoint_every': 0})
  with pytest.raises(trainer.TrainingError, match='3 consecutive steps .up to step 11. had a '
                                                  'non-finite loss or gradient'):
    run_with_hook(c, str(tmp_path / 'run'), poison, monkeypatch)
  by_step = {r['step']: r for r in rows(str(tmp_path / 'run'))}
  assert by_step[3]['skipped_steps'] == 0 and by_step[3]['loss'] is not None
  assert by_step[4]['loss'] is None and by_step[4]['skipped_steps'] == 1
  assert by_step[5]['skipped_steps'] == 2 and by_step[8]['skipped_steps'] == 2
  assert by_step[6]['loss'] is not None        # the skipped updates left the params finite
  assert max(by_step) <= 11                    # stopped at the third skip in a row


# Loss spikes ---------------------------------------------------------------------------------
def test_loss_spike_restores_the_last_good_checkpoint_and_skips_the_bad_batches(tiny_corpus, tmp_path,
                                                                                monkeypatch, capsys):
  text = open(tiny_corpus, encoding='utf-8').read()
  chars = sorted(set(text))
  rare = chars.index(min(chars, key=text.count))
  bad = {10, 11}   # global batches (0-based) first drawn for steps 11 and 12
  used = []

  def scramble(step, batch, drawn):
    used.append((step, drawn - 1))
    if drawn - 1 in bad:  # every target the rarest character: a loss far above the trend
      batch = dict(batch, targets=np.full_like(batch['targets'], rare))
    return batch
  wd = str(tmp_path / 'run')
  c = config(tiny_corpus, **{'train.steps': 16, 'train.checkpoint_every': 5, 'train.spike_factor': 1.5,
                             'train.spike_window': 5, 'train.spike_skip_batches': 2, 'optim.lr': 1e-2})
  run_with_hook(c, wd, scramble, monkeypatch)
  out = capsys.readouterr()
  r = rows(wd)
  assert 'loss spike at step 11: restarting from step 10, skipping 2 batches' in out.out + out.err, (
      [(x['step'], x['loss']) for x in r], used)
  assert [x['step'] for x in r] == list(range(1, 17))   # the abandoned steps were logged again
  assert r[-1]['spike_restarts'] == 1
  # After the restart, step 11 trains on batch 12: batches 10 and 11 are never trained on again.
  assert [b for s, b in used if s >= 11][-6:] == list(range(12, 18))
  assert max(x['loss'] for x in r[10:]) < 1.5 * np.median([x['loss'] for x in r[5:10]])
  assert Checkpointer.steps_in(os.path.join(wd, 'checkpoints'))[-1] == 16


# SIGKILL -------------------------------------------------------------------------------------
def whole_rows(path):
  """The rows of a log being appended to (a line still being written is not one yet)."""
  with open(path) as f:
    return [json.loads(l) for l in f.read().split('\n')[:-1] if l.strip()]


def test_sigkill_loses_no_checkpoint_step_the_log_already_shows(tiny_corpus, tmp_path):
  """Orbax saves asynchronously; a row of metrics.jsonl at step >= N must mean checkpoint N is
  final, so a SIGKILL right after the row (no time for the write to finish) resumes there."""
  every = 10
  over = {'train.steps': 3000, 'train.checkpoint_every': every}
  wd = str(tmp_path / 'killed')
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  log = tmp_path / 'first.err'
  with open(log, 'w') as err:
    p = subprocess.Popen([sys.executable, '-m', 'experiments.run', *flags(tiny_corpus, wd, **over)],
                         cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=err)
  metrics = os.path.join(wd, 'metrics.jsonl')
  try:
    # Poll the log (no wall-clock guess): kill as soon as it shows the second checkpoint step.
    deadline = time.monotonic() + 280
    while time.monotonic() < deadline and p.poll() is None:
      if os.path.exists(metrics) and any(r['step'] >= 2 * every for r in whole_rows(metrics)):
        break
      time.sleep(0.002)
    p.kill()
  finally:
    p.wait()
  assert p.returncode == -signal.SIGKILL, log.read_text()[-3000:]   # killed mid-run
  shown = max(r['step'] for r in rows(wd))
  assert shown < over['train.steps']
  newest = Checkpointer.steps_in(os.path.join(wd, 'checkpoints'))
  assert newest and newest[-1] >= shown // every * every >= 2 * every, (shown, newest)
  r = subprocess.run([sys.executable, '-m', 'experiments.run',
                      *flags(tiny_corpus, wd, **over, **{'train.stop_after': 1})],
                     cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stderr[-3000:]
  assert f'resuming at step {newest[-1]}' in r.stdout
  assert max(x['step'] for x in rows(wd)) == newest[-1] + 1
