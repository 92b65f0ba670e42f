"""Compile-only planning (MaxText's train_compile.py): will this model, mesh and batch fit?

  python -m experiments.run --config=experiments/configs/aot.py --workdir=/tmp/aot \
      --config.model.preset=llama2-70b --config.mesh.fsdp=64 --config.target=tpu-v5p

The real train step (optimizer, shardings, loss, grad accumulation) is lowered and
compiled on abstract inputs (jax.eval_shape + shardings) over a mesh of fake CPU
devices, as many as config.mesh names: no parameter is ever allocated, so a 70B plan
runs on a laptop. A process whose JAX backend already started with too few devices
re-runs the plan in a child process with --xla_force_host_platform_device_count=N.

WORKDIR/aot.json holds, per device: params and optimizer bytes (from shapes and
shardings), the compiled program's argument / output / temporary bytes
(`memory_analysis()`), FLOPs per step (XLA's `cost_analysis()` and the analytic
ModelConfig.flops_per_token), and whether the peak fits the target's HBM; when it does
not, remat / grad-accumulation / mesh suggestions to try next.

Caveats: XLA's CPU compiler plans the buffers, so temporaries are an estimate of what
the TPU/GPU compiler would need (layouts, fusion and collectives differ); XLA's cost
analysis counts a rolled scan body once, so its FLOPs are per layer-iteration, not per
step (the analytic figure is the one to use).
"""
from __future__ import annotations

import functools
import json
import math
import os
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
from ml_collections import ConfigDict

from experiments.stages import trainer
from lm import mfu as mfu_lib
from lm import model, objectives, presets, sharding, train as train_lib
from lm.config import ConfigError, ModelConfig

GIB = 2 ** 30
# target -> (HBM GiB per device, key of lm.mfu.PEAK_FLOPS). Nominal capacities.
TARGETS = {
    'tpu-v4': (32, 'tpu v4'),
    'tpu-v5e': (16, 'tpu v5e'),
    'tpu-v5p': (95, 'tpu v5p'),
    'tpu-v6e': (32, 'tpu v6'),
    'a100-40gb': (40, 'a100'),
    'a100-80gb': (80, 'a100'),
    'h100': (80, 'h100'),
    'h200': (141, 'h200'),
}


# Config -> model, devices, target ---------------------------------------------------------
def model_config(config: ConfigDict) -> ModelConfig:
  """The preset, with every model field that differs from ModelConfig's default on top."""
  m = config.model.to_dict()
  name = m.pop('preset', '')
  defaults = ModelConfig().__dict__
  if not name:
    return ModelConfig.from_dict({k: v for k, v in m.items() if k != 'vocab_size' or v})
  overrides = {k: v for k, v in m.items() if v != defaults.get(k) and not (k == 'vocab_size' and not v)}
  return presets.preset(name, **overrides)


def n_devices(config: ConfigDict) -> int:
  sizes = config.mesh.to_dict()
  if any(s < 1 for s in sizes.values()):
    raise ConfigError(f'config.mesh={sizes}: give every axis an explicit size (no -1); their '
                      'product is the number of devices the plan is for.')
  return math.prod(sizes.values())


def target_hbm(config: ConfigDict) -> tuple[float, float | None]:
  """(HBM bytes per device, peak FLOP/s or None)."""
  if config.target not in TARGETS and config.hbm_gib <= 0:
    raise ConfigError(f'config.target={config.target!r} is unknown; choose one of {sorted(TARGETS)} '
                      'or give its memory per device with --config.hbm_gib=GIB.')
  gib, peak_key = TARGETS.get(config.target, (0, None))
  return (config.hbm_gib or gib) * GIB, mfu_lib.PEAK_FLOPS.get(peak_key)


def _cpu_devices(n: int):
  """n CPU devices in this process, or None when the backend already started with fewer."""
  from jax._src import xla_bridge
  if not xla_bridge.backends_are_initialized():
    jax.config.update('jax_platforms', 'cpu')   # plan on fake devices even on a GPU host
    jax.config.update('jax_num_cpu_devices', n)
  try:
    devices = jax.devices('cpu')
  except RuntimeError:
    return None
  return devices[:n] if len(devices) >= n else None


# The plan ---------------------------------------------------------------------------------
def per_device_bytes(abstract, shardings) -> int:
  """Bytes one device holds of a tree, from each leaf's shard shape (scalars replicated)."""
  total = 0
  for a, s in zip(jax.tree.leaves(abstract), jax.tree.leaves(shardings)):
    total += math.prod(s.shard_shape(a.shape)) * jnp.dtype(a.dtype).itemsize
  return total


def _cost(compiled) -> dict:
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):   # older JAX: one dict per program
    cost = cost[0] if cost else {}
  return cost or {}


