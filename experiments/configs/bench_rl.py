"""RL throughput benchmark: the PPO iteration's time split and overhead, GRPO (a cheap reward,
and the `answer` rule on arith prompts: grpo_rules) and DPO beside TRL.

python -m experiments.run --config=experiments/configs/bench_rl.py --workdir=/tmp/bench_rl

A random GPT-2-shaped policy (d_model 128, 4 layers, char tokenizer) and a reward model on
its own trunk, written in a second; or --config.init_from=runs/rlhf/sft
--config.reward_from=runs/rlhf/rm (GPT-2-shaped runs, for the TRL export). TRL's column
needs the [bench] extra (pip install -e '.[bench]'); without it the bench says so. The rule
row's policy is --config.rules_init_from (its context must hold the arith prompts + the
response: checked at start-up), else a tiny random one sized for them. Figures measured on
this config: experiments/bench_rl.py's docstring.
"""
from ml_collections import ConfigDict


def get_config():
  c = ConfigDict()
  c.experiment = 'bench_rl'
  c.seed = 0
  c.init_from = ''          # '' : tiny random runs in WORKDIR/runs
  c.reward_from = ''
  # GPT-2's layout (what lm.convert exports); vocab_size comes from the tokenizer
  c.model = ConfigDict(dict(d_model=128, n_layers=4, n_heads=4, max_seq_len=64, init_std=0.02,
                            norm='layernorm', positions='learned', activation='gelu_tanh',
                            use_bias=True, tie_embeddings=True, dtype='float32'))
  c.batch_size = 32         # rollouts per iteration (PPO: rollout.prompts, samples=1;
                            #   GRPO: rollout.prompts = batch_size / grpo_k, samples = grpo_k)
  c.max_new_tokens = 24
  c.ppo_epochs = 2          # PPO's train.epochs
  c.ppo_minibatches = 2     # PPO's train.minibatches
  c.grpo_k = 4              # GRPO's rollout.samples (the group)
  c.warmup = 1              # iterations that compile, not timed
  c.iterations = 3
  c.repeats = 3             # best of, for the pieces timed alone
  c.grpo = True             # the GRPO side by side
  c.dpo = True              # the DPO side by side (after GRPO; TRL's only if its GRPO ran)
  c.dpo_batch = 8           # pairs per step
  c.grpo_rules = True       # GRPO with the `answer` rule on arith prompts, beside TRL's
  c.rules_init_from = ''    # its policy; '' : a tiny random one whose context holds the prompts
  c.trl = True              # False: ours only
  c.torch_threads = 0       # 0: torch's default
  c.mesh = ConfigDict(dict(data=-1, fsdp=1, tensor=1, expert=1))
  return c
