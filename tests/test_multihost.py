"""Two local processes (jax.distributed over 127.0.0.1, 4 CPU devices each) train exactly
like one process with 8 devices: per-process batch rows, collective checkpoints."""
import json
import os
import socket
import subprocess
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _free_port():
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _args(corpus, workdir):
  return [sys.executable, '-m', 'experiments.run', '--config=experiments/configs/shakespeare_char.py',
          f'--workdir={workdir}', f'--config.data.path={corpus}', '--config.model.d_model=32',
          '--config.model.n_layers=2', '--config.model.n_heads=2', '--config.model.max_seq_len=32',
          '--config.train.steps=8', '--config.train.batch_size=8', '--config.train.log_every=1',
          '--config.eval.every=4', '--config.train.eval_batches=2',
          '--config.train.checkpoint_every=4', '--config.train.samples=0',
          '--config.optim.warmup_steps=2']


def _env(n_devices):
  # conftest's other XLA flags (LLVM -O0: compiling is most of these runs) with this count
  flags = [f for f in os.environ.get('XLA_FLAGS', '').split()
           if not f.startswith('--xla_force_host_platform_device_count')]
  return dict(os.environ, JAX_PLATFORMS='cpu',
              XLA_FLAGS=' '.join(flags + [f'--xla_force_host_platform_device_count={n_devices}']))


def _rows(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(l) for l in f]


def run_two_and_one(args_for, multi, single, timeout=600):
  """`args_for(workdir)` as two processes of 4 CPU devices each (jax.distributed over
  127.0.0.1) into `multi`, then as one process of 8 devices into `single`; both must exit 0."""
  port = _free_port()
  procs = [subprocess.Popen(args_for(multi) + [f'--coordinator=127.0.0.1:{port}',
                                               '--num_processes=2', f'--process_id={i}'],
                            cwd=ROOT, env=_env(4), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True) for i in range(2)]
  outs = [p.communicate(timeout=timeout)[0] for p in procs]
  assert all(p.returncode == 0 for p in procs), outs[0][-3000:] + outs[1][-3000:]
  r = subprocess.run(args_for(single), cwd=ROOT, env=_env(8), capture_output=True, text=True,
                     timeout=timeout)
  assert r.returncode == 0, r.stderr[-3000:]


def test_two_processes_equal_one_process(tiny_corpus, tmp_path):
  multi, single = str(tmp_path / 'multi'), str(tmp_path / 'single')
  run_two_and_one(lambda w: _args(tiny_corpus, w), multi, single)
  a, b = _rows(multi), _rows(single)
  assert [x['step'] for x in a] == [x['step'] for x in b] == list(range(1, 9))
  np.testing.assert_allclose([x['loss'] for x in a], [x['loss'] for x in b], rtol=1e-5)
  np.testing.assert_allclose([x['val_loss'] for x in a if 'val_loss' in x],
                             [x['val_loss'] for x in b if 'val_loss' in x], rtol=1e-5)
  assert sorted(os.listdir(os.path.join(multi, 'checkpoints')))[:2] == ['4', '8']
