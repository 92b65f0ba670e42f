"""A full disk (issue 21: was 461 lines and 5 tracebacks): a failed write of a checkpoint, of
config.json or of TensorBoard's events ends the launcher with one sentence (what is full, the
newest intact checkpoint, how to go on), nothing saved is lost, and the rerun resumes exactly.
The disk is not filled: the OSError is raised where the write happens (Orbax's and
TensorBoard's writer threads, the config write), through a small launcher wrapper."""
import errno
import json
import logging
import os
import subprocess
import sys

import numpy as np
import pytest

from experiments import pretrain
from experiments.stages import diskfull
from lm.checkpoint import Checkpointer
from tests.test_faults import ROOT, config, flags, rows

# FULL_AT=checkpoint:N (Orbax's background commit of step N), config (config.json, after half
# of it was written), tensorboard:N (TensorBoard's writer thread, from its Nth event on).
FULL_DISK_LAUNCHER = '''
import errno, os
from experiments import run
where, _, at = os.environ['FULL_AT'].partition(':')
def full(path):
  return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
if where == 'checkpoint':
  from orbax.checkpoint._src.handlers import json_checkpoint_handler as h
  orig = h.JsonCheckpointHandler._save_fn
  async def save_fn(self, x, directory):
    if f'/{at}.orbax-checkpoint-tmp' in str(directory):
      raise full(directory / self._filename)
    return await orig(self, x, directory)
  h.JsonCheckpointHandler._save_fn = save_fn
elif where == 'config':
  from lm import paths
  orig = paths.write_text
  def write_text(p, text):
    if os.path.basename(str(p)).startswith('config.json'):
      with open(p, 'w') as f:
        f.write(text[:len(text) // 2])
      raise full(p)
    return orig(p, text)
  paths.write_text = write_text
elif where == 'tensorboard':
  from tensorboardX import event_file_writer as w
  orig, n = w.EventsWriter._write_serialized_event, [0]
  def write(self, s):
    n[0] += 1
    if n[0] >= int(at):
      raise full(self._file_name)
    return orig(self, s)
  w.EventsWriter._write_serialized_event = write
run.AS_PROCESS = True
run.cli()
'''
OVER = {'train.steps': 30, 'train.checkpoint_every': 10}


def launch(corpus, wd, full_at=None, **over):
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  if full_at:
    cmd, env['FULL_AT'] = [sys.executable, '-c', FULL_DISK_LAUNCHER, 'run'], full_at
  else:
    cmd = [sys.executable, '-m', 'experiments.run']
  return subprocess.run(cmd + flags(corpus, wd, **{**OVER, **over}), cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=300)


def assert_one_sentence(p, *parts):
  assert p.returncode == 1, p.stderr[-3000:]
  assert 'Traceback' not in p.stderr, p.stderr[-3000:]
  said = [l for l in p.stderr.replace('\r', '\n').splitlines() if l.startswith('error:')]
  assert len(said) == 1 and p.stderr.count('error') == 1, p.stderr[-3000:]
  for part in parts:
    assert part in said[0], said[0]
  return said[0]


def test_a_full_disk_at_a_checkpoint_or_config_write_is_one_sentence_and_the_rerun_resumes(
    tiny_corpus, tmp_path):
  wd = str(tmp_path / 'run')
  ckpts = os.path.join(wd, 'checkpoints')
  # Step 20's checkpoint fails in Orbax's writer thread: step 10's is the newest intact one.
  p = launch(tiny_corpus, wd, 'checkpoint:20')
  assert_one_sentence(p, f'no space left on the device holding {wd} (writing checkpoints/20.',
                      'checkpoints up to step 10 are intact',
                      'rerun the same command: it resumes from step 10.')
  assert Checkpointer.steps_in(ckpts) == [10]
  assert max(r['step'] for r in rows(wd)) < 20      # no row from the step whose save failed
  # The rerun's config.json fails half-written: the one before stays whole (with its history).
  before = open(os.path.join(wd, 'config.json')).read()
  p = launch(tiny_corpus, wd, 'config')
  assert_one_sentence(p, f'(writing config.json', 'it resumes from step 10.')
  assert open(os.path.join(wd, 'config.json')).read() == before
  assert sorted(os.listdir(wd)) == sorted(['checkpoints', 'config.json', 'data', 'metrics.jsonl',
                                           'tensorboard', 'tokenizer_ref.json'])
  # Space freed: the same command resumes from step 10 and ends where a straight run does.
  p = launch(tiny_corpus, wd)
  assert p.returncode == 0, p.stderr[-3000:]
  assert 'resuming at step 10' in p.stdout
  # config.json's history: the first invocation (the failed config write left no record)
  assert len(json.load(open(os.path.join(wd, 'config.json')))['history']) == 1
  straight = str(tmp_path / 'straight')
  pretrain.run(config(tiny_corpus, **OVER), straight)
  a, b = rows(straight), rows(wd)
  assert [x['step'] for x in a] == [x['step'] for x in b] == list(range(1, 31))
  np.testing.assert_array_equal([x['loss'] for x in a], [x['loss'] for x in b])


