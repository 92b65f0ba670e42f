"""The over-optimisation study with a learned gold reward (Gao et al. 2022), every stage in one
process through experiments.registry (a driver never imports another driver); the chain and
its knobs are in experiments/configs/overopt_study.py.

Why trunks are pretrained per size: the reward stage takes its trunk from init_from, and Gao
et al.'s proxies are pretrained models of each size with a head. A small pretraining run per
size (all on one tokenizer, so every RM reads the policy's ids) is the cheapest trunk that is
still a language model; proxies start from pretraining, not SFT (only the policy needs SFT).

WORKDIR/
  pretrain/<size>   sft   prefs_vader   gold_rm   prefs_gold (+ prefs_gold/n<N>.jsonl subsets)
  rm/<size>_n<N>    rm/<size>_n<N>_ens (+ _ens_<combine> views)    bon    ppo/<proxy>_b<beta>
  study.json, study_*.png (experiments/stages/overopt_axes.py)
"""
from __future__ import annotations

import copy
import json
import os
import shutil
import time

from ml_collections import ConfigDict

from experiments import registry
from experiments.configs import overopt_study as study_config
from experiments.configs import rlhf_bon, rlhf_ppo, rlhf_preferences, rlhf_pretrain, rlhf_reward, rlhf_sft
from experiments.stages import overopt_axes, trainer
from lm.config import ConfigError
from rl import reward as reward_lib

DONE = 'study_done.json'
# The stages `rerun` may name: the evaluations, which only the analysis reads. Rerunning an
# upstream stage (a proxy, the gold) would leave its dependants' results from the old one.
RERUNNABLE = ('bon', 'ppo')


def size_name(size) -> str:
  d, l, h = size
  return f'd{d}_L{l}'


def rerun_stages(c: ConfigDict) -> set[str]:
  """The stage groups in c.rerun ('bon', 'ppo', 'bon,ppo' or '')."""
  names = {x.strip() for x in str(c.get('rerun', '')).split(',') if x.strip()}
  bad = sorted(names - set(RERUNNABLE))
  if bad:
    raise ConfigError(f'rerun={c.rerun!r}: name only {" or ".join(RERUNNABLE)} (comma-separated), the '
                      'evaluation stages; an upstream stage would leave the stages after it stale.')
  return names


def resolve(config: ConfigDict) -> ConfigDict:
  """config with preset=full's overrides applied, then checked (one sentence each)."""
  c = copy.deepcopy(config)
  if c.preset == 'full':
    for k, v in study_config.FULL.items():
      if isinstance(v, dict):
        c[k].update(v)
      else:
        c[k] = v
  elif c.preset != 'reduced':
    raise ConfigError(f'preset={c.preset!r}: choose reduced or full.')
  for name, size in [('policy.size', c.policy.size), ('gold.size', c.gold.size), ('proxy.size', c.proxy.size)] + \
                    [(f'proxy.sizes[{i}]', s) for i, s in enumerate(c.proxy.sizes)]:
    if len(size) != 3 or size[0] % size[2]:
      raise ConfigError(f'{name}={tuple(size)}: a size is (d_model, n_layers, n_heads) with n_heads dividing d_model.')
  if max(c.proxy.data) >= c.gold.prompts or c.proxy.n_data > max(c.proxy.data):
    raise ConfigError(f'proxy.data={tuple(c.proxy.data)}, proxy.n_data={c.proxy.n_data}: n_data must be one of '
                      'the data sizes (or below the largest), and the gold must see more labels than any proxy '
                      f'(gold.prompts={c.gold.prompts}).')
  gold_d = c.gold.size[0] * c.gold.size[1]
  if any(s[0] * s[1] >= gold_d for s in list(c.proxy.sizes) + [c.proxy.size]):
    raise ConfigError(f'gold.size={tuple(c.gold.size)} must be larger (d_model x n_layers) than every proxy size.')
  if c.ppo.all_betas_for not in ('all', 'smallest'):
    raise ConfigError(f'ppo.all_betas_for={c.ppo.all_betas_for!r}: choose all or smallest.')
  bad = [x for x in c.ensemble.combines if x not in reward_lib.ENSEMBLES]
  if bad:
    raise ConfigError(f'ensemble.combines holds {bad}; choose from {reward_lib.ENSEMBLES}.')
  if not c.ppo.betas or min(c.ppo.betas) < 0:
    raise ConfigError(f'ppo.betas={tuple(c.ppo.betas)}: list kl.coef values >= 0.')
  rerun_stages(c)
  return c


