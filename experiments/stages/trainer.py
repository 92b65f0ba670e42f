"""The training loop every driver shares: resume-or-init, steps, logging, eval, checkpoints.

A driver (pretrain, reward, ppo, ...) builds a `Run` with its loss-specific pieces and
calls `train(run)`. Everything that can fail on user input has failed before this
point; the first compile happens inside the loop.
"""
from __future__ import annotations

import collections
import dataclasses
import json
import os
import signal
import threading
import time
from typing import Any, Callable, Iterator

import jax
import numpy as np
from jax.experimental import multihost_utils
from ml_collections import ConfigDict
from tqdm import tqdm

from lm import checkpoint as ckpt_lib
from lm import mfu as mfu_lib
from lm import paths
from lm.config import ConfigError
from lm import sharding, train as train_lib
from experiments.stages import runlog, validate


def check_batch(config: ConfigDict, mesh) -> None:
  """The global batch must split evenly into microbatches and over the batch mesh axes (after
  validate.training: no key holds a value that no run can use)."""
  validate.training(config)
  b, k = config.train.batch_size, config.train.grad_accum
  div = sharding.batch_size_divisor(mesh)
  if k < 1 or b % k:
    raise ConfigError(f'train.batch_size={b} is not divisible by train.grad_accum={k}; '
                      'make batch_size a multiple of grad_accum.')
  if (b // k) % div:
    raise ConfigError(f'The microbatch of {b // k} sequences (train.batch_size / train.grad_accum) '
                      f'does not divide over the {div} devices of the batch mesh axes '
                      f'{dict((a, mesh.shape[a]) for a in sharding.BATCH_AXES)}; '
                      f'use a batch size that is a multiple of {div * k}.')


def process_zero_first(fn: Callable, name: str):
  """Run fn on process 0, then on the others: a shared data directory is written once."""
  if jax.process_count() == 1:
    return fn()
  out = fn() if jax.process_index() == 0 else None
  multihost_utils.sync_global_devices(name)
  return out if jax.process_index() == 0 else fn()


# Settings a resumed run must share with the steps already taken: the optimizer and the length
# of its schedule (train.steps, or the online stages' iterations x epochs x minibatches).
SCHEDULE_KEYS = ('steps', 'iterations', 'epochs', 'minibatches')


def changed_optim(old: dict, new: dict) -> list[str]:
  """The optim.* and schedule keys whose values differ between two saved configs (a key one of
  them lacks, e.g. added to the codebase since, is not a change)."""
  pairs = [(f'optim.{k}', (old.get('optim') or {}).get(k, v), v)
           for k, v in (new.get('optim') or {}).items()]
  pairs += [(f'train.{k}', (old.get('train') or {}).get(k, v), v)
            for k, v in (new.get('train') or {}).items() if k in SCHEDULE_KEYS]
  return [f'{k} {a!r} -> {b!r}' for k, a, b in pairs if a != b]


def write_config(config: ConfigDict, workdir: str, extra: dict | None = None) -> None:
  """WORKDIR/config.json: this invocation's settings, with every earlier invocation's record
  under 'history' (oldest first). A resumed run (checkpoints exist) whose optimizer or schedule
  changed is refused unless train.allow_changed_optim=True."""
  path = paths.path(workdir) / 'config.json'   # epath: the workdir may be a bucket (gs://)
  new = {**config.to_dict(), **(extra or {})}
  old = json.loads(paths.read_text(path)) if path.exists() else None
  steps = ckpt_lib.Checkpointer.steps_in(paths.path(workdir) / 'checkpoints')
  if old is not None and steps:
    changed = changed_optim(old, new)
    if changed and not (config.get('train') or {}).get('allow_changed_optim', False):
      raise ConfigError(
          f'{workdir} resumes from step {steps[-1]} trained with other optimizer/schedule settings '
          f'({"; ".join(changed)}); rerun with the earlier values, use a new --workdir, or add '
          '--config.train.allow_changed_optim=True to continue with the new ones.')
  new['history'] = (old.pop('history', []) + [old]) if old is not None else []
  new['written_at'] = time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())
  new['resumed_from_step'] = steps[-1] if steps else 0
  if jax.process_index() == 0:
    write_whole(path, json.dumps(new, indent=2, default=str))


