"""The input-pipeline benchmark runs end to end on a tiny corpus and writes positive numbers."""
import json

import pytest

from experiments import bench_data
from experiments.configs import bench_data as bench_data_config
from lm.config import ConfigError


def test_bench_data_smoke(tiny_corpus, tmp_path):
  config = bench_data_config.get_config()
  with config.unlocked():
    config.corpora = {'tiny': tiny_corpus}
    config.max_chars = 20000
    config.vocab_size = 400
    config.repeats = 1
    config.shapes = {'small': dict(batch_size=8, seq_len=32), 'gpt_d512': dict(batch_size=16, seq_len=64)}
    config.warmup_batches, config.batches = 2, 5
    # a bench_train result for one of the shapes: that row gets a ratio, the other does not
    train = tmp_path / 'bench.json'
    train.write_text(json.dumps({'rows': [{'model': 'gpt_d512', 'batch': 16, 'seq_len': 64,
                                           'tokens_per_sec': 1000.0}]}))
    config.train_bench_results = str(tmp_path)  # a workdir holding bench.json
  workdir = tmp_path / 'bench'
  bench_data.run(config, str(workdir))
  out = json.loads((workdir / 'results.json').read_text())
  assert out['n_devices'] == 8 and 'no bench_train' not in out['note']
  toks = out['tokenizers']
  assert [(r['corpus'], r['tokenizer']) for r in toks] == [('tiny', 'char'), ('tiny', 'bpe')]
  for r in toks:
    for k in ('mb', 'tokens', 'bytes_per_token', 'encode_mb_per_s', 'decode_mb_per_s',
              'encode_tokens_per_s'):
      assert r[k] > 0, (r['tokenizer'], k)
    assert r['build_s'] >= 0
  assert toks[0]['bytes_per_token'] == 1.0 and toks[1]['bytes_per_token'] > 1.0  # subwords compress
  assert toks[1]['vocab_size'] == 400
  pipe = out['pipeline']
  assert {(r['tokenizer'], r['shape']) for r in pipe} == {(k, s) for k in ('char', 'bpe')
                                                          for s in ('small', 'gpt_d512')}
  for r in pipe:
    assert r['tokens_per_sec'] > 0 and r['ms_per_batch'] > 0 and r['p99_ms_per_batch'] > 0
    assert r['keys'] == ['inputs', 'targets', 'weights']
    if r['shape'] == 'gpt_d512':
      assert r['ratio'] == r['tokens_per_sec'] / 1000.0
    else:
      assert 'ratio' not in r


def test_bench_data_missing_train_results_is_a_user_error(tmp_path):
  config = bench_data_config.get_config()
  with config.unlocked():
    config.train_bench_results = str(tmp_path / 'nowhere.json')
  with pytest.raises(ConfigError, match='does not exist'):
    bench_data.run(config, str(tmp_path / 'bench'))
