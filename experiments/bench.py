"""Steady-state train-step throughput: tokens/s, ms/step and MFU per model, as a table.

Each model trains on random tokens (throughput does not depend on the data) with the
real optimizer, shardings and jitted step; compile and warm-up steps are excluded.

Two small studies follow (config.unroll_study, config.checkpoint_stall):
  - the layer scan unrolled fully vs rolled (scan_unroll = n_layers vs 1): compile s and
    ms/step, the trade-off behind model.scan_unroll=0's choice;
  - how long the training thread blocks in `Checkpointer.save` per checkpoint of the train
    state, with orbax's asynchronous save vs a synchronous one (and the full write time).

XLA:CPU library flags (XLA_FLAGS, set before the process starts; measured at 315cef0, jax
0.10.2, 2-core AMD EPYC with AVX-512, shared and loaded): none is worth a default.
  - xla_cpu_use_onednn, xla_cpu_experimental_onednn_custom_call, ..._onednn_fusion_type,
    xla_cpu_use_xnnpack (already true), ..._xnn_fusion_type, ..._xnn_graph_fusion_mode=GREEDY
    are accepted but leave the compiled train step byte-identical (same HLO hash): no-ops here.
  - Only xla_cpu_experimental_ynn_fusion_type changes it. By default YNNPACK already takes
    every dot whose LHS contracts its last dim (forward and input-gradient dots, plus some
    elementwise ops); the weight-gradient dots (LHS contracting dim 0) stay plain Eigen dots
    under every flag. '=dot' narrows YNN to dots, '=' turns YNN off: losses equal to 1e-6,
    tokens/s unchanged within noise (baby, best of 2 per run: ours 7.9k/8.0k default,
    7.0k/7.8k '=dot', 7.8k/8.3k off; d512 side by side with nanoGPT in one quiet window:
    0.82x default, 0.84x YNN off).
  So the remaining gap to torch is in the transposed (weight-gradient) dots, not a flag.
"""
from __future__ import annotations

import functools
import json
import os
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from ml_collections import ConfigDict

from lm import checkpoint as ckpt_lib
from experiments.stages import bench_nanogpt, bench_profile, stage, trainer
from experiments.configs import base
from lm import mfu as mfu_lib
from lm import model, objectives, sharding, train as train_lib
from lm.config import ConfigError, ModelConfig


def bench_one(name: str, spec: ConfigDict, config: ConfigDict, scan_unroll: int | None = None,
              keep_state: bool = False, profile_steps: int = 0) -> dict:
  m = base.model().to_dict()
  m.update(spec.model.to_dict())
  if scan_unroll is not None:
    m['scan_unroll'] = scan_unroll
  cfg = ModelConfig.from_dict(m)
  b, t = spec.batch_size, spec.seq_len
  mesh = sharding.make_mesh(config.mesh.to_dict())
  run_cfg = ConfigDict({'train': {'batch_size': b, 'grad_accum': 1}})
  trainer.check_batch(run_cfg, mesh)
  setup = stage.build(ConfigDict({'seed': 0, 'optim': config.optim}), None, mesh,
                      axes=model.logical_axes(cfg), init_params=functools.partial(model.init, cfg),
                      total_steps=1000)
  state, shardings = setup.state, setup.shardings
  spec_b = {k: jax.ShapeDtypeStruct((b, t), d) for k, d in
            (('inputs', jnp.int32), ('targets', jnp.int32), ('weights', jnp.float32))}
  bsh = train_lib.batch_shardings(mesh, spec_b)
  step = train_lib.make_train_step(functools.partial(objectives.next_token_loss, cfg=cfg), setup.tx,
                                   mesh, shardings, bsh, schedule=setup.schedule)
  rng = np.random.default_rng(0)
  toks = rng.integers(0, cfg.vocab_size, (b, t + 1)).astype(np.int32)
  batch = {'inputs': toks[:, :-1], 'targets': toks[:, 1:], 'weights': np.ones((b, t), np.float32)}
  batch = {k: jax.device_put(v, bsh[k]) for k, v in batch.items()}
  t0 = time.perf_counter()
  state, metrics = step(state, batch)
  jax.block_until_ready(metrics)
  compile_s = time.perf_counter() - t0
  for _ in range(config.warmup_steps):
    state, metrics = step(state, batch)
  jax.block_until_ready(metrics)
  times = []
  for _ in range(config.repeats):  # best of several timed windows: robust to noisy neighbours
    t0 = time.perf_counter()
    inflight = []
    for _ in range(spec.steps):
      state, metrics = step(state, batch)
      inflight = inflight[-trainer.MAX_INFLIGHT:] + [metrics]
      trainer.bounded(inflight)      # as the trainer: XLA:CPU meshes deadlock far ahead
    jax.block_until_ready(metrics)
    times.append((time.perf_counter() - t0) / spec.steps)
  dt = min(times)
  profile = None
  if profile_steps:   # the same steps again under the profiler, which records each op
    profile, state = bench_profile.xla_breakdown(step, state, batch, profile_steps)
  tps = b * t / dt
  util = mfu_lib.mfu(tps, cfg.flops_per_token(t), jax.device_count(), mfu_lib.peak_flops())
  return {'model': name, 'params': cfg.num_params(), 'd_model': cfg.d_model, 'layers': cfg.n_layers,
          'batch': b, 'seq_len': t, 'ms_per_step': 1000 * dt, 'median_ms_per_step': 1000 * float(np.median(times)),
          'tokens_per_sec': tps, 'mfu': util, 'compile_s': compile_s,
          'flops_per_token': cfg.flops_per_token(t), 'scan_unroll': cfg.scan_unroll,
          **({'profile_ms': profile} if profile else {}),
          **({'state': state} if keep_state else {})}


