"""Peak host memory of importing a checkpoint onto 8 fake devices (run as a subprocess by
tests/test_families.py; `python tests/peak_rss_worker.py make|stream|naive DIR`).

make: write a random Qwen2-0.5B-shaped checkpoint (bf16, one shard per layer) to DIR.
stream / naive: import DIR with convert.import_hf_to_mesh, or with import_hf + device_put, and
print one JSON line: baseline, peak and device-param MB.
"""
import json
import os
import resource
import sys

os.environ['XLA_FLAGS'] = '--xla_force_host_platform_device_count=8'
os.environ['JAX_PLATFORMS'] = 'cpu'

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from lm import convert, model, sharding  # noqa: E402
from lm.layers import Spec  # noqa: E402

QWEN2_05B = {'model_type': 'qwen2', 'vocab_size': 151936, 'hidden_size': 896, 'intermediate_size': 4864,
             'num_hidden_layers': 24, 'num_attention_heads': 14, 'num_key_value_heads': 2,
             'max_position_embeddings': 32768, 'rms_norm_eps': 1e-6, 'rope_theta': 1e6,
             'tie_word_embeddings': True}


def _rss_mb() -> float:
  with open('/proc/self/status') as f:
    return next(int(line.split()[1]) for line in f if line.startswith('VmRSS')) / 1024


def make(path: str) -> None:
  cfg = convert.config_from_hf(QWEN2_05B)
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda s: rng.standard_normal(s.shape, np.float32) * 0.02, model.param_specs(cfg),
                        is_leaf=lambda x: isinstance(x, Spec))
  convert.export_hf(params, cfg, path, dtype='bfloat16')


def load(path: str, how: str) -> dict:
  mesh = sharding.make_mesh({'fsdp': 8})
  jnp.ones(8).block_until_ready()
  base = _rss_mb()
  if how == 'stream':
    params, cfg = convert.import_hf_to_mesh(path, mesh)
  else:
    host, cfg = convert.import_hf(path)
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), host)
    params = jax.device_put(host, sharding.tree_shardings(model.logical_axes(cfg), abstract, mesh))
    del host
  jax.block_until_ready(params)
  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
  return {'baseline_mb': base, 'peak_mb': peak, 'params_mb': sum(x.nbytes for x in jax.tree.leaves(params)) / 2**20,
          'n_params': cfg.num_params()}


if __name__ == '__main__':
  if sys.argv[1] == 'make':
    make(sys.argv[2])
  else:
    print(json.dumps(load(sys.argv[2], sys.argv[1])))
