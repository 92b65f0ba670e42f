"""The online stages' iteration loop (experiments/stages/iterations.py) and the run log's resume."""
import json

from experiments.stages import iterations, runlog


class _Checkpointer:
  """Records how many rows metrics.jsonl held when each save was waited for."""

  def __init__(self, log):
    self.log, self.waits, self.saved = log, [], []

  def rows(self):
    return sum(1 for _ in open(self.log)) if self.log.exists() else 0

  def save(self, it):
    self.saved.append(it)

  def wait(self):
    self.waits.append((self.saved[-1], self.rows()))

  def close(self):
    self.closed = True


def test_the_log_shows_an_iteration_only_after_its_checkpoint_is_final(tmp_path):
  ck = _Checkpointer(tmp_path / 'metrics.jsonl')
  iterations.run_iterations(str(tmp_path), start=0, end=7, total=7, desc='t',
                            iterate=lambda i: {'loss': float(i)}, evaluate=None, save=ck.save,
                            checkpointer=ck, eval_every=0, checkpoint_every=3, eval_before=False,
                            postfix={})
  # saves at 3, 6 and the last iteration 7; when each was waited for, the log held the rows
  # of the iterations before it only (row `it` is written after its checkpoint is final)
  assert ck.saved == [3, 6, 7]
  assert ck.waits == [(3, 2), (6, 5), (7, 6)]
  rows = [json.loads(l) for l in open(tmp_path / 'metrics.jsonl')]
  assert [r['step'] for r in rows] == list(range(1, 8))


def test_resume_drops_a_last_line_cut_short(tmp_path):
  log = tmp_path / 'metrics.jsonl'
  log.write_text('{"step": 1, "loss": 1.0}\n{"step": 2, "loss": 2.0}\n{"step": 3, "lo')
  w = runlog.MetricsWriter(str(tmp_path), resume_step=5)
  w.close()
  assert log.read_text() == '{"step": 1, "loss": 1.0}\n{"step": 2, "loss": 2.0}\n'
