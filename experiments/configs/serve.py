"""Serve a run or a Hugging Face folder over an OpenAI-compatible API on 127.0.0.1
(experiments/serve.py), generating with the continuous-batching engine (lm/engine.py).

python -m experiments.run --config=experiments/configs/serve.py --workdir=runs/serve \
    --config.init_from=runs/works [--config.port=8000 --config.slots=16]
curl -s http://127.0.0.1:8000/v1/completions -H 'Content-Type: application/json' \
    -d '{"model": "works", "prompt": "ROMEO:", "max_tokens": 64, "temperature": 0.8}'

mode=bench measures the engine beside static batching instead (no server): bench.json.

python -m experiments.run --config=experiments/configs/serve.py --workdir=runs/bench_engine --config.mode=bench

The bench workload: 96 requests, prompts of 8-32 tokens, response lengths a mixture of short
line completions (the RLHF testbed's: median 16, at most 32) and long rationales (the CoT
testbed's: median 64, at most 160), greedy, no EOS (each request asks for its length). Static
batching runs decode.generate on consecutive batches of `slots` requests, each batch as long
as its longest response. The engine runs with the same `slots` rows of prompt_max + 160
columns (less cache than the static batch's largest), and with as many rows as that largest
static cache holds (equal memory). Runs are compiled first, then timed in turn `repeats` times
(the fastest of each kept), so a machine's drifting load spreads over all of them.
"""
from ml_collections import ConfigDict


def get_config():
  c = ConfigDict()
  c.experiment = 'serve'
  c.mode = 'serve'            # serve | bench
  c.init_from = ''            # a run workdir or hf:PATH
  c.model_name = ''           # the id clients send as "model"; '' = the folder's name
  c.port = 8000               # on 127.0.0.1 only; 0 = any free port (server.json has the URL)
  c.slots = 16                # KV-cache rows: requests decoded at once
  c.max_len = 0               # columns per row (prompt + response); 0 = the model context
  c.sync_every = 4            # decode steps per engine call (new requests join between calls)
  c.prefix_cache = 8          # recently prefilled prompts kept for reuse (n samples, few-shot)
  c.request_timeout = 600.0   # seconds a request may wait for its tokens
  c.drain_seconds = 60.0      # on SIGTERM: how long requests in flight may take to finish
  c.bench = ConfigDict(dict(
      seed=0, requests=96, repeats=2, slots=16, prompt_min=8, prompt_max=32, short_fraction=0.5,
      short_median=16, short_max=32, long_median=64, long_max=160, sigma=0.5,
      model=dict(vocab_size=512, d_model=256, n_layers=4, n_heads=4, max_seq_len=256)))
  return c