def write_whole(path, text: str) -> None:
  """Write a file whole or not at all: a full disk must not leave a truncated config.json
  (its history lost, the rerun unable to read it). A bucket replaces an object whole anyway."""
  if paths.is_url(path):
    paths.write_text(path, text)
    return
  tmp = path.with_name(path.name + '.tmp')
  try:
    paths.write_text(tmp, text)
  except BaseException:
    tmp.unlink(missing_ok=True)
    raise
  os.replace(tmp, path)


# XLA:CPU's collectives deadlock (a rendezvous times out and aborts the process) once
# about 32 multi-device programs are queued at once, e.g. a whole validation split of eval
# steps dispatched before any result is read. Keeping at most this many in flight costs
# nothing on accelerators (the device stays busy) and keeps fake-device meshes alive.
MAX_INFLIGHT = 8


def bounded(results: list, depth: int = MAX_INFLIGHT) -> None:
  """Wait for the result dispatched `depth` calls ago (no transfer): bounds programs in flight."""
  if len(results) > depth:
    jax.block_until_ready(results[-depth - 1])


class TrainingError(RuntimeError):
  """Training cannot go on (e.g. every update is non-finite); the message says what to try."""


class Preempted(SystemExit):
  """SIGTERM / SIGINT: a checkpoint was saved at the step reached; rerun the same command to
  continue exactly. The process exits with 128 + the signal number (143 SIGTERM, 130 SIGINT),
  so a requeue loop (`until python -m experiments.run ...; do :; done`) tells it from success."""

  def __init__(self, step: int, signum: int):
    super().__init__(128 + signum)
    self.step, self.signum = step, signum


@dataclasses.dataclass
class Run:
  config: ConfigDict
  workdir: str
  mesh: Any
  state: Any                               # TrainState (fresh or restored)
  start_step: int
  step_fn: Callable                        # (state, global batch) -> (state, metrics)
  batches: Iterator                        # yields process-local numpy batches; has state()
  to_global: Callable                      # local numpy batch -> global jax arrays
  evaluate: Callable[[Any], dict] | None   # params -> {'val_loss': ...}
  checkpointer: ckpt_lib.Checkpointer
  flops_per_token: float
  tokens_per_step: int
  meta: dict | None = None                 # the restored checkpoint's metadata (counters)
  # Test hook: (step about to run, local numpy batch) -> batch, e.g. to inject bad batches.
  transform_batch: Callable[[int, dict], dict] | None = None


def restore_or_init(checkpointer, init_state: Callable, abstract, shardings):
  """(state, start_step, data_state): the latest checkpoint, or a fresh sharded init."""
  target = train_lib.abstract_with_shardings(abstract, shardings)
  found = checkpointer.restore_or_none(target)
  if found is None:
    return init_state(), 0, None
  step, state, data_state, _ = found
  return state, step, data_state


_HELD: list[int] = []   # stop signals that arrived before the training loop (see hold_stop_signals)


def hold_stop_signals() -> None:
  """Call right after jax.distributed.initialize. It installs a SIGTERM handler that only
  notifies JAX's preemption service, so a SIGTERM during data preparation or compile would be
  lost and the run would train on until the scheduler's SIGKILL. Hold SIGTERM / SIGINT here
  instead: the loop's StopSignals takes the held signal and stops at its first check step
  (with a checkpoint); a second signal stops at once."""
  def hold(signum, frame):
    if _HELD:
      raise KeyboardInterrupt
    _HELD.append(signum)
  if threading.current_thread() is threading.main_thread():
    for s in (signal.SIGTERM, signal.SIGINT):
      signal.signal(s, hold)


class StopSignals:
  """SIGTERM / SIGINT set a flag the loop reads at the next step boundary; a second one
  stops at once. With several processes the hosts must stop at one step (the checkpoint save
  is collective) though the signal may reach one host only, or each at a different step:
  every `check_every` steps they all-gather their local flags, and all stop at that step if
  any host was signalled, exiting with the first signalled host's signal number."""

  def __init__(self, check_every: int = 1):
    if check_every < 1:
      raise ConfigError(f'train.preempt_check_every={check_every} must be at least 1.')
    self.signum = None        # agreed: every host stops at this step boundary
    self.local = None         # this host's signal, not yet agreed on with the others
    self.check_every, self._old = check_every, {}

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      for s in (signal.SIGTERM, signal.SIGINT):
        self._old[s] = signal.signal(s, self._handle)
    if _HELD:                 # signalled before the loop: treated as if signalled at its start
      self.local = _HELD.pop()
    return self

  def _handle(self, signum, frame):
    if self.local is not None:
      raise KeyboardInterrupt
    self.local = signum

  def should_stop(self, step: int) -> bool:
    """At a step boundary, reached by every host in the same order: stop here?"""
    if self.signum is None:
      if jax.process_count() == 1:
        self.signum = self.local
      elif step % self.check_every == 0:
        self.signum = agree_on_signal(self.local)
    return self.signum is not None

  def __exit__(self, *exc):
    for s, h in self._old.items():
      signal.signal(s, h)


