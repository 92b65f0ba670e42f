"""bench_peft runs every method side by side and its figures are consistent with the configs."""
import json

from experiments import bench_peft
from experiments.configs import bench_peft as bench_peft_config
from lm import peft


def test_bench_peft_smoke(tmp_path):
  c = bench_peft_config.get_config()
  c.model.update(d_model=32, n_heads=2, n_layers=1, vocab_size=128, max_seq_len=32)   # compile-bound: 1 layer
  c.update(batch_size=8, seq_len=32, steps=1, repeats=1, warmup_steps=0)
  rows = bench_peft.run(c, str(tmp_path))
  by = {r['method']: r for r in rows}
  assert set(by) == {'none', 'lora', 'prefix', 'prompt', 'adapter'}
  # Adam holds two moments per trainable float32 param (plus a step count).
  for r in rows:
    assert abs(r['optimizer_bytes'] - 8 * r['trainable_params']) <= 64, r
  cfg = bench_peft.ModelConfig.from_dict({**bench_peft.base.model().to_dict(), **c.model.to_dict()})
  pcfg = peft.PeftConfig.from_dict({**c.peft.to_dict(), 'method': 'lora'})
  assert by['lora']['trainable_params'] == peft.num_params(cfg, pcfg)
  assert by['none']['trainable_params'] == cfg.num_params()
  assert all(r['peak_bytes'] is None or r['peak_bytes'] > 0 for r in rows)
  assert json.load(open(tmp_path / 'bench.json'))['rows'][0]['method'] == 'none'