def checkpoint_stall(state, repeats: int) -> dict:
  """ms the calling thread blocks in save() per checkpoint (median of `repeats`), and ms
  until the checkpoint is on disk, with async (orbax's background write) and sync saves."""
  out = {}
  for mode in ('async', 'sync'):
    with tempfile.TemporaryDirectory() as d:
      ck = ckpt_lib.Checkpointer(d, max_to_keep=2, async_save=mode == 'async')
      block, total = [], []
      for i in range(repeats + 1):   # the first save also sets up orbax: not counted
        t0 = time.perf_counter()
        ck.save(i, state, {'batches_drawn': i}, {'step': i})
        t1 = time.perf_counter()
        ck.wait()
        if i:
          block.append(1000 * (t1 - t0))
          total.append(1000 * (time.perf_counter() - t0))
      ck.close()
    out[f'save_block_ms_{mode}'] = float(np.median(block))
    out[f'save_total_ms_{mode}'] = float(np.median(total))
  return out


def side_by_side(config: ConfigDict, rows: list[dict]) -> tuple[list[dict], list[dict]]:
  """nanoGPT's step at each bench model's sizes (config.nanogpt_dir: a nanoGPT checkout; ''
  skips it), ours re-timed in alternation with it (config.rounds), and with config.profile
  where each step's time goes. Single-process, single-device comparisons only."""
  nano_dir, rounds = config.get('nanogpt_dir', ''), config.get('rounds', 2)
  profile = config.get('profile', False)
  if not nano_dir:
    print('config.nanogpt_dir is empty: the nanoGPT side-by-side is skipped '
          '(git clone https://github.com/karpathy/nanoGPT and pass its path).')
  fastest = lambda a, b: b if b['ms_per_step'] < a['ms_per_step'] else a
  nano, breakdown = [], []
  for (name, spec), r in zip(config.models.items(), rows):
    if nano_dir:
      m = {**base.model().to_dict(), **spec.model.to_dict()}
      run_nano = functools.partial(bench_nanogpt.bench_nanogpt, nano_dir, m, spec.batch_size, spec.seq_len,
                                   spec.steps, config.warmup_steps, config.repeats, config.optim)
      first = run_nano(profile_steps=spec.steps if profile else 0)
      ours, theirs = r, first
      for _ in range(rounds - 1):   # alternate: a noisy neighbour hits both sides alike
        ours = fastest(ours, bench_one(name, spec, config))
        theirs = fastest(theirs, run_nano())
      nano.append({'model': name, 'ours_ms_per_step': ours['ms_per_step'],
                   'ours_tokens_per_sec': ours['tokens_per_sec'],
                   'nanogpt_ms_per_step': theirs['ms_per_step'],
                   'nanogpt_tokens_per_sec': theirs['tokens_per_sec'],
                   'speed_ratio': ours['tokens_per_sec'] / theirs['tokens_per_sec'],
                   'nanogpt_params': theirs['params'], 'torch_threads': theirs['torch_threads']})
      if profile:
        breakdown.append({'model': name, 'framework': 'nanoGPT', 'ms': first['profile_ms'],
                          'step_ms': theirs['ms_per_step']})
    if profile:
      breakdown.append({'model': name, 'framework': 'ours', 'ms': r['profile_ms'], 'step_ms': r['ms_per_step']})
  return nano, breakdown


def format_nano(rows: list[dict]) -> str:
  head = f"{'model':<18}{'ours tok/s':>12}{'nanoGPT tok/s':>15}{'ours / nanoGPT':>16}"
  lines = [head, '-' * len(head)]
  for r in rows:
    lines.append(f"{r['model']:<18}{r['ours_tokens_per_sec']:>12,.0f}{r['nanogpt_tokens_per_sec']:>15,.0f}"
                 f"{r['speed_ratio']:>15.2f}x")
  return '\n'.join(lines)


