"""Input-pipeline throughput: is the data ever the bottleneck of training?

Two measurements, both steady state (one-off costs are reported beside them, never mixed in):

  tokenizers  MB/s of UTF-8 text through `encode` and `decode`, best of `repeats` passes over
              each corpus, per tokenizer (char, and SentencePiece BPE trained on that corpus:
              its training time is reported but not measured as throughput).
  pipeline    tokens/s delivered as global jax.Arrays: BatchIterator's rows of this process ->
              `to_global` -> jax.block_until_ready, mean (and 99th percentile) over `batches`
              batches after a warm-up, at bench_train's batch shapes. Blocking on every batch
              makes this a lower bound: the trainer overlaps the next batch with the running step.

The last column divides pipeline tokens/s by bench_train's training tokens/s for the same
batch shape (from its bench.json): a ratio well above 1 means the input never holds a step up.
"""
from __future__ import annotations

import json
import os
import time

import jax
import numpy as np
from ml_collections import ConfigDict
from tqdm import tqdm

from data import pipeline, sources, tokenizers
from experiments.stages import trainer
from lm import sharding, train as train_lib
from lm.config import ConfigError

MB = 1e6  # MB/s: millions of UTF-8 bytes of text per second


def load_docs(path: str, max_chars: int = 0) -> list[str]:
  """The corpus as documents (one per file), as pretraining tokenizes it; optionally cut short."""
  docs = [sources.read_text(f) for f in sources.resolve_files(path)]
  if max_chars:
    out, left = [], max_chars
    for d in docs:
      if left <= 0:
        break
      out.append(d[:left])
      left -= len(out[-1])
    docs = out
  return docs


def best_time(fn, repeats: int) -> float:
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return min(times)


def make_tokenizer(kind: str, docs: list[str], vocab_size: int, prefix: str):
  """(tokenizer, seconds it took to build); process 0 trains, the others wait and train the same."""
  t0 = time.perf_counter()
  tok = trainer.process_zero_first(
      lambda: tokenizers.build_tokenizer(kind, docs, vocab_size, prefix), f'build {prefix}')
  return tok, time.perf_counter() - t0


def bench_tokenizer(corpus: str, kind: str, tok, build_s: float, docs: list[str], repeats: int) -> dict:
  n_bytes = sum(len(d.encode('utf-8')) for d in docs)
  ids = [tok.encode(d) for d in docs]  # also warms up (thread pools, caches)
  enc = best_time(lambda: [tok.encode(d) for d in docs], repeats)
  dec = best_time(lambda: [tok.decode(i) for i in ids], repeats)
  n_tokens = sum(len(i) for i in ids)
  return {'corpus': corpus, 'tokenizer': kind, 'vocab_size': tok.vocab_size, 'mb': n_bytes / MB,
          'tokens': n_tokens, 'bytes_per_token': n_bytes / max(n_tokens, 1), 'build_s': build_s,
          'encode_mb_per_s': n_bytes / MB / enc, 'decode_mb_per_s': n_bytes / MB / dec,
          'encode_tokens_per_s': n_tokens / enc, 'encode_s': enc, 'decode_s': dec}


def bench_pipeline(corpus: str, kind: str, shape_name: str, stream: pipeline.TokenStream,
                   batch_size: int, seq_len: int, mesh, config: ConfigDict) -> dict:
  div = sharding.batch_size_divisor(mesh)
  if batch_size % div:
    raise ConfigError(f'shapes.{shape_name}.batch_size={batch_size} does not divide over the {div} '
                      'devices of the batch mesh axes; use a multiple of it or fewer devices.')
  spec = pipeline.batch_spec(stream, seq_len)
  bsh = train_lib.batch_shardings(mesh, spec)
  rows = pipeline.local_rows(bsh['inputs'], batch_size, seq_len)
  it = pipeline.BatchIterator(stream, seq_len, batch_size, config.seed, config.sampling, rows)
  for _ in range(config.warmup_batches):
    jax.block_until_ready(pipeline.to_global(next(it), bsh, batch_size))
  times = np.empty(config.batches)
  for i in range(config.batches):
    t0 = time.perf_counter()
    jax.block_until_ready(pipeline.to_global(next(it), bsh, batch_size))
    times[i] = time.perf_counter() - t0
  dt = float(times.mean())
  return {'corpus': corpus, 'tokenizer': kind, 'shape': shape_name, 'batch': batch_size,
          'seq_len': seq_len, 'keys': sorted(spec), 'ms_per_batch': 1000 * dt,
          'p99_ms_per_batch': 1000 * float(np.percentile(times, 99)),
          'tokens_per_sec': batch_size * seq_len / dt}


def train_throughput(path: str) -> dict[str, dict] | None:
  """bench_train's rows by model name, from its bench.json or the workdir holding it."""
  if not path:
    return None
  if os.path.isdir(path):
    path = os.path.join(path, 'bench.json')
  if not os.path.isfile(path):
    raise ConfigError(f'train_bench_results={path} does not exist; give the bench.json (or workdir) '
                      'of a bench_train run, or leave it empty.')
  with open(path) as f:
    rows = json.load(f).get('rows', [])
  return {r['model']: r for r in rows}


