"""Model FLOPs utilisation: achieved model FLOP/s over the hardware's peak.

Peaks are dense bf16 tensor-core figures per device from vendor datasheets, looked up
by `device_kind`. On CPU there is no datasheet figure that means anything, so the
peak is measured once with a float32 matmul microbenchmark. Unknown devices give None
(printed as "n/a") rather than a guess, unlike nanoGPT's hard-coded A100 figure.
"""
from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp

# device_kind substring (lower case) -> peak FLOP/s per device (bf16, dense).
PEAK_FLOPS = {
    'h200': 989e12,
    'h100': 989e12,          # SXM; the PCIe part is 756e12
    'a100': 312e12,
    'a10g': 125e12,
    'l4': 121e12,
    'v100': 125e12,
    'tpu v6': 918e12,        # Trillium
    'tpu v5p': 459e12,
    'tpu v5 lite': 197e12,   # v5e
    'tpu v5e': 197e12,
    'tpu v4': 275e12,
    'tpu v3': 123e12,
}


@functools.lru_cache(maxsize=None)
def measured_cpu_peak(n: int = 1024, repeats: int = 5) -> float:
  """Best float32 matmul FLOP/s on the host CPU (all cores), measured once per process."""
  x = jnp.ones((n, n), jnp.float32)
  f = jax.jit(lambda a: a @ a).lower(x).compile()
  f(x).block_until_ready()
  best = float('inf')
  for _ in range(repeats):
    t = time.perf_counter()
    f(x).block_until_ready()
    best = min(best, time.perf_counter() - t)
  return 2 * n ** 3 / best


def peak_flops(device=None) -> float | None:
  """Peak FLOP/s of one device, or None if unknown."""
  device = device or jax.devices()[0]
  if device.platform == 'cpu':
    # Fake host devices (--xla_force_host_platform_device_count) share the same cores.
    return measured_cpu_peak() / jax.local_device_count()
  kind = device.device_kind.lower()
  for key, peak in PEAK_FLOPS.items():
    if key in kind:
      return peak
  return None


def mfu(tokens_per_sec: float, flops_per_token: float, n_devices: int,
        peak: float | None) -> float | None:
  if peak is None or tokens_per_sec <= 0:
    return None
  return tokens_per_sec * flops_per_token / (peak * n_devices)
