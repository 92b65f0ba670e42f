"""The training loop every driver shares: resume-or-init, steps, logging, eval, checkpoints.

A driver (pretrain, reward, ppo, ...) builds a `Run` with its loss-specific pieces and
calls `train(run)`. Everything that can fail on user input has failed before this
point; the first compile happens inside the loop.
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any, Callable, Iterator

import jax
import numpy as np
from ml_collections import ConfigDict
from tqdm import tqdm

from lm import checkpoint as ckpt_lib
from lm import mfu as mfu_lib
from lm.config import ConfigError
from lm import sharding, train as train_lib
from experiments import metrics as metrics_lib


def check_batch(config: ConfigDict, mesh) -> None:
  """The global batch must split evenly into microbatches and over the batch mesh axes."""
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
  from jax.experimental import multihost_utils
  out = fn() if jax.process_index() == 0 else None
  multihost_utils.sync_global_devices(name)
  return out if jax.process_index() == 0 else fn()


def write_config(config: ConfigDict, workdir: str, extra: dict | None = None) -> None:
  if jax.process_index() == 0:
    with open(os.path.join(workdir, 'config.json'), 'w') as f:
      json.dump({**config.to_dict(), **(extra or {})}, f, indent=2, default=str)


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


def restore_or_init(checkpointer, init_state: Callable, abstract, shardings):
  """(state, start_step, data_state): the latest checkpoint, or a fresh sharded init."""
  target = train_lib.abstract_with_shardings(abstract, shardings)
  found = checkpointer.restore_or_none(target)
  if found is None:
    return init_state(), 0, None
  step, state, data_state, _ = found
  return state, step, data_state


def train(run: Run) -> Any:
  cfg = run.config.train
  writer = metrics_lib.MetricsWriter(run.workdir, resume_step=run.start_step or None)
  peak = mfu_lib.peak_flops()
  n_dev = jax.device_count()
  end = cfg.steps if not cfg.stop_after else min(cfg.steps, run.start_step + cfg.stop_after)
  state, step = run.state, run.start_step
  pending = None                       # (step, device metrics) published one step late
  last_t, last_step = time.perf_counter(), step
  bar = tqdm(total=cfg.steps, initial=step, desc='train', unit='step', dynamic_ncols=True,
             disable=jax.process_index() != 0)

  def measure(at_step, dev_metrics) -> dict:
    """Host copy of a step's metrics plus throughput since the previous reading."""
    nonlocal last_t, last_step
    m = {k: float(v) for k, v in jax.device_get(dev_metrics).items()}
    now = time.perf_counter()
    tps = (at_step - last_step) * run.tokens_per_step / (now - last_t) if at_step > last_step else None
    last_t, last_step = now, at_step
    m['tokens_per_sec'] = tps
    m['mfu'] = None if tps is None else mfu_lib.mfu(tps, run.flops_per_token, n_dev, peak)
    return m

  def publish(row_step, row):
    writer.write(row_step, row)
    postfix = {'loss': f"{row['loss']:.4f}"}
    if row.get('tokens_per_sec'):
      postfix['tok/s'] = f"{row['tokens_per_sec']:,.0f}"
      postfix['mfu'] = 'n/a' if row['mfu'] is None else f"{100 * row['mfu']:.1f}%"
    bar.set_postfix(postfix)

  while step < end:
    batch = run.to_global(next(run.batches))
    state, dev_metrics = run.step_fn(state, batch)
    step += 1
    bar.update(1)
    if pending is not None:            # step N-1's numbers are fetched while step N runs
      publish(pending[0], measure(*pending))
      pending = None
    if step == run.start_step + 1:     # keep compile time out of the throughput figures
      jax.block_until_ready(dev_metrics)
      last_t, last_step = time.perf_counter(), step
    is_eval = run.evaluate and cfg.eval_every and (step % cfg.eval_every == 0 or step == cfg.steps)
    if is_eval:
      row = measure(step, dev_metrics)
      row.update(run.evaluate(state.params))
      publish(step, row)
      bar.write(f"step {step}: loss {row['loss']:.4f}, val_loss {row['val_loss']:.4f}")
      last_t = time.perf_counter()     # don't charge evaluation to training throughput
    elif step % cfg.log_every == 0 or step == end:
      pending = (step, dev_metrics)
    if cfg.checkpoint_every and (step % cfg.checkpoint_every == 0 or step == end):
      run.checkpointer.save(step, state, run.batches.state(), {'step': step})
  if pending is not None:
    publish(pending[0], measure(*pending))
  bar.close()
  run.checkpointer.wait()
  writer.close()
  if jax.process_index() == 0 and os.path.exists(writer.path):
    metrics_lib.plot_losses(writer.path, os.path.join(run.workdir, 'loss.png'),
                            title=os.path.basename(os.path.abspath(run.workdir)))
  return state


def eval_fn(eval_step: Callable, batches: list, to_global: Callable) -> Callable[[Any], dict]:
  """Mean validation loss over fixed batches (token-weighted, so padding rows don't count)."""
  global_batches = [to_global(b) for b in batches]

  def evaluate(params) -> dict:
    totals = [eval_step(params, b) for b in global_batches]
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
