"""Defaults shared by the RLHF testbed's policy stages (preferences, ppo, grpo, rloo, dpo, bon),
in the one vocabulary every policy stage reads:

  rollout.{prompts, samples, max_new_tokens, temperature}   how responses are sampled
  kl.{coef, estimator, mode, target, horizon}                the KL to the reference
  reward.{kind, rules, missing_eos_penalty}                  a reward model or rule rewards
  eval.{every, before, gold, batch_size, max_new_tokens}     held-out evaluations
  train.{iterations | steps, epochs, minibatches, grad_accum, checkpoint_every, ...}
"""
import dataclasses

from ml_collections import ConfigDict

from lm import peft


def prompts() -> ConfigDict:
  """Line openings of the works: training plays for RL, held-out plays for evaluation."""
  return ConfigDict(dict(source='openings', n_train=2000, n_eval=256, words=(2, 4), seed=0))


def mesh() -> ConfigDict:
  return ConfigDict(dict(data=-1, fsdp=1, tensor=1, expert=1))


def sampling(samples: int, batch_size: int, max_new_tokens: int = 24,
             temperature: float = 1.0) -> ConfigDict:
  """How an offline policy stage (preferences, label, best-of-n) samples: `samples` responses
  per prompt, `batch_size` rows per generation call."""
  return ConfigDict(dict(samples=samples, max_new_tokens=max_new_tokens, temperature=temperature,
                         batch_size=batch_size))


def online(experiment: str) -> ConfigDict:
  """The sections every online RL stage (experiments/stages/online.py) reads."""
  c = ConfigDict()
  c.experiment = experiment
  c.seed = 0
  c.init_from = 'runs/rlhf/sft'       # the policy and the frozen reference
  c.reward_from = 'runs/rlhf/rm'      # the proxy reward model being optimised
  c.prompts = prompts()
  c.rollout = ConfigDict(dict(
      prompts=16,                     # training prompts per iteration (drawn at random)
      samples=1,                      # responses per prompt (the group of GRPO / RLOO)
      max_new_tokens=24,              # truncation; rows without eos are "missing EOS"
      temperature=1.0,                # sampling AND every log-prob (ratios, KL) use it
      engine=False,                   # True: generate through lm/engine (continuous batching)
      engine_slots=0,                 # engine: rows at a time (0: one slot per row)
      stop=(),                        # engine: stop strings; a response ends with the first
                                      #   (kept: the loss and the rewards see up to it)
      dynamic_sampling=False,         # DAPO: drop all-equal groups, refill (GRPO/RLOO, rules)
      max_refills=3))                 # dynamic_sampling: refill rounds at most
  c.kl = ConfigDict(dict(
      coef=0.05,                      # strength of the KL to the reference (PPO: beta)
      estimator='k1',                 # k1 (log-ratio) | k3
      mode='fixed',                   # fixed | adaptive (Ziegler et al. 2019; PPO)
      target=6.0,                     # adaptive: KL target (nats per sequence), > 0
      horizon=10000))                 # adaptive: samples over which the error is corrected
  c.reward = ConfigDict(dict(
      kind='model',                   # model: reward_from's reward model | rules: reward.rules
      rules=ConfigDict(),             # rules: {name: {fn?, weight, params}} (rl/rewards.py)
      missing_eos_penalty=0.0))       # subtracted from the score of truncated responses (0: off)
  c.peft = ConfigDict({k: v for k, v in dataclasses.asdict(peft.PeftConfig()).items()})
  c.train = ConfigDict(dict(
      iterations=40, epochs=1, minibatches=1, grad_accum=1, checkpoint_every=10,
      keep_checkpoints=2, stop_after=0,
      allow_changed_optim=False))   # True: resume with changed optim.* / iterations, epochs, minibatches
  c.eval = ConfigDict(dict(
      every=10, before=True,          # held-out gold / proxy / KL, also before the first iteration
      gold='vader',                   # rl/gold.GOLDS: logged, never optimised
      batch_size=128, max_new_tokens=0))   # 0: rollout.max_new_tokens
  c.optim = ConfigDict(dict(
      lr=1e-4, min_lr=1e-4, warmup_steps=0, decay_steps=0, schedule='constant',
      b1=0.9, b2=0.95, eps=1e-5, weight_decay=0.0, grad_clip=1.0, mu_dtype=''))
  c.mesh = mesh()
  return c
