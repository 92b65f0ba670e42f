"""RL throughput (`bench_rl`): where a PPO iteration's time goes; GRPO (a cheap reward, and rule
rewards) and DPO beside TRL.

A tiny random GPT-2-shaped policy and a reward model on its trunk (written like
tests/rl_fixtures, or init_from / reward_from of real runs) drive the online-RL loop's own
pieces (experiments/stages/online.py: `prepare`, then `iterate` per iteration: draw,
generation, the one scoring jit, the one update jit, gold scoring, then the algorithm's
`after`) with the PPO adapter, got through registry.algorithm('ppo') (no driver is imported).
After `warmup` iterations (compiles), per iteration:

  gen_s, score_s, update_s   seconds in generation / the one scoring jit / the update jit
  host_s                     the rest of the iteration: the draw, padding, the gold score of
                             the samples (gold_s, also reported alone), the KL controller
  rollout tokens/s           response tokens / iteration seconds
  overhead                   iteration / (generation + one scoring pass + E x M forward/
                             backward passes of the PPO loss on one minibatch) - 1, the
                             pieces timed alone (best of `repeats`) with the same shapes;
                             what the optimizer, GAE, the scan and the host add (goal <= 30%)

GRPO side by side: the same loop with the GRPO adapter (registry.algorithm('grpo')) against
TRL's GRPOTrainer on the same weights (exported with lm.convert through the `export`
experiment, registry.get('export')), the same prompts, k, response length and one update per
rollout, torch on the CPU, with the same cheap reward (response length in characters) on the
TRL side. tokens/s = response tokens / (generation + scoring + update seconds); ratio = ours /
TRL (goal >= 2). DPO likewise: the dpo stage's loss (experiments/stages/preference_loss.py,
reference log-probs each step) in lm.train's step against TRL's DPOTrainer, on `dpo_batch`
pairs of fixed-length random responses after the same prompts; tokens/s counts prompt +
response tokens of both rows. Without `trl` installed the TRL columns are skipped with a
printed line; a TRL failure is printed and recorded (trl_error / trl_dpo_error /
trl_rules_error) and our numbers kept. Writes bench.json and prints a table.

GRPO with rule rewards (grpo_rules): the same GRPO loop and shapes with reward.kind='rules'
(the strict `answer` rule: the number after '#### ' against the problem's) on the RLVR
testbed's arith prompts in its CoT query layout ('Q: ...\nA:\n', configs/rlvr_arith.py),
beside GRPOTrainer on the same exported weights and prompt texts, whose reward function calls
our rules (rl/rewards.score with the loop's FUNCTIONS, as online.rule_scores does) on each
completion: both sides do the same reward work. Ours counts the seconds in the rules
(time_rules: decoding + the rule) in its iteration; TRL's are timed inside its reward
function. The policy is rules_init_from, else a tiny random one like the others whose
context holds the longest arith prompt (81 chars) + max_new_tokens and whose vocabulary has
'#', '+', '='. A random policy writes garbage, so the reward is ~0 on both sides (every row
unparsable): this row measures throughput, not learning.

Measured (commit efe402d's code, run at e21c7b4; defaults: 32 rows, k=4, 24 new tokens, 3
timed iterations after 1 warm-up; trl 1.16.0, torch 2.13 CPU at 2 threads, jax 0.10.2 CPU; the
2 cores shared with other work, load average 7.7-9.1 throughout, so TRL's steps swing
11.5-29 s):
  PPO iteration 2.089 s (generation 0.168, scoring 0.406, update 1.511, host 0.003),
    318 rollout tokens/s, overhead -8.7%
  GRPO, length reward    ours 0.935 s/it, 715 tokens/s   TRL 20.01 s/step, 34 tokens/s
                         ratio 20.9x (14.2x against TRL's fastest step)
  DPO, 8 pairs           ours 0.190 s, 3,378 tokens/s    TRL 4.095 s, 152 tokens/s; 22.2x
  GRPO, 'answer' rule    ours 1.724 s/it (generation 0.548, rules 0.0007, scoring 0.394,
    on arith (width 81)    update 0.782), 409 tokens/s   TRL 16.21 s/step, 41 tokens/s
                         (its reward function 0.0007 s/step); ratio 10.0x (7.1x against
                         TRL's fastest step); mean reward 0.000 on both sides
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import time

import jax
import numpy as np
from ml_collections import ConfigDict

from data import sources
from data import formats, tokenizers
from experiments import registry
from experiments.configs import (base, export as export_config, reward_base, rlhf_dpo, rlhf_grpo,
                                 rlhf_ppo, rlvr_arith)
from experiments.stages import online, policy as policy_lib, preference_loss, reward_model, stage
from lm import checkpoint as ckpt_lib
from lm import decode, heads, model, sharding, train as train_lib
from lm.config import ConfigError, ModelConfig
from rl import rewards

CHARS = "abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ,.;:!?'-\n"
RULE_CHARS = '0123456789#+-='     # the rule row's policy can write a CoT answer ('#### N')


# 1. Tiny random runs (what pretrain/sft and reward leave; no training) ----------------------
def _save(workdir: str, tree, config: dict) -> None:
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, 'config.json'), 'w') as f:
    json.dump(config, f, default=str)
  state = train_lib.TrainState(step=jax.numpy.zeros((), 'int32'), params=tree, opt_state=())
  ck = ckpt_lib.Checkpointer(os.path.join(workdir, 'checkpoints'), async_save=False)
  ck.save(1, state, {}, {}, force=True)
  ck.wait()
  ck.close()


def tiny_runs(workdir: str, model_kw: dict, seed: int, extra_chars: str = '') -> tuple[str, str]:
  """(policy dir, reward dir): a char-tokenizer GPT-2 with eos, and an RM on its own trunk."""
  text = ''.join(sorted({c for f in sources.resolve_files('shakespeare_works')
                         for c in sources.read_text(f)} | set(CHARS) | set(extra_chars)))
  tok = tokenizers.add_special_tokens(tokenizers.CharTokenizer.from_texts([text]), ['eos'])
  cfg = ModelConfig(vocab_size=tok.vocab_size, **model_kw)
  pol_dir, rm_dir = os.path.join(workdir, 'policy'), os.path.join(workdir, 'rm')
  c = base.pretrain().to_dict()
  c['model'], c['resolved'] = dataclasses.asdict(cfg), {'vocab_size': cfg.vocab_size}
  init = jax.jit(model.init, static_argnums=0)   # one compile for both trunks, not eager ops
  _save(pol_dir, init(cfg, jax.random.key(seed)), c)
  tok.save(tokenizers.run_file(pol_dir))
  c = reward_base.reward().to_dict()
  c['model'] = dataclasses.asdict(cfg)
  c['resolved'] = {'vocab_size': cfg.vocab_size, 'seq_len': cfg.max_seq_len}
  c['source'] = {'path': os.path.abspath(pol_dir)}
  _save(rm_dir, {'trunk': init(cfg, jax.random.key(seed + 1)),
                 'head': heads.init(cfg, 1, jax.random.key(seed + 2), init_std=0.5)}, c)
  tok.save(tokenizers.run_file(rm_dir))
  reward_model.write_norm(rm_dir, {'gain': 1.0, 'bias': 0.0})
  return pol_dir, rm_dir


def best_time(fn, repeats: int) -> float:
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t0)
  return min(times)


# 2. PPO: the time split and the overhead ---------------------------------------------------
def ppo_config(config: ConfigDict, pol_dir: str, rm_dir: str) -> ConfigDict:
  c = rlhf_ppo.get_config()
  c.init_from, c.reward_from, c.seed = pol_dir, rm_dir, config.seed
  c.prompts.update(n_train=max(256, config.batch_size), n_eval=16)
  c.rollout.update(prompts=config.batch_size, samples=1, max_new_tokens=config.max_new_tokens)
  c.train.update(iterations=config.warmup + config.iterations, epochs=config.ppo_epochs,
                 minibatches=config.ppo_minibatches, grad_accum=1, checkpoint_every=0)
  c.eval.update(every=0, before=False)
  return c


def start(run: online.Run):
  """(state, extras, rng, frozen) as online.run starts them from the checkpointed state."""
  return (run.st['train'], run.st.get('extras', {}), jax.random.wrap_key_data(run.st['rng']),
          run.trees.frozen)


def timed_iteration(run: online.Run, state, extras, rng, frozen):
  """online.iterate, then the algorithm's host-side `after` (as online.run does), timed whole."""
  t0 = time.perf_counter()
  state, extras, rng, row = online.iterate(run, state, extras, rng, frozen)
  extras = run.algo.after(run.ctx, extras, row)
  return state, extras, rng, row, time.perf_counter() - t0


