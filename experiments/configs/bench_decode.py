"""Generation benchmark: lm.decode vs Hugging Face transformers generate on one GPT-2.

python -m experiments.run --config=experiments/configs/bench_decode.py --workdir=/tmp/bench_decode

A random d_model=512, 6-layer GPT-2 (16k vocabulary, ~30M params) exported through
lm.convert so both sides run the same weights; greedy, prompts of 64 tokens, 64 new tokens.
"""
from ml_collections import ConfigDict


def get_config():
  c = ConfigDict()
  c.experiment = 'bench_decode'
  c.seed = 0
  # GPT-2's shape (what lm.convert exports as gpt2): LayerNorm, learned positions, tanh GELU,
  # biases, tied embeddings
  c.model = ConfigDict(dict(vocab_size=16384, d_model=512, n_layers=6, n_heads=8, max_seq_len=256,
                            norm='layernorm', positions='learned', activation='gelu_tanh',
                            use_bias=True, tie_embeddings=True, dtype='float32'))
  c.batch_sizes = (1, 8, 32, 64)
  c.prompt_len = 64
  c.max_new_tokens = 64
  c.repeats = 3
  c.transformers = True        # False: only our numbers (no torch needed)
  c.torch_threads = 0          # 0: torch's default
  return c
