"""Preemption with several processes: a SIGTERM that reaches one host only stops every host at
one agreed step, where they all save (orbax's save is collective) and exit 143; rerunning the
same commands continues exactly."""
import os
import signal
import subprocess
import sys
import textwrap
import time

import jax
import numpy as np
import pytest

from experiments import pretrain
from experiments.stages import trainer
from lm.checkpoint import Checkpointer
from tests.test_faults import TINY, config, flags, rows

# The launcher with every training step slowed down, so a signal sent from outside lands while
# the hosts are mid-run (test_faults' own SIGTERM test signals from a hook instead).
SLOW_LAUNCHER = '''
import dataclasses, sys, time
from experiments import run
from experiments.stages import trainer
orig = trainer.train
def slow(r):
  def hook(step, batch):
    time.sleep(0.3)
    return batch
  return orig(dataclasses.replace(r, transform_batch=hook))
trainer.train = slow
run.app.run(run.main, flags_parser=run.parse_flags)
'''
from tests.test_multihost import ROOT, _env, _free_port


# Unit level (fast, default run) --------------------------------------------------------------
def test_hosts_consult_each_other_only_every_check_every_steps(monkeypatch):
  """A real SIGTERM sets only the local flag; the stop comes at the next agreement step, and
  the all-gather runs on those steps only (no host sync every step)."""
  calls = []

  def agree(local):
    calls.append(local)
    return local
  monkeypatch.setattr(jax, 'process_count', lambda: 2)
  monkeypatch.setattr(trainer, 'agree_on_signal', agree)
  stop = trainer.StopSignals(check_every=4)
  with stop:
    assert not any(stop.should_stop(s) for s in range(1, 6))
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(0.01)                      # the handler runs between bytecodes
    assert stop.local == signal.SIGTERM and stop.signum is None
    assert not stop.should_stop(6) and not stop.should_stop(7)
    assert stop.should_stop(8) and stop.signum == signal.SIGTERM
  assert calls == [None, signal.SIGTERM]  # steps 4 and 8 only
  assert signal.getsignal(signal.SIGTERM) is not stop._handle


def test_a_host_not_signalled_stops_when_another_was(monkeypatch):
  monkeypatch.setattr(jax, 'process_count', lambda: 2)
  monkeypatch.setattr(trainer, 'agree_on_signal', lambda local: signal.SIGINT)
  stop = trainer.StopSignals(check_every=3)
  assert not stop.should_stop(2) and stop.should_stop(3) and stop.signum == signal.SIGINT


def test_one_process_stops_at_the_next_step_without_a_collective(monkeypatch):
  monkeypatch.setattr(trainer, 'agree_on_signal', lambda local: pytest.fail('no collective'))
  stop = trainer.StopSignals(check_every=10)
  stop.local = signal.SIGTERM
  assert stop.should_stop(3) and stop.signum == signal.SIGTERM


def test_bad_check_every_is_a_config_error():
  with pytest.raises(trainer.ConfigError, match='preempt_check_every=0 must be at least 1'):
    trainer.StopSignals(check_every=0)


AGREE = textwrap.dedent('''
  import sys, jax
  jax.distributed.initialize(sys.argv[1], 2, int(sys.argv[2]))
  from experiments.stages.trainer import agree_on_signal
  me = jax.process_index()
  print('none', agree_on_signal(None))
  print('one', agree_on_signal(15 if me == 1 else None))
  print('both', agree_on_signal(2 if me == 0 else 15))
''')


