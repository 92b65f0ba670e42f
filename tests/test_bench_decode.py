"""The generation benchmark runs end to end on a tiny GPT-2 and writes positive numbers."""
import json

import pytest

from experiments import bench_decode, registry
from experiments.configs import bench_decode as bench_decode_config


def test_bench_decode_smoke(tmp_path):
  pytest.importorskip('transformers', reason='needs the [hf] extra (torch, transformers)')
  config = bench_decode_config.get_config()
  with config.unlocked():
    config.model.update(vocab_size=96, d_model=32, n_layers=2, n_heads=4, max_seq_len=32)
    config.batch_sizes = (2,)
    config.prompt_len, config.max_new_tokens, config.repeats = 5, 4, 1
  assert registry.EXPERIMENTS['bench_decode'] == 'experiments.bench_decode:run'
  bench_decode.run(config, str(tmp_path))
  out = json.loads((tmp_path / 'bench.json').read_text())
  assert [r["batch"] for r in out["rows"]] == [2]
  for r in out['rows']:
    for side in ('ours', 'transformers'):
      assert r[side]['prefill_tokens_per_s'] > 0 and r[side]['decode_tokens_per_s'] > 0
    assert r['decode_speedup'] > 0 and 0 <= r['greedy_agree'] <= 1
  # the same weights on both sides: greedy tokens of a tiny model agree (almost) everywhere
  assert min(r['greedy_agree'] for r in out['rows']) >= 0.75
