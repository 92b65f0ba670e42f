"""Compile-only planning: per-device bytes equal hand arithmetic, the verdict follows the
target's memory, nothing is allocated, and a mesh larger than this process re-runs in a child."""
import json

import jax

from experiments import aot
from experiments.configs import aot as aot_config

# A tiny LLaMA-shaped decoder: every leaf has an 'embed' dimension, so fsdp splits all of it.
TINY = dict(preset='', vocab_size=256, d_model=64, n_layers=2, n_heads=4, d_ff=128, max_seq_len=32,
            norm='rmsnorm', activation='swiglu', positions='rope', use_bias=False,
            tie_embeddings=False)


def _config(fsdp, **top):
  c = aot_config.get_config()
  c.model.update(TINY)
  c.mesh.fsdp = fsdp
  for k, v in top.items():
    c[k] = v
  return c


def test_bytes_match_hand_arithmetic_and_nothing_is_allocated(tmp_path):
  c = _config(4)
  c.model.remat = 'none'
  before = len(jax.live_arrays())
  r = aot.run(c, str(tmp_path))
  assert len(jax.live_arrays()) <= before + 2   # at most a stray scalar, never a param
  d, f, v, n = 64, 128, 256, 2
  params = 2 * v * d + n * (4 * d * d + 3 * d * f + 2 * d) + d   # embed, lm_head, layers, final norm
  by = r['per_device_bytes']
  assert by['params'] == params * 4 // 4                         # float32 over 4 fsdp shards
  assert by['opt_state'] == 2 * by['params'] + 2 * 4             # Adam mu + nu; two int32 counts
  batch = r['batch_size'] * 32 * (4 + 4 + 4) // 4                # inputs, targets, weights
  assert r['batch_size'] == 4 and by['batch'] == batch
  assert by['arguments'] == by['params'] + by['opt_state'] + 4 + batch   # + the int32 step
  assert by['peak'] > by['arguments'] + by['params']             # + f32 grads and activations
  assert r['fits'] and not r['suggestions']
  assert r['flops']['analytic_per_step'] > 0 and r['flops']['xla_per_device'] > 0
  saved = json.loads((tmp_path / 'aot.json').read_text())
  assert saved['per_device_bytes'] == by and saved['config']['target'] == 'h100'

  # The verdict flips on a tiny accelerator: between state + gradients and the step's peak...
  cfg = aot.model_config(c)
  c.hbm_gib = (by['arguments'] + by['params'] + 1) / c.usable_fraction / aot.GIB
  small = aot.judge(c, cfg, r)
  assert not small['fits'] and small['headroom_bytes'] < 0
  assert any('remat=full' in s for s in small['suggestions'])
  # ...and below the state itself, only more devices help.
  c.hbm_gib = by['params'] / aot.GIB
  tiny = aot.judge(c, cfg, r)
  assert not tiny['fits'] and 'devices' in tiny['suggestions'][0]


def test_mesh_larger_than_this_process_runs_in_a_child(tmp_path):
  assert jax.device_count() == 8   # conftest
  r = aot.run(_config(16), str(tmp_path))
  assert r['n_devices'] == 16 and r['mesh']['fsdp'] == 16
  assert r['per_device_bytes']['params'] == 4 * aot.model_config(_config(16)).num_params() // 16
