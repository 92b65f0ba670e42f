"""What every policy stage shares (preferences, PPO, DPO, RLOO / GRPO, best-of-n): the policy
opened from an earlier stage, prompts as tokens, batched sampling, and the held-out
evaluation that puts every method on the same axes (gold reward, proxy reward, KL to the
reference policy).

  pol = open_policy(config.init_from)                  # SFT workdir or hf:PATH, eos added
  prompts = encode_prompts(pol.tok, texts)             # the SFT template's prompt tokens
  gens = sample(params, pol, prompts, key, sampling, mesh, batch)
  report = evaluate(params, ref_params, pol, prompts, key, ...)   # gold, proxy, KL, length

Sampling for RL is plain temperature sampling (no bans, no top-k): the log-probs the update
uses are exactly the distribution the responses came from.
"""
from __future__ import annotations

import dataclasses
import json
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
import numpy as np
from ml_collections import ConfigDict

from data import arith, formats, openings, tokenizers
from experiments.evaluation import answers, prompting
from experiments.stages import gold_model, reward_model, stage
from lm import model, peft
from lm import compiled, decode, paths
from lm.config import ConfigError, ModelConfig
from rl import rollout


@dataclasses.dataclass
class Policy:
  source: stage.Source
  cfg: ModelConfig
  tok: Any
  eos: int
  template: str


def open_policy(init_from: str, template: str = 'none') -> Policy:
  if not init_from:
    raise ConfigError('This stage needs --config.init_from=DIR (an SFT workdir) or hf:PATH.')
  source = stage.read_source(init_from)
  cfg = source.cfg
  if cfg.arch != 'decoder' or not cfg.causal:
    raise ConfigError(f'Policies are causal decoder-only models; init_from holds a {cfg.arch} '
                      f'model with causal={cfg.causal}.')
  tok = tokenizers.add_special_tokens(source.tokenizer, ['eos'])
  return Policy(source, stage.with_tokens(cfg, tok), tok, int(tok.eos_id), template)


PROMPT_SOURCES = ('openings', 'arith', 'jsonl')


def prompt_examples(config: ConfigDict, split: str) -> list[dict]:
  """The prompts as examples: each a dict with 'prompt' (the text the policy is given) and
  the fields a rule reward reads (rl/rewards.py), from prompts.source:

    openings  line openings of the works (train or held-out plays)
    arith     data/arith.py's generated GSM8K-format problems (question, answer '...#### N',
              final, steps, digits, id); held-out problems never repeat a training question;
              prompts.{steps, digits, ops} set their size, prompts.template the layout
              and prompts.shots the worked demonstrations before it (the first training
              problems, then not trained on; the reasoning lab's prompt.k layout)
    jsonl     a GSM8K-format JSON-lines file prompts.path ({question, answer, ...} per line):
              the last prompts.n_eval records are held out, the first prompts.n_train of the
              rest train (after prompts.shots demonstrations, which come first)
  """
  d = config.prompts
  n = d.n_train if split == 'train' else d.n_eval
  shots = int(d.get('shots', 0))
  if shots < 0 or (shots and d.source == 'openings'):
    raise ConfigError(f'prompts.shots={shots}: use 0, or a positive count of worked demonstrations '
                      f'with prompts.source=arith or jsonl (they have rationales).')
  if d.source == 'openings':
    return [dict(o) for o in openings.openings(split, n, tuple(d.words), seed=d.seed)]
  if d.source == 'arith':
    try:
      train = arith.generate(d.n_train + shots, seed=d.seed, split='train', steps=tuple(d.steps),
                             digits=tuple(d.digits), ops=d.ops)
      out = train[shots:] if split == 'train' else arith.generate(
          d.n_eval, seed=d.seed, split='test', steps=tuple(d.steps), digits=tuple(d.digits), ops=d.ops,
          exclude=[t['question'] for t in train])
    except arith.ArithError as e:
      raise ConfigError(str(e)) from None
    demos = train[:shots]
    return [{**p, 'prompt': _demos(demos) + d.template.format(question=p['question'])} for p in out]
  if d.source == 'jsonl':
    records = _jsonl(d.path)
    held, rest = records[len(records) - d.n_eval:], records[:len(records) - d.n_eval]
    demos, rest = rest[:shots], rest[shots:]
    out = rest[:d.n_train] if split == 'train' else held
    if len(demos) < shots or not out:
      raise ConfigError(f'prompts.path={d.path} leaves no {split} prompts ({len(records)} records, '
                        f'prompts.n_eval={d.n_eval} held out).')
    demos = [_gsm8k_demo(r) for r in demos]
    if None in demos:
      raise ConfigError(f'prompts.shots={shots} needs an "answer" ("rationale ... #### N") in each of '
                        f'the first {shots} records of {d.path}.') from None
    return [{'id': r.get('id', f'{split}-{i}'), **r,
             'prompt': _demos(demos) + d.template.format(question=r['question'])}
            for i, r in enumerate(out)]
  raise ConfigError(f'prompts.source={d.source!r} is not known; choose one of {PROMPT_SOURCES}.')


