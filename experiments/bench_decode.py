"""Generation throughput: lm.decode against Hugging Face transformers on the same GPT-2.

One random GPT-2-shaped model is written with lm.convert.export_hf and loaded by
transformers, so both sides run identical weights. For each batch size, with all prompts
`prompt_len` tokens long and greedy decoding (no EOS, every row runs to the end):

  prefill tokens/s  batch * prompt_len / time(generate 1 new token)
  decode tokens/s   batch * (max_new_tokens - 1) / (time(max_new_tokens) - time(1))

Times are the best of `repeats` runs after a warm-up (our compile is reported separately,
never mixed in). transformers runs `generate(do_sample=False, use_cache=True)` in torch on
the CPU. `greedy_agree` is the fraction of new tokens both produced identically (float
rounding may split near-ties of a random model, after which the rows differ).
"""
from __future__ import annotations

import json
import os
import time

import jax
import numpy as np
from ml_collections import ConfigDict

from lm import convert, decode, model
from lm.config import ConfigError, ModelConfig


def best_time(fn, repeats: int) -> float:
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return min(times)


def ours(params, cfg, prompts: np.ndarray, n_new: int, repeats: int) -> tuple[dict, np.ndarray]:
  def gen(n):
    s = decode.SamplingConfig(temperature=0, max_new_tokens=n)
    out = decode.generate(params, list(prompts), jax.random.key(0), cfg=cfg, sampling=s)
    return jax.block_until_ready(out)
  t0 = time.perf_counter()
  tokens = np.asarray(gen(n_new).tokens)
  compile_s = time.perf_counter() - t0
  gen(1)
  return {'compile_s': compile_s, 't1': best_time(lambda: gen(1), repeats),
          'tn': best_time(lambda: gen(n_new), repeats)}, tokens


def transformers_side(hf, prompts: np.ndarray, n_new: int, repeats: int) -> tuple[dict, np.ndarray]:
  import torch
  ids = torch.tensor(prompts, dtype=torch.long)
  mask = torch.ones_like(ids)

  def gen(n):
    with torch.no_grad():
      return hf.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                         use_cache=True, pad_token_id=0)
  tokens = gen(n_new)[:, prompts.shape[1]:].numpy()
  gen(1)
  return {'t1': best_time(lambda: gen(1), repeats), 'tn': best_time(lambda: gen(n_new), repeats)}, tokens


def rates(t: dict, batch: int, prompt_len: int, n_new: int) -> dict:
  decode_s = max(t['tn'] - t['t1'], 1e-9)
  return {'prefill_tokens_per_s': batch * prompt_len / t['t1'],
          'decode_tokens_per_s': batch * (n_new - 1) / decode_s,
          'seconds_1_token': t['t1'], 'seconds_all_tokens': t['tn']}


def run(config: ConfigDict, workdir: str):
  os.makedirs(workdir, exist_ok=True)
  cfg = ModelConfig(**config.model.to_dict())
  p, n = config.prompt_len, config.max_new_tokens
  if config.max_new_tokens < 2:
    raise ConfigError('bench_decode needs max_new_tokens >= 2 (decode time is t(N) - t(1)).')
  decode.check_context(cfg, p, n)
  params = model.init(cfg, jax.random.key(config.seed))
  hf = None
  if config.transformers:
    try:
      import torch
      import transformers
    except ImportError as e:
      raise ConfigError('bench_decode compares with transformers: install the [hf] extra '
                        '(torch, transformers) or set config.transformers=False.') from e
    if config.torch_threads:
      torch.set_num_threads(config.torch_threads)
    path = convert.export_hf(params, cfg, os.path.join(workdir, 'hf_model'))
    hf = transformers.GPT2LMHeadModel.from_pretrained(path).eval()
  rng = np.random.default_rng(config.seed)
  rows = []
  for b in config.batch_sizes:
    prompts = rng.integers(0, cfg.vocab_size, (b, p)).astype(np.int32)
    t, toks = ours(params, cfg, prompts, n, config.repeats)
    row = {'batch': b, 'prompt_len': p, 'max_new_tokens': n, 'compile_s': t['compile_s'],
           'ours': rates(t, b, p, n)}
    if hf is not None:
      t_hf, toks_hf = transformers_side(hf, prompts, n, config.repeats)
      row['transformers'] = rates(t_hf, b, p, n)
      row['decode_speedup'] = (row['ours']['decode_tokens_per_s']
                               / row['transformers']['decode_tokens_per_s'])
      row['prefill_speedup'] = (row['ours']['prefill_tokens_per_s']
                                / row['transformers']['prefill_tokens_per_s'])
      row['greedy_agree'] = float(np.mean(toks == toks_hf))
    rows.append(row)
    print(format_row(row), flush=True)
  out = {'model': config.model.to_dict(), 'params': cfg.num_params(),
         'backend': jax.default_backend(), 'devices': jax.device_count(),
         'compiled_programs': decode.compiled_programs(), 'rows': rows}
  with open(os.path.join(workdir, 'bench.json'), 'w') as f:
    json.dump(out, f, indent=2)
  print(table(rows))
  return out


def format_row(r: dict) -> str:
  o, t = r['ours'], r.get('transformers')
  s = (f"batch {r['batch']:>3}: ours prefill {o['prefill_tokens_per_s']:>9.0f} tok/s, "
       f"decode {o['decode_tokens_per_s']:>8.0f} tok/s")
  if t:
    s += (f" | transformers prefill {t['prefill_tokens_per_s']:>9.0f}, decode "
          f"{t['decode_tokens_per_s']:>8.0f} | decode x{r['decode_speedup']:.2f}")
  return s


def table(rows: list[dict]) -> str:
  head = ('batch  prefill tok/s (ours / HF)   decode tok/s (ours / HF)   decode speedup  '
          'greedy agree')
  lines = [head, '-' * len(head)]
  for r in rows:
    o, t = r['ours'], r.get('transformers', {})
    hf_p = f"{t['prefill_tokens_per_s']:.0f}" if t else '-'
    hf_d = f"{t['decode_tokens_per_s']:.0f}" if t else '-'
    lines.append(f"{r['batch']:>5}  {o['prefill_tokens_per_s']:>12.0f} / {hf_p:<12}"
                 f"{o['decode_tokens_per_s']:>11.0f} / {hf_d:<12}"
                 f"{r.get('decode_speedup', float('nan')):>10.2f}x  "
                 f"{r.get('greedy_agree', float('nan')):>10.2f}")
  return '\n'.join(lines)
