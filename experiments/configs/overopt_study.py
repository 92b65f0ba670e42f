"""The over-optimisation study with a learned gold (Gao et al. 2022; issue 24), end to end from
this one config (experiment `overopt_study`, experiments/overopt_study.py):

  pretrain (one per model size: the policy's, every proxy's, the gold's; one BPE tokenizer)
  -> sft (the policy) -> preferences (K SFT samples per prompt ranked by VADER, many prompts)
  -> the gold RM (the largest trunk, trained on those labels, then frozen: gold=model:DIR)
  -> preferences (ranked by the gold RM, label_noise) -> proxy RMs on two axes: every size
  in proxy.sizes at proxy.n_data groups, and proxy.size at every proxy.data -> ensembles of
  the smallest proxy (ensemble.members; one run, scored by each combination) -> best-of-n
  (all proxies, n up to bon.samples) and PPO (each proxy x ppo.betas), gold = the gold RM
  -> study.json, the printed summary, and the plots (Gao's layout).

Every stage runs in WORKDIR/<stage> through experiments.registry; a finished stage leaves
study_done.json and is not rerun (rerunning the command resumes). --config.rerun=bon (or ppo)
runs a finished evaluation stage again on the same gold and proxies, e.g. a larger best-of-n:
python -m experiments.run --config=experiments/configs/overopt_study.py --workdir=runs/overopt \
    --config.rerun=bon --config.bon.prompts=512

The reduced default (this file) takes about an hour of stages on 2 cores shared with other work
(3056 s at commit 66b69ba with bon at 32 x 256; 3848 s with bon at the default 256 x 1024 below):
python -m experiments.run --config=experiments/configs/overopt_study.py --workdir=runs/overopt
The full recipe (see README "over-optimisation with a learned gold"):
python -m experiments.run --config=experiments/configs/overopt_study.py --workdir=runs/overopt_full \
    --config.preset=full
"""
from ml_collections import ConfigDict

# (d_model, n_layers, n_heads); with the 512-token vocabulary (tied embeddings) these are
# about 5k, 13k, 37k and 130k parameters (proxies), 380k (gold)
SIZES = ((8, 1, 1), (16, 1, 2), (32, 2, 2), (64, 2, 4))


def get_config():
  c = ConfigDict()
  c.experiment = 'overopt_study'
  c.seed = 0
  c.preset = 'reduced'            # reduced | full: full overrides the sizes below (FULL)
  c.vocab_size = 512              # the BPE tokenizer every model shares
  c.max_new_tokens = 16           # response budget: labelling, best-of-n, PPO
  c.k = 4                         # responses ranked per prompt (both labellers)
  c.pretrain = ConfigDict(dict(steps=300, batch_size=32, lr=2e-3))
  c.policy = ConfigDict(dict(size=(32, 2, 2), sft_steps=150))
  c.gold = ConfigDict(dict(
      size=(96, 3, 4),            # larger than every proxy
      # x k VADER-ranked SFT samples. The small SFT policy rarely writes a sentiment word (VADER
      # nonzero on ~9% of samples): ~30% of groups hold a comparison, so 8000 prompts give the
      # gold ~2400 usable groups, 8x the largest proxy's 300
      prompts=8000,
      steps=500, batch_size=16, lr=1e-3))
  c.proxy = ConfigDict(dict(
      sizes=SIZES,                # the size axis, each at n_data groups
      n_data=300,
      size=(32, 2, 2),            # the data axis: this size at each data size
      data=(30, 100, 300),
      label_noise=0.25,           # Coste et al. 2023's 25% (0: Gao's noiseless labels)
      steps=150, batch_size=16, lr=1e-3))
  c.ensemble = ConfigDict(dict(
      members=3,                  # of the smallest proxy size at n_data (member 0 = the single proxy)
      combines=('mean', 'min', 'uwo'),   # mean | worst-case | uncertainty-weighted (rl.reward.ENSEMBLES)
      lam=0.5))
  # best-of-n's gold at n = samples is one sample per prompt, so prompts set its noise. At 32 x 256
  # (156 s) the smallest proxy's 17% fall after its peak was inside 1 bootstrap standard error
  # (0.063), and a 73% "fall" of d32_L2_n30 at 32 x 512 vanished at 256 prompts. 256 x 1024 (the
  # full preset's; d to 2.44) took 947 s on the 2 shared cores (load 6-10; 331 s sampling, the
  # rest the gold RM's scoring), standard errors ~0.04; --config.bon.prompts=512 took 1691 s,
  # ~0.03, and the smallest proxy's gold plateaus from n = 64 (+0.30) to n = 1024 (+0.28, fall
  # 0.022 +- 0.022): no turn-down at d <= 2.44 (commit 61a5e57 on 66b69ba's trained stages)
  c.bon = ConfigDict(dict(prompts=256, samples=1024, batch_size=256))
  c.ppo = ConfigDict(dict(
      betas=(0.0, 0.02, 0.1),     # kl.coef: 0 and two > 0
      # every beta for: all proxies | smallest (the smallest single proxy; the others, the
      # ensembles included, at beta 0 only: the setting the size / data fits use)
      all_betas_for='smallest',
      # an iteration costs ~1-2 s here, a run's compile ~100 s: 12 iterations of 32 prompts moved
      # the proxy by +0.1 at KL 4 (drift, not optimisation), so rlhf_ppo's 64 x 4 minibatches
      iterations=40, every=5, prompts=64, minibatches=4, epochs=2, lr=3e-4, eval_prompts=64))
  c.mesh = ConfigDict(dict(data=-1, fsdp=1, tensor=1, expert=1))
  # 'bon', 'ppo' or 'bon,ppo': run those finished evaluation stages again (their sub-workdirs
  # deleted first) on the trained gold and proxies, e.g. with larger bon.* (every invocation
  # that names them reruns them; drop it to resume an interrupted rerun)
  c.rerun = ''
  return c


# The full recipe: Gao-like axes at the testbed's scale (hours on 2 cores; see README).
FULL = {
    'vocab_size': 2048, 'max_new_tokens': 24,
    'pretrain': {'steps': 1500},
    'policy': {'size': (128, 4, 4), 'sft_steps': 400},
    'gold': {'size': (256, 6, 8), 'prompts': 40000, 'steps': 4000},
    'proxy': {'sizes': ((16, 1, 2), (32, 2, 2), (64, 2, 4), (128, 4, 4)), 'n_data': 3000,
              'size': (64, 2, 4), 'data': (300, 1000, 3000), 'steps': 1500},
    'bon': {'prompts': 256, 'samples': 1024},
    'ppo': {'iterations': 60, 'every': 5, 'prompts': 64, 'eval_prompts': 256, 'all_betas_for': 'all'},
}
