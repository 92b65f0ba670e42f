"""Where metrics go: metrics.jsonl (one JSON object per logged step), TensorBoard, and a PNG.

Only process 0 writes. On resume, rows past the restored step are dropped from
metrics.jsonl because the resumed run logs those steps again (identically). The workdir
may be a bucket URL (gs://): files go through etils.epath (lm.paths).
"""
from __future__ import annotations

import io
import json
import math
import os
import shutil
import tempfile
import time

import jax

from lm import paths


FLUSH_SECONDS = 30   # a bucket's metrics.jsonl is rewritten at most this often (and on close)


def _clean(v):
  v = float(v)
  return v if math.isfinite(v) else None


class MetricsWriter:
  def __init__(self, workdir: str, resume_step: int | None = None):
    self.enabled = jax.process_index() == 0
    self.path = paths.path(workdir) / 'metrics.jsonl'
    self._tb = self._tb_local = self._rows = None
    if not self.enabled:
      return
    if resume_step is not None and self.path.exists():
      # a last line cut short (a full disk, a kill mid-append) is dropped, not parsed
      rows = [l for l in paths.read_text(self.path).splitlines(keepends=True)
              if l.strip() and l.endswith('\n') and json.loads(l)['step'] <= resume_step]
      paths.write_text(self.path, ''.join(rows))
    elif self.path.exists():
      self.path.unlink()  # a fresh run (no checkpoint) starts a fresh log
    if paths.is_url(workdir):   # the rows kept, so far, for whole-file rewrites
      self._rows = paths.read_text(self.path).splitlines(keepends=True) if self.path.exists() else []
      self._flushed = time.monotonic()
    from tensorboardX import SummaryWriter
    self._tb_dir = paths.path(workdir) / 'tensorboard'
    if paths.is_url(workdir):  # tensorboardX's own gs:// writer needs google-cloud-storage:
      self._tb_local = tempfile.mkdtemp(prefix='tensorboard')   # write here, copy up on close
    self._tb = SummaryWriter(self._tb_local or os.fspath(self._tb_dir))

  def write(self, step: int, metrics: dict) -> None:
    if not self.enabled:
      return
    row = {'step': int(step), **{k: _clean(v) for k, v in metrics.items() if v is not None}}
    # An object store cannot append: a bucket's file is rewritten whole from memory, at most
    # every FLUSH_SECONDS and on close; a local file is appended to as before.
    if paths.is_url(self.path):
      self._rows.append(json.dumps(row) + '\n')
      if time.monotonic() - self._flushed > FLUSH_SECONDS:
        self.flush()
    else:
      with open(self.path, 'a') as f:
        f.write(json.dumps(row) + '\n')
    for k, v in row.items():
      if k != 'step' and v is not None:
        self._tb.add_scalar(k, v, step)

  def flush(self) -> None:
    if self._rows:
      paths.write_text(self.path, ''.join(self._rows))
      self._flushed = time.monotonic()

  def close(self) -> None:
    self.flush()
    if self._tb is not None:
      self._tb.close()
    if self._tb_local is not None:
      self._tb_dir.mkdir(parents=True, exist_ok=True)
      for name in os.listdir(self._tb_local):
        (self._tb_dir / name).write_bytes(open(os.path.join(self._tb_local, name), 'rb').read())
      shutil.rmtree(self._tb_local, ignore_errors=True)
      self._tb_local = None


def read(path: str) -> list[dict]:
  return [json.loads(l) for l in paths.read_text(path).splitlines() if l.strip()]


def plot_losses(metrics_path: str, png_path: str, title: str = '') -> str:
  """Training loss and validation loss against step."""
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  rows = read(metrics_path)
  fig, ax = plt.subplots(figsize=(6, 4))
  tr = [(r['step'], r['loss']) for r in rows if r.get('loss') is not None]
  va = [(r['step'], r['val_loss']) for r in rows if r.get('val_loss') is not None]
  if tr:
    ax.plot(*zip(*tr), label='train loss', lw=1)
  if va:
    ax.plot(*zip(*va), 'o-', label='validation loss', ms=3)
  ax.set_xlabel('step')
  ax.set_ylabel('loss (nats/token)')
  ax.set_title(title)
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  return save_png(fig, png_path, dpi=120)


def save_png(fig, path, dpi: int):
  """Write a matplotlib figure as PNG through epath (the workdir may be a bucket, gs://) and
  close it; returns `path`."""
  import matplotlib.pyplot as plt
  buf = io.BytesIO()
  fig.savefig(buf, format='png', dpi=dpi)
  plt.close(fig)
  paths.path(path).write_bytes(buf.getvalue())
  return path