def bench_ppo(config: ConfigDict, workdir: str, pol_dir: str, rm_dir: str) -> dict:
  c = ppo_config(config, pol_dir, rm_dir)
  algo = registry.algorithm('ppo')()
  run = online.prepare(c, os.path.join(workdir, 'ppo'), algo)
  ctx, r, t = run.ctx, c.rollout, c.train
  state, extras, rng, frozen = start(run)
  rows = []
  for it in range(config.warmup + config.iterations):
    state, extras, rng, row, it_s = timed_iteration(run, state, extras, rng, frozen)
    if it >= config.warmup:
      rows.append({'iteration_s': it_s, 'gen_s': row['time_generate'], 'score_s': row['time_score'],
                   'update_s': row['time_update'], 'gold_s': row['time_reward'],
                   'tokens': row['response_tokens']})
  run.checkpointer.close()

  # The denominator's pieces alone, same shapes: generation, one scoring pass, and one
  # forward/backward of the PPO loss on a minibatch (x epochs x minibatches).
  prompts, it_key, _, _ = online.draw(run, rng)
  toks, pmask = decode.left_pad(prompts, ctx.width)
  sampling = policy_lib.sampling_config(ctx.pol, r.max_new_tokens, r.temperature)
  params = state.params
  generate = lambda: decode.generate_padded(run.trees.generation(params, frozen), toks, pmask, it_key,
                                            ctx.pol.cfg, sampling, mesh=ctx.mesh).sequences()
  gen_alone = best_time(generate, config.repeats)
  tokens, mask = generate()
  score_alone = best_time(lambda: run.score(params, frozen, tokens, mask), config.repeats)
  batch, _ = run.score(params, frozen, tokens, mask)
  batch, _, _ = train_lib.with_mesh(jax.jit(functools.partial(algo.prepare, ctx)), ctx.mesh)(batch, extras)
  mb = jax.tree.map(lambda x: x[:ctx.rows // t.minibatches], batch)
  loss_fn = algo.loss_fn(ctx, run.trees)

  def loss(prm, b, frz):
    total, n, _ = loss_fn(prm, b, jax.random.key(0), frz)
    return total / n
  grad = train_lib.with_mesh(jax.jit(jax.value_and_grad(loss)), ctx.mesh)   # frozen: an argument
  jax.block_until_ready(grad(params, mb, frozen))
  fb = best_time(lambda: grad(params, mb, frozen), config.repeats)
  n_passes = t.epochs * t.minibatches
  mean = lambda k: float(np.mean([x[k] for x in rows]))
  it_s = mean('iteration_s')
  floor = gen_alone + score_alone + n_passes * fb
  return {'batch': ctx.rows, 'prompt_len': ctx.width, 'max_new_tokens': r.max_new_tokens,
          'epochs': t.epochs, 'minibatches': t.minibatches, 'iterations': len(rows),
          'iteration_s': it_s, 'gen_s': mean('gen_s'), 'score_s': mean('score_s'),
          'update_s': mean('update_s'), 'gold_s': mean('gold_s'),
          'host_s': it_s - mean('gen_s') - mean('score_s') - mean('update_s'),
          'tokens_per_s': mean('tokens') / it_s,
          'alone': {'gen_s': gen_alone, 'score_s': score_alone, 'fwd_bwd_s': fb,
                    'fwd_bwd_passes': n_passes, 'sum_s': floor},
          'overhead': it_s / floor - 1.0, 'per_iteration': rows}


# 3. GRPO: ours (the online loop with the GRPO adapter) and TRL's GRPOTrainer --------------
def grpo_config(config: ConfigDict, pol_dir: str, rm_dir: str) -> ConfigDict:
  c = rlhf_grpo.get_config()
  c.init_from, c.reward_from, c.seed = pol_dir, rm_dir, config.seed
  c.prompts.update(n_train=max(256, config.batch_size), n_eval=16)
  c.rollout.update(prompts=config.batch_size // config.grpo_k, samples=config.grpo_k,
                   max_new_tokens=config.max_new_tokens)
  c.train.update(iterations=config.warmup + config.iterations, epochs=1, minibatches=1,
                 grad_accum=1, checkpoint_every=0)
  c.eval.update(every=0, before=False)
  return c


def bench_grpo(config: ConfigDict, workdir: str, pol_dir: str, rm_dir: str) -> tuple[dict, list]:
  """Ours; also returns the prompt examples used (per iteration), for TRL."""
  return run_grpo(config, grpo_config(config, pol_dir, rm_dir), os.path.join(workdir, 'grpo'))


def run_grpo(config: ConfigDict, c: ConfigDict, workdir: str) -> tuple[dict, list]:
  """The online loop with the GRPO adapter on config `c`, timed after warm-up; and each
  iteration's prompt examples (one per group, in draw order: what TRL is given)."""
  run = online.prepare(c, workdir, registry.algorithm('grpo')())
  ctx, r = run.ctx, c.rollout
  state, extras, rng, frozen = start(run)
  rows, used = [], []
  for it in range(c.train.iterations):
    idx = online.draw_indices(run, rng)[0]         # what iterate draws from this rng
    used.append([ctx.train_examples[i] for i in idx[::r.samples]])
    state, extras, rng, row, _ = timed_iteration(run, state, extras, rng, frozen)
    if it >= config.warmup:
      # (with a reward model time_rules is only the texts' decoding, for the gold score: not
      # the reward's work, and the GRPO row never counted it)
      rows.append({'gen_s': row['time_generate'], 'rules_s': row['time_rules'] if ctx.rules else 0.0,
                   'score_s': row['time_score'], 'update_s': row['time_update'],
                   'tokens': row['response_tokens'],
                   **{k: row[k] for k in row if k.startswith('reward/')}})
  run.checkpointer.close()
  return summarise(rows, ctx.rows, r.samples, ctx.width, r.max_new_tokens), used


def summarise(rows: list[dict], n_rows: int, k: int, width: int, n_new: int) -> dict:
  """Means over the timed iterations; an iteration = generation + rules + scoring + update
  (rules_s: the host's rule rewards, 0 with a reward model)."""
  mean = lambda key: float(np.mean([x[key] for x in rows]))
  it_s = mean('gen_s') + mean('rules_s') + mean('score_s') + mean('update_s')
  out = {'rows': n_rows, 'k': k, 'prompt_len': width, 'max_new_tokens': n_new,
         'iterations': len(rows), 'iteration_s': it_s, 'gen_s': mean('gen_s'),
         'rules_s': mean('rules_s'), 'score_s': mean('score_s'), 'update_s': mean('update_s'),
         'response_tokens': mean('tokens'), 'tokens_per_s': mean('tokens') / it_s}
  out.update({k: mean(k) for k in rows[0] if k.startswith('reward/')})
  return out


def export_policy(workdir: str, pol_dir: str, name: str) -> str:
  """The policy as a Hugging Face folder WORKDIR/name (the export experiment, got through
  registry.get('export'): not a driver import)."""
  e = export_config.get_config()
  e.init_from, e.out = pol_dir, os.path.join(workdir, name)
  return registry.get('export')(e, workdir)


def length_reward(completions, **_):   # cheap: the length in characters
  return [float(len(x)) for x in completions]


def bench_trl_grpo(config: ConfigDict, workdir: str, pol_dir: str, prompts: list[list[dict]],
                   width: int, reward=length_reward, columns: tuple = (), name: str = 'hf_policy'
                   ) -> dict:
  """TRL's GRPOTrainer on the exported policy (WORKDIR/name); step times from a callback after
  warm-up. `prompts`: each iteration's examples; their `columns` go to the reward function."""
  import datasets
  import torch
  import transformers
  import trl
  if config.torch_threads:
    torch.set_num_threads(config.torch_threads)
  hf_dir = export_policy(workdir, pol_dir, name)
  # (the export splits special-token text; TRL appends eos as text, so keep '</s>' whole)
  hf_tok = transformers.PreTrainedTokenizerFast.from_pretrained(hf_dir, split_special_tokens=False)
  hf_tok.padding_side = 'left'
  if hf_tok.pad_token is None:
    hf_tok.pad_token = hf_tok.eos_token
  hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir)
  k, n_new = config.grpo_k, config.max_new_tokens
  flat = [x for group in prompts for x in group]
  ds = datasets.Dataset.from_dict({'prompt': [x['prompt'] for x in flat],
                                   **{c: [x[c] for x in flat] for c in columns}})
  times, lengths, rewards_seen = [], [], []

  class Clock(transformers.TrainerCallback):
    def on_step_begin(self, args, state, control, **kw):
      self.t0 = time.perf_counter()

    def on_step_end(self, args, state, control, **kw):
      times.append(time.perf_counter() - self.t0)

    def on_log(self, args, state, control, logs=None, **kw):
      if logs and 'completions/mean_length' in logs:
        lengths.append(float(logs['completions/mean_length']))
      if logs and 'reward' in logs:
        rewards_seen.append(float(logs['reward']))

  steps = config.warmup + config.iterations
  args = trl.GRPOConfig(
      output_dir=os.path.join(workdir, 'trl_grpo'), per_device_train_batch_size=len(prompts[0]) * k,
      num_generations=k, max_completion_length=n_new, max_steps=steps, num_iterations=1,
      learning_rate=5e-5, beta=0.04, temperature=1.0, logging_steps=1, report_to='none',
      save_strategy='no', use_cpu=True, seed=config.seed, shuffle_dataset=False,
      dataloader_num_workers=0, bf16=False, fp16=False)
  trainer = trl.GRPOTrainer(model=hf, reward_funcs=reward, args=args, train_dataset=ds,
                            processing_class=hf_tok, callbacks=[Clock()])
  trainer.train()
  timed = times[config.warmup:] or times
  mean_len = float(np.mean(lengths[config.warmup:] or lengths)) if lengths else float(n_new)
  rows = len(prompts[0]) * k
  step_s = float(np.mean(timed))
  return {'trl_version': trl.__version__, 'torch_threads': torch.get_num_threads(),
          'rows': rows, 'k': k, 'max_new_tokens': n_new, 'steps': len(timed), 'step_s': step_s,
          'response_tokens': mean_len * rows, 'tokens_per_s': mean_len * rows / step_s,
          'reward': float(np.mean(rewards_seen[config.warmup:] or rewards_seen)) if rewards_seen else None,
          'step_times': times}


# 3b. GRPO with rule rewards: arith prompts, the `answer` rule, on both sides ---------------
def grpo_rules_config(config: ConfigDict, pol_dir: str) -> ConfigDict:
  """The GRPO row's config (same shapes) with rule rewards: the RLVR testbed's arith prompts
  in its CoT query layout (experiments/configs/rlvr_arith.py) and the strict `answer` rule."""
  c = grpo_config(config, pol_dir, '')
  c.prompts = ConfigDict(rlvr_arith.get_config().prompts.to_dict())
  c.prompts.update(n_train=max(256, config.batch_size), n_eval=16)
  c.reward.update(kind='rules')
  c.reward.rules = ConfigDict(dict(answer=dict(weight=1.0, extract='strict', field='answer')))
  return c


def rules_policy(config: ConfigDict, workdir: str) -> str:
  """rules_init_from, else a tiny random policy like the others whose context holds the
  longest arith prompt (one char-token each) + max_new_tokens, with '#', '+', '=' in its
  vocabulary (the CoT answer's characters: '#### N' can be sampled)."""
  if config.rules_init_from:
    return config.rules_init_from
  longest = max(len(t) for t in policy_lib.prompt_texts(grpo_rules_config(config, ''), 'train'))
  n = -(-(longest + config.max_new_tokens) // 16) * 16
  return tiny_runs(os.path.join(workdir, 'runs_rules'), {**config.model.to_dict(), 'max_seq_len': n},
                   config.seed, extra_chars=RULE_CHARS)[0]


def rules_reward(c: ConfigDict, spent: list):
  """TRL's reward function: our rules (rl/rewards.score with the loop's FUNCTIONS, as
  online.rule_scores calls it) on each completion against its problem's answer; the seconds
  of each call appended to `spent`."""
  rules = online.rules_of(c)

  def answer_rule(prompts, completions, answer, **_):
    t0 = time.perf_counter()
    examples = [{'prompt': p, 'answer': a} for p, a in zip(prompts, answer)]
    out = rewards.score(rules, prompts, completions, examples, functions=online.FUNCTIONS).total
    spent.append(time.perf_counter() - t0)
    return [float(x) for x in out]
  return answer_rule


def bench_grpo_rules(config: ConfigDict, workdir: str, use_trl: bool, out: dict) -> None:
  """Ours (out['grpo_rules']) and, with use_trl, TRL's (out['trl_grpo_rules']) GRPO on the
  arith prompts with the `answer` rule; a TRL failure is recorded (trl_rules_error)."""
  pol_dir = rules_policy(config, workdir)
  c = grpo_rules_config(config, pol_dir)
  out['grpo_rules'], used = run_grpo(config, c, os.path.join(workdir, 'grpo_rules'))
  out['trl_grpo_rules'] = None
  if use_trl:
    spent = []
    try:
      t = bench_trl_grpo(config, workdir, pol_dir, used, out['grpo_rules']['prompt_len'],
                         reward=rules_reward(c, spent), columns=('answer',), name='hf_policy_rules')
      t['rules_s'] = float(np.mean(spent[config.warmup:] or spent))
      out['trl_grpo_rules'] = t
      out['grpo_rules_ratio'] = out['grpo_rules']['tokens_per_s'] / t['tokens_per_s']
      out['grpo_rules_ratio_vs_trl_best'] = out['grpo_rules']['tokens_per_s'] / (
          t['response_tokens'] / min(t['step_times'][config.warmup:] or t['step_times']))
    except Exception as e:   # TRL's API moves between versions: report, keep our numbers
      out['trl_rules_error'] = f'{type(e).__name__}: {e}'
      print(f'TRL GRPOTrainer (rules) failed: {out["trl_rules_error"]}')


# 4. DPO: ours (the dpo stage's loss in lm.train's step) and TRL's DPOTrainer ----------------
def dpo_records(config: ConfigDict, prompts: list[str]) -> list[dict]:
  """Pairs of random letter strings of max_new_tokens characters (one token each with the
  char tokenizer) after real prompts: fixed lengths on both sides."""
  rng = np.random.default_rng(config.seed)
  word = lambda: ''.join(rng.choice(list('abcdefghij klmnop'), config.max_new_tokens - 1))
  return [{'prompt': p, 'responses': [word(), word()], 'ranks': [0, 1]}
          for p in prompts[:config.dpo_batch * (config.warmup + config.iterations)]]


def encode_pairs(records: list[dict], pol: policy_lib.Policy, seq_len: int) -> dict:
  """Pair rows as the dpo stage lays them out (experiments/stages/preference_loss.py):
  {'tokens', 'mask', 'resp': [N, 2, seq_len]}, [prompt | response + eos] right-padded, the
  prompt cut from the left to fit (bench records are short: nothing else is cut)."""
  out = {k: np.zeros((len(records), 2, seq_len), np.int32) for k in ('tokens', 'mask', 'resp')}
  for a, r in enumerate(records):
    prompt = formats.prompt_tokens({'instruction': '', 'input': r['prompt']}, pol.template, pol.tok)
    for b, x in enumerate(r['responses']):
      resp = list(pol.tok.encode(x))[:seq_len - 2] + [pol.eos]
      ids = list(prompt)[-(seq_len - len(resp)):] + resp
      out['tokens'][a, b, :len(ids)] = ids
      out['mask'][a, b, :len(ids)] = 1
      out['resp'][a, b, len(ids) - len(resp):len(ids)] = 1
  return out


def bench_dpo(config: ConfigDict, pol_dir: str, records: list[dict]) -> dict:
  c = rlhf_dpo.get_config()
  c.init_from, c.seed = pol_dir, config.seed
  c.train.update(steps=config.warmup + config.iterations, batch_size=config.dpo_batch)
  pol = policy_lib.open_policy(pol_dir)
  seq_len = pol.cfg.max_seq_len
  data = encode_pairs(records, pol, seq_len)
  mesh = sharding.make_mesh(c.mesh.to_dict())
  trees = policy_lib.trees(c, pol, mesh)
  spec = {k: jax.ShapeDtypeStruct(v.shape[1:], v.dtype) for k, v in data.items()}
  batch_sh = train_lib.batch_shardings(mesh, spec)
  setup = stage.build(c, None, mesh, axes=trees.axes, init_params=trees.init_params,
                      total_steps=c.train.steps, initial_params=trees.initial)
  loss_fn = preference_loss.make_loss(trees, 'dpo', c.kl.coef)   # beta
  step = train_lib.make_train_step(loss_fn, setup.tx, mesh, setup.shardings, batch_sh,
                                   frozen_sh=trees.frozen_sh, seed=c.seed, schedule=setup.schedule)
  state, b, times, tokens = setup.state, config.dpo_batch, [], []
  for i in range(c.train.steps):
    part = {k: jax.device_put(v[i * b:(i + 1) * b], batch_sh[k]) for k, v in data.items()}
    t0 = time.perf_counter()
    state, m = step(state, part, trees.frozen)
    jax.device_get(m)
    if i >= config.warmup:
      times.append(time.perf_counter() - t0)
      tokens.append(float(np.asarray(data['mask'][i * b:(i + 1) * b]).sum()))
  step_s = float(np.mean(times))
  return {'pairs': b, 'seq_len': seq_len, 'steps': len(times), 'step_s': step_s,
          'tokens': float(np.mean(tokens)), 'tokens_per_s': float(np.mean(tokens)) / step_s}


def bench_trl_dpo(config: ConfigDict, workdir: str, records: list[dict]) -> dict:
  """TRL's DPOTrainer on the exported policy (the folder bench_trl_grpo wrote)."""
  import datasets
  import torch
  import transformers
  import trl
  hf_dir = os.path.join(workdir, 'hf_policy')
  # (the export splits special-token text; TRL appends eos as text, so keep '</s>' whole)
  hf_tok = transformers.PreTrainedTokenizerFast.from_pretrained(hf_dir, split_special_tokens=False)
  if hf_tok.pad_token is None:
    hf_tok.pad_token = hf_tok.eos_token
  hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir)
  ds = datasets.Dataset.from_dict({'prompt': [r['prompt'] for r in records],
                                   'chosen': [r['responses'][0] for r in records],
                                   'rejected': [r['responses'][1] for r in records]})
  times, tokens = [], []

  class Clock(transformers.TrainerCallback):
    def on_step_begin(self, args, state, control, **kw):
      self.t0 = time.perf_counter()

    def on_step_end(self, args, state, control, **kw):
      times.append(time.perf_counter() - self.t0)

  steps = config.warmup + config.iterations
  args = trl.DPOConfig(
      output_dir=os.path.join(workdir, 'trl_dpo'), per_device_train_batch_size=config.dpo_batch,
      max_steps=steps, learning_rate=5e-6, beta=0.1, logging_steps=1, report_to='none',
      save_strategy='no', use_cpu=True, seed=config.seed, dataloader_num_workers=0)
  trainer = trl.DPOTrainer(model=hf, args=args, train_dataset=ds, processing_class=hf_tok,
                           callbacks=[Clock()])
  trainer.train()
  n_tok = sum(len(hf_tok(r['prompt'])['input_ids']) * 2 + sum(len(hf_tok(x)['input_ids']) + 1
              for x in r['responses']) for r in records[:config.dpo_batch])
  step_s = float(np.mean(times[config.warmup:] or times))
  return {'trl_version': trl.__version__, 'torch_threads': torch.get_num_threads(),
          'pairs': config.dpo_batch, 'steps': len(times), 'step_s': step_s, 'tokens': float(n_tok),
          'tokens_per_s': n_tok / step_s, 'step_times': times}


# 5. The run ---------------------------------------------------------------------------------
def check(config: ConfigDict) -> None:
  if config.iterations < 1 or config.warmup < 0 or config.repeats < 1:
    raise ConfigError('bench_rl needs iterations >= 1, warmup >= 0 and repeats >= 1.')
  if config.batch_size % config.grpo_k or config.grpo_k < 2:
    raise ConfigError(f'batch_size={config.batch_size} must be a multiple of grpo_k='
                      f'{config.grpo_k} >= 2 (GRPO groups of k responses per prompt).')
  if config.batch_size % config.ppo_minibatches:
    raise ConfigError(f'batch_size={config.batch_size} must split into ppo_minibatches='
                      f'{config.ppo_minibatches}.')
  if config.grpo_rules and config.rules_init_from:   # its context must hold the arith prompts
    pol = policy_lib.open_policy(config.rules_init_from)
    texts = policy_lib.prompt_texts(grpo_rules_config(config, config.rules_init_from), 'train')
    policy_lib.encode_prompts(pol, texts, pol.cfg.max_seq_len - config.max_new_tokens)


def trl_installed(out: dict) -> bool:
  try:
    import trl  # noqa: F401
  except ImportError:
    out['trl_skipped'] = 'trl is not installed (pip install -e ".[bench]"): TRL column skipped'
    print(out['trl_skipped'])
    return False
  return True


def run(config: ConfigDict, workdir: str) -> dict:
  check(config)
  os.makedirs(workdir, exist_ok=True)
  if config.init_from:
    pol_dir, rm_dir = config.init_from, config.reward_from
  else:
    pol_dir, rm_dir = tiny_runs(os.path.join(workdir, 'runs'), config.model.to_dict(), config.seed)
  out = {'backend': jax.default_backend(), 'devices': jax.device_count(),
         'policy': pol_dir, 'reward': rm_dir}
  out['ppo'] = bench_ppo(config, workdir, pol_dir, rm_dir)
  print(ppo_table(out['ppo']), flush=True)
  use_trl = bool(config.trl) and (config.grpo or config.grpo_rules) and trl_installed(out)
  if config.grpo:
    out['grpo'], used = bench_grpo(config, workdir, pol_dir, rm_dir)
    prompts = [[x['prompt'] for x in group] for group in used]
    out['trl_grpo'] = None
    if use_trl:
      try:
        out['trl_grpo'] = bench_trl_grpo(config, workdir, pol_dir, used, out['grpo']['prompt_len'])
      except Exception as e:   # TRL's API moves between versions: report, keep our numbers
        out['trl_error'] = f'{type(e).__name__}: {e}'
        print(f'TRL GRPOTrainer failed: {out["trl_error"]}')
    if out['trl_grpo']:
      out['grpo_ratio'] = out['grpo']['tokens_per_s'] / out['trl_grpo']['tokens_per_s']
      # shared CPUs make TRL's step times swing; the ratio against its fastest timed step too
      t = out['trl_grpo']
      out['grpo_ratio_vs_trl_best'] = out['grpo']['tokens_per_s'] / (
          t['response_tokens'] / min(t['step_times'][config.warmup:] or t['step_times']))
    print(grpo_table(out), flush=True)
    if config.dpo:
      records = dpo_records(config, [x for group in prompts for x in group] * 4)
      out['dpo'] = bench_dpo(config, pol_dir, records)
      out['trl_dpo'] = None
      if out['trl_grpo']:
        try:
          out['trl_dpo'] = bench_trl_dpo(config, workdir, records)
          out['dpo_ratio'] = out['dpo']['tokens_per_s'] / out['trl_dpo']['tokens_per_s']
          t = out['trl_dpo']
          out['dpo_ratio_vs_trl_best'] = out['dpo']['tokens_per_s'] / (
              t['tokens'] / min(t['step_times'][config.warmup:] or t['step_times']))
        except Exception as e:
          out['trl_dpo_error'] = f'{type(e).__name__}: {e}'
          print(f'TRL DPOTrainer failed: {out["trl_dpo_error"]}')
      print(dpo_table(out), flush=True)
  if config.grpo_rules:
    bench_grpo_rules(config, workdir, use_trl, out)
    print(grpo_rules_table(out), flush=True)
  with open(os.path.join(workdir, 'bench.json'), 'w') as f:
    json.dump(out, f, indent=2)
  return out


def ppo_table(r: dict) -> str:
  a = r['alone']
  head = (f"PPO iteration ({r['batch']} x {r['prompt_len']}+{r['max_new_tokens']} tokens, "
          f"{r['epochs']} epochs x {r['minibatches']} minibatches; mean of {r['iterations']} "
          'after warm-up)')
  lines = [head, '-' * len(head),
           f"{'':>12} {'seconds':>9} {'alone':>9}",
           f"{'generation':>12} {r['gen_s']:>9.4f} {a['gen_s']:>9.4f}",
           f"{'scoring':>12} {r['score_s']:>9.4f} {a['score_s']:>9.4f}",
           f"{'update':>12} {r['update_s']:>9.4f} {a['fwd_bwd_passes'] * a['fwd_bwd_s']:>9.4f}"
           f"   ({a['fwd_bwd_passes']} x fwd/bwd {a['fwd_bwd_s']:.4f})",
           f"{'host':>12} {r['host_s']:>9.4f}   (gold scoring {r['gold_s']:.4f})",
           f"{'iteration':>12} {r['iteration_s']:>9.4f} {a['sum_s']:>9.4f}",
           f"rollout tokens/s {r['tokens_per_s']:,.0f}; overhead {100 * r['overhead']:.1f}% "
           '(goal <= 30%)']
  return '\n'.join(lines)


def dpo_table(out: dict) -> str:
  o, t = out['dpo'], out.get('trl_dpo')
  lines = [f"DPO step ({o['pairs']} pairs, chosen + rejected rows, reference log-probs each step)"
           f"   ours: {o['step_s']:.4f} s, {o['tokens_per_s']:,.0f} tokens/s"]
  if t:
    lines.append(f"   TRL: {t['step_s']:.4f} s, {t['tokens_per_s']:,.0f} tokens/s; ratio ours / "
                 f"TRL: {out['dpo_ratio']:.2f}x (goal >= 2x)")
  return '\n'.join(lines)


def grpo_table(out: dict, key: str = 'grpo', title: str = 'GRPO iteration') -> str:
  o, t = out[key], out.get(f'trl_{key}')
  head = (f"{title} ({o['rows']} rows = {o['rows'] // o['k']} prompts x k={o['k']}, "
          f"{o['max_new_tokens']} new tokens, one update)   ours        TRL")
  lines = [head, '-' * len(head)]
  tv = lambda key, fmt: format(t[key], fmt) if t else '-'
  lines.append(f"{'seconds per iteration':<52}{o['iteration_s']:>9.4f} {tv('step_s', '>11.4f')}")
  lines.append(f"{'response tokens per iteration':<52}{o['response_tokens']:>9.0f} "
               f"{tv('response_tokens', '>11.0f')}")
  lines.append(f"{'tokens/s':<52}{o['tokens_per_s']:>9.0f} {tv('tokens_per_s', '>11.0f')}")
  if t:
    lines.append(f"ratio ours / TRL: {out[key + '_ratio']:.2f}x (goal >= 2x)")
  return '\n'.join(lines)


def grpo_rules_table(out: dict) -> str:
  """grpo_table for the rule-reward row, with the seconds in the rules and the mean reward."""
  o, t = out['grpo_rules'], out.get('trl_grpo_rules')
  lines = grpo_table(out, 'grpo_rules', "GRPO, 'answer' rule on arith").split('\n')
  tv = lambda key, fmt: format(t[key], fmt) if t and t.get(key) is not None else '-'
  at = len(lines) - (1 if t else 0)
  lines[at:at] = [
      f"{'seconds in the rules per iteration':<52}{o['rules_s']:>9.4f} {tv('rules_s', '>11.4f')}",
      f"{'mean reward (random policy: ~0)':<52}{o['reward/total']:>9.3f} {tv('reward', '>11.3f')}"]
  return '\n'.join(lines)
