"""nanoGPT's training step (PyTorch eager), timed the way experiments/bench.py times ours.

This imports nanoGPT's own `model.py` from a checkout (config.nanogpt_dir; e.g. a clone of
github.com/karpathy/nanoGPT) instead of re-writing it, so the comparison is against the
code people actually run. Its train.py step is: forward with targets, backward, clip the
gradient norm to 1, AdamW step, zero_grad(set_to_none=True); dropout 0 as in our bench.
"""
from __future__ import annotations

import importlib.util
import os
import time

import numpy as np

from experiments.stages import bench_profile


def load_nanogpt(nanogpt_dir: str):
  path = os.path.join(nanogpt_dir, 'model.py')
  if not os.path.isfile(path):
    raise FileNotFoundError(f'config.nanogpt_dir={nanogpt_dir!r} has no model.py; give the path of a '
                            'nanoGPT checkout (git clone https://github.com/karpathy/nanoGPT) or "" to skip.')
  spec = importlib.util.spec_from_file_location('nanogpt_model', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def make_step(nanogpt_dir: str, model: dict, batch_size: int, seq_len: int, optim):
  """nanoGPT's GPT at our bench model's sizes, and one training step on a fixed random batch."""
  import torch
  nano = load_nanogpt(nanogpt_dir)
  torch.manual_seed(0)
  cfg = nano.GPTConfig(block_size=seq_len, vocab_size=model['vocab_size'], n_layer=model['n_layers'],
                       n_head=model['n_heads'], n_embd=model['d_model'], dropout=0.0,
                       bias=model.get('use_bias', True))
  net = nano.GPT(cfg)
  net.train()
  opt = net.configure_optimizers(optim.weight_decay, optim.lr, (optim.b1, optim.b2), 'cpu')
  rng = np.random.default_rng(0)
  toks = torch.from_numpy(rng.integers(0, cfg.vocab_size, (batch_size, seq_len + 1)).astype(np.int64))
  x, y = toks[:, :-1].contiguous(), toks[:, 1:].contiguous()

  def step():
    _, loss = net(x, y)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(net.parameters(), optim.grad_clip)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.detach()

  return step, sum(p.numel() for p in net.parameters())


def bench_nanogpt(nanogpt_dir: str, model: dict, batch_size: int, seq_len: int, steps: int,
                  warmup_steps: int, repeats: int, optim, profile_steps: int = 0) -> dict:
  import torch
  step, n_params = make_step(nanogpt_dir, model, batch_size, seq_len, optim)
  for _ in range(warmup_steps + 1):
    step()
  times = []
  for _ in range(repeats):   # best window, as bench.bench_one
    t0 = time.perf_counter()
    for _ in range(steps):
      loss = step()
    float(loss)
    times.append((time.perf_counter() - t0) / steps)
  dt = min(times)
  out = {'ms_per_step': 1000 * dt, 'median_ms_per_step': 1000 * float(np.median(times)),
         'tokens_per_sec': batch_size * seq_len / dt, 'torch_threads': torch.get_num_threads(),
         'params': n_params}
  if profile_steps:
    out['profile_ms'] = bench_profile.torch_breakdown(step, profile_steps)
  return out