def _demos(demos: Sequence[dict]) -> str:
  """Worked demonstrations before the query, laid out as the CoT testbed's documents and the
  reasoning lab's prompt.k (prompting.Format's cot style: question, rationale, '#### N')."""
  fmt = prompting.Format()
  return ''.join(fmt.demo(e, 'cot') + fmt.sep for e in demos)


def _gsm8k_demo(record: dict) -> dict | None:
  """A GSM8K record as a demonstration {question, rationale, final}; None without an answer
  that ends in '#### N'."""
  a = record.get('answer')
  final = answers.gsm8k_gold(a) if isinstance(a, str) else None
  if final is None:
    return None
  return {'question': record['question'], 'rationale': a.rsplit('####', 1)[0].strip(), 'final': final}


def _jsonl(path: str) -> list[dict]:
  if not path or not paths.path(path).exists():
    raise ConfigError(f'prompts.source=jsonl needs prompts.path, an existing JSON-lines file of '
                      f'{{question, answer}} records; got {path!r}.')
  out = []
  for i, line in enumerate(paths.read_text(paths.path(path)).splitlines()):
    if line.strip():
      r = json.loads(line)
      if 'question' not in r:
        raise ConfigError(f'{path} line {i + 1} has no "question" field (GSM8K format: question, answer).')
      out.append(r)
  return out


def prompt_texts(config: ConfigDict, split: str) -> list[str]:
  """The prompts' texts (prompt_examples' 'prompt')."""
  return [e['prompt'] for e in prompt_examples(config, split)]


def prompt_template(pol: Policy) -> str:
  """The template prompts are laid out in: 'chat' (one user turn, then the generation prompt)
  where the model's own chat_template formatted it (an hf: folder that carries one, or a run
  whose data.template=chat used one), else the policy's."""
  if getattr(pol.tok, 'chat_template', None):
    d = pol.source.config.get('data', {}) if pol.source.config is not None else {}
    if pol.source.kind == 'hf' or d.get('template') == 'chat':
      return 'chat'
  return pol.template


def encode_prompts(pol: Policy, texts: Sequence[str], max_len: int) -> list[np.ndarray]:
  """Prompt tokens as the SFT template laid them out; a prompt longer than max_len is a
  ConfigError (it would leave no room for the response)."""
  out = []
  template = prompt_template(pol)
  for t in texts:
    chat = formats.uses_chat_template(template, pol.tok)
    ex = {'messages': [{'role': 'user', 'content': t}]} if chat else {'instruction': '', 'input': t}
    ids = formats.prompt_tokens(ex, template, pol.tok)
    if len(ids) == 0:
      raise ConfigError(f'Prompt {t!r} encodes to no tokens; drop empty prompts.')
    if len(ids) > max_len:
      raise ConfigError(f'Prompt {t[:60]!r}... has {len(ids)} tokens, more than the '
                        f'{max_len} the context leaves for prompts; shorten prompts or raise '
                        'the context.')
    out.append(np.asarray(ids, np.int32))
  return out


def sampling_config(pol: Policy, max_new_tokens: int, temperature: float = 1.0) -> decode.SamplingConfig:
  return decode.SamplingConfig(temperature=temperature, max_new_tokens=max_new_tokens,
                               eos_ids=(pol.eos,), pad_id=0)


def sample(params, pol: Policy, prompts: Sequence[np.ndarray], key, s: decode.SamplingConfig,
           mesh=None, batch: int = 64) -> list[decode.Generation]:
  """Generations for `prompts` in chunks of `batch` (one program per bucket)."""
  out = []
  for i in range(0, len(prompts), batch):
    out.append(decode.generate(params, list(prompts[i:i + batch]), jax.random.fold_in(key, i),
                               cfg=pol.cfg, sampling=s, mesh=mesh))
  return out


def texts_of(pol: Policy, gen: decode.Generation) -> list[str]:
  """Each response's text, without its eos."""
  toks, lens = np.asarray(gen.tokens), np.asarray(gen.lengths)
  out = []
  for row, n in zip(toks, lens):
    ids = [int(t) for t in row[:n] if int(t) != pol.eos]
    out.append(pol.tok.decode(ids))
  return out