def format_tables(tok_rows: list[dict], pipe_rows: list[dict]) -> str:
  head = (f"{'corpus':<20}{'tokenizer':<11}{'vocab':>7}{'MB':>7}{'bytes/tok':>10}"
          f"{'encode MB/s':>13}{'decode MB/s':>13}{'encode tok/s':>14}{'build s':>9}")
  lines = [head, '-' * len(head)]
  for r in tok_rows:
    lines.append(f"{r['corpus']:<20}{r['tokenizer']:<11}{r['vocab_size']:>7}{r['mb']:>7.2f}"
                 f"{r['bytes_per_token']:>10.2f}{r['encode_mb_per_s']:>13.1f}{r['decode_mb_per_s']:>13.1f}"
                 f"{r['encode_tokens_per_s']:>14,.0f}{r['build_s']:>9.1f}")
  head = (f"{'corpus':<20}{'tokenizer':<11}{'shape':<18}{'batch x seq':>12}{'ms/batch':>10}"
          f"{'p99 ms':>9}{'tokens/s':>14}{'train tok/s':>13}{'ratio':>9}")
  lines += ['', head, '-' * len(head)]
  for r in pipe_rows:
    train = '-' if r.get('train_tokens_per_sec') is None else f"{r['train_tokens_per_sec']:,.0f}"
    ratio = '-' if r.get('ratio') is None else f"{r['ratio']:,.0f}x"
    lines.append(f"{r['corpus']:<20}{r['tokenizer']:<11}{r['shape']:<18}{r['batch']:>5} x {r['seq_len']:<4}"
                 f"{r['ms_per_batch']:>10.3f}{r['p99_ms_per_batch']:>9.3f}{r['tokens_per_sec']:>14,.0f}{train:>13}{ratio:>9}")
  return '\n'.join(lines)


def run(config: ConfigDict, workdir: str):
  os.makedirs(workdir, exist_ok=True)
  if config.batches < 1 or config.repeats < 1:
    raise ConfigError(f'batches={config.batches} and repeats={config.repeats} must both be at least 1.')
  train = train_throughput(config.train_bench_results)  # fail before the long part
  mesh = sharding.make_mesh(config.mesh.to_dict())
  print(f'devices: {jax.device_count()} x {jax.devices()[0].device_kind} over {jax.process_count()} '
        f'process(es); {os.cpu_count()} CPU cores')
  tok_rows, pipe_rows = [], []
  jobs = [(c, k) for c in config.corpora for k in config.tokenizers]
  bar = tqdm(jobs, desc='bench_data', unit='tokenizer', dynamic_ncols=True)
  docs_of = {}
  for corpus, kind in bar:
    bar.set_postfix_str(f'{corpus}/{kind}')
    if corpus not in docs_of:
      docs_of = {corpus: load_docs(config.corpora[corpus], config.max_chars)}  # one corpus in memory
    docs = docs_of[corpus]
    prefix = os.path.join(workdir, 'tokenizers', f'{corpus}_{kind}')
    tok, build_s = make_tokenizer(kind, docs, config.vocab_size, prefix)
    tok_rows.append(bench_tokenizer(corpus, kind, tok, build_s, docs, config.repeats))
    stream = pipeline.tokenize_docs(docs, tok)
    for shape_name, s in config.shapes.items():
      row = bench_pipeline(corpus, kind, shape_name, stream, s.batch_size, s.seq_len, mesh, config)
      t = (train or {}).get(shape_name)
      if t is not None and (t['batch'], t['seq_len']) == (row['batch'], row['seq_len']):
        row['train_tokens_per_sec'] = t['tokens_per_sec']
        row['ratio'] = row['tokens_per_sec'] / t['tokens_per_sec']
      pipe_rows.append(row)
  print(format_tables(tok_rows, pipe_rows))
  if train is None:
    note = ('no bench_train results given (train_bench_results=\'\'): run experiments/configs/'
            'bench_train.py and pass its bench.json to get the ratio column.')
  else:
    ratios = [r['ratio'] for r in pipe_rows if r.get('ratio') is not None]
    note = (f'input pipeline / training tokens/s: at least {min(ratios):,.0f}x' if ratios else
            'bench_train results have no model with these batch shapes; no ratio.')
  print(note)
  if jax.process_index() == 0:
    with open(os.path.join(workdir, 'results.json'), 'w') as f:
      json.dump({'device': jax.devices()[0].device_kind, 'n_devices': jax.device_count(),
                 'n_processes': jax.process_count(), 'cpu_count': os.cpu_count(),
                 'sampling': config.sampling, 'batches': config.batches,
                 'train_bench_results': config.train_bench_results or None, 'note': note,
                 'tokenizers': tok_rows, 'pipeline': pipe_rows}, f, indent=2)
  return {'tokenizers': tok_rows, 'pipeline': pipe_rows}
