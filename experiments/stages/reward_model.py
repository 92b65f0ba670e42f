"""A finished reward run opened for scoring: load_reward_model(workdir) -> RewardModel (one model
or an ensemble, normalised by reward_norm.json), and the helpers the reward stage and its readers share."""
from __future__ import annotations

import dataclasses
import json
from typing import Any, Callable
import jax
import jax.numpy as jnp
from ml_collections import ConfigDict
from experiments.stages import stage
from lm import checkpoint as ckpt_lib
from lm import heads, model, paths, peft, sharding, train as train_lib
from lm.config import ConfigError, ModelConfig
from rl import reward as reward_lib
import os


NORM_FILE = 'reward_norm.json'


# Ensembles ------------------------------------------------------------------------------------
def ensemble_config(config: ConfigDict) -> ConfigDict:
  """config.ensemble, checked (one sentence each); configs without the section are one model."""
  e = ConfigDict(dict(members=1, combine='mean', lam=0.5))
  if config.get('ensemble') is not None:
    e.update(config.ensemble.to_dict())
  if not isinstance(e.members, int) or e.members < 1:
    raise ConfigError(f'ensemble.members={e.members!r}: an ensemble needs at least one reward model; '
                      'set ensemble.members to an integer >= 1 (1 = a single model).')
  if e.combine not in reward_lib.ENSEMBLES:
    raise ConfigError(f'ensemble.combine={e.combine!r} is not a known combination; use one of '
                      f'{list(reward_lib.ENSEMBLES)}.')
  if e.lam < 0:
    raise ConfigError(f'ensemble.lam={e.lam} would reward disagreement between members; use lam >= 0.')
  return e


def stacked_axes(axes):
  """Each leaf's logical axes with a leading unnamed (replicated) member axis."""
  return jax.tree.map(lambda ax: (None, *ax), axes, is_leaf=lambda x: isinstance(x, tuple))


def write_norm(workdir: str, norm: dict) -> None:
  if jax.process_index() == 0:
    paths.write_text(paths.path(workdir) / NORM_FILE, json.dumps(norm, indent=2))


@dataclasses.dataclass
class RewardModel:
  """A trained reward model: `score(params, tokens, mask)` -> [B] normalised rewards for
  [B, T] token rows (any padding, left or right, 1 = real token; end each row with eos).

  An ensemble of `members` models: params carry a leading member axis, `score_members`
  gives the [M, B] normalised member scores and `score` their `combine` (rl.reward.ensemble
  with `lam`); gain and bias are then per-member lists. A single model has members = 1 and
  score_members = score[None]."""
  params: Any                 # {'trunk': params for model.forward (adapters hooked in), 'head'}
  score: Callable
  cfg: ModelConfig
  tokenizer: Any
  gain: float | list
  bias: float | list
  seq_len: int
  members: int = 1
  combine: str = 'mean'
  lam: float = 0.0
  score_members: Callable | None = None


