"""Parameter-efficient fine-tuning: LoRA, prefix tuning, prompt tuning, bottleneck adapters.

The trainable tree is `adapters`, a params dict of its own with a parallel tree of logical
axes (so lm.sharding shards it like the model); the frozen tree is the base model's params.
`combine(base, adapters)` builds params that the one `lm.model.forward` consumes unchanged;
each method enters the model through a narrow hook:

  lora     target weights become layers.LoRAWeight(w, a, b, alpha / r) and layers.dense
           adds scale * (x a) b without ever forming w + scale a b (Hu et al. 2021)
  prefix   p['attn']['prefix_k' / 'prefix_v'] [P, kv_heads, head_dim] in every layer,
           prepended to its keys/values (Li & Liang 2021); prefix_hidden > 0 produces them
           from a reparameterising MLP. Prefix keys get no position (no RoPE, zero bias)
  prompt   params['soft_prompt'] [L, d_model] before the token embeddings (Lester et al.
           2021): real tokens move to positions L, L+1, ...; the prompt's logits are dropped
  adapter  p['adapter_attn'], p['adapter_mlp'] bottlenecks on each sublayer's output,
           before the residual add (Houlsby et al. 2019)
  none     full fine-tuning: the adapters are the model's params and the frozen tree is {}

  adapters = peft.init(cfg, pcfg, key, base)
  loss = lambda ad, base: loss_fn(peft.combine(base, ad, cfg, pcfg), batch)
  grads = jax.grad(loss)(adapters, base)     # gradients (and optimizer state) for adapters only
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp

from lm import layers, model
from lm.config import ConfigError, ModelConfig
from lm.layers import LoRAWeight, Spec

METHODS = ('none', 'lora', 'prefix', 'prompt', 'adapter')
# LoRA target name -> (sublayer, weight names); 'mlp' means all of the MLP's projections.
LORA_TARGETS = {'q': ('attn', ('wq',)), 'k': ('attn', ('wk',)), 'v': ('attn', ('wv',)),
                'o': ('attn', ('wo',)), 'mlp': ('mlp', ('wi', 'wg', 'wo'))}
PROMPT_INITS = ('vocab', 'normal')

__all__ = ['PeftConfig', 'LoRAWeight', 'specs', 'logical_axes', 'init', 'combine', 'merge',
           'num_params']


@dataclasses.dataclass(frozen=True)
class PeftConfig:
  method: str = 'none'            # one of METHODS
  lora_rank: int = 8
  lora_alpha: float = 16.0        # the update is scaled by alpha / rank
  lora_targets: tuple[str, ...] = ('q', 'k', 'v', 'o')
  prefix_length: int = 10
  prefix_hidden: int = 0          # 0: per-layer K/V prefix params; > 0: MLP reparameterisation
  prompt_length: int = 10
  prompt_init: str = 'vocab'      # embeddings of random vocabulary tokens, or 'normal'
  adapter_dim: int = 16           # Houlsby bottleneck width

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> 'PeftConfig':
    d = dict(d)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
      raise ConfigError(f'Unknown peft config key(s) {unknown}; valid keys are {sorted(names)}.')
    if 'lora_targets' in d:
      t = d['lora_targets']
      d['lora_targets'] = (t,) if isinstance(t, str) else tuple(t)
    return cls(**d)

  def __post_init__(self):
    def check(ok, msg):
      if not ok:
        raise ConfigError(msg)
    check(self.method in METHODS, f'peft.method={self.method!r} is not supported; choose one of {METHODS}.')
    check(self.prompt_init in PROMPT_INITS,
          f'peft.prompt_init={self.prompt_init!r} is not supported; choose one of {PROMPT_INITS}.')
    bad = [t for t in self.lora_targets if t not in LORA_TARGETS]
    check(not bad and self.lora_targets,
          f'peft.lora_targets={self.lora_targets!r} must be a non-empty subset of {tuple(LORA_TARGETS)}.')
    for name in ('lora_rank', 'prefix_length', 'prompt_length', 'adapter_dim'):
      check(getattr(self, name) > 0, f'peft.{name} must be positive, got {getattr(self, name)}.')
    check(self.prefix_hidden >= 0, f'peft.prefix_hidden must be >= 0 (0: no MLP), got {self.prefix_hidden}.')

  @property
  def lora_scale(self) -> float:
    return self.lora_alpha / self.lora_rank


# Parameters ---------------------------------------------------------------------------
def _lora_sites(cfg: ModelConfig, pcfg: PeftConfig) -> list[tuple[str, str, Spec, int]]:
  """(sublayer, weight name, the weight's per-layer Spec, number of input dims) per target."""
  block = model.layer_specs(cfg)
  sites = []
  for t in pcfg.lora_targets:
    group, names = LORA_TARGETS[t]
    # MoE expert weights have an expert axis that LoRA's [in, r] @ [r, out] does not cover.
    found = [] if (group == 'mlp' and cfg.moe_experts) else [n for n in names if n in block[group]]
    if not found:
      raise ConfigError(f'peft.lora_targets names {t!r}, which matches no dense weight of this '
                        f'model ({group}: {sorted(block[group])}); drop it from lora_targets.')
    # Attention's output projection contracts heads and head_dim; the others one dim.
    sites += [(group, n, block[group][n], 2 if (group, n) == ('attn', 'wo') else 1) for n in found]
  return sites


def specs(cfg: ModelConfig, pcfg: PeftConfig) -> dict:
  """Specs of the adapter params only, per-layer ones stacked on 'layers' like the model's."""
  if cfg.arch != 'decoder':
    raise ConfigError('lm.peft adapts decoder-only models; model.arch must be "decoder".')
  m, d, n = pcfg.method, cfg.d_model, cfg.n_layers
  kv, hd = cfg.kv_heads, cfg.head_dim
  stack = lambda tree: jax.tree.map(lambda s: s.stacked(n), tree, is_leaf=_is_spec)
  if m == 'none':
    return model.param_specs(cfg)
  if m == 'lora':
    r, out = pcfg.lora_rank, {}
    for group, name, w, n_in in _lora_sites(cfg, pcfg):
      fan_in = math.prod(w.shape[:n_in])
      out.setdefault(group, {})[name] = {   # B = 0: the model starts as the base model
          'a': Spec((*w.shape[:n_in], r), (*w.axes[:n_in], None), std=1 / math.sqrt(fan_in)),
          'b': Spec((r, *w.shape[n_in:]), (None, *w.axes[n_in:]), 'zeros')}
    return {'layers': stack(out)}
  if m == 'prefix':
    p = pcfg.prefix_length
    if not pcfg.prefix_hidden:
      # std of keys/values at init: unit-variance normed inputs through std-init_std weights
      kv_spec = Spec((p, kv, hd), (None, 'kv_heads', 'head_dim'), std=cfg.init_std * math.sqrt(d))
      return {'layers': stack({'attn': {'prefix_k': kv_spec, 'prefix_v': kv_spec}})}
    h = pcfg.prefix_hidden
    return {'prefix': {   # Li & Liang's P = MLP(P'), as in HF PEFT's prefix projection
        'embed': Spec((p, d), (None, 'embed'), std=1.0),
        'w1': Spec((d, h), ('embed', 'mlp'), std=1 / math.sqrt(d)),
        'b1': Spec((h,), ('mlp',), 'zeros'),
        'w2': Spec((h, n, 2, kv, hd), ('mlp', 'layers', None, 'kv_heads', 'head_dim'), std=1 / math.sqrt(h)),
        'b2': Spec((n, 2, kv, hd), ('layers', None, 'kv_heads', 'head_dim'), 'zeros')}}
  if m == 'prompt':
    return {'soft_prompt': Spec((pcfg.prompt_length, d), (None, 'embed'), std=cfg.init_std)}
  a = pcfg.adapter_dim
  bottleneck = {'down': Spec((d, a), ('embed', None), std=cfg.init_std),
                'down_b': Spec((a,), (None,), 'zeros'),
                'up': Spec((a, d), (None, 'embed'), 'zeros'),   # starts as the identity
                'up_b': Spec((d,), ('embed',), 'zeros')}
  return {'layers': stack({'adapter_attn': bottleneck, 'adapter_mlp': dict(bottleneck)})}


def _is_spec(x):
  return isinstance(x, Spec)


def logical_axes(cfg: ModelConfig, pcfg: PeftConfig) -> dict:
  return jax.tree.map(lambda s: s.axes, specs(cfg, pcfg), is_leaf=_is_spec)


def num_params(cfg: ModelConfig, pcfg: PeftConfig) -> int:
  """Trainable parameter count."""
  return sum(math.prod(s.shape) for s in jax.tree.leaves(specs(cfg, pcfg), is_leaf=_is_spec))


def init(cfg: ModelConfig, pcfg: PeftConfig, key: jax.Array, base_params: dict | None = None) -> dict:
  """The trainable tree. 'none' returns base_params (or a fresh model); 'prompt' with
  prompt_init='vocab' copies the embeddings of prompt_length random tokens from base_params."""
  if pcfg.method == 'none':
    return base_params if base_params is not None else model.init(cfg, key)
  adapters = layers.init_from_specs(specs(cfg, pcfg), key, jnp.dtype(cfg.param_dtype))
  if pcfg.method == 'prompt' and pcfg.prompt_init == 'vocab':
    if base_params is None:
      raise ConfigError('peft.prompt_init="vocab" copies token embeddings, so peft.init needs '
                        'base_params; pass them or set prompt_init="normal".')
    ids = jax.random.randint(jax.random.fold_in(key, 1), (pcfg.prompt_length,), 0, cfg.vocab_size)
    adapters['soft_prompt'] = jnp.asarray(base_params['embed'])[ids].astype(cfg.param_dtype)
  return adapters


# Using adapters -------------------------------------------------------------------------
def prefix_kv(adapters: dict, pcfg: PeftConfig) -> dict:
  """Per-layer {'prefix_k', 'prefix_v'} [layers, P, kv_heads, head_dim]; with prefix_hidden
  they come from tanh-MLP(P') (Li & Liang 2021), so gradients reach the MLP."""
  if not pcfg.prefix_hidden:
    return adapters['layers']['attn']
  p = adapters['prefix']
  h = jnp.tanh(p['embed'] @ p['w1'] + p['b1'])                     # [P, hidden]
  kv = jnp.einsum('ph,hlckd->lcpkd', h, p['w2']) + p['b2'][:, :, None]
  return {'prefix_k': kv[:, 0], 'prefix_v': kv[:, 1]}


def combine(base_params: dict, adapters: dict, cfg: ModelConfig, pcfg: PeftConfig) -> dict:
  """Params for model.forward: the base with the adapters hooked in (nothing is merged)."""
  m = pcfg.method
  if m == 'none':
    return adapters
  if m == 'prompt':
    return {**base_params, 'soft_prompt': adapters['soft_prompt']}
  lay = dict(base_params['layers'])
  if m == 'lora':
    for group, ws in adapters['layers'].items():
      lay[group] = {**lay[group], **{n: LoRAWeight(lay[group][n], ab['a'], ab['b'], pcfg.lora_scale)
                                     for n, ab in ws.items()}}
  elif m == 'prefix':
    lay['attn'] = {**lay['attn'], **prefix_kv(adapters, pcfg)}
  else:  # adapter
    lay.update(adapters['layers'])
  return {**base_params, 'layers': lay}


def merge(base_params: dict, adapters: dict, cfg: ModelConfig, pcfg: PeftConfig) -> dict:
  """Plain params with LoRA folded in: w + scale * a @ b (for export or fast inference)."""
  if pcfg.method == 'none':
    return adapters
  if pcfg.method != 'lora':
    raise ConfigError(f'peft.merge folds only LoRA into the base weights; {pcfg.method} params '
                      'cannot be merged, so use peft.combine(base, adapters) to run them.')

  def fold(w: LoRAWeight):
    n, r = w.a.shape[0], w.a.shape[-1]
    delta = jnp.matmul(w.a.reshape(n, -1, r), w.b.reshape(n, r, -1), precision='highest')
    return (w.w + w.scale * delta.reshape(w.w.shape)).astype(w.w.dtype)

  return jax.tree.map(lambda x: fold(x) if isinstance(x, LoRAWeight) else x,
                      combine(base_params, adapters, cfg, pcfg),
                      is_leaf=lambda x: isinstance(x, LoRAWeight))
