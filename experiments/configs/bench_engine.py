"""The evaluation harness's generate_until, static batches vs the continuous-batching engine,
side by side in one process (experiments/bench_engine.py's docstring has the measured figures).

python -m experiments.run --config=experiments/configs/bench_engine.py --workdir=/tmp/bench_engine
"""
from ml_collections import ConfigDict


def get_config():
  c = ConfigDict()
  c.experiment = 'bench_engine'
  c.n = 64                # generated GSM8K-format problems (requests)
  c.k = 4                 # demonstrations from another file: one shared few-shot head
  c.batch = 16            # static batch size = the engine's slots
  c.train_steps = 0       # AdamW steps on problems first, so answers end at their own lengths
  c.max_len = 1024        # the model's context
  # Mixed lengths without training: a random model (init_std 0.3: peaked, varied next-token
  # distributions) with a common character as one more stop string ends rows at random places.
  c.init_std = 0.02
  c.extra_stop = ''
  c.max_new = 256
  return c
