"""Two local processes (4 CPU devices each) over JSON-lines sources: each reads only its
share of the examples, together they read every example exactly once per epoch, and the
global batches they assemble equal those of one process with 8 devices.

The per-process reading lives in tests/multihost_sources_worker.py (data/ has no
per-process example sharding yet; pretraining reads the whole corpus on every process)."""
import json
import os
import subprocess
import sys

import numpy as np

from tests.test_multihost import ROOT, _env, _free_port

N = 40  # examples per source: 5 global batches of 8 per epoch


def _write_sources(d):
  words = 'the quick brown fox jumps over lazy dogs while seven wizards box'.split()
  rng = np.random.default_rng(0)
  say = lambda i, n: f'{i}: ' + ' '.join(rng.choice(words, n))
  rows = {
      'documents': [{'text': 'doc ' + say(i, 8 + i % 5)} for i in range(N)],
      'instructions': [{'instruction': 'task ' + say(i, 4), 'input': '' if i % 3 else say(i, 2),
                        'output': say(i, 5)} for i in range(N)],
      'preferences': [{'chosen': f'\n\nHuman: q{i}?\n\nAssistant: ' + say(i, 4),
                       'rejected': f'\n\nHuman: q{i}?\n\nAssistant: no {i}'} for i in range(N)],
  }
  os.makedirs(d, exist_ok=True)
  for kind, rs in rows.items():
    with open(os.path.join(d, f'{kind}.jsonl'), 'w') as f:
      f.writelines(json.dumps(r) + '\n' for r in rs)


def _worker(jsonl, out, extra=()):
  return [sys.executable, '-m', 'tests.multihost_sources_worker', f'--jsonl_dir={jsonl}',
          f'--out={out}', *extra]


def test_two_processes_read_disjoint_shares_and_build_the_same_global_batch(tmp_path):
  jsonl, multi, single = str(tmp_path / 'jsonl'), str(tmp_path / 'multi'), str(tmp_path / 'single')
  _write_sources(jsonl)
  port = _free_port()
  procs = [subprocess.Popen(_worker(jsonl, multi, [f'--coordinator=127.0.0.1:{port}', '--num_processes=2',
                                                   f'--process_id={i}']),
                            cwd=ROOT, env=_env(4), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True) for i in range(2)]
  outs = [p.communicate(timeout=300)[0] for p in procs]
  assert all(p.returncode == 0 for p in procs), outs[0][-3000:] + outs[1][-3000:]
  r = subprocess.run(_worker(jsonl, single), cwd=ROOT, env=_env(8), capture_output=True, text=True,
                     timeout=300)
  assert r.returncode == 0, r.stderr[-3000:]

  meta = [json.load(open(os.path.join(multi, f'process_{i}.json'))) for i in range(2)]
  one = json.load(open(os.path.join(single, 'process_0.json')))
  assert [m['devices'] for m in meta] == [8, 8] and [m['local_devices'] for m in meta] == [4, 4]
  assert [m['rows'] for m in meta] == [[0, 4], [4, 8]] and one['rows'] == [0, 8]
  every = set(range(1, N + 1))  # record ids are line numbers
  for kind in ('documents', 'instructions', 'preferences'):
    assert len(meta[0][kind]) == len(meta[1][kind]) == 10  # two epochs of 5 batches
    for epoch in range(2):
      batches = slice(5 * epoch, 5 * epoch + 5)
      ids = [[i for b in m[kind][batches] for i in b] for m in meta]
      assert len(ids[0]) == len(ids[1]) == N // 2, kind            # each reads only its half
      assert not set(ids[0]) & set(ids[1]), kind                   # no example on both processes
      assert sorted(ids[0] + ids[1]) == sorted(every), kind        # together: each exactly once
      # and those are exactly the rows one process with 8 devices reads
      assert [a + b for a, b in zip(meta[0][kind][batches], meta[1][kind][batches])] == one[kind][batches]
    assert meta[0][kind][:5] != meta[0][kind][5:]  # a fresh permutation every epoch

  arrays = [np.load(os.path.join(multi, f'process_{i}.npz')) for i in range(2)]
  ref = np.load(os.path.join(single, 'process_0.npz'))
  full = [k for k in ref.files if '/shard' not in k]
  assert {k.split('/')[0] for k in full} == {'documents', 'instructions', 'preferences', 'stream'}
  assert any(k.endswith('/segment_ids') for k in full)  # the stream batches are multi-document
  for k in full:
    assert ref[k].shape[0] == 8
    for a in arrays:  # the all-gathered global batch of each process equals the single-process one
      np.testing.assert_array_equal(a[k], ref[k], err_msg=k)
  for p, a in enumerate(arrays):  # and each process holds exactly its rows of it, one per device
    shards = [k for k in a.files if '/shard' in k]
    assert len(shards) == 4 * len(full)
    for k in shards:
      name, start = k.rsplit('/shard', 1)
      start = int(start)
      assert 4 * p <= start < 4 * p + 4, k
      np.testing.assert_array_equal(a[k], ref[name][start:start + 1], err_msg=k)
