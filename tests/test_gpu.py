"""GPU-only checks: cuDNN flash attention (attention_impl='cudnn') against the plain XLA
path, forward and gradients, in bfloat16. Skipped where no GPU is present (CI)."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lm import model, objectives
from lm.config import PRESETS, ModelConfig

pytestmark = pytest.mark.skipif(jax.default_backend() != 'gpu', reason='needs a GPU (cuDNN attention)')


@pytest.mark.parametrize('variant', [dict(PRESETS['llama'], n_kv_heads=2), dict(PRESETS['gpt2']),
                                     dict(positions='alibi')])
def test_cudnn_attention_matches_xla(variant):
  base = ModelConfig(vocab_size=512, d_model=256, n_layers=2, n_heads=4, max_seq_len=256,
                     dtype='bfloat16', attention_impl='xla', **variant)
  fused = dataclasses.replace(base, attention_impl='cudnn')
  params = model.init(base, jax.random.key(0))
  toks = jax.random.randint(jax.random.key(1), (4, 257), 0, 512)
  batch = {'inputs': toks[:, :-1], 'targets': toks[:, 1:], 'weights': jnp.ones((4, 256))}

  def loss(p, cfg):
    s, w, _ = objectives.next_token_loss(p, batch, jax.random.key(0), cfg)
    return s / w

  ref = dataclasses.replace(base, dtype='float32')    # float32 XLA attention: the reference
  vg = lambda cfg: jax.jit(jax.value_and_grad(lambda p: loss(p, cfg)))(params)
  (l32, g32), (lx, gx), (lf, gf) = vg(ref), vg(base), vg(fused)
  assert float(lf) == pytest.approx(float(l32), rel=5e-3)
  scale = max(float(jnp.max(jnp.abs(a))) for a in jax.tree.leaves(g32))

  def err(g):   # worst gradient error, relative to the largest float32 gradient anywhere
    return max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(jax.tree.leaves(g32), jax.tree.leaves(g))) / scale

  # cuDNN in bfloat16 is at least as close to float32 as XLA in bfloat16 (which rounds the
  # attention probabilities to bfloat16; flash attention keeps them in float32)
  assert err(gf) <= 1.5 * err(gx) + 1e-3, (err(gf), err(gx))
  hlo = jax.jit(lambda p: loss(p, fused)).lower(params).compile().as_text()
  assert 'fmha' in hlo.lower()   # really cuDNN's fused attention, not the XLA fallback