def agree_on_signal(local: int | None) -> int | None:
  """A collective over all processes: the first signalled process's signal, or None if none
  was signalled. One int32 per host, so the cost is the round trip (and draining the steps
  already queued before it), paid once per train.preempt_check_every steps."""
  flags = np.ravel(multihost_utils.process_allgather(np.int32(local or 0)))
  hit = [int(f) for f in flags if f]
  return hit[0] if hit else None


def _abstract(state):
  """What a checkpoint of `state` restores into: same shapes, dtypes and shardings."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)


class _Loop:
  """The mutable state of one `train` call and the steps that change it. A class rather than
  closures over nonlocals, so each piece (measure, publish, spike restart, save) is its own
  short method; `train` reads as open -> steps -> close -> report."""

  def __init__(self, run: Run):
    cfg = self.cfg = run.config.train
    self.run = run
    meta = run.meta or {}
    self.counts = {'skipped_steps': int(meta.get('skipped_steps', 0)),
                   'spike_restarts': int(meta.get('spike_restarts', 0))}
    self.max_skips = cfg.get('max_consecutive_skips', 20)
    self.spike_k, self.spike_w = cfg.get('spike_factor', 0.0), cfg.get('spike_window', 20)
    self.writer = runlog.MetricsWriter(run.workdir, resume_step=run.start_step or None)
    self.peak = mfu_lib.peak_flops()
    self.n_dev = jax.device_count()
    self.end = cfg.steps if not cfg.stop_after else min(cfg.steps, run.start_step + cfg.stop_after)
    self.state, self.step = run.state, run.start_step
    # A spike restart's restore target, read before the first step donates the state.
    self.target = _abstract(self.state) if self.spike_k else None
    self.pending = None                 # (step, device metrics) published one step late
    self.flags = []                     # (step, device 'skipped') not yet read on the host
    self.inflight = []                  # device metrics of the last steps, to bound run-ahead
    self.consecutive = 0
    self.recent = collections.deque(maxlen=self.spike_w)   # (step, loss) of the last logged steps
    self.spike = None                   # the step whose logged loss spiked
    self.last_t, self.last_step = time.perf_counter(), self.step
    self.bar = tqdm(total=cfg.steps, initial=self.step, desc='train', unit='step',
                    dynamic_ncols=True, disable=jax.process_index() != 0)
    self.saved = run.start_step         # the last step with a checkpoint
    self.unfinal = None                 # a step whose async save may not be final yet
    self.held = []                      # (step, row) not logged until that save is final
    self.stop = StopSignals(cfg.get('preempt_check_every', 10))

  def count_skips(self, upto: int) -> None:
    """Read the skip flags of steps <= upto (with metrics already being fetched: no extra
    sync per step) and stop after max_consecutive_skips non-finite updates in a row."""
    now = [f for f in self.flags if f[0] <= upto]
    self.flags = [f for f in self.flags if f[0] > upto]
    for s, skipped in zip([f[0] for f in now], jax.device_get([f[1] for f in now])):
      if float(skipped):
        self.counts['skipped_steps'] += 1
        self.consecutive += 1
      else:
        self.consecutive = 0
      if self.max_skips and self.consecutive >= self.max_skips:
        raise TrainingError(
            f'{self.consecutive} consecutive steps (up to step {s}) had a non-finite loss or '
            'gradient and were skipped; lower optim.lr, raise optim.warmup_steps, check the '
            'data, or raise train.max_consecutive_skips.')

  def measure(self, at_step, dev_metrics) -> dict:
    """Host copy of a step's metrics plus throughput since the previous reading."""
    self.count_skips(at_step)
    m = {k: float(v) for k, v in jax.device_get(dev_metrics).items()}
    now = time.perf_counter()
    tps = ((at_step - self.last_step) * self.run.tokens_per_step / (now - self.last_t)
           if at_step > self.last_step else None)
    self.last_t, self.last_step = now, at_step
    m['tokens_per_sec'] = tps
    m['mfu'] = None if tps is None else mfu_lib.mfu(tps, self.run.flops_per_token, self.n_dev, self.peak)
    m.update(self.counts)
    return m

  def publish(self, row_step, row) -> None:
    """Log a row, and note a loss spike (handled at the step boundary)."""
    self.log(row_step, row)
    postfix = {'loss': f"{row['loss']:.4f}"}
    if row.get('tokens_per_sec'):
      postfix['tok/s'] = f"{row['tokens_per_sec']:,.0f}"
      postfix['mfu'] = 'n/a' if row['mfu'] is None else f"{100 * row['mfu']:.1f}%"
    self.bar.set_postfix(postfix)
    loss = row['loss']
    if not self.spike_k or not np.isfinite(loss):
      return
    recent = self.recent
    if len(recent) == self.spike_w and loss > self.spike_k * float(np.median([l for _, l in recent])):
      self.spike = self.spike or row_step
    else:
      recent.append((row_step, loss))

  def log(self, row_step, row, final: bool = False) -> None:
    """Write rows to metrics.jsonl, but none at or after the step of an async save until that
    save is final (held meanwhile; training goes on): a SIGKILL after the log shows step N
    never resumes from before N. final=True: wait for the save and write every held row."""
    if row is not None:
      self.held.append((row_step, row))
    if self.unfinal is not None and (final or not self.run.checkpointer.saving()):
      try:
        self.run.checkpointer.wait()      # returns at once, or raises the save's error:
      except BaseException:               # then the rows it held never reach the log
        self.held = [h for h in self.held if h[0] < self.unfinal]
        raise
      self.unfinal = None
    while self.held and (self.unfinal is None or self.held[0][0] < self.unfinal):
      self.writer.write(*self.held.pop(0))

  def publish_pending(self) -> None:
    if self.pending is not None:
      self.publish(self.pending[0], self.measure(*self.pending))
      self.pending = None

  def restart_before_spike(self) -> None:
    """PaLM's recipe: back to the newest checkpoint before the spike, skipping the batches
    that led into it (the restored position + spike_skip_batches, default: through the spike)."""
    run, spike = self.run, self.spike
    self.log(None, None, final=True)
    good = [s for s in run.checkpointer.steps() if s < spike]
    if not good:
      raise TrainingError(f'The loss spiked at step {spike} (over {self.spike_k} x the median of the '
                          f'last {self.spike_w} logged losses) and no checkpoint precedes it to restart '
                          'from; checkpoint more often (train.checkpoint_every) or set train.spike_factor=0.')
    back = good[-1]
    self.state, data_state, _ = run.checkpointer.restore(back, self.target)
    run.checkpointer.delete_after(back)   # they hold the spiking trajectory
    run.batches.restore(data_state)
    n_skip = self.cfg.get('spike_skip_batches', 0) or spike - back
    for _ in range(n_skip):
      next(run.batches)
    self.counts['spike_restarts'] += 1
    self.bar.write(f'loss spike at step {spike}: restarting from step {back}, skipping {n_skip} batches')
    self.writer.close()                   # the restarted steps are logged again
    self.writer = runlog.MetricsWriter(run.workdir, resume_step=back)
    while self.recent and self.recent[-1][0] > back:
      self.recent.pop()
    self.step, self.pending, self.flags, self.inflight, self.spike = back, None, [], [], None
    self.bar.n = back
    self.bar.refresh()
    self.last_t, self.last_step = time.perf_counter(), self.step

  def save(self, at_step: int) -> None:
    """Start an async save (`log` holds the rows from `at_step` on until it is final)."""
    self.saved = self.unfinal = at_step
    self.run.checkpointer.save(at_step, self.state, self.run.batches.state(),
                               {'step': at_step, **self.counts})

  def advance(self) -> None:
    """One step: draw, update, publish the previous step's row, save, evaluate."""
    run, cfg = self.run, self.cfg
    local = next(run.batches)
    if run.transform_batch is not None:
      local = run.transform_batch(self.step + 1, local)
    self.state, dev_metrics = run.step_fn(self.state, run.to_global(local))
    self.step += 1
    step = self.step
    self.bar.update(1)
    if 'skipped' in dev_metrics:
      self.flags.append((step, dev_metrics['skipped']))
    self.inflight = self.inflight[-MAX_INFLIGHT:] + [dev_metrics]
    bounded(self.inflight)
    self.publish_pending()                # step N-1's numbers are fetched while step N runs
    if step == run.start_step + 1:        # keep compile time out of the throughput figures
      jax.block_until_ready(dev_metrics)
      self.last_t, self.last_step = time.perf_counter(), step
    if self.spike is None and cfg.checkpoint_every and (step % cfg.checkpoint_every == 0
                                                         or step == self.end):
      self.save(step)                     # before an evaluation: it overlaps the write
    every = run.config.eval.every    # (eval.every: one spelling across the stages)
    is_eval = run.evaluate and every and (step % every == 0 or step == cfg.steps)
    if is_eval:
      row = self.measure(step, dev_metrics)
      row.update(run.evaluate(self.state.params))
      self.publish(step, row)
      self.bar.write(f"step {step}: loss {row['loss']:.4f}, val_loss {row['val_loss']:.4f}")
      self.last_t = time.perf_counter()   # don't charge evaluation to training throughput
    elif step % cfg.log_every == 0 or step == self.end:
      self.pending = (step, dev_metrics)

  def steps(self) -> None:
    """Steps up to `end` (each saving its checkpoint), a spike restart or a stop at each
    boundary."""
    while self.step < self.end:
      self.advance()
      if self.spike is not None:
        self.restart_before_spike()
        continue
      if self.stop.should_stop(self.step):
        break
    self.publish_pending()
    self.count_skips(self.step)

  @property
  def preempted(self) -> bool:
    return self.stop.signum is not None and self.step < self.end

  def after_steps(self) -> None:
    if self.spike is not None:           # in the very last logged row: reported, not restarted
      self.bar.write(f'loss spike at step {self.spike} (the last logged step); not restarted')
    if self.preempted and self.saved != self.step:
      self.save(self.step)               # preempted: keep the step reached

  def close(self) -> None:
    """Also on errors: finish async writes (rows held for a save that failed stay out of the
    log), flush logs."""
    self.bar.close()
    try:
      self.log(None, None, final=True)
    finally:
      self.writer.close()

  def report(self) -> Any:
    """The loss plot; Preempted if a signal stopped the run early, else the final state."""
    workdir = self.run.workdir
    if jax.process_index() == 0 and self.writer.path.exists():
      runlog.plot_losses(self.writer.path, paths.path(workdir) / 'loss.png',
                         title=paths.absolute(workdir).name)
    if self.preempted:
      print(f'{signal.Signals(self.stop.signum).name} received: saved a checkpoint at step '
            f'{self.step}; rerun the same command to continue.', flush=True)
      raise Preempted(self.step, self.stop.signum)
    return self.state


