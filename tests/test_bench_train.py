"""bench_train: our step side by side with nanoGPT's, and where each step's time goes.

nanoGPT itself is not shipped (tests are offline), so a stand-in module with nanoGPT's
interface (GPTConfig, GPT(config)(idx, targets) -> (logits, loss), configure_optimizers)
is written to a temporary "checkout"; the bench imports its model.py exactly as it would
import nanoGPT's.
"""
import json
import subprocess
import sys
import textwrap

import pytest
from ml_collections import ConfigDict

from experiments import bench
from experiments.stages import bench_profile
from experiments.configs import bench_train
from lm.config import ConfigError

pytest.importorskip('torch')

STAND_IN = textwrap.dedent('''
    from dataclasses import dataclass
    import torch
    from torch import nn
    from torch.nn import functional as F

    @dataclass
    class GPTConfig:
        block_size: int = 64
        vocab_size: int = 65
        n_layer: int = 1
        n_head: int = 1
        n_embd: int = 16
        dropout: float = 0.0
        bias: bool = True

    class GPT(nn.Module):
        def __init__(self, config):
            super().__init__()
            self.wte = nn.Embedding(config.vocab_size, config.n_embd)
            self.mlp = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
            self.out = nn.Linear(4 * config.n_embd, config.vocab_size, bias=False)

        def forward(self, idx, targets):
            logits = self.out(F.gelu(self.mlp(self.wte(idx))))
            return logits, F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))

        def configure_optimizers(self, weight_decay, learning_rate, betas, device_type):
            return torch.optim.AdamW(self.parameters(), lr=learning_rate, betas=betas,
                                     weight_decay=weight_decay)
''')


def tiny_config(nano_dir: str) -> ConfigDict:
  c = bench_train.get_config()
  c.models = ConfigDict({'tiny': ConfigDict(dict(
      model=dict(vocab_size=65, d_model=32, n_layers=1, n_heads=2, max_seq_len=16,
                 use_bias=False, activation='gelu', dtype='float32'),
      batch_size=8, seq_len=16, steps=3))})
  c.warmup_steps, c.repeats, c.rounds = 1, 1, 1
  c.unroll_study, c.checkpoint_stall = False, False
  c.nanogpt_dir = nano_dir
  return c


def test_side_by_side_and_breakdown(tmp_path):
  nano = tmp_path / 'nanoGPT'
  nano.mkdir()
  (nano / 'model.py').write_text(STAND_IN)
  bench.run(tiny_config(str(nano)), str(tmp_path / 'out'))
  out = json.loads((tmp_path / 'out' / 'bench.json').read_text())
  [row] = out['nanogpt']
  assert row['speed_ratio'] == pytest.approx(row['ours_tokens_per_sec'] / row['nanogpt_tokens_per_sec'])
  assert row['nanogpt_params'] == 65 * 32 + 32 * 128 + 128 * 65   # the stand-in, bias=False as ours
  by = {r['framework']: r['ms'] for r in out['profile']}
  # per-op trace events were read on both sides: matmuls and the rest each took time
  for side in ('ours', 'nanoGPT'):
    assert by[side]['matmul'] > 0 and by[side]['elementwise/reduce'] > 0, (side, by[side])
  table = (tmp_path / 'out' / 'bench.txt').read_text()
  assert 'ours / nanoGPT' in table and 'where the step time goes' in table


def test_kinds_of_xla_and_torch_ops():
  assert bench_profile.xla_kind('ynn_fusion.12') == 'matmul'
  assert bench_profile.xla_kind('dot.3') == 'matmul'
  assert bench_profile.xla_kind('all-reduce-start.2') == 'collectives'
  assert bench_profile.xla_kind('copy_bitcast_fusion.7') == 'data movement'
  assert bench_profile.xla_kind('transpose_copy_fusion') == 'data movement'
  assert bench_profile.xla_kind('broadcast_multiply_fusion.2') == 'elementwise/reduce'
  assert bench_profile.xla_kind('multiply_erf_fusion') == 'elementwise/reduce'
  assert bench_profile.torch_kind('aten::addmm') == 'matmul'
  assert bench_profile.torch_kind('aten::_scaled_dot_product_flash_attention_for_cpu') == 'attention kernel'
  assert bench_profile.torch_kind('aten::copy_') == 'data movement'
  assert bench_profile.torch_kind('aten::gelu') == 'elementwise/reduce'


def test_missing_nanogpt_checkout_is_one_sentence(tmp_path):
  with pytest.raises(ConfigError, match='has no model.py'):
    bench.run(tiny_config(str(tmp_path / 'nowhere')), str(tmp_path / 'out'))
  assert not (tmp_path / 'out').exists()
