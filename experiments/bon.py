"""Best-of-n sampling on the RLHF testbed: the reference point of Gao et al. (2022) for how
much gold reward optimising a proxy buys per nat of KL.

  init_from (SFT policy) -> N samples per held-out prompt at temperature 1 -> each scored by
  every proxy RM in reward_from and by the gold reward -> for n = 1, 2, 4, ..., N the expected
  proxy and gold reward of the best-of-n choice (selected by that proxy), estimated without
  bias from the N samples -> KL_bon(n) = log n - (n - 1) / n (rl.bon.kl_bon)

Writes results.json (one series per proxy RM, plus 'oracle': best-of-n selected by gold
itself, the ceiling of any proxy), scores.npz (the raw [P, N] gold and proxy scores, for
refitting), a printed table and bon.png (gold and proxy against sqrt(KL)).

The unbiased estimator over the N samples is rl/bon.py's (expected_best, curve).
"""
from __future__ import annotations

import io
import json
import time

import jax
import numpy as np
from ml_collections import ConfigDict
from tqdm import tqdm

from experiments.stages import reward_model
from experiments.stages import runlog
from experiments.stages import gold_model, policy, trainer
from lm import paths, sharding
from lm.config import ConfigError
from rl import bon as bon_lib

RESULTS = 'results.json'
SCORES = 'scores.npz'


# ---------------------------------------------------------------------------------------------
# The experiment.

def check(config: ConfigDict) -> list[str]:
  dirs = reward_model.reward_dirs(config.reward_from)
  if not dirs:
    raise ConfigError('bon needs --config.reward_from=DIR[,DIR...] (finished `reward` workdirs).')
  if config.rollout.samples < 1:
    raise ConfigError(f'rollout.samples={config.rollout.samples}: draw at least 1 sample per prompt.')
  if config.rollout.max_new_tokens < 1 or config.rollout.temperature <= 0:
    raise ConfigError('rollout.max_new_tokens must be >= 1 and rollout.temperature > 0 (samples, not greedy).')
  if config.prompts.n_eval < 1:
    raise ConfigError(f'prompts.n_eval={config.prompts.n_eval}: evaluate at least 1 prompt.')
  if config.rollout.temperature != 1.0:
    print(f'note: rollout.temperature={config.rollout.temperature}: KL_bon is measured from the temperature-'
          f'{config.rollout.temperature} sampling distribution, not from the policy itself.')
  gold_model.check(config.eval.gold)
  return dirs


def run(config: ConfigDict, workdir: str):
  dirs = check(config)
  paths.path(workdir).mkdir(parents=True, exist_ok=True)   # a local folder or a gs:// bucket
  pol = policy.open_policy(config.init_from)
  max_prompt = pol.cfg.max_seq_len - config.rollout.max_new_tokens
  texts = policy.prompt_texts(config, 'eval')
  prompts = policy.encode_prompts(pol, texts, max_prompt)
  max_len = max(len(p) for p in prompts) + config.rollout.max_new_tokens
  mesh_cfg = config.mesh.to_dict()
  mesh = sharding.make_mesh(mesh_cfg)
  rms = [policy.open_reward(d, pol, mesh, max_len) for d in dirs]   # errors before sampling
  labels = reward_model.labels_of(dirs)
  trainer.write_config(config, workdir, {'source': pol.source.record(), 'reward_dirs': dirs})
  params = pol.source.restore_params(mesh, pol.cfg)
  s = policy.sampling_config(pol, config.rollout.max_new_tokens, config.rollout.temperature)
  P, N = len(prompts), config.rollout.samples

  # N samples of each prompt: the prompt list with each prompt repeated N times, one per row.
  t0 = time.time()
  reps = [p for p in prompts for _ in range(N)]
  responses, proxies, lengths = [], [[] for _ in rms], []
  bar = tqdm(total=len(reps), desc='sampling', unit='resp')
  for gen in policy.sample(params, pol, reps, jax.random.key(config.seed), s, mesh, config.rollout.batch_size):
    responses += policy.texts_of(pol, gen)
    lengths.append(np.asarray(gen.lengths))
    seq = gen.sequences()
    for j, rm in enumerate(rms):
      proxies[j].append(np.asarray(rm.score(rm.params, *seq)))
    bar.update(len(gen.lengths))
  bar.close()
  sample_s = time.time() - t0
  g = gold_model.scorer(config.eval.gold, mesh)([t for t in texts for _ in range(N)], responses).reshape(P, N)
  proxy = [np.concatenate(p).reshape(P, N) for p in proxies]
  buf = io.BytesIO()   # then written through epath: the workdir may be a bucket (gs://)
  np.savez(buf, gold=g, **{f'proxy_{i}': p for i, p in enumerate(proxy)},
           labels=np.array(labels), lengths=np.concatenate(lengths).reshape(P, N))
  (paths.path(workdir) / SCORES).write_bytes(buf.getvalue())

  ns = bon_lib.ns_of(N)
  series = {}
  for label, d, p in zip(labels, dirs, proxy):
    series[label] = {'reward_from': str(paths.absolute(d)), 'points': bon_lib.curve(p, g, p, ns),
                     'best_samples': _best_samples(texts, responses, p, g, N)}
  oracle = {'reward_from': None, 'points': bon_lib.curve(g, g, None, ns)}
  results = {'init_from': pol.source.path, 'prompts': P, 'n_samples': N, 'ns': ns,
             'gold_kind': config.eval.gold, 'temperature': config.rollout.temperature,
             'sft_gold': float(g.mean()), 'series': series, 'oracle': oracle,
             'responses_per_s': len(reps) / sample_s,
             'duplicate_share': float(1 - np.mean([len(set(r)) / N for r in
                                                   np.array(responses, object).reshape(P, N)]))}
  paths.write_text(paths.path(workdir) / RESULTS, json.dumps(results, indent=2))
  print(table(results))
  plot(results, paths.path(workdir) / 'bon.png')
  return results


