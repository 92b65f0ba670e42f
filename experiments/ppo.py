"""PPO from human (here: gold-labelled) feedback, InstructGPT's step 3 (experiment `ppo`), on
the online-RL loop (experiments/stages/online.py):

  score    policy / reference log-probs, the critic's values, the RM score (one jit)
  prepare  per-token rewards (KL penalty + the score at the EOS) -> GAE (rl/ppo.py), in the
           update jit, with beta and the running score moments from the checkpointed extras
  loss     clipped surrogate + loss.vf_coef * clipped value loss (- entropy bonus)
           (+ ptx.coef * LM loss on pretraining text: PPO-ptx)
  after    the KL controller on the host: fixed beta, or Ziegler et al.'s adaptive one

The critic: value.init='reward' trains a separate value model initialised from the reward
model (trainable role 'value': {'trunk', 'head'}), 'policy_head' a zero-init head on the
policy's trunk ('value_head'). Logged per iteration besides the loop's own: clip fraction,
approx-KL, value error, beta.

python -m experiments.run --config=experiments/configs/rlhf_ppo.py --workdir=runs/rlhf/ppo \\
    --config.init_from=runs/rlhf/sft --config.reward_from=runs/rlhf/rm
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from ml_collections import ConfigDict

from data import sources
from experiments.stages import online
from lm import heads, model, objectives, peft
from lm.config import ConfigError
from rl import common, ppo, rollout

KL_MODES = ('fixed', 'adaptive')
VALUE_INITS = ('reward', 'policy_head')
SCORE_SCALES = ('none', 'running')


def _plain(tree):
  """A trunk with any LoRA folded in (a LoRA reward model's trunk as a trainable value trunk)."""
  def fold(w):
    n, r = w.a.shape[0], w.a.shape[-1]
    d = jnp.matmul(w.a.reshape(n, -1, r), w.b.reshape(n, r, -1), precision='highest')
    return (w.w + w.scale * d.reshape(w.w.shape)).astype(w.w.dtype)
  return jax.tree.map(lambda x: fold(x) if isinstance(x, peft.LoRAWeight) else x, tree,
                      is_leaf=lambda x: isinstance(x, peft.LoRAWeight))


class PPO(online.Algorithm):
  name = 'ppo'
  adaptive_kl = True

  def check(self, config: ConfigDict) -> None:
    def one_of(name, value, allowed):
      if value not in allowed:
        raise ConfigError(f'{name}={value!r} is not known; choose one of {allowed}.')
    k = config.kl
    one_of('kl.mode', k.mode, KL_MODES)
    one_of('reward.score_scale', config.reward.score_scale, SCORE_SCALES)
    one_of('value.init', config.value.init, VALUE_INITS)
    if k.mode == 'adaptive' and (k.target <= 0 or k.horizon <= 0):
      raise ConfigError(f'kl.target={k.target}: the adaptive KL controller steers towards a positive KL '
                        '(nats per sequence) over kl.horizon > 0 samples; set both > 0 or kl.mode=fixed.')

  def trees(self, ctx):
    # PPO-ptx's text is read here, at set-up: a corpus too short fails before any compile.
    self.ptx_ids = ptx_tokens(ctx.config.ptx, ctx.pol.tok) if ctx.config.ptx.coef > 0 else None
    base = super().trees(ctx)
    cfg, rm = ctx.pol.cfg, ctx.rm
    if ctx.config.value.init == 'policy_head':
      init = lambda k: {'value_head': heads.init(cfg, 1, k, init_std=0.0)}
      return base.with_trainable({'value_head': heads.logical_axes(cfg, 1)}, init,
                                 lambda: init(jax.random.key(0)))
    axes = {'value': {'trunk': model.logical_axes(rm.cfg), 'head': heads.logical_axes(rm.cfg, 1)}}
    init = lambda k: {'value': {'trunk': model.init(rm.cfg, k), 'head': heads.init(rm.cfg, 1, k)}}
    # (stage.build copies initial params into the train state: no buffer is shared)
    # an ensemble RM (params with a leading member axis): the critic starts from member 0
    rp = rm.params if rm.members == 1 else jax.tree.map(lambda x: x[0], rm.params)
    initial = lambda: {'value': {'trunk': _plain(rp['trunk']), 'head': rp['head']}}
    return base.with_trainable(axes, init, initial)

  def extras(self, ctx):
    return {'beta': jnp.float32(ctx.config.kl.coef), 'moments': ppo.running_moments()._asdict()}

  def _values(self, ctx, params, policy_params, tokens, mask):
    if ctx.config.value.init == 'policy_head':
      return rollout.response_values(policy_params, params['value_head'], tokens, mask, ctx.width,
                                     ctx.pol.cfg)
    v = params['value']
    return rollout.response_values(v['trunk'], v['head'], tokens, mask, ctx.width, ctx.rm.cfg)

  def score(self, ctx, trees, params, frozen, tokens, mask):
    values = lambda pol: self._values(ctx, params, pol, tokens, mask)
    out, metrics = online.common_scores(ctx, trees, params, frozen, tokens, mask, values=values)
    batch = {k: out[k] for k in ('logp', 'ref_logp', 'values', 'scores', 'has_eos')}
    return {'tokens': tokens, 'mask': mask, **batch}, metrics

  def prepare(self, ctx, b, extras):
    c, n = ctx.config, ctx.width
    adv, returns, rewards, kl, moments = ppo.token_advantages(
        b['scores'], b['logp'], b['ref_logp'], b['values'], b['mask'][:, n:], b['has_eos'],
        beta=extras['beta'], moments=ppo.RunningMoments(**extras['moments']),
        kl_estimator=c.kl.estimator, missing_eos_penalty=float(c.reward.missing_eos_penalty),
        score_clip=float(c.reward.score_clip), score_scale=c.reward.score_scale,
        whiten_rewards=bool(c.reward.whiten), whiten_advantages_=bool(c.loss.whiten_advantages),
        gamma=float(c.loss.gamma), lam=float(c.loss.lam))
    rmask = b['mask'][:, n:].astype(jnp.float32)
    metrics = {'reward_total': jnp.mean(jnp.sum(rewards, 1)),
               'kl_penalty': jnp.mean(jnp.sum(kl, 1)) * extras['beta'],
               'value_error': common.masked_mean(jnp.square(b['values'] - returns), rmask),
               'returns': common.masked_mean(returns, rmask)}
    keep = ('tokens', 'mask', 'logp', 'values', 'ptx_inputs', 'ptx_targets', 'ptx_weights')
    batch = {k: v for k, v in b.items() if k in keep}
    batch.update(advantages=adv, returns=returns)
    return batch, {**extras, 'moments': moments._asdict()}, metrics

  def loss_fn(self, ctx, trees):
    c, n, cfg = ctx.config, ctx.width, ctx.pol.cfg
    l, temp = c.loss, c.rollout.temperature

    def loss_fn(params, batch, rng, frozen):
      pol = trees.full(params, frozen)
      tokens, mask = batch['tokens'], batch['mask']
      want_ent = l.entropy_coef > 0
      if c.value.init == 'policy_head':   # one trunk pass gives both
        logp, ent, values = rollout.response_logprobs_values(pol, params['value_head'], tokens, mask,
                                                             n, cfg, temp, want_ent)
      else:
        logp, ent = rollout.response_logprobs(pol, tokens, mask, n, cfg, temp, want_ent)
        values = self._values(ctx, params, pol, tokens, mask)
      out = ppo.ppo_loss(logp, batch['logp'], values, batch['values'], batch['advantages'],
                         batch['returns'], mask[:, n:], clip_eps=l.clip_eps,
                         vf_clip_eps=l.vf_clip_eps if l.vf_clip_eps > 0 else jnp.inf,
                         vf_coef=l.vf_coef, entropy=ent, entropy_coef=l.entropy_coef)
      if c.ptx.coef > 0:
        ptx = {'inputs': batch['ptx_inputs'], 'targets': batch['ptx_targets'],
               'weights': batch['ptx_weights']}
        out = ppo.ppo_ptx_loss(out, objectives.next_token_loss(pol, ptx, rng, cfg=cfg), c.ptx.coef)
      return out
    return loss_fn

  def batch_extras(self, ctx, host_rng):
    """PPO-ptx: rows of pretraining text (the first ptx.chars characters of ptx.corpus)."""
    p = ctx.config.ptx
    if not p.coef > 0:
      return {}
    starts = host_rng.integers(0, len(self.ptx_ids) - p.seq_len - 1, ctx.rows)
    w = np.stack([self.ptx_ids[i:i + p.seq_len + 1] for i in starts])
    return {'ptx_inputs': w[:, :-1], 'ptx_targets': w[:, 1:],
            'ptx_weights': np.ones((ctx.rows, p.seq_len), np.float32)}

  def after(self, ctx, extras, row):
    return {**extras, 'beta': next_beta(ctx.config.kl, extras['beta'], row['kl'], ctx.rows)}

  def log_extras(self, extras):
    return {'beta': float(extras['beta'])} if extras else {}


def next_beta(kl_cfg, beta, kl: float, n: int):
  """Ziegler et al.'s controller: beta *= 1 + clip(KL / target - 1, +-0.2) * n / horizon."""
  if kl_cfg.mode != 'adaptive':
    return beta
  ctl = ppo.KLController(beta, jnp.float32(kl_cfg.target), jnp.float32(kl_cfg.horizon))
  return jax.device_put(ppo.update_kl_controller(ctl, kl, n).beta, beta.sharding)


def ptx_tokens(p: ConfigDict, tok) -> np.ndarray:
  """Token ids of the first p.chars characters of the pretraining corpus."""
  text, left = [], p.chars
  for path in sources.resolve_files(p.corpus):
    with open(path, encoding='utf-8') as f:
      text.append(f.read(left))
    left -= len(text[-1])
    if left <= 0:
      break
  ids = np.asarray(tok.encode(''.join(text)), np.int32)
  if len(ids) <= p.seq_len + 1:
    raise ConfigError(f'ptx.corpus={p.corpus!r} gives {len(ids)} tokens, fewer than ptx.seq_len='
                      f'{p.seq_len}; raise ptx.chars or lower ptx.seq_len.')
  return ids


def prepare(config: ConfigDict, workdir: str, devices=None) -> online.Run:
  """The set-up run (tests and benchmarks drive its pieces)."""
  return online.prepare(config, workdir, PPO(), devices)


def run(config: ConfigDict, workdir: str) -> dict:
  return online.run(config, workdir, PPO())


ALGORITHM = PPO   # registry.algorithm('ppo')