def load_reward_model(workdir: str, mesh_cfg: dict | None = None, combine: str | None = None,
                      lam: float | None = None) -> RewardModel:
  """The finished reward run in `workdir` (one model or an ensemble), normalised by its
  reward_norm.json; `combine` / `lam` override an ensemble's saved combination."""
  saved = json.loads(paths.read_text(paths.path(workdir) / 'config.json'))
  norm_path = paths.path(workdir) / NORM_FILE   # epath: the workdir may be a bucket (gs://)
  if not norm_path.exists():
    raise ckpt_lib.CheckpointError(f'{workdir} has no {NORM_FILE}: the reward run did not finish; '
                                   'rerun it to train.steps.')
  norm = json.loads(paths.read_text(norm_path))
  ens = ensemble_config(ConfigDict({'ensemble': {
      **saved.get('ensemble', {}), **({} if combine is None else {'combine': combine}),
      **({} if lam is None else {'lam': lam})}}))
  m = ens.members
  cfg = ModelConfig.from_dict(saved['model'])
  pcfg = peft.PeftConfig.from_dict(saved['peft'])
  mesh = sharding.make_mesh(mesh_cfg or {'data': -1})
  if pcfg.method == 'none':
    axes = {'trunk': model.logical_axes(cfg), 'head': heads.logical_axes(cfg, 1)}
    init = lambda k: {'trunk': model.init(cfg, k), 'head': heads.init(cfg, 1, k)}
  else:
    axes = {'adapters': peft.logical_axes(cfg, pcfg), 'head': heads.logical_axes(cfg, 1)}
    init = lambda k: {'adapters': peft.init(cfg, pcfg, k), 'head': heads.init(cfg, 1, k)}
  if m > 1:
    axes, one = stacked_axes(axes), init
    init = lambda k: jax.vmap(one)(jax.random.split(k, m))
  abstract = jax.eval_shape(init, jax.random.key(0))
  target = train_lib.abstract_with_shardings(abstract, sharding.tree_shardings(axes, abstract, mesh))
  ck = ckpt_lib.Checkpointer(paths.path(workdir) / 'checkpoints', async_save=False)
  try:
    params = ck.restore_params(ckpt_lib.Checkpointer.steps_in(ck.directory)[-1], target)
  finally:
    ck.close()
  if pcfg.method != 'none':
    src = saved['source']
    base = stage.read_source(src['path']).restore_params(mesh, cfg)
    merge = lambda a: peft.combine(base, a, cfg, pcfg)
    trunk = merge(params['adapters']) if m == 1 else jax.vmap(merge)(params['adapters'])
    params = {'trunk': trunk, 'head': params['head']}
  gain, bias = norm['gain'], norm['bias']
  tok = stage.load_tokenizer(workdir)
  seq_len = saved['resolved']['seq_len']
  if m == 1:
    @jax.jit
    def score(p, tokens, mask):
      raw = heads.score(p['trunk'], p['head'], tokens, mask, cfg)[:, 0]
      return reward_lib.normalize(raw, gain, bias)
    return RewardModel(params, score, cfg, tok, gain, bias, seq_len,
                       score_members=jax.jit(lambda p, t, k: score(p, t, k)[None]))
  g, b = jnp.asarray(gain, jnp.float32)[:, None], jnp.asarray(bias, jnp.float32)[:, None]

  @jax.jit
  def score_members(p, tokens, mask):
    raw = jax.vmap(lambda q: heads.score(q['trunk'], q['head'], tokens, mask, cfg)[:, 0])(p)
    return reward_lib.normalize(raw, g, b)                                   # [M, B]

  @jax.jit
  def score_ens(p, tokens, mask):
    return reward_lib.ensemble(score_members(p, tokens, mask), ens.combine, ens.lam)
  return RewardModel(params, score_ens, cfg, tok, gain, bias, seq_len, members=m,
                     combine=ens.combine, lam=float(ens.lam), score_members=score_members)


def reward_dirs(reward_from) -> list[str]:
  """reward_from as a list: a comma-separated string or a list / tuple of workdirs."""
  if isinstance(reward_from, str):
    dirs = [p.strip() for p in reward_from.split(',') if p.strip()]
  else:
    dirs = [str(p) for p in reward_from or ()]
  return dirs


def labels_of(dirs: list[str]) -> list[str]:
  """Series names: for each workdir the fewest trailing path components no other one ends
  with (runs/rlhf/rm, runs/small/rm, runs/rlhf/rm_ens -> rlhf/rm, small/rm, rm_ens)."""
  # (a bucket URL, gs://B/..., split as it is: os.path would make it a local '/cwd/gs:/B/...')
  parts = [(d.rstrip('/').split('/') if paths.is_url(d) else
            os.path.normpath(os.path.abspath(d)).split(os.sep)) for d in dirs]
  labels = []
  for i, p in enumerate(parts):
    for k in range(1, len(p) + 1):
      if all(q[-k:] != p[-k:] for j, q in enumerate(parts) if j != i):
        break
    labels.append('/'.join(p[-k:]))
  return labels