_PROGRAMS = compiled.Programs()


def _kl_fn(cfg: ModelConfig, n_prompt: int, temperature: float):
  def kl(params, ref, tokens, mask):
    logp, _ = rollout.response_logprobs(params, tokens, mask, n_prompt, cfg, temperature)
    ref_logp, _ = rollout.response_logprobs(ref, tokens, mask, n_prompt, cfg, temperature)
    return jnp.sum(logp - ref_logp, axis=1)        # log pi(y|x) - log pi_ref(y|x) per sequence
  return _PROGRAMS.get(('sequence_kl', cfg, n_prompt, temperature), lambda: jax.jit(kl))


def sequence_kl(params, ref, pol: Policy, gen: decode.Generation, temperature: float = 1.0) -> np.ndarray:
  """[B] log pi(y|x) - log pi_ref(y|x) of sampled y: its mean is KL(pi || pi_ref) (nats)."""
  tokens, mask = gen.sequences()
  return np.asarray(_kl_fn(pol.cfg, int(gen.prompt_tokens.shape[1]), float(temperature))(
      params, ref, tokens, mask))


def evaluate(params, ref, pol: Policy, prompts: Sequence[np.ndarray], key, *, max_new_tokens: int,
             gold_kind: str = 'vader', reward: Callable | None = None, mesh=None, batch: int = 64,
             temperature: float = 1.0, keep: int = 8) -> dict:
  """Held-out report of a policy: one sample per prompt at `temperature`.

  gold / proxy are means over prompts (gold_kind: a kind of experiments/stages/gold_model.py;
  proxy: the reward model's normalised score, if given),
  kl the mean of log pi - log pi_ref over the samples (0 for the reference itself),
  eos_rate the share of responses that ended before max_new_tokens. `keep` samples return
  as text for the log."""
  s = sampling_config(pol, max_new_tokens, temperature)
  texts, kls, lens, eos, proxy = [], [], [], [], []
  for gen in sample(params, pol, prompts, key, s, mesh, batch):
    texts += texts_of(pol, gen)
    kls.append(sequence_kl(params, ref, pol, gen, temperature) if ref is not None
               else np.zeros(len(gen.lengths)))
    lens.append(np.asarray(gen.lengths))
    eos.append(np.asarray(rollout.has_eos(gen.tokens, gen.mask, pol.eos)))
    if reward is not None:
      proxy.append(np.asarray(reward(*gen.sequences())))
  # the prompts as text (the gold model reads prompt + continuation, as the reward stage does)
  g = gold_model.scorer(gold_kind, mesh)([pol.tok.decode([int(t) for t in p]) for p in prompts], texts)
  out = {'gold': float(g.mean()), 'gold_stderr': float(g.std() / np.sqrt(len(g))),
         'kl': float(np.concatenate(kls).mean()), 'length': float(np.concatenate(lens).mean()),
         'eos_rate': float(np.concatenate(eos).mean()), 'prompts': len(texts),
         'samples': texts[:keep]}
  if proxy:
    out['proxy'] = float(np.concatenate(proxy).mean())
  return out


# Trainable policy stages (dpo and the online loop) ---------------------------------------
@dataclasses.dataclass
class Trees:
  """A policy stage's trees, by role. Trainable: {'policy': params} (full fine-tuning, a copy
  of init_from trained against the frozen original) or {'adapters': LoRA} (on the frozen base,
  whose plain forward *is* the reference: no second copy of the weights), plus whatever an
  algorithm adds ('value', 'value_head'). Frozen: {'reference': params} plus 'reward' (the
  reward model's params) where a stage scores rollouts."""
  axes: Any
  init_params: Callable          # key -> a fresh trainable tree (shapes / sharding only)
  initial: Callable | None       # () -> the starting trainable tree (init_from's weights)
  frozen: Any                    # {'reference': ..., ['reward': ...]}, on the mesh
  frozen_sh: Any
  cfg: ModelConfig
  pcfg: Any

  @property
  def policy_role(self) -> str:
    return 'policy' if self.pcfg.method == 'none' else 'adapters'

  def reference(self, frozen):
    return frozen['reference']

  def full(self, trainable, frozen):
    """Params model.forward runs: the trained policy, or the base with adapters hooked in."""
    if self.pcfg.method == 'none':
      return trainable['policy']
    return peft.combine(frozen['reference'], trainable['adapters'], self.cfg, self.pcfg)

  def generation(self, trainable, frozen):
    """Params decode runs (LoRA folded into the base: exact, and in the rules table's tree)."""
    if self.pcfg.method == 'none':
      return trainable['policy']
    return peft.merge(frozen['reference'], trainable['adapters'], self.cfg, self.pcfg)

  def with_trainable(self, axes: dict, init: Callable, initial: Callable) -> 'Trees':
    """These trees plus more trainable roles (axes, key -> fresh, () -> starting values)."""
    first = self.initial or (lambda: self.init_params(jax.random.key(0)))
    return dataclasses.replace(
        self, axes={**self.axes, **axes}, init_params=lambda k: {**self.init_params(k), **init(k)},
        initial=lambda: {**first(), **initial()})