def train(run: Run) -> Any:
  loop = _Loop(run)
  try:
    with loop.stop:
      loop.steps()
    loop.after_steps()
  finally:
    loop.close()
  return loop.report()


def eval_fn(eval_step: Callable, batches: list, to_global: Callable) -> Callable[[Any], dict]:
  """Mean validation loss over fixed batches (token-weighted, so padding rows don't count)."""
  global_batches = [to_global(b) for b in batches]

  def evaluate(params) -> dict:
    totals = []
    for b in global_batches:
      totals.append(eval_step(params, b))
      bounded(totals)
    loss = sum(float(t[0]) for t in totals)
    weight = sum(float(t[1]) for t in totals)
    out = {'val_loss': loss / max(weight, 1e-9), 'val_tokens': weight}
    for k in totals[0][2]:
      out[f'val_{k}'] = sum(float(t[2][k]) for t in totals) / max(weight, 1e-9)
    return out
  return evaluate


def combine_evals(evals: dict[str, Callable[[Any], dict]]) -> Callable[[Any], dict]:
  """Several validation sets: each one's metrics suffixed with its name, and token-weighted
  means over all of them under the plain names."""
  def evaluate(params) -> dict:
    parts = {name: fn(params) for name, fn in evals.items()}
    total = sum(p['val_tokens'] for p in parts.values())
    out = {k: sum(p[k] * p['val_tokens'] for p in parts.values()) / max(total, 1e-9)
           for k in next(iter(parts.values())) if k != 'val_tokens'}
    out['val_tokens'] = total
    for name, p in parts.items():
      out.update({f'{k}_{name}': v for k, v in p.items() if k != 'val_tokens'})
    return out
  return evaluate


def with_frozen(step_fn, frozen, state, batch):
  return step_fn(state, batch, frozen)