def test_agree_on_signal_between_two_real_processes():
  """The collective itself, over jax.distributed on two local CPU processes."""
  port = _free_port()
  procs = [subprocess.Popen([sys.executable, '-c', AGREE, f'127.0.0.1:{port}', str(i)], cwd=ROOT,
                            env=_env(1), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
           for i in range(2)]
  try:
    outs = [p.communicate(timeout=120)[0] for p in procs]
  finally:
    for p in procs:
      p.kill()
  for p, out in zip(procs, outs):
    assert p.returncode == 0, out[-3000:]
    assert 'none None\none 15\nboth 2\n' in out, out[-3000:]


EARLY = textwrap.dedent('''
  import os, signal, sys, time
  from absl import app
  from experiments import registry, run
  from experiments.stages import trainer

  def stage(config, workdir):        # a SIGTERM during data preparation / compile
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(0.5)
    print('alive before the loop', flush=True)
    with trainer.StopSignals(check_every=1) as stop:
      print('stops at the first step:', stop.should_stop(1), flush=True)
  registry.get = lambda name: stage
  sys.argv = ['run', '--config=experiments/configs/shakespeare_char.py', '--workdir=' + sys.argv[1],
              '--coordinator=' + sys.argv[2], '--num_processes=1', '--process_id=0']
  app.run(run.main, flags_parser=run.parse_flags)
''')


def test_a_sigterm_before_the_loop_is_held_for_it_not_swallowed_by_jax(tmp_path):
  """After jax.distributed.initialize, JAX's own SIGTERM handler only notifies its preemption
  service, so a signal during data preparation or compile was lost and the run trained on. The
  launcher holds it instead, and the loop stops at its first check step."""
  out = subprocess.run([sys.executable, '-c', EARLY, str(tmp_path / 'w'), f'127.0.0.1:{_free_port()}'],
                       cwd=ROOT, env=_env(1), capture_output=True, text=True, timeout=120)
  assert out.returncode == 0, out.stdout + out.stderr[-3000:]
  assert 'alive before the loop\nstops at the first step: True\n' in out.stdout, out.stdout


# End to end: a real signal to one of two processes (slow) ------------------------------------
OVER = {'train.steps': 24, 'train.checkpoint_every': 10, 'train.preempt_check_every': 4,
        'mesh.data': 4, 'mesh.fsdp': 2}


def _launch(argv_for, workdir, port):
  return [subprocess.Popen(argv_for(workdir) + [f'--coordinator=127.0.0.1:{port}',
                                                '--num_processes=2', f'--process_id={i}'],
                           cwd=ROOT, env=_env(4), stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True) for i in range(2)]


def _finish(procs, timeout):
  """Both outputs; a process still running at the deadline fails the test (and is killed)."""
  try:
    return [p.communicate(timeout=timeout)[0] for p in procs]
  finally:
    for p in procs:
      p.kill()


@pytest.mark.slow
def test_sigterm_to_one_of_two_processes_stops_both_at_one_step_and_the_rerun_continues(
    tiny_corpus, tmp_path):
  wd = str(tmp_path / 'preempted')
  slow = lambda w: [sys.executable, '-c', SLOW_LAUNCHER, *flags(tiny_corpus, w, **OVER)]
  procs = _launch(slow, wd, _free_port())
  try:
    deadline = time.time() + 300
    while time.time() < deadline and all(p.poll() is None for p in procs):
      if os.path.exists(os.path.join(wd, 'metrics.jsonl')) and len(rows(wd)) >= 3:
        break
      time.sleep(0.1)
    assert all(p.poll() is None for p in procs), 'the run ended before it could be signalled'
    procs[1].send_signal(signal.SIGTERM)    # process 1 only; process 0 writes the metrics
    outs = _finish(procs, timeout=120)
  finally:
    for p in procs:
      p.kill()
  for p, out in zip(procs, outs):
    assert p.returncode == 128 + signal.SIGTERM, out[-3000:]
    assert 'Traceback' not in out, out[-3000:]
  reached = [int(o.split('saved a checkpoint at step ')[1].split(';')[0]) for o in outs]
  assert reached[0] == reached[1], reached
  reached = reached[0]
  assert 4 <= reached < 24 and reached % 4 == 0
  assert Checkpointer.steps_in(os.path.join(wd, 'checkpoints'))[-1] == reached
  assert max(r['step'] for r in rows(wd)) == reached
  # Rerun the same two commands (without the slowdown): they finish the remaining steps only.
  plain = lambda w: [sys.executable, '-m', 'experiments.run', *flags(tiny_corpus, w, **OVER)]
  procs = _launch(plain, wd, _free_port())
  outs = _finish(procs, timeout=300)
  for p, out in zip(procs, outs):
    assert p.returncode == 0, out[-3000:]
    assert f'resuming at step {reached}' in out, out[-3000:]
  # One uninterrupted process of 8 devices: the same steps and losses (the two-process run
  # equals the one-process run to float rounding, tests/test_multihost.py).
  full = str(tmp_path / 'full')
  pretrain.run(config(tiny_corpus, **OVER), full)
  a, b = rows(full), rows(wd)
  assert [x['step'] for x in a] == [x['step'] for x in b] == list(range(1, 25))
  np.testing.assert_allclose([x['loss'] for x in a], [x['loss'] for x in b], rtol=1e-5)
