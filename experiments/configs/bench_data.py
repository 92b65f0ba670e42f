"""Input-pipeline benchmark: tokenizer MB/s and batches delivered to the devices, tokens/s.

python -m experiments.run --config=experiments/configs/bench_data.py --workdir=/tmp/bench_data \
    [--config.train_bench_results=/tmp/bench/bench.json]

The batch shapes are those of bench_train.py, so the tokens/s compare one to one with its
training throughput (pass its bench.json, or its workdir, as train_bench_results).
"""
from ml_collections import ConfigDict

from experiments.configs import bench_train
from experiments.configs.shakespeare_char import TINY_SHAKESPEARE


def get_config():
  c = ConfigDict()
  c.experiment = 'bench_data'
  c.seed = 0
  # name -> a text file, a directory, or a corpus shipped with the install (both of these are)
  c.corpora = ConfigDict({'tinyshakespeare': TINY_SHAKESPEARE, 'shakespeare_works': 'shakespeare_works'})
  c.max_chars = 0               # >0: cut every corpus to its first max_chars characters (smoke tests)
  c.tokenizers = ('char', 'bpe')  # char | bpe | unigram
  c.vocab_size = 2000           # for bpe / unigram, trained on each corpus (time reported, not measured)
  c.repeats = 3                 # tokenizer timings: best of this many passes over the corpus
  # One pipeline row per (corpus, tokenizer, shape); shapes default to bench_train's models.
  c.shapes = ConfigDict({name: dict(batch_size=m.batch_size, seq_len=m.seq_len)
                         for name, m in bench_train.get_config().models.items()})
  c.sampling = 'random'         # random | sequential, as data.sampling in pretraining
  c.warmup_batches = 20
  c.batches = 1000              # timed batches per pipeline row
  c.train_bench_results = ''    # bench_train's bench.json (or its workdir) for the ratio column
  c.mesh = ConfigDict(dict(data=-1, fsdp=1, tensor=1, expert=1))
  return c
