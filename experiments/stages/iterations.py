"""The schedule of an online RL run (experiments/stages/online.py drives it): the iteration
loop with its progress bar, metrics.jsonl and TensorBoard, held-out evaluations on a schedule
(eval.jsonl), checkpoints, and preemption: SIGTERM / SIGINT saves at the iteration reached and
exits 128 + N, as pretraining does, so rerunning the same command continues exactly."""
from __future__ import annotations

import json
import signal
from typing import Callable

import jax
from tqdm import tqdm

from experiments.stages import runlog
from experiments.stages import trainer
from lm import paths

EVAL_FILE = 'eval.jsonl'


class EvalLog:
  """eval.jsonl: one {iteration, gold, proxy, kl, ...} line per held-out evaluation; a resumed
  run drops lines past the iteration it resumes from (they are evaluated again)."""

  def __init__(self, workdir: str, start: int):
    self.path = paths.path(workdir) / EVAL_FILE
    self.rows = []
    if self.path.exists():
      self.rows = [json.loads(x) for x in self.path.read_text().splitlines() if x.strip()]
      self.rows = [r for r in self.rows if start and r['iteration'] <= start]
    self._flush()

  def _flush(self):
    if jax.process_index() == 0:
      paths.write_text(self.path, ''.join(json.dumps(r) + '\n' for r in self.rows))

  def add(self, row: dict) -> dict:
    self.rows.append(row)
    self._flush()
    return row


def run_iterations(workdir: str, *, start: int, end: int, total: int, desc: str,
                   iterate: Callable[[int], dict], evaluate: Callable[[int], None] | None,
                   save: Callable[[int], None], checkpointer, eval_every: int,
                   checkpoint_every: int, eval_before: bool, postfix: dict[str, str]) -> int:
  """Iterations start+1 .. end of a run of `total`. `iterate(i)` runs the iteration after i and
  returns its metrics row; `evaluate(i)` the held-out evaluation after iteration i (before the
  first when eval_before, every eval_every, and after the last of the run); `save(i)` the
  checkpoint (every checkpoint_every and at `end`). `postfix` names the row's keys the bar
  shows, with their formats. Returns the iteration reached; raises trainer.Preempted (after
  saving) on SIGTERM / SIGINT."""
  writer = runlog.MetricsWriter(workdir, resume_step=start or None)
  bar = tqdm(total=total, initial=start, desc=desc, unit='it', dynamic_ncols=True,
             disable=jax.process_index() != 0)
  # An iteration (generation included) is long: the hosts can agree on a signal every one.
  stop = trainer.StopSignals(check_every=1)
  it = saved = start
  try:
    with stop:
      if start == 0 and eval_before and evaluate:
        evaluate(0)
      while it < end:
        row = iterate(it)
        it += 1
        if evaluate and ((eval_every and it % eval_every == 0) or it == total):
          evaluate(it)
        if (checkpoint_every and it % checkpoint_every == 0) or it == end:
          save(it)
          saved = it
          # metrics.jsonl never shows an iteration whose checkpoint is not final: after a
          # SIGKILL the rerun resumes from the last checkpointed iteration the log shows (an
          # iteration is long, so waiting for the async save costs little).
          checkpointer.wait()
        writer.write(it, row)
        bar.update(1)
        bar.set_postfix({k: format(row[k], f) for k, f in postfix.items() if k in row})
        if stop.should_stop(it):
          break
    if stop.signum is not None and saved != it:
      save(it)                          # preempted: keep the iteration reached
  finally:
    bar.close()
    checkpointer.close()
    writer.close()
  if stop.signum is not None and it < end:
    print(f'{signal.Signals(stop.signum).name} received: saved a checkpoint at iteration {it}; '
          'rerun the same command to continue.', flush=True)
    raise trainer.Preempted(it, stop.signum)
  return it
