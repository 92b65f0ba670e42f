"""The online RL loop's schedule (experiments/stages/iterations.py) that PPO, RLOO and GRPO share:
evaluations and checkpoints, metrics rows, and preemption by a real signal."""
import json
import os
import signal
import time

import pytest

from experiments.stages import iterations, online_report, trainer


class Closed:
  closed = False

  def close(self):
    self.closed = True

  def wait(self):
    """run_iterations waits for a save before logging its iteration; nothing to wait for here."""


def _loop(workdir, start, end, total, signal_at=None, calls=None, **kw):
  calls = calls if calls is not None else {'iterate': [], 'eval': [], 'save': []}

  def iterate(i):
    calls['iterate'].append(i)
    if i + 1 == signal_at:                # the signal arrives during this iteration
      os.kill(os.getpid(), signal.SIGTERM)
      time.sleep(0.01)
    return {'loss': 1.0 / (i + 1), 'proxy': float(i)}
  ck = Closed()
  args = dict(eval_every=2, checkpoint_every=3, eval_before=True, postfix={'proxy': '+.2f'})
  args.update(kw)
  it = iterations.run_iterations(str(workdir), start=start, end=end, total=total, desc='t',
                             iterate=iterate, evaluate=calls['eval'].append,
                             save=calls['save'].append, checkpointer=ck, **args)
  assert ck.closed
  return it, calls


def _steps(workdir):
  return [json.loads(l)['step'] for l in open(workdir / 'metrics.jsonl')]


def test_schedule_of_evaluations_checkpoints_and_rows(tmp_path):
  it, calls = _loop(tmp_path, 0, 5, 7)                # stop_after: 5 of 7 iterations
  assert it == 5 and calls['iterate'] == [0, 1, 2, 3, 4]
  assert calls['eval'] == [0, 2, 4] and calls['save'] == [3, 5]
  it, calls = _loop(tmp_path, 5, 7, 7)                # resumed: the rest, eval after the last
  assert calls['iterate'] == [5, 6] and calls['eval'] == [6, 7] and calls['save'] == [6, 7]
  assert _steps(tmp_path) == [1, 2, 3, 4, 5, 6, 7]


def test_sigterm_saves_at_the_iteration_reached_and_exits_143(tmp_path):
  calls = {'iterate': [], 'eval': [], 'save': []}
  with pytest.raises(trainer.Preempted) as e:
    _loop(tmp_path, 0, 10, 10, signal_at=4, calls=calls)
  assert e.value.code == 143 and e.value.step == 4
  assert calls['save'] == [3, 4] and calls['eval'] == [0, 2, 4]
  assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL   # the handler is gone again
  assert _steps(tmp_path) == [1, 2, 3, 4]
  it, calls = _loop(tmp_path, 4, 10, 10)              # the rerun continues after 4
  assert calls['iterate'] == [4, 5, 6, 7, 8, 9] and it == 10
  assert _steps(tmp_path) == list(range(1, 11))


def test_preempted_at_a_checkpoint_step_saves_once(tmp_path):
  calls = {'iterate': [], 'eval': [], 'save': []}
  with pytest.raises(trainer.Preempted):
    _loop(tmp_path, 0, 10, 10, signal_at=3, calls=calls)
  assert calls['save'] == [3] and calls['iterate'] == [0, 1, 2]


def test_eval_log_keeps_rows_up_to_the_resumed_iteration(tmp_path):
  log = iterations.EvalLog(str(tmp_path), 0)
  for i in (0, 2, 4):
    log.add({'iteration': i, 'gold': i / 10})
  assert [r['iteration'] for r in iterations.EvalLog(str(tmp_path), 2).rows] == [0, 2]
  assert [json.loads(l)['iteration'] for l in open(tmp_path / iterations.EVAL_FILE)] == [0, 2]
  assert iterations.EvalLog(str(tmp_path), 0).rows == []  # a fresh run starts a new file
  assert (tmp_path / iterations.EVAL_FILE).read_text() == ''


def test_results_split_every_logged_phase_including_rule_rewards(tmp_path):
  """results.json's seconds per iteration carry the rule rewards' time (a sandbox can be most
  of an iteration) and the whole iteration; the first, compiling, iteration is left out."""
  rows = [{'step': i, 'loss': 0.0, 'proxy': 0.0, 'gold': 0.0, 'kl': 0.0, 'tokens_per_sec': 10.0,
           'time_generate': g, 'time_rules': r, 'time_score': 1.0, 'time_update': 2.0,
           'time_reward': 0.5, 'time_iteration': g + r + 3.5}
          for i, (g, r) in enumerate([(90.0, 90.0), (4.0, 20.0), (6.0, 22.0)], 1)]
  (tmp_path / 'metrics.jsonl').write_text(''.join(json.dumps(x) + '\n' for x in rows))
  out = online_report.finish(str(tmp_path), 'grpo', 0, 3, 3, [])
  assert out['seconds_per_iteration'] == {'generate': 5.0, 'rules': 21.0, 'score': 1.0, 'update': 2.0,
                                          'reward': 0.5, 'iteration': 29.5}