def plan(config: ConfigDict, devices) -> dict:
  cfg = model_config(config)
  t = config.train.seq_len or cfg.max_seq_len
  if t > cfg.max_seq_len:
    raise ConfigError(f'train.seq_len={t} exceeds model.max_seq_len={cfg.max_seq_len}; raise '
                      'model.max_seq_len (RoPE models have no position table to grow).')
  mesh = sharding.make_mesh(config.mesh.to_dict(), devices)
  k = config.train.grad_accum
  b = config.train.batch_size or sharding.batch_size_divisor(mesh) * k
  trainer.check_batch(ConfigDict({'train': {'batch_size': b, 'grad_accum': k}}), mesh)
  axes = model.logical_axes(cfg)
  tx, schedule = train_lib.make_optimizer(config.optim.to_dict(), axes, 1000)
  key = jax.eval_shape(lambda: jax.random.key(config.seed))   # abstract too: nothing on device
  _, abstract, shardings = train_lib.state_shardings(
      functools.partial(model.init, cfg), axes, tx, mesh, key)
  batch = {n: jax.ShapeDtypeStruct((b, t), d) for n, d in
           (('inputs', jnp.int32), ('targets', jnp.int32), ('weights', jnp.float32))}
  batch_sh = train_lib.batch_shardings(mesh, batch)
  step = train_lib.make_train_step(functools.partial(objectives.next_token_loss, cfg=cfg), tx, mesh,
                                   shardings, batch_sh, grad_accum=k, schedule=schedule)
  t0 = time.perf_counter()
  lowered = step.lower(train_lib.abstract_with_shardings(abstract, shardings),
                       train_lib.abstract_with_shardings(batch, batch_sh))
  lower_s = time.perf_counter() - t0
  compiled = lowered.compile()
  compile_s = time.perf_counter() - t0 - lower_s

  mem = compiled.memory_analysis()
  arg, out = mem.argument_size_in_bytes, mem.output_size_in_bytes
  alias, temp = mem.alias_size_in_bytes, mem.temp_size_in_bytes
  peak = arg + out - alias + temp   # donated state: outputs reuse the argument buffers
  flops_step = cfg.flops_per_token(t) * b * t
  result = {
      'model': {'preset': config.model.preset, 'params': cfg.num_params(), 'n_layers': cfg.n_layers,
                'd_model': cfg.d_model, 'dtype': cfg.dtype, 'param_dtype': cfg.param_dtype,
                'remat': cfg.remat, 'scan_unroll': cfg.scan_unroll},
      'mesh': {a: int(s) for a, s in mesh.shape.items()}, 'n_devices': len(devices),
      'batch_size': b, 'seq_len': t, 'grad_accum': k, 'tokens_per_step': b * t,
      'per_device_bytes': {
          'params': per_device_bytes(abstract.params, shardings.params),
          'opt_state': per_device_bytes(abstract.opt_state, shardings.opt_state),
          'batch': per_device_bytes(batch, batch_sh),
          'arguments': arg, 'outputs': out, 'aliased': alias, 'temporaries': temp,
          'generated_code': mem.generated_code_size_in_bytes, 'peak': peak},
      'flops': {'analytic_per_step': flops_step, 'analytic_per_device': flops_step / len(devices),
                'xla_per_device': float(_cost(compiled).get('flops', -1)),
                'flops_per_token': cfg.flops_per_token(t)},
      'lower_s': lower_s, 'compile_s': compile_s, 'compiled_on': devices[0].device_kind,
  }
  return judge(config, cfg, result)


def judge(config: ConfigDict, cfg: ModelConfig, result: dict) -> dict:
  """Add the target, the fit verdict and (if it does not fit) suggestions to a plan."""
  hbm, peak_flops = target_hbm(config)
  usable = config.usable_fraction * hbm
  peak = result['per_device_bytes']['peak']
  per_device = result['flops']['analytic_per_device']
  r = dict(result, fits=peak <= usable, headroom_bytes=usable - peak, target={
      'name': config.target, 'hbm_bytes': hbm, 'usable_fraction': config.usable_fraction,
      'peak_flops': peak_flops, 'ideal_step_s': per_device / peak_flops if peak_flops else None})
  r['suggestions'] = [] if r['fits'] else suggestions(cfg, r, usable)
  return r