def trees(config: ConfigDict, pol: Policy, mesh, reward=None) -> Trees:
  """Trees for config.peft.method in ('none', 'lora') (ConfigError otherwise); `reward` (a
  RewardModel on `mesh`) adds the frozen 'reward' role."""
  pcfg = stage.peft_config(config)
  if pcfg.method not in ('none', 'lora'):
    raise ConfigError(f'peft.method={pcfg.method!r}: policy stages train the full model (none) or '
                      'LoRA (whose reference is the base without adapters); choose none or lora.')
  ref = pol.source.restore_params(mesh, pol.cfg)
  frozen = {'reference': ref, **({'reward': reward.params} if reward is not None else {})}
  frozen_sh = jax.tree.map(lambda x: x.sharding, frozen)
  if pcfg.method == 'none':
    return Trees({'policy': model.logical_axes(pol.cfg)},
                 lambda k: {'policy': model.init(pol.cfg, k)},
                 lambda: {'policy': pol.source.restore_params(mesh, pol.cfg)}, frozen, frozen_sh,
                 pol.cfg, pcfg)
  lora_init = lambda k: {'adapters': peft.init(pol.cfg, pcfg, k, base_params=ref)}
  return Trees({'adapters': peft.logical_axes(pol.cfg, pcfg)}, lora_init,
               lambda: lora_init(jax.random.key(config.seed)), frozen, frozen_sh, pol.cfg, pcfg)


def same_tokenizer(a, b) -> bool:
  """Whether two tokenizers give every id the same text and the same eos (the RM must read
  the policy's token ids as the policy meant them)."""
  if a.vocab_size != b.vocab_size or a.eos_id != b.eos_id:
    return False
  return all(a.decode([i]) == b.decode([i]) for i in range(a.vocab_size))


def reward_tokenizer(reward_from: str):
  """The tokenizer of a reward run's workdir (a local folder or gs://), or one sentence."""
  if not (paths.path(reward_from) / 'config.json').exists():
    raise ConfigError(f'reward_from={reward_from} holds no config.json; point it at the workdir of '
                      'a finished `reward` run.')
  return stage.load_tokenizer(reward_from)


def open_reward(reward_from: str, pol: Policy, mesh=None, max_len: int = 0):
  """The reward model in `reward_from` for scoring this policy's rollouts, its params on `mesh`
  (the same specs on this run's devices); ConfigError at start-up if its tokenizer or context
  does not fit the policy. The RM's tokenizer is compared with eos added, as the policy's is."""
  rm_tok = tokenizers.add_special_tokens(reward_tokenizer(reward_from), ['eos'])
  if not same_tokenizer(rm_tok, pol.tok):
    raise ConfigError(f'The reward model in {reward_from} uses a different tokenizer from the policy '
                      f'in {pol.source.path} ({rm_tok.vocab_size} vs {pol.tok.vocab_size} ids); train '
                      'the reward model from the same SFT (or pretraining) lineage as the policy.')
  rm = reward_model.load_reward_model(reward_from, {'data': -1})
  context = min(rm.cfg.max_seq_len, rm.seq_len or rm.cfg.max_seq_len)
  if max_len and max_len > context:
    raise ConfigError(f'Rollouts of up to {max_len} tokens (prompt + rollout.max_new_tokens) exceed '
                      f"the reward model's {context}-token context; lower max_new_tokens or the "
                      'prompt length.')
  if mesh is not None:
    onto = lambda x: jax.device_put(x, NamedSharding(mesh, x.sharding.spec))
    rm = dataclasses.replace(rm, params=jax.tree.map(onto, rm.params))
  return rm



def dedup_responses(responses: list[str], scores: np.ndarray, counts: dict) -> tuple[list[str], list[float]]:
  """Drop empty and duplicate responses of one prompt (first kept), counting each."""
  seen, out, g = set(), [], []
  for r, s in zip(responses, scores):
    key = r.strip()
    if not key:
      counts['empty_responses'] += 1
      continue
    if key in seen:
      counts['duplicate_responses'] += 1
      continue
    seen.add(key)
    out.append(r)
    g.append(float(s))
  return out, g
