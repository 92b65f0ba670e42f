"""Where a training step's time goes: ms per step by kind of op, for our jitted step (XLA's
per-op trace events) and for nanoGPT's eager step (torch.profiler), side by side.

Kinds: `matmul` (XLA dot fusions / aten mm, addmm, bmm), `attention kernel` (torch's fused
SDPA, which does its own matmuls), `data movement` (copies, transposes, slices, concats,
gathers), `elementwise/reduce` (every other fusion: norms, activations, softmax, optimizer),
`collectives` (on a mesh, including waiting for the other devices), `other`. The profilers
slow the steps they record, so compare the columns' proportions, not their sums. Op times add up over threads, so a column can exceed the step's wall time when
ops run concurrently.
"""
from __future__ import annotations

import collections
import glob
import re
import tempfile

import jax

KINDS = ('matmul', 'attention kernel', 'data movement', 'elementwise/reduce', 'collectives', 'other')
_XLA_MOVE = re.compile(r'^(copy|transpose|slice|concatenate|gather|bitcast|dynamic|pad|broadcast'
                       r'|reshape|iota|select)')
_WRAPPERS = ('ThunkExecutor', 'ThreadpoolListener', 'SlinkyThreadPool', 'end: ')


def xla_kind(name: str) -> str:
  """Kind of an XLA:CPU trace event named after its HLO instruction (e.g. ynn_fusion.12,
  copy_bitcast_fusion.3, multiply_erf_fusion): a fusion is named after the ops it starts with."""
  base = re.sub(r'\.\d+$', '', name)
  if re.search(r'all-reduce|all-gather|reduce-scatter|all-to-all|collective-permute|AllReduce|AllGather', base):
    return 'collectives'
  if base in ('dot', 'convolution') or 'ynn_fusion' in base or 'xnn_fusion' in base or base.startswith('onednn'):
    return 'matmul'
  if _XLA_MOVE.match(base) and not any(op in base for op in ('multiply', 'add', 'subtract', 'divide',
                                                              'exponential', 'reduce', 'erf', 'tanh')):
    return 'data movement'
  if 'fusion' in base or base in ('reduce', 'add', 'multiply', 'subtract', 'divide', 'exponential'):
    return 'elementwise/reduce'
  return 'other'


def torch_kind(name: str) -> str:
  if name in ('aten::mm', 'aten::addmm', 'aten::bmm', 'aten::baddbmm'):
    return 'matmul'
  if 'scaled_dot_product' in name or 'flash_attention' in name:
    return 'attention kernel'
  if name in ('aten::copy_', 'aten::clone', 'aten::contiguous', 'aten::transpose', 'aten::t',
              'aten::view', 'aten::reshape', 'aten::split', 'aten::slice', 'aten::cat',
              'aten::index_select', 'aten::embedding', 'aten::embedding_dense_backward',
              'aten::_unsafe_view', 'aten::expand', 'aten::permute', 'aten::as_strided',
              'aten::narrow', 'aten::zero_', 'aten::fill_', 'aten::empty', 'aten::empty_like',
              'aten::zeros', 'aten::zeros_like', 'aten::index_add_'):
    return 'data movement'
  if name.startswith('aten::'):
    return 'elementwise/reduce'
  return 'other'


def xla_breakdown(step, state, batch, steps: int):
  """(ms per step by kind, the final state) for `steps` calls of step(state, batch) ->
  (state, metrics), a jitted step that donates its state. XLA:CPU's executor records one
  trace event per op (thunk) while the profiler runs."""
  opts = jax.profiler.ProfileOptions()
  opts.python_tracer_level = 0
  with tempfile.TemporaryDirectory() as d:
    jax.profiler.start_trace(d, profiler_options=opts)
    for _ in range(steps):
      state, metrics = step(state, batch)
    jax.block_until_ready(metrics)
    jax.profiler.stop_trace()
    files = glob.glob(f'{d}/**/*.xplane.pb', recursive=True)
    data = jax.profiler.ProfileData.from_file(files[0])
    total = collections.Counter()
    for plane in data.planes:
      for line in plane.lines:
        if 'XLA' not in line.name:     # XLA's executor and Eigen worker threads
          continue
        for ev in line.events:
          if not ev.name.startswith(_WRAPPERS):
            total[xla_kind(ev.name)] += ev.duration_ns
  return {k: total[k] / 1e6 / steps for k in KINDS}, state


def torch_breakdown(step_fn, steps: int) -> dict[str, float]:
  """ms per step by kind of op (self CPU time) for `steps` calls of an eager torch step."""
  import torch
  with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
    for _ in range(steps):
      step_fn()
  total = collections.Counter()
  for ev in prof.key_averages():
    total[torch_kind(ev.key)] += ev.self_cpu_time_total   # microseconds
  return {k: total[k] / 1e3 / steps for k in KINDS}


def format_breakdown(rows: list[dict]) -> str:
  head = f"{'model':<18}{'framework':<10}" + ''.join(f'{k:>20}' for k in KINDS) + f"{'step ms':>10}"
  lines = [head, '-' * len(head)]
  for r in rows:
    lines.append(f"{r['model']:<18}{r['framework']:<10}"
                 + ''.join(f"{r['ms'][k]:>20.1f}" for k in KINDS) + f"{r['step_ms']:>10.1f}")
  return '\n'.join(lines)
