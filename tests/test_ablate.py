"""The architecture ablation: parameter matching and a tiny end-to-end grid."""
import dataclasses
import json
import os

import pytest

from experiments import ablate
from experiments.configs import ablate_arch
from lm.config import ModelConfig


def test_matched_width_equalises_parameter_counts():
  base = ModelConfig(vocab_size=65, d_model=64, n_layers=4, n_heads=4, use_bias=False)
  for overrides in ({'activation': 'swiglu'}, {'n_kv_heads': 1}, {'norm_position': 'sandwich'}):
    d_ff = ablate.matched_d_ff(base, overrides)
    variant = dataclasses.replace(base, d_ff=d_ff, **overrides)
    assert variant.num_params(non_embedding=True) == pytest.approx(base.num_params(non_embedding=True), rel=0.02)
  assert ablate.matched_d_ff(base, {'activation': 'swiglu'}) < base.ff_dim   # three matrices, narrower


def test_tiny_ablation_runs_and_writes_its_table(tiny_corpus, tmp_path):
  c = ablate_arch.get_config()
  c.run.data.path = tiny_corpus
  c.run.model.update(d_model=32, n_layers=1, n_heads=2, max_seq_len=16)
  c.run.train.update(steps=3, batch_size=8, log_every=1, eval_batches=2)
  c.variants = {'baseline_gpt': {}, 'swiglu': {'activation': 'swiglu'}}
  rows = ablate.run(c, str(tmp_path))
  assert sorted(r['variant'] for r in rows) == ['baseline_gpt', 'swiglu']
  assert all(r['val_loss'] > 0 for r in rows)
  assert os.path.getsize(tmp_path / 'ablation.png') > 1000
  assert json.load(open(tmp_path / 'ablation.json')) == rows