def _best_samples(texts, responses, proxy, g, N, k: int = 3) -> list[dict]:
  """The best-of-N response under this proxy for the first k prompts (for the log)."""
  out = []
  for i in range(min(k, len(texts))):
    j = int(np.argmax(proxy[i]))
    out.append({'prompt': texts[i], 'response': responses[i * N + j], 'proxy': float(proxy[i, j]),
                'gold': float(g[i, j])})
  return out


def table(results: dict) -> str:
  names = list(results['series'])
  head = f'{"n":>5} {"KL":>7} {"sqrtKL":>7}' + ''.join(f' {n[:14] + " proxy":>20} {"gold":>7}' for n in names)
  head += f' {"oracle gold":>12}'
  rows = [f'best-of-n on {results["prompts"]} held-out prompts x {results["n_samples"]} samples '
          f'(SFT gold {results["sft_gold"]:+.4f}; {results["responses_per_s"]:.0f} responses/s)', head]
  for j, n in enumerate(results['ns']):
    pt0 = results['oracle']['points'][j]
    r = f'{n:>5} {pt0["kl"]:>7.3f} {pt0["d"]:>7.3f}'
    for name in names:
      pt = results['series'][name]['points'][j]
      r += f' {pt["proxy"]:>+20.4f} {pt["gold"]:>+7.4f}'
    rows.append(r + f' {pt0["gold"]:>+12.4f}')
  return '\n'.join(rows)


def plot(results: dict, path: str) -> str:
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  fig, (ax_g, ax_p) = plt.subplots(1, 2, figsize=(11, 4.2))
  for name, s in results['series'].items():
    d = [p['d'] for p in s['points']]
    line, = ax_g.plot(d, [p['gold'] for p in s['points']], 'o-', label=name)
    ax_p.plot(d, [p['proxy'] for p in s['points']], 'o-', color=line.get_color(), label=name)
  o = results['oracle']['points']
  ax_g.plot([p['d'] for p in o], [p['gold'] for p in o], 'k:', label='oracle (select by gold)')
  for ax, what in ((ax_g, 'gold reward'), (ax_p, 'proxy reward (normalised)')):
    ax.set_xlabel('d = sqrt(KL_bon) (nats^0.5)')
    ax.set_ylabel(what)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  top = ax_g.secondary_xaxis('top', functions=(lambda d: d, lambda d: d))
  top.set_ticks([p['d'] for p in o][1::2], labels=[str(n) for n in results['ns']][1::2])
  top.set_xlabel('n')
  fig.suptitle(f'best-of-n, {results["prompts"]} prompts x {results["n_samples"]} samples')
  fig.tight_layout()
  return runlog.save_png(fig, path, dpi=110)