def format_table(rows: list[dict]) -> str:
  head = f"{'model':<18}{'params':>12}{'batch x seq':>13}{'ms/step':>10}{'tokens/s':>12}{'MFU':>8}{'compile s':>11}"
  lines = [head, '-' * len(head)]
  for r in rows:
    mfu = 'n/a' if r['mfu'] is None else f"{100 * r['mfu']:.1f}%"
    lines.append(f"{r['model']:<18}{r['params']:>12,}{r['batch']:>6} x {r['seq_len']:<4}"
                 f"{r['ms_per_step']:>10.1f}{r['tokens_per_sec']:>12,.0f}{mfu:>8}{r['compile_s']:>11.1f}")
  return '\n'.join(lines)


def format_unroll(rows: list[dict]) -> str:
  head = f"{'model':<18}{'layers':>7}{'compile s (all / 1)':>22}{'ms/step (all / 1)':>22}"
  lines = [head, '-' * len(head)]
  for r in rows:
    lines.append(f"{r['model']:<18}{r['layers']:>7}{r['compile_s_all']:>13.1f} / {r['compile_s_1']:<6.1f}"
                 f"{r['ms_per_step_all']:>13.1f} / {r['ms_per_step_1']:<6.1f}")
  return '\n'.join(lines)


def format_stall(rows: list[dict]) -> str:
  head = (f"{'model':<18}{'params':>12}{'save blocks ms (async / sync)':>32}"
          f"{'on disk ms (async / sync)':>28}")
  lines = [head, '-' * len(head)]
  for r in rows:
    lines.append(f"{r['model']:<18}{r['params']:>12,}"
                 f"{r['save_block_ms_async']:>21.1f} / {r['save_block_ms_sync']:<8.1f}"
                 f"{r['save_total_ms_async']:>17.1f} / {r['save_total_ms_sync']:<8.1f}")
  return '\n'.join(lines)


def run(config: ConfigDict, workdir: str):
  nano_dir = config.get('nanogpt_dir', '')
  if nano_dir and not os.path.isfile(os.path.join(nano_dir, 'model.py')):
    raise ConfigError(f'config.nanogpt_dir={nano_dir!r} has no model.py; give the path of a nanoGPT '
                      'checkout (git clone https://github.com/karpathy/nanoGPT) or "" to skip it.')
  os.makedirs(workdir, exist_ok=True)
  device = jax.devices()[0]
  peak = mfu_lib.peak_flops()
  print(f'devices: {jax.device_count()} x {device.device_kind}; peak per device: '
        + ('n/a' if peak is None else f'{peak / 1e9:,.0f} GFLOP/s'
           + (' (measured fp32 matmul)' if device.platform == 'cpu' else '')))
  rows = [bench_one(name, spec, config, keep_state=config.get('checkpoint_stall', False),
                    profile_steps=spec.steps if config.get('profile', False) else 0)
          for name, spec in config.models.items()]
  nano, breakdown = side_by_side(config, rows)
  table = format_table(rows)
  if nano:
    table += '\n\nnanoGPT (PyTorch eager, same machine, same run; best window of each, alternated):\n' + format_nano(nano)
  if breakdown:
    table += ('\n\nwhere the step time goes (ms per step, op times summed over threads):\n'
              + bench_profile.format_breakdown(breakdown))
  unroll, stall = [], []
  if config.get('unroll_study', False):
    for (name, spec), r in zip(config.models.items(), rows):
      n = r['layers']   # scan_unroll = n_layers unrolls every layer; 1 keeps the loop rolled
      # model.scan_unroll=0 resolves as lm/model.hidden_states does: all layers on CPU up to 8
      auto = n if n <= 8 and jax.default_backend() == 'cpu' else 1
      done = min(r['scan_unroll'] or auto, n)
      got = {u: r if done == u else bench_one(name, spec, config, scan_unroll=u) for u in (n, 1)}
      unroll.append({'model': name, 'layers': n, 'default_scan_unroll': r['scan_unroll'],
                     'compile_s_all': got[n]['compile_s'], 'compile_s_1': got[1]['compile_s'],
                     'ms_per_step_all': got[n]['ms_per_step'], 'ms_per_step_1': got[1]['ms_per_step']})
    table += '\n\nlayer scan unrolled fully vs rolled (model.scan_unroll = n_layers vs 1):\n' + format_unroll(unroll)
  if config.get('checkpoint_stall', False):
    for r in rows:
      stall.append({'model': r['model'], 'params': r['params'],
                    **checkpoint_stall(r['state'], config.get('checkpoint_repeats', 3))})
    table += ('\n\ntraining thread blocked per checkpoint save (median), async vs sync orbax:\n'
              + format_stall(stall))
  for r in rows:
    r.pop('state', None)
  print(table)
  if jax.process_index() == 0:
    with open(os.path.join(workdir, 'bench.json'), 'w') as f:
      json.dump({'device': device.device_kind, 'n_devices': jax.device_count(),
                 'peak_flops_per_device': peak, 'rows': rows, 'unroll': unroll,
                 'checkpoint_stall': stall, 'nanogpt': nano, 'profile': breakdown}, f, indent=2)
    with open(os.path.join(workdir, 'bench.txt'), 'w') as f:
      f.write(table + '\n')
  return rows
