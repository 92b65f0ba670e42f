"""One process of tests/test_multihost_sources.py: reads its share of JSON-lines examples.

Example sources are read per process with `pipeline.example_indices`: global batch i is a
pure function of (seed, i), and a process fetches by index only the examples of the rows
its devices hold (`pipeline.local_rows`), then `pipeline.pad_rows` + `to_global`.

python -m tests.multihost_sources_worker --jsonl_dir=D --out=O [--coordinator=H:P --num_processes=N --process_id=I]

Writes O/process_I.json (the example ids read, per kind and batch) and O/process_I.npz
(the all-gathered global batches and this process's addressable shards).
"""
from __future__ import annotations

import argparse
import json
import os
import string

import numpy as np

GLOBAL_BATCH, SEQ_LEN, SEED, EPOCHS = 8, 32, 0, 2
TEXT_OF = {
    'documents': lambda r: r['text'],
    'instructions': lambda r: r['instruction'] + '\n' + r['input'] + '\n' + r['output'],
    'preferences': lambda r: r['prompt'] + r['chosen'],
}


def example_batch(records: list[dict], kind: str, tok, seq_len: int) -> dict[str, np.ndarray]:
  """pipeline.pad_rows of the examples' text, plus their ids (to check who read what)."""
  from data import pipeline
  batch = pipeline.pad_rows([tok.encode(TEXT_OF[kind](rec)) for rec in records], seq_len)
  return {**batch, 'ids': np.array([rec['id'] for rec in records], np.int32)}


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument('--jsonl_dir', required=True)
  ap.add_argument('--out', required=True)
  ap.add_argument('--coordinator')
  ap.add_argument('--num_processes', type=int)
  ap.add_argument('--process_id', type=int)
  args = ap.parse_args()
  import jax
  if args.coordinator:
    jax.distributed.initialize(args.coordinator, args.num_processes, args.process_id)
  from jax.experimental import multihost_utils

  from data import pipeline, sources, tokenizers
  from experiments.stages import trainer
  from lm import sharding, train as train_lib

  pid = jax.process_index()
  mesh = sharding.make_mesh({'data': -1, 'fsdp': 1, 'tensor': 1, 'expert': 1})
  tok = tokenizers.CharTokenizer(string.printable)
  data_dir = os.path.join(args.out, 'data')  # shared by the processes: process 0 prepares it
  prepare = {'documents': sources.prepare_documents, 'instructions': sources.prepare_instructions,
             'preferences': sources.prepare_preferences}
  read, arrays, prepared_of = {'rows': None}, {}, {}

  def record(name: str, i: int, g: dict) -> None:
    full = multihost_utils.process_allgather(g, tiled=True)
    for k, v in full.items():
      arrays[f'{name}/{i}/{k}'] = np.asarray(v)
    for k, v in g.items():  # this process's shards, with the rows they hold
      for s in v.addressable_shards:
        arrays[f'{name}/{i}/{k}/shard{s.index[0].start or 0}'] = np.asarray(s.data)

  for kind, fn in prepare.items():
    path = os.path.join(args.jsonl_dir, f'{kind}.jsonl')
    prepared = trainer.process_zero_first(lambda: fn(path, data_dir, val_fraction=0.0), f'prepare {kind}')
    src = prepared.source('train')
    prepared_of[kind] = prepared
    bsh = train_lib.batch_shardings(mesh, example_batch([], kind, tok, SEQ_LEN))  # shapes only
    rows = pipeline.local_rows(bsh['inputs'], GLOBAL_BATCH, SEQ_LEN)
    read['rows'] = list(rows)
    read[kind] = []
    for i in range(EPOCHS * (len(src) // GLOBAL_BATCH)):
      idx = pipeline.example_indices(len(src), GLOBAL_BATCH, SEED, i, rows)
      records = [_example(src[int(j)]) for j in idx]  # only the examples of our rows
      read[kind].append([r['id'] for r in records])
      record(kind, i, pipeline.to_global(example_batch(records, kind, tok, SEQ_LEN), bsh, GLOBAL_BATCH))

  # The token-stream pipeline as pretraining runs it: whole corpus per process, rows split.
  stream = pipeline.tokenize_docs(prepared_of['documents'].documents('train'), tok)
  bsh = train_lib.batch_shardings(mesh, pipeline.batch_spec(stream, SEQ_LEN))
  rows = pipeline.local_rows(bsh['inputs'], GLOBAL_BATCH, SEQ_LEN)
  it = pipeline.BatchIterator(stream, SEQ_LEN, GLOBAL_BATCH, SEED, 'sequential', rows)
  for i in range(4):
    record('stream', i, pipeline.to_global(next(it), bsh, GLOBAL_BATCH))

  os.makedirs(args.out, exist_ok=True)
  with open(os.path.join(args.out, f'process_{pid}.json'), 'w') as f:
    json.dump({**read, 'process_count': jax.process_count(), 'devices': jax.device_count(),
               'local_devices': jax.local_device_count()}, f)
  np.savez(os.path.join(args.out, f'process_{pid}.npz'), **arrays)


def _example(raw: dict) -> dict:
  """A tfds record as str fields and its integer line `id`."""
  return {k: v.decode('utf-8') if isinstance(v, bytes) else int(v) for k, v in raw.items()}


if __name__ == '__main__':
  main()