def suggestions(cfg: ModelConfig, r: dict, usable: float) -> list[str]:
  """What to try when the step does not fit (estimates: rerun the plan to check)."""
  by = r['per_device_bytes']
  state = by['params'] + by['opt_state']
  grads = by['params'] * 4 // jnp.dtype(cfg.param_dtype).itemsize   # f32 gradient accumulator
  out = []
  if state + grads > usable:   # no activation trick helps: split the state over more devices
    need = 2 ** math.ceil(math.log2((state + grads) * r['n_devices'] / usable))   # sizes divide
    out.append(f'params + optimizer state + gradients alone need {_gib(state + grads).strip()} per '
               f'device: spread them over >= {need} devices (mesh.fsdp, mesh.tensor) or use a '
               'bigger accelerator.')
    return out
  if cfg.remat == 'none':
    out.append('--config.model.remat=full (recompute each layer in the backward pass, keeping only '
               'its input)')
  elif cfg.remat != 'full':
    out.append(f'--config.model.remat=full (saves less than remat={cfg.remat!r})')
  # Activations scale with the microbatch; state and gradients do not.
  act = max(by['temporaries'] - grads, 1)
  b, k = r['batch_size'], r['grad_accum']
  shards = math.prod(r['mesh'][a] for a in sharding.BATCH_AXES)
  for more in (2, 4, 8, 16, 32, 64):
    if b % (k * more) or (b // (k * more)) % shards:   # microbatch must still split over the mesh
      continue
    if by['arguments'] + grads + act / more <= usable:
      out.append(f'--config.train.grad_accum={k * more} (microbatch {b // (k * more)} sequences; '
                 'activations shrink with it)')
      break
  else:
    out.append('shorter sequences, a smaller batch, or more devices on the batch axes')
  return out


# Entry points -------------------------------------------------------------------------------
def _gib(x) -> str:
  for unit, size in (('GiB', GIB), ('MiB', 2 ** 20), ('KiB', 2 ** 10)):
    if abs(x) >= size:
      return f'{x / size:8.2f} {unit}'
  return f'{x:8d} B  '


def report(r: dict) -> str:
  by, f, tg = r['per_device_bytes'], r['flops'], r['target']
  lines = [
      f"{r['model']['preset'] or 'model'}: {r['model']['params'] / 1e9:.2f}B params, "
      f"mesh {r['mesh']} ({r['n_devices']} devices), batch {r['batch_size']} x {r['seq_len']}, "
      f"grad_accum {r['grad_accum']}, remat {r['model']['remat']}, {r['model']['dtype']}",
      'per device:',
      f"  params            {_gib(by['params'])}",
      f"  optimizer state   {_gib(by['opt_state'])}",
      f"  arguments         {_gib(by['arguments'])}   (compiled: state + batch)",
      f"  temporaries       {_gib(by['temporaries'])}   (grads, activations, collectives)",
      f"  peak              {_gib(by['peak'])}",
      f"FLOPs per step: {f['analytic_per_step']:.3e} analytic ({f['analytic_per_device']:.3e} per device); "
      f"XLA cost analysis {f['xla_per_device']:.3e} per device (a rolled scan counts one layer)",
      f"target {tg['name']}: {tg['hbm_bytes'] / GIB:.0f} GiB x {tg['usable_fraction']:.0%} usable -> "
      + ('FITS' if r['fits'] else 'DOES NOT FIT')
      + f" (headroom {_gib(r['headroom_bytes']).strip()})"
      + (f"; ideal step {1e3 * tg['ideal_step_s']:,.1f} ms at 100% of peak" if tg['ideal_step_s'] else ''),
      f"lowered in {r['lower_s']:.1f} s, compiled in {r['compile_s']:.1f} s on {r['compiled_on']}",
  ]
  lines += [f'  try: {s}' for s in r['suggestions']]
  return '\n'.join(lines)


def run(config: ConfigDict, workdir: str) -> dict:
  os.makedirs(workdir, exist_ok=True)
  n = n_devices(config)
  model_config(config)   # bad model settings fail here, before any compile or child process
  target_hbm(config)
  devices = _cpu_devices(n)
  if devices is None:
    return _in_child(config, workdir, n)
  r = plan(config, devices)
  print(report(r))
  with open(os.path.join(workdir, 'aot.json'), 'w') as f:
    json.dump({'config': config.to_dict(), **r}, f, indent=2, default=str)
  return r


def _in_child(config: ConfigDict, workdir: str, n: int) -> dict:
  """Re-run in a fresh process whose CPU backend has n devices (set before JAX starts)."""
  path = os.path.join(workdir, 'aot_config.json')
  with open(path, 'w') as f:
    json.dump(config.to_dict(), f)
  flags = [x for x in os.environ.get('XLA_FLAGS', '').split()
           if not x.startswith('--xla_force_host_platform_device_count')]
  env = dict(os.environ, JAX_PLATFORMS='cpu',
             XLA_FLAGS=' '.join(flags + [f'--xla_force_host_platform_device_count={n}']))
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  rc = subprocess.call([sys.executable, '-m', 'experiments.aot', path, workdir], env=env, cwd=root)
  if rc:
    raise SystemExit(rc)
  with open(os.path.join(workdir, 'aot.json')) as f:
    return json.load(f)


if __name__ == '__main__':   # the child process of _in_child
  with open(sys.argv[1]) as f:
    _config = ConfigDict(json.load(f))
  try:
    run(_config, sys.argv[2])
  except (ConfigError, sharding.ShardingError) as e:
    sys.exit(f'error: {e}')
