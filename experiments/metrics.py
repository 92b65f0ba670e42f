"""Where metrics go: metrics.jsonl (one JSON object per logged step), TensorBoard, and a PNG.

Only process 0 writes. On resume, rows past the restored step are dropped from
metrics.jsonl because the resumed run logs those steps again (identically).
"""
from __future__ import annotations

import json
import math
import os

import jax


def _clean(v):
  v = float(v)
  return v if math.isfinite(v) else None


class MetricsWriter:
  def __init__(self, workdir: str, resume_step: int | None = None):
    self.enabled = jax.process_index() == 0
    self.path = os.path.join(workdir, 'metrics.jsonl')
    self._tb = None
    if not self.enabled:
      return
    if resume_step is not None and os.path.exists(self.path):
      rows = [l for l in open(self.path) if l.strip() and json.loads(l)['step'] <= resume_step]
      with open(self.path, 'w') as f:
        f.writelines(rows)
    elif os.path.exists(self.path):
      os.remove(self.path)  # a fresh run (no checkpoint) starts a fresh log
    from tensorboardX import SummaryWriter
    self._tb = SummaryWriter(os.path.join(workdir, 'tensorboard'))

  def write(self, step: int, metrics: dict) -> None:
    if not self.enabled:
      return
    row = {'step': int(step), **{k: _clean(v) for k, v in metrics.items() if v is not None}}
    with open(self.path, 'a') as f:
      f.write(json.dumps(row) + '\n')
    for k, v in row.items():
      if k != 'step' and v is not None:
        self._tb.add_scalar(k, v, step)

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()


def read(path: str) -> list[dict]:
  with open(path) as f:
    return [json.loads(l) for l in f if l.strip()]


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
  fig.savefig(png_path, dpi=120)
  plt.close(fig)
  return png_path