# Stage configs, from the testbed's own ---------------------------------------------------------
def pretrain_config(c, size, tokenizer: str, data_dir: str) -> ConfigDict:
  p = rlhf_pretrain.get_config()
  p.seed = c.seed
  p.data.update(vocab_size=c.vocab_size, data_dir=data_dir, tokenizer=tokenizer or 'bpe')
  p.model.update(d_model=size[0], n_layers=size[1], n_heads=size[2])
  s = c.pretrain.steps
  p.train.update(steps=s, batch_size=c.pretrain.batch_size, checkpoint_every=s, eval_batches=5,
                 samples=0, log_every=max(1, s // 5))
  p.eval.every = s
  p.optim.update(lr=c.pretrain.lr, min_lr=c.pretrain.lr / 10, warmup_steps=min(100, max(1, s // 10)))
  p.mesh.update(c.mesh.to_dict())
  return p


def sft_config(c, init_from: str) -> ConfigDict:
  p = rlhf_sft.get_config()
  p.seed, p.init_from = c.seed, init_from
  s = c.policy.sft_steps
  p.data.works.n_per_family = max(2000, 32 * s)
  p.train.update(steps=s, checkpoint_every=s)
  p.eval.every = s
  p.optim.warmup_steps = min(p.optim.warmup_steps, max(1, s // 10))
  p.mesh.update(c.mesh.to_dict())
  return p


def prefs_config(c, sft: str, n: int, gold: str, noise: float, seed: int) -> ConfigDict:
  p = rlhf_preferences.get_config()
  p.seed, p.init_from = seed, sft
  p.prompts.n_train = n
  p.prompts.n_eval = c.ppo.eval_prompts
  p.rollout.update(samples=c.k, max_new_tokens=c.max_new_tokens, batch_size=256)
  p.eval.gold, p.label_noise = gold, noise
  p.mesh.update(c.mesh.to_dict())
  return p


def reward_config(c, init_from: str, data: str, steps: int, batch: int, lr: float,
                  members: int = 1, combine: str = 'mean') -> ConfigDict:
  p = rlhf_reward.get_config()
  p.seed, p.init_from = c.seed, init_from
  p.data.update(path=data, k=c.k, seq_len=48)
  p.train.update(steps=steps, batch_size=batch, checkpoint_every=steps, log_every=max(1, steps // 5))
  p.eval.every = steps
  p.optim.update(lr=lr, min_lr=lr / 10, warmup_steps=min(20, max(1, steps // 10)))
  p.ensemble.update(members=members, combine=combine, lam=c.ensemble.lam)
  p.mesh.update(c.mesh.to_dict())
  return p


def bon_config(c, sft: str, rms: list[str], gold: str) -> ConfigDict:
  p = rlhf_bon.get_config()
  p.seed, p.init_from, p.reward_from = c.seed, sft, ','.join(rms)
  p.prompts.n_eval = c.bon.prompts
  p.rollout.update(samples=c.bon.samples, batch_size=c.bon.batch_size, max_new_tokens=c.max_new_tokens)
  p.eval.gold = gold
  p.mesh.update(c.mesh.to_dict())
  return p


def ppo_config(c, sft: str, rm: str, gold: str, beta: float) -> ConfigDict:
  p = rlhf_ppo.get_config()
  q = c.ppo
  p.seed, p.init_from, p.reward_from = c.seed, sft, rm
  p.prompts.n_eval = q.eval_prompts
  p.rollout.update(prompts=q.prompts, max_new_tokens=c.max_new_tokens)
  # beta = 0 runs at 1e-12: at exactly 0 online.policy_trees holds no reference and the
  # held-out KL (the study's x axis) is reported as 0; 1e-12 x KL changes no reward.
  p.kl.coef = float(beta) or 1e-12
  p.train.update(iterations=q.iterations, epochs=q.epochs, minibatches=q.minibatches,
                 checkpoint_every=q.iterations)
  p.optim.update(lr=q.lr, min_lr=q.lr)
  p.eval.update(every=q.every, gold=gold)
  p.mesh.update(c.mesh.to_dict())
  return p


# The chain -----------------------------------------------------------------------------------
class Chain:
  """Runs each stage once: a sub-workdir with study_done.json is skipped (its time kept),
  unless its group ('bon', 'ppo' of 'ppo/<proxy>_b<beta>') is in `rerun`: then the finished
  sub-workdir is deleted first, since a stage would resume from its own checkpoints."""

  def __init__(self, workdir: str, rerun: set[str] = frozenset()):
    self.workdir, self.times, self.rerun = workdir, {}, set(rerun)

  def __call__(self, name: str, config: ConfigDict) -> str:
    wd = os.path.join(self.workdir, name)
    done = os.path.join(wd, DONE)
    if name.split('/')[0] in self.rerun and os.path.exists(done):
      print(f'== overopt_study: rerun {name}: deleting the finished {wd}', flush=True)
      shutil.rmtree(wd)
    if not os.path.exists(done):
      print(f'== overopt_study: {name} ({config.experiment})', flush=True)
      t0 = time.time()
      registry.get(config.experiment)(config, wd)
      with open(done, 'w') as f:
        json.dump({'seconds': time.time() - t0}, f)
    with open(done) as f:
      self.times[name] = json.load(f)['seconds']
    return wd


def subset(path: str, n: int) -> str:
  """The first n records of a preferences file (the data axis: nested subsets)."""
  out = os.path.join(os.path.dirname(path), f'n{n}.jsonl')
  with open(path) as f:
    lines = [l for l in f if l.strip()]
  if len(lines) < n:
    raise ConfigError(f'{path} holds {len(lines)} groups, fewer than the data size {n}; raise gold.prompts '
                      'or lower proxy.data.')
  with open(out, 'w') as f:
    f.writelines(lines[:n])
  return out


def ensemble_view(src: str, dst: str, combine: str) -> str:
  """The trained ensemble in `src` as a reward workdir scored by another combination (its
  checkpoints linked, config.json's ensemble.combine changed): one training run serves every
  combination, as in Coste et al."""
  if os.path.abspath(src) == os.path.abspath(dst):
    return dst
  os.makedirs(dst, exist_ok=True)
  for name in os.listdir(src):
    target = os.path.join(dst, name)
    if name == 'config.json':
      cfg = json.load(open(os.path.join(src, name)))
      cfg['ensemble']['combine'] = combine
      with open(target, 'w') as f:
        json.dump(cfg, f, indent=2)
    elif not os.path.lexists(target) and name != DONE:
      os.symlink(os.path.abspath(os.path.join(src, name)), target)
  return dst


def run(config: ConfigDict, workdir: str):
  c = resolve(config)
  os.makedirs(workdir, exist_ok=True)
  trainer.write_config(c, workdir)
  chain = Chain(workdir, rerun_stages(c))
  t0 = time.time()
  data_dir = os.path.join(workdir, 'data')

  sizes = list(dict.fromkeys([tuple(c.policy.size), *map(tuple, c.proxy.sizes), tuple(c.proxy.size),
                              tuple(c.gold.size)]))
  trunks, tokenizer = {}, ''
  for s in sizes:              # the first trains the tokenizer; the rest read it
    trunks[s] = chain(f'pretrain/{size_name(s)}', pretrain_config(c, s, tokenizer, data_dir))
    tokenizer = tokenizer or os.path.join(trunks[s], 'tokenizer_ref.json')
  sft = chain('sft', sft_config(c, trunks[tuple(c.policy.size)]))

  # The gold: VADER-ranked samples of many prompts -> the largest RM, frozen.
  vader = chain('prefs_vader', prefs_config(c, sft, c.gold.prompts, 'vader', 0.0, c.seed))
  gold_rm = chain('gold_rm', reward_config(c, trunks[tuple(c.gold.size)], os.path.join(vader, 'preferences.jsonl'),
                                           c.gold.steps, c.gold.batch_size, c.gold.lr))
  gold = 'model:' + gold_rm

  # Proxies on the gold's labels (other samples: another seed), on two axes.
  labels = chain('prefs_gold', prefs_config(c, sft, max(c.proxy.data), gold, c.proxy.label_noise, c.seed + 1))
  q = c.proxy
  plan = {(tuple(s), q.n_data) for s in q.sizes} | {(tuple(q.size), n) for n in q.data}
  proxies = {}
  for s, n in sorted(plan, key=lambda x: (x[0][0] * x[0][1], x[1])):
    data = subset(os.path.join(labels, 'preferences.jsonl'), n)
    name = f'{size_name(s)}_n{n}'
    proxies[name] = {'dir': chain(f'rm/{name}', reward_config(c, trunks[s], data, q.steps, q.batch_size, q.lr)),
                     'size': list(s), 'data': n, 'kind': 'single'}
  small = min(map(tuple, q.sizes), key=lambda s: s[0] * s[1])
  single = f'{size_name(small)}_n{q.n_data}'
  data = subset(os.path.join(labels, 'preferences.jsonl'), q.n_data)
  combines = list(c.ensemble.combines)
  ens = chain(f'rm/{single}_ens', reward_config(c, trunks[small], data, q.steps, q.batch_size, q.lr,
                                                c.ensemble.members, combines[0]))
  for how in combines:
    name = f'{single}_ens_{how}'
    proxies[name] = {'dir': ensemble_view(ens, os.path.join(workdir, 'rm', name), how),
                     'size': list(small), 'data': q.n_data, 'kind': f'ensemble_{how}', 'single': single}

  names = list(proxies)
  bon = chain('bon', bon_config(c, sft, [proxies[n]['dir'] for n in names], gold))
  ppo = {}
  # the smallest proxy and its ensembles first (the over-optimisation claims), then the axes
  for n in sorted(names, key=lambda n: (n != single, proxies[n]['kind'] == 'single')):
    every = c.ppo.all_betas_for == 'all' or n == single
    for beta in (c.ppo.betas if every else [b for b in c.ppo.betas if b == 0]):
      ppo[(n, float(beta))] = chain(f'ppo/{n}_b{beta:g}', ppo_config(c, sft, proxies[n]['dir'], gold, beta))

  axis_names = {'size': [f'{size_name(s)}_n{q.n_data}' for s in q.sizes],
                'data': [f'{size_name(q.size)}_n{n}' for n in q.data]}
  out = overopt_axes.analyse(workdir, proxies, axis_names, bon, ppo, gold_rm)
  out['stage_seconds'] = chain.times
  out['seconds_this_invocation'] = time.time() - t0
  with open(os.path.join(workdir, overopt_axes.OUT), 'w') as f:
    json.dump(out, f, indent=2)
  print(overopt_axes.summary(out))
  print(f'overopt_study: {sum(chain.times.values()):.0f} s of stages in all; this invocation '
        f'{out["seconds_this_invocation"]:.0f} s')
  return out