def test_tensorboards_writer_thread_dying_of_a_full_disk_ends_the_run_at_once(tiny_corpus,
                                                                              tmp_path):
  """Its queue then fills and the main thread would block on it for ever."""
  wd = str(tmp_path / 'run')
  p = launch(tiny_corpus, wd, 'tensorboard:200', **{'train.steps': 2000})   # ~ step 15
  said = assert_one_sentence(p, f'no space left on the device holding {wd} (writing '
                                'tensorboard/events.', 'checkpoints up to step ')
  newest = Checkpointer.steps_in(os.path.join(wd, 'checkpoints'))[-1]
  assert f'up to step {newest} are intact' in said and newest < 2000


def test_full_disk_errors_are_found_by_errno_or_by_tensorstores_text(tmp_path):
  full = OSError(errno.ENOSPC, 'No space left on device', '/data/run/metrics.jsonl')
  try:
    try:
      raise full
    except OSError as e:
      raise RuntimeError('writing failed') from e
  except RuntimeError as e:
    assert diskfull.cause(e) is full
  quota = OSError(errno.EDQUOT, 'Disk quota exceeded')
  assert diskfull.cause(quota) is quota
  # What TensorStore raised on a full tmpfs (a real run, issue 21), from Orbax's commit thread:
  ts = ValueError('RESOURCE_EXHAUSTED: Error writing local file "/data/run/checkpoints/60.orbax-'
                  'checkpoint-tmp/state.orbax-checkpoint-tmp/_sharding": Failed writing: "/data/'
                  'run/checkpoints/60.orbax-checkpoint-tmp/state.orbax-checkpoint-tmp/_sharding.__'
                  'lock": Failed to write 5037 bytes to file 15: No space left on device '
                  "[os_error_code='28']")
  assert diskfull.cause(ts) is ts
  assert diskfull.where(ts) == '/data/run/checkpoints/60.orbax-checkpoint-tmp/state.orbax-checkpoint-tmp/_sharding'
  for other in (OSError(errno.EACCES, 'Permission denied', '/x'), ValueError('bad value'),
                RuntimeError('Event loop is closed')):
    assert diskfull.cause(other) is None
  # The sentence: the newest final step (a .orbax-checkpoint-tmp one is not), the file as a
  # path inside the workdir, a quota named as such.
  wd = tmp_path / 'run'
  for d in ('10', '20', '30.orbax-checkpoint-tmp'):
    (wd / 'checkpoints' / d).mkdir(parents=True)
  msg = diskfull.message(OSError(errno.EDQUOT, 'Disk quota exceeded', str(wd / 'metrics.jsonl')), str(wd))
  assert msg == (f'disk quota exceeded on the device holding {wd} (writing metrics.jsonl); the '
                 'checkpoints up to step 20 are intact; free some space and rerun the same '
                 'command: it resumes from step 20.')
  assert diskfull.message(OSError(errno.ENOSPC, 'x'), str(tmp_path / 'new')) == (
      f'no space left on the device holding {tmp_path / "new"}; no checkpoint had been saved '
      'yet; free some space and rerun the same command.')


def test_log_records_about_a_full_disk_are_dropped_and_others_kept():
  quiet = diskfull.QuietFullDisk()

  def record(msg, exc=None):
    return logging.LogRecord('absl', logging.ERROR, __file__, 1, msg, None,
                             (type(exc), exc, None) if exc else None)
  try:
    try:
      raise OSError(errno.ENOSPC, 'No space left on device', '/run/x')
    except OSError as e:
      raise RuntimeError('commit failed') from e
  except RuntimeError as e:
    wrapped = e
  assert not quiet.filter(record('Failed to run 5 Handler Commit operations', wrapped))
  assert not quiet.filter(record("Error writing: ... [os_error_code='28']"))
  assert quiet.filter(record('Failed to run 5 Handler Commit operations', ValueError('bad shape')))
  assert quiet.filter(record('an unrelated warning'))
