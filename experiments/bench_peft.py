"""Full fine-tuning vs parameter-efficient methods on one model, side by side in one run:
trainable params, optimizer-state bytes, the compiled step's peak device bytes
(`memory_analysis()`), ms/step and tokens/s. Prints a table and writes bench.json."""
from __future__ import annotations

import functools
import json
import os
import time

import jax
import numpy as np
from ml_collections import ConfigDict

from experiments.stages import stage
from experiments.configs import base
from lm import model, objectives, peft, sharding, train as train_lib
from lm.config import ModelConfig


def _bytes(tree) -> int:
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree) if hasattr(x, 'dtype'))


def peak_bytes(compiled) -> int | None:
  """Arguments + outputs + temporaries - donated aliases: what the step holds at its peak."""
  m = compiled.memory_analysis()
  if m is None:
    return None
  return (m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
          - m.alias_size_in_bytes)


def bench_method(method: str, cfg: ModelConfig, base_params, config: ConfigDict, mesh) -> dict:
  pcfg = peft.PeftConfig.from_dict({**config.peft.to_dict(), 'method': method})
  b, t = config.batch_size, config.seq_len
  if method == 'none':
    axes, init, frozen, frozen_sh = model.logical_axes(cfg), (lambda k: base_params), None, None
  else:
    axes = peft.logical_axes(cfg, pcfg)
    init = functools.partial(peft.init, cfg, pcfg, base_params=base_params)
    frozen, frozen_sh = base_params, jax.tree.map(lambda x: x.sharding, base_params)
  setup = stage.build(ConfigDict({'seed': 0, 'optim': config.optim}), None, mesh, axes=axes,
                      init_params=init, total_steps=1000)

  def loss_fn(params, batch, rng, frozen=None):
    full = params if frozen is None else peft.combine(frozen, params, cfg, pcfg)
    return objectives.next_token_loss(full, batch, rng, cfg=cfg)

  rng = np.random.default_rng(0)
  toks = rng.integers(0, cfg.vocab_size, (b, t + 1)).astype(np.int32)
  batch = {'inputs': toks[:, :-1], 'targets': toks[:, 1:], 'weights': np.ones((b, t), np.float32)}
  bsh = train_lib.batch_shardings(mesh, batch)
  batch = jax.device_put(batch, bsh)
  step = train_lib.make_train_step(loss_fn, setup.tx, mesh, setup.shardings, bsh, frozen_sh=frozen_sh)
  args = (batch,) if frozen is None else (batch, frozen)
  state = setup.state
  t0 = time.perf_counter()
  compiled = step.lower(state, *args).compile()
  compile_s = time.perf_counter() - t0
  peak = peak_bytes(compiled)
  opt_bytes = _bytes(state.opt_state)
  trainable = sum(x.size for x in jax.tree.leaves(state.params))
  for _ in range(config.warmup_steps):
    state, m = step(state, *args)
  jax.block_until_ready(state)
  times = []
  for _ in range(config.repeats):   # best of several windows: robust to noisy neighbours
    t0 = time.perf_counter()
    for _ in range(config.steps):
      state, m = step(state, *args)
    jax.block_until_ready(m)
    times.append((time.perf_counter() - t0) / config.steps)
  dt = min(times)
  return {'method': method, 'trainable_params': int(trainable), 'optimizer_bytes': int(opt_bytes),
          'peak_bytes': peak, 'ms_per_step': 1000 * dt, 'tokens_per_sec': b * t / dt,
          'compile_s': compile_s}


def format_table(rows: list[dict]) -> str:
  full = next(r for r in rows if r['method'] == 'none')
  head = (f"{'method':<10}{'trainable':>13}{'opt state':>12}{'vs full':>9}{'peak MB':>10}"
          f"{'ms/step':>10}{'vs full':>9}{'tokens/s':>11}")
  lines = [head, '-' * len(head)]
  for r in rows:
    peak = 'n/a' if r['peak_bytes'] is None else f"{r['peak_bytes'] / 2**20:.1f}"
    lines.append(f"{r['method']:<10}{r['trainable_params']:>13,}{r['optimizer_bytes'] / 2**20:>10.2f}MB"
                 f"{100 * r['optimizer_bytes'] / full['optimizer_bytes']:>8.2f}%{peak:>10}"
                 f"{r['ms_per_step']:>10.1f}{r['ms_per_step'] / full['ms_per_step']:>8.2f}x"
                 f"{r['tokens_per_sec']:>11,.0f}")
  return '\n'.join(lines)


def run(config: ConfigDict, workdir: str):
  os.makedirs(workdir, exist_ok=True)
  m = base.model().to_dict()
  m.update(config.model.to_dict())
  cfg = ModelConfig.from_dict(m)
  mesh = sharding.make_mesh(config.mesh.to_dict())
  params = jax.jit(functools.partial(model.init, cfg),
                   out_shardings=sharding.tree_shardings(
                       model.logical_axes(cfg),
                       jax.eval_shape(functools.partial(model.init, cfg), jax.random.key(0)), mesh)
                   )(jax.random.key(0))
  print(f'model: d_model {cfg.d_model}, {cfg.n_layers} layers, {cfg.num_params():,} params; '
        f'batch {config.batch_size} x {config.seq_len}; {jax.device_count()} x {jax.devices()[0].device_kind}')
  rows = []
  for method in config.methods.split(','):
    rows.append(bench_method(method, cfg, params, config, mesh))
    print(f"  {method}: {rows[-1]['ms_per_step']:.1f} ms/step")
  table = format_table(rows)
  print(table)
  if jax.process_index() == 0:
    with open(os.path.join(workdir, 'bench.json'), 'w') as f:
      json.dump({'model': cfg.to_dict() if hasattr(cfg, 'to_dict') else m, 'rows': rows}, f, indent=2,
                default=str)
    with open(os.path.join(workdir, 'bench.txt'), 'w') as f:
      f.write(table + '\n')
  return rows
