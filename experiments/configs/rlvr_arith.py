"""RL with verifiable rewards on the arithmetic testbed: GRPO (experiment `grpo`) with rule
rewards instead of a reward model. The policy is the CoT testbed's model (a cot_arith run's
runs/mixed: pretrained on problems with rationales); the prompts are data/arith.py's generated
problems, laid out as the testbed's CoT query ('Q: ...\nA:\n'); the reward is the `answer`
rule (the number after '#### ' equals the problem's) plus a small `format` bonus. Metrics rows
carry reward/answer, reward/format, reward/total and reward/unparsable every iteration; the
held-out rows the same on held-out problems (eval.gold is VADER, meaningless here).

python -m experiments.run --config=experiments/configs/cot_arith.py --workdir=runs/cot
python -m experiments.run --config=experiments/configs/rlvr_arith.py --workdir=runs/rlvr/grpo \
    --config.init_from=runs/cot/runs/mixed

Other rules: `program` (PAL: {'program': {'weight': 1.0}} with a PAL prompts.template) and
`tests` (HumanEval: prompts.source=jsonl records with question = the code prompt, test,
entry_point; {'tests': {'weight': 1.0}}) run in the sandbox (experiments/stages/sandbox_rules.py).

Variants are switches: Dr. GRPO --config.loss.scale_rewards=none --config.loss.length_norm=False;
DAPO --config.loss.level=token --config.loss.clip_eps_high=0.28 --config.rollout.dynamic_sampling=True
(+ a length rule); GSPO
--config.loss.ratio=sequence; no reference held: --config.kl.coef=0.
"""
from ml_collections import ConfigDict

from experiments.configs import rlhf_grpo


def get_config():
  c = rlhf_grpo.get_config()
  c.init_from = 'runs/cot/runs/mixed'
  c.reward_from = ''                        # no reward model: reward.kind='rules'
  c.prompts = ConfigDict(dict(
      source='arith',                       # arith (generated) | jsonl (GSM8K-format prompts.path)
      path='',
      n_train=4000, n_eval=128, seed=0,
      steps=(1, 3), digits=(1, 1), ops='+-',
      template='Q: {question}\nA:\n',       # the cot_arith CoT query
      shots=0))                             # worked demonstrations before it (training problems)
  c.reward.update(kind='rules')
  c.reward.rules = ConfigDict(dict(
      answer=ConfigDict(dict(weight=1.0, extract='strict', field='answer')),
      # weight 0: logged, not optimised. At 0.1 (answer + format from the pretrained model) the
      # format reached 0.98 by iteration 3 while held-out answers stayed at 2-4%: the policy
      # learned to print a bare '#### N' (the reasoning lab's first run, 3c6751b).
      format=ConfigDict(dict(weight=0.0, pattern=r'#### -?[0-9]+'))))
  c.rollout.update(prompts=16, samples=8, max_new_tokens=96, temperature=1.0)
  # The engine, 16 rows at a time: 2.8x faster generation than the static batch on these shapes
  # (2 CPU cores, experiments/bench_rollouts.py; responses of 1-96 tokens waste most of a static
  # batch's steps); on the RLHF testbed's short responses it is slower, so rlhf_grpo keeps False.
  c.rollout.update(engine=True, engine_slots=16)
  c.kl.update(coef=0.0)                     # RLVR practice: no KL (and no reference held)
  c.train.update(iterations=30, epochs=1, minibatches=2)
  # 3e-4: the 150k-parameter CoT model was pretrained at 3e-3, and 60 Adam steps at 1e-5 barely
  # move it (the lab's figures in reasoning_arith.py are at these settings)
  c.optim.update(lr=3e-4, min_lr=3e-4)
  c.eval.update(every=10, batch_size=128)
  return c
