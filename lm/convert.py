"""Import and export Hugging Face checkpoints (safetensors): GPT-2, and the LLaMA family (LLaMA
incl. 3.x RoPE scaling, Mistral, Qwen2/2.5, Qwen3, Gemma-2, Gemma-3 text); import T5 (v1.0:
ReLU MLP) encoder-decoder checkpoints.

Import streams the checkpoint tensor by tensor into preallocated stacked arrays, so
memory holds our params plus one tensor, never two copies of the model (the complaint
behind MaxText #551). Export writes one safetensors shard per layer plus an index, so
it too holds only one layer in the Hugging Face layout at a time.

Layouts: HF GPT-2 uses Conv1D (y = x W, W [in, out]) with fused QKV; HF LLaMA uses
Linear (y = x W^T, W [out, in]) with separate q/k/v/o and gate/up/down projections.
Both use the rotate-half RoPE convention that lm.layers.rope implements. RoPE is read from
either config layout (transformers >= 5 `rope_parameters`, older `rope_theta` / `rope_scaling`).

Every field of a LLaMA-family config.json is mapped to a ModelConfig field, or is bookkeeping
that cannot change the network (_NEUTRAL), or is refused in one sentence naming it: nothing is
silently ignored. Export builds the config.json and checks that reading it back gives the same
network (_check_round_trip), so a model transformers would run differently is refused.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Callable, Iterator

import numpy as np

from lm import model
from lm.config import ConfigError, ModelConfig


# Configs --------------------------------------------------------------------------------------
# Modern decoder families: LLaMA, Mistral, Qwen2/2.5, Qwen3, Gemma-2, Gemma-3 (text) ---------------
FAMILIES = ('llama', 'mistral', 'qwen2', 'qwen3', 'gemma2', 'gemma3_text')
# PretrainedConfig bookkeeping and training-only knobs: they never change the forward pass.
_NEUTRAL = {'_name_or_path', 'architectures', 'chunk_size_feed_forward', 'dtype', 'torch_dtype',
            'id2label', 'label2id', 'model_type', 'output_attentions', 'output_hidden_states',
            'problem_type', 'return_dict', 'transformers_version', 'use_cache', 'initializer_range',
            'attention_dropout', 'bos_token_id', 'pad_token_id', 'eos_token_id', 'tokenizer_class',
            'pretraining_tp', 'is_encoder_decoder', 'tie_word_embeddings', 'cache_implementation',
            'final_logit_softcapping', 'attn_logit_softcapping', 'embedding_dropout', 'resid_pdrop'}
_ACTIVATIONS = {'silu': 'swiglu', 'swish': 'swiglu', 'gelu': 'geglu', 'gelu_pytorch_tanh': 'geglu_tanh',
                'gelu_new': 'geglu_tanh', 'gelu_tanh': 'geglu_tanh'}
_ROPE_KEYS = {'default': set(), 'linear': {'factor'}, 'dynamic': {'factor'},
              'llama3': {'factor', 'low_freq_factor', 'high_freq_factor', 'original_max_position_embeddings'},
              'yarn': {'factor', 'original_max_position_embeddings', 'beta_fast', 'beta_slow', 'attention_factor',
                       'mscale', 'mscale_all_dim', 'truncate'}}


def _refuse(kind: str, field: str, value, why: str = 'lm.model does not implement it') -> ConfigError:
  return ConfigError(f'This {kind} checkpoint sets {field}={value!r}, which cannot be imported: {why}.')


def _rope_parameters(hf: dict, kind: str) -> tuple[dict, dict | None]:
  """(full-attention RoPE dict, sliding-attention RoPE dict or None) from either config layout:
  transformers >= 5 `rope_parameters` (per layer type for Gemma-3), older `rope_theta` +
  `rope_scaling` (+ Gemma-3's `rope_local_base_freq`)."""
  params = hf.get('rope_parameters') or {}
  if 'full_attention' in params or 'sliding_attention' in params:
    full, local = dict(params.get('full_attention') or {}), params.get('sliding_attention')
  else:
    full, local = dict(params), None
  if not params:
    full = {'rope_theta': hf.get('rope_theta', 10000.0), **(hf.get('rope_scaling') or {})}
  elif hf.get('rope_scaling'):
    full.update(hf['rope_scaling'])
  if kind == 'gemma3_text' and local is None:
    local = {'rope_type': 'default', 'rope_theta': hf.get('rope_local_base_freq', 10000.0)}
  return full, (dict(local) if local is not None else None)


def _rope_fields(p: dict, kind: str, max_pos: int) -> dict:
  """Our rope_* fields from one transformers RoPE dict; refuses kinds and keys we lack."""
  p = dict(p)
  rtype = p.pop('rope_type', None) or p.pop('type', None) or 'default'
  p.pop('type', None)
  theta = float(p.pop('rope_theta', 10000.0))
  partial = p.pop('partial_rotary_factor', 1.0)
  if partial != 1.0:
    raise _refuse(kind, 'partial_rotary_factor', partial, 'RoPE here rotates the whole head')
  if rtype not in _ROPE_KEYS:
    raise _refuse(kind, 'rope_type', rtype, "RoPE scaling kinds here are 'linear', 'dynamic', 'yarn' and 'llama3'")
  extra = sorted(set(p) - _ROPE_KEYS[rtype])
  if extra:
    raise _refuse(kind, f'rope_parameters.{extra[0]}', p[extra[0]], f'{rtype!r} RoPE takes no such key')
  out = {'rope_theta': theta}
  if rtype == 'default':
    return out
  factor = p.get('factor')
  orig = p.get('original_max_position_embeddings')
  if rtype == 'yarn':
    orig = orig or max_pos
    factor = factor or max_pos / orig
    af = p.get('attention_factor')
    if af is None and p.get('mscale') and p.get('mscale_all_dim'):
      m = lambda s: 1.0 if factor <= 1 else 0.1 * s * math.log(factor) + 1.0
      af = m(p['mscale']) / m(p['mscale_all_dim'])
    out.update(rope_beta_fast=float(p.get('beta_fast') or 32), rope_beta_slow=float(p.get('beta_slow') or 1),
               rope_attention_factor=float(af or 0.0), rope_truncate=bool(p.get('truncate', True)))
  if rtype == 'llama3':
    out.update(rope_low_freq_factor=float(p['low_freq_factor']), rope_high_freq_factor=float(p['high_freq_factor']))
  if rtype == 'dynamic':   # transformers' NTK grows the base past max_position_embeddings
    orig = max_pos
  out.update(rope_scaling=rtype, rope_factor=float(factor), rope_original_max_len=int(orig or 0))
  return out


def _layer_types(hf: dict, kind: str, n: int, get) -> tuple[int, tuple]:
  """(sliding_window, our layer_types) as transformers derives them for the family (LLaMA has
  neither field, so a LLaMA config carrying one is refused as unknown)."""
  if kind == 'llama':
    return 0, ()
  window = get('sliding_window')
  if kind in ('qwen2', 'qwen3') and not get('use_sliding_window', False):
    window = None   # transformers drops the window unless use_sliding_window
  get('max_window_layers'), get('sliding_window_pattern'), get('_sliding_window_pattern')
  alias = get('sliding_window_size')   # Gemma-2's configs repeat the window under this name
  if alias is not None and alias != hf.get('sliding_window'):
    raise _refuse(kind, 'sliding_window_size', alias, f'it disagrees with sliding_window={hf.get("sliding_window")}')
  types = get('layer_types')
  if window is None:   # every layer attends to the whole context, whatever layer_types says
    return 0, ()
  if not types:
    if kind == 'mistral':
      types = ['sliding_attention'] * n
    elif kind in ('qwen2', 'qwen3'):
      types = ['sliding_attention' if i >= hf.get('max_window_layers', 28) else 'full_attention' for i in range(n)]
    else:
      pattern = 2 if kind == 'gemma2' else hf.get('sliding_window_pattern', hf.get('_sliding_window_pattern', 6))
      types = ['sliding_attention' if (i + 1) % pattern else 'full_attention' for i in range(n)]
  names = {'full_attention': 'full', 'sliding_attention': 'sliding'}
  bad = [t for t in types if t not in names]
  if bad:
    raise _refuse(kind, 'layer_types', bad[0], "only 'full_attention' and 'sliding_attention' layers exist here")
  types = tuple(names[t] for t in types)
  return (int(window), types) if 'sliding' in types else (0, ())


def _family_config(hf: dict) -> dict:
  """ModelConfig fields of a LLaMA / Mistral / Qwen2 / Qwen3 / Gemma-2 / Gemma-3 config.json.

  Every field is read, or is bookkeeping (_NEUTRAL), or is refused in one sentence."""
  kind, seen = hf['model_type'], set()

  def get(name, default=None):
    seen.add(name)
    return hf.get(name, default)

  gemma = kind.startswith('gemma')
  d, h = get('hidden_size'), get('num_attention_heads')
  max_pos = get('max_position_embeddings', 2048)
  c = dict(vocab_size=get('vocab_size'), d_model=d, n_layers=get('num_hidden_layers'), n_heads=h,
           n_kv_heads=get('num_key_value_heads') or h, d_ff=get('intermediate_size'), max_seq_len=max_pos,
           norm='rmsnorm', norm_eps=float(get('rms_norm_eps', 1e-6)), positions='rope', use_bias=False,
           tie_embeddings=bool(hf.get('tie_word_embeddings', gemma)))
  head_dim = get('head_dim') or d // h
  if head_dim != d // h:
    c['d_head'] = head_dim
  act_field = 'hidden_activation' if gemma and hf.get('hidden_activation') else 'hidden_act'
  act = get(act_field, 'silu')
  get('hidden_act')
  if act not in _ACTIVATIONS:
    raise _refuse(kind, act_field, act, f'the gated MLP here takes one of {sorted(_ACTIVATIONS)}')
  c['activation'] = _ACTIVATIONS[act]
  for name in ('attention_bias', 'mlp_bias', 'use_bidirectional_attention'):
    if get(name):
      raise _refuse(kind, name, hf[name], f'{kind} here has none')
  c['qkv_bias'] = kind == 'qwen2'               # Qwen2's q/k/v always carry biases
  c['qk_norm'] = kind in ('qwen3', 'gemma3_text')
  if gemma:
    c.update(norm_unit_offset=True, norm_position='sandwich', scale_embeddings=True,
             query_pre_attn_scalar=float(get('query_pre_attn_scalar') or head_dim),
             attn_softcap=float(hf.get('attn_logit_softcapping') or 0.0),
             final_softcap=float(hf.get('final_logit_softcapping') or 0.0))
  else:
    for name in ('attn_logit_softcapping', 'final_logit_softcapping'):
      if hf.get(name):
        raise _refuse(kind, name, hf[name], f'{kind} has no soft-capping')
  c['sliding_window'], c['layer_types'] = _layer_types(hf, kind, c['n_layers'], get)
  seen.update({'rope_parameters', 'rope_theta', 'rope_scaling', 'rope_local_base_freq'})
  full, local = _rope_parameters(hf, kind)
  c.update(_rope_fields(full, kind, max_pos))
  if c.get('rope_scaling') == 'dynamic':   # the longer context that dynamic NTK opens
    c['max_seq_len'] = int(max_pos * c['rope_factor'])
  if local is not None:
    lf = _rope_fields(local, kind, max_pos)
    if len(lf) > 1:
      raise _refuse(kind, 'rope_parameters.sliding_attention', local, 'sliding layers take unscaled RoPE here')
    if lf['rope_theta'] != c['rope_theta'] or c.get('rope_scaling', 'none') != 'none':
      c['rope_local_theta'] = lf['rope_theta']   # sliding layers: unscaled, their own base
  eos = hf.get('eos_token_id')
  c['eos_ids'] = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
  _refuse_unread(hf, kind, seen)
  return c


def _refuse_unread(hf: dict, kind: str, seen: set, neutral: frozenset = frozenset()) -> None:
  """A field nobody read may change the network: refuse it (None means off everywhere)."""
  rest = sorted(k for k in hf if k not in seen | _NEUTRAL | neutral and hf[k] is not None)
  if rest:
    raise _refuse(kind, rest[0], hf[rest[0]], 'it is not a field this importer knows, so its effect cannot be reproduced')


_GPT2_ACTIVATIONS = {'gelu_new': 'gelu_tanh', 'gelu_pytorch_tanh': 'gelu_tanh', 'gelu': 'gelu', 'relu': 'relu'}
# dropout and the sequence-summary head (GPT2DoubleHeads) do not touch the LM's forward pass;
# reorder_and_upcast_attn only changes fp16 rounding.
_GPT2_NEUTRAL = frozenset({'resid_pdrop', 'embd_pdrop', 'attn_pdrop', 'summary_type', 'summary_use_proj',
                           'summary_activation', 'summary_proj_to_labels', 'summary_first_dropout',
                           'reorder_and_upcast_attn', 'n_ctx'})


def _gpt2_config(hf: dict) -> dict:
  """ModelConfig fields of a GPT-2 config.json; switches GPT-2 has and we lack are refused."""
  kind, seen = 'gpt2', set()

  def get(name, default=None):
    seen.add(name)
    return hf.get(name, default)

  act = get('activation_function', 'gelu_new')
  if act not in _GPT2_ACTIVATIONS:
    raise _refuse(kind, 'activation_function', act, f'the MLP here takes one of {sorted(_GPT2_ACTIVATIONS)}')
  for name, want in (('scale_attn_weights', True), ('scale_attn_by_inverse_layer_idx', False),
                     ('add_cross_attention', False), ('tie_word_embeddings', True)):
    if get(name, want) != want:
      raise _refuse(kind, name, hf[name], f'GPT-2 here has {name}={want}')
  d = get('n_embd')
  c = dict(vocab_size=get('vocab_size'), d_model=d, n_layers=get('n_layer'), n_heads=get('n_head'),
           d_ff=get('n_inner') or 4 * d, max_seq_len=get('n_positions'), norm='layernorm',
           norm_eps=get('layer_norm_epsilon', 1e-5), activation=_GPT2_ACTIVATIONS[act], positions='learned',
           use_bias=True, tie_embeddings=True)
  _refuse_unread(hf, kind, seen, _GPT2_NEUTRAL)
  return c


def config_from_hf(hf: dict, **overrides) -> ModelConfig:
  """ModelConfig from a Hugging Face config.json dict (GPT-2 or LLaMA families)."""
  kind = hf.get('model_type')
  if kind == 'gpt2':
    c = _gpt2_config(hf)
  elif kind in FAMILIES:
    c = _family_config(hf)
  elif kind == 'gemma3':
    raise ConfigError("This is a multimodal Gemma-3 checkpoint (model_type 'gemma3'); import its text-only "
                      "Gemma3ForCausalLM form (model_type 'gemma3_text').")
  elif kind == 't5':
    if hf.get('feed_forward_proj', 'relu') != 'relu':
      raise ConfigError(f'This T5 checkpoint uses feed_forward_proj={hf["feed_forward_proj"]!r}; '
                        'only T5 v1.0 (relu) checkpoints can be imported.')
    c = dict(arch='encoder_decoder', vocab_size=hf['vocab_size'], d_model=hf['d_model'],
             d_head=hf['d_kv'], d_ff=hf['d_ff'], n_encoder_layers=hf['num_layers'],
             n_layers=hf.get('num_decoder_layers') or hf['num_layers'], n_heads=hf['num_heads'],
             max_seq_len=hf.get('n_positions', 512), norm='rmsnorm',
             norm_eps=hf.get('layer_norm_epsilon', 1e-6), activation='relu', positions='relative',
             rel_buckets=hf.get('relative_attention_num_buckets', 32),
             rel_max_distance=hf.get('relative_attention_max_distance', 128), use_bias=False,
             scale_attention=False, tie_embeddings=bool(hf.get('tie_word_embeddings', True)))
  else:
    raise ConfigError(f'Unsupported model_type {kind!r}; lm.convert handles gpt2, t5 and {", ".join(FAMILIES)}.')
  c.update(overrides)
  return ModelConfig(**c)


def config_to_hf(cfg: ModelConfig) -> dict:
  if cfg.positions == 'learned' and cfg.norm == 'layernorm':
    return {'model_type': 'gpt2', 'architectures': ['GPT2LMHeadModel'], 'vocab_size': cfg.vocab_size,
            'n_embd': cfg.d_model, 'n_layer': cfg.n_layers, 'n_head': cfg.n_heads,
            'n_inner': cfg.ff_dim, 'n_positions': cfg.max_seq_len, 'layer_norm_epsilon': cfg.norm_eps,
            'activation_function': {'gelu_tanh': 'gelu_new', 'gelu': 'gelu', 'relu': 'relu'}[cfg.activation],
            'tie_word_embeddings': True}
  if cfg.positions == 'rope' and cfg.norm == 'rmsnorm' and cfg.gated:
    hf = _family_to_hf(cfg)
    _check_round_trip(cfg, hf)
    return hf
  raise ConfigError('Only GPT-2-like (learned positions, LayerNorm) and LLaMA-family (RoPE, RMSNorm, '
                    'gated MLP) models can be exported to Hugging Face.')


def export_family(cfg: ModelConfig) -> str:
  """The transformers model_type a RoPE + RMSNorm + gated-MLP config exports as."""
  if cfg.norm_position == 'sandwich' and cfg.norm_unit_offset:
    return 'gemma3_text' if cfg.qk_norm else 'gemma2'
  if cfg.qk_norm:
    return 'qwen3'
  if cfg.qkv_bias:
    return 'qwen2'
  return 'mistral' if cfg.sliding_window and all(cfg.local_layers) else \
      ('qwen2' if cfg.sliding_window else 'llama')


_ARCHITECTURES = {'llama': 'LlamaForCausalLM', 'mistral': 'MistralForCausalLM', 'qwen2': 'Qwen2ForCausalLM',
                  'qwen3': 'Qwen3ForCausalLM', 'gemma2': 'Gemma2ForCausalLM', 'gemma3_text': 'Gemma3ForCausalLM'}


def _rope_to_hf(cfg: ModelConfig) -> dict:
  p = {'rope_type': 'default' if cfg.rope_scaling == 'none' else cfg.rope_scaling, 'rope_theta': cfg.rope_theta}
  if cfg.rope_scaling != 'none':
    p['factor'] = cfg.rope_factor
  if cfg.rope_scaling in ('llama3', 'yarn'):
    p['original_max_position_embeddings'] = cfg.rope_original_max_len
  if cfg.rope_scaling == 'llama3':
    p.update(low_freq_factor=cfg.rope_low_freq_factor, high_freq_factor=cfg.rope_high_freq_factor)
  if cfg.rope_scaling == 'yarn':
    p.update(beta_fast=cfg.rope_beta_fast, beta_slow=cfg.rope_beta_slow, truncate=cfg.rope_truncate)
    if cfg.rope_attention_factor:
      p['attention_factor'] = cfg.rope_attention_factor
  return p


def _family_to_hf(cfg: ModelConfig) -> dict:
  kind = export_family(cfg)
  gemma = kind.startswith('gemma')
  max_pos = cfg.rope_original_max_len if cfg.rope_scaling == 'dynamic' else cfg.max_seq_len
  act = {'swiglu': 'silu', 'geglu': 'gelu', 'geglu_tanh': 'gelu_pytorch_tanh'}[cfg.activation]
  hf = {'model_type': kind, 'architectures': [_ARCHITECTURES[kind]], 'vocab_size': cfg.vocab_size,
        'hidden_size': cfg.d_model, 'num_hidden_layers': cfg.n_layers, 'num_attention_heads': cfg.n_heads,
        'num_key_value_heads': cfg.kv_heads, 'head_dim': cfg.head_dim, 'intermediate_size': cfg.ff_dim,
        'max_position_embeddings': max_pos, 'rms_norm_eps': cfg.norm_eps,
        ('hidden_activation' if gemma else 'hidden_act'): act,
        'tie_word_embeddings': cfg.tie_embeddings}
  rope = _rope_to_hf(cfg)
  if kind == 'gemma3_text':
    local = {'rope_type': 'default', 'rope_theta': cfg.rope_local_theta or cfg.rope_theta}
    hf['rope_parameters'] = {'full_attention': rope, 'sliding_attention': local}
  else:
    # both layouts: transformers >= 5 reads rope_parameters, older versions rope_theta / rope_scaling
    hf.update(rope_theta=cfg.rope_theta, rope_parameters=rope)
    if cfg.rope_scaling != 'none':
      hf['rope_scaling'] = rope
  if kind in ('llama', 'qwen3'):
    hf['attention_bias'] = False
  if kind == 'llama':
    hf['mlp_bias'] = False
  if kind in ('qwen2', 'qwen3'):
    hf['use_sliding_window'] = bool(cfg.sliding_window)
  if kind != 'llama':
    hf['sliding_window'] = cfg.sliding_window or None
    if cfg.sliding_window and kind != 'mistral':
      hf['layer_types'] = [t + '_attention' for t in ('sliding' if l else 'full' for l in cfg.local_layers)]
  if gemma:
    qpas = cfg.query_pre_attn_scalar or cfg.head_dim
    hf.update(query_pre_attn_scalar=int(qpas) if float(qpas).is_integer() else qpas,   # transformers wants an int
              attn_logit_softcapping=cfg.attn_softcap or None, final_logit_softcapping=cfg.final_softcap or None)
  if cfg.eos_ids:
    hf['eos_token_id'] = list(cfg.eos_ids) if len(cfg.eos_ids) > 1 else cfg.eos_ids[0]
  return hf


# Fields that only say how we compute or store, never what the network is.
_NOT_ARCHITECTURE = {'dtype', 'param_dtype', 'attention_impl', 'attention_q_block', 'remat', 'scan_unroll',
                     'init_std', 'vocab_multiple', 'max_seq_len', 'eos_ids', 'n_kv_heads', 'd_head', 'd_ff',
                     'moe_top_k', 'moe_capacity_factor', 'moe_balance_weight', 'moe_z_weight',
                     'rel_buckets', 'rel_max_distance', 'n_encoder_layers'}


def _architecture(cfg: ModelConfig) -> dict:
  """The fields that define the network, sizes resolved and unused RoPE knobs dropped."""
  a = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if f.name not in _NOT_ARCHITECTURE}
  a.update(kv_heads=cfg.kv_heads, head_dim=cfg.head_dim, ff_dim=cfg.ff_dim, layer_types=cfg.local_layers)
  kind = cfg.rope_scaling
  drop = {'rope_factor', 'rope_original_max_len'} if kind == 'none' else set()
  drop |= set() if kind == 'llama3' else {'rope_low_freq_factor', 'rope_high_freq_factor'}
  drop |= set() if kind == 'yarn' else {'rope_beta_fast', 'rope_beta_slow', 'rope_attention_factor', 'rope_truncate'}
  if not cfg.sliding_window:
    drop |= {'sliding_window', 'layer_types'}
  if not any(cfg.local_layers) or (cfg.rope_local_theta == cfg.rope_theta and kind == 'none'):
    drop.add('rope_local_theta')   # no layer uses it, or it is the global RoPE anyway
  return {k: v for k, v in a.items() if k not in drop}


def _check_round_trip(cfg: ModelConfig, hf: dict) -> None:
  """Refuse an export transformers would read back as a different network."""
  ours, back = _architecture(cfg), _architecture(config_from_hf(hf))
  diff = [k for k in ours if ours[k] != back.get(k)]
  if diff:
    k = diff[0]
    raise ConfigError(f'This model cannot be exported as a Hugging Face {hf["model_type"]}: its {k}={ours[k]!r} '
                      f'has no counterpart there (it would load as {back.get(k)!r}).')


# Name maps: HF tensor name -> (our path, layer index or None, transform to our layout) -----------------
def _gpt2_map(cfg: ModelConfig) -> dict[str, tuple]:
  d, h, hd = cfg.d_model, cfg.n_heads, cfg.head_dim
  m = {'transformer.wte.weight': (('embed',), None, lambda w: w),
       'transformer.wpe.weight': (('pos_embed',), None, lambda w: w),
       'transformer.ln_f.weight': (('final_norm', 'scale'), None, lambda w: w),
       'transformer.ln_f.bias': (('final_norm', 'bias'), None, lambda w: w)}
  for i in range(cfg.n_layers):
    p = f'transformer.h.{i}.'
    for j, name in enumerate(('wq', 'wk', 'wv')):
      m[(p + 'attn.c_attn.weight', name)] = (('layers', 'attn', name), i,
                                             lambda w, j=j: w[:, j * d:(j + 1) * d].reshape(d, h, hd))
      m[(p + 'attn.c_attn.bias', 'b' + name[1])] = (('layers', 'attn', 'b' + name[1]), i,
                                                   lambda w, j=j: w[j * d:(j + 1) * d].reshape(h, hd))
    m.update({
        p + 'attn.c_proj.weight': (('layers', 'attn', 'wo'), i, lambda w: w.reshape(h, hd, d)),
        p + 'attn.c_proj.bias': (('layers', 'attn', 'bo'), i, lambda w: w),
        p + 'ln_1.weight': (('layers', 'ln1', 'scale'), i, lambda w: w),
        p + 'ln_1.bias': (('layers', 'ln1', 'bias'), i, lambda w: w),
        p + 'ln_2.weight': (('layers', 'ln2', 'scale'), i, lambda w: w),
        p + 'ln_2.bias': (('layers', 'ln2', 'bias'), i, lambda w: w),
        p + 'mlp.c_fc.weight': (('layers', 'mlp', 'wi'), i, lambda w: w),
        p + 'mlp.c_fc.bias': (('layers', 'mlp', 'bi'), i, lambda w: w),
        p + 'mlp.c_proj.weight': (('layers', 'mlp', 'wo'), i, lambda w: w),
        p + 'mlp.c_proj.bias': (('layers', 'mlp', 'bo'), i, lambda w: w),
    })
  return m


def _llama_map(cfg: ModelConfig) -> dict[str, tuple]:
  """LLaMA's names, which Mistral and Qwen share; Qwen2's q/k/v biases, Qwen3's and Gemma-3's
  q/k norms and Gemma's four norms per block (sandwich) where cfg has them."""
  d, h, kv, hd = cfg.d_model, cfg.n_heads, cfg.kv_heads, cfg.head_dim
  same = lambda w: w
  m = {'model.embed_tokens.weight': (('embed',), None, lambda w: w),
       'model.norm.weight': (('final_norm', 'scale'), None, lambda w: w)}
  if not cfg.tie_embeddings:
    m['lm_head.weight'] = (('lm_head',), None, lambda w: w.T)
  for i in range(cfg.n_layers):
    p = f'model.layers.{i}.'
    m.update({
        p + 'self_attn.q_proj.weight': (('layers', 'attn', 'wq'), i, lambda w: w.T.reshape(d, h, hd)),
        p + 'self_attn.k_proj.weight': (('layers', 'attn', 'wk'), i, lambda w: w.T.reshape(d, kv, hd)),
        p + 'self_attn.v_proj.weight': (('layers', 'attn', 'wv'), i, lambda w: w.T.reshape(d, kv, hd)),
        p + 'self_attn.o_proj.weight': (('layers', 'attn', 'wo'), i, lambda w: w.T.reshape(h, hd, d)),
        p + 'mlp.gate_proj.weight': (('layers', 'mlp', 'wg'), i, lambda w: w.T),
        p + 'mlp.up_proj.weight': (('layers', 'mlp', 'wi'), i, lambda w: w.T),
        p + 'mlp.down_proj.weight': (('layers', 'mlp', 'wo'), i, lambda w: w.T),
        p + 'input_layernorm.weight': (('layers', 'ln1', 'scale'), i, same),
    })
    if cfg.norm_position == 'sandwich':   # Gemma: a norm before and after each sublayer
      m.update({p + 'post_attention_layernorm.weight': (('layers', 'ln1_out', 'scale'), i, same),
                p + 'pre_feedforward_layernorm.weight': (('layers', 'ln2', 'scale'), i, same),
                p + 'post_feedforward_layernorm.weight': (('layers', 'ln2_out', 'scale'), i, same)})
    else:
      m[p + 'post_attention_layernorm.weight'] = (('layers', 'ln2', 'scale'), i, same)
    if cfg.qkv_bias:
      for x, n in (('q', h), ('k', kv), ('v', kv)):
        m[p + f'self_attn.{x}_proj.bias'] = (('layers', 'attn', f'b{x}'), i, lambda w, n=n: w.reshape(n, hd))
    if cfg.qk_norm:
      m[p + 'self_attn.q_norm.weight'] = (('layers', 'attn', 'q_norm'), i, same)
      m[p + 'self_attn.k_norm.weight'] = (('layers', 'attn', 'k_norm'), i, same)
  return m


def _t5_map(cfg: ModelConfig) -> dict[str, tuple]:
  d, h, hd = cfg.d_model, cfg.n_heads, cfg.head_dim
  qkv = lambda w: w.T.reshape(d, h, hd)         # Linear [h*hd, d] -> [d, h, hd]
  out = lambda w: w.T.reshape(h, hd, d)
  same, t = (lambda w: w), (lambda w: w.T)
  m = {'shared.weight': (('embed',), None, same),
       'encoder.final_layer_norm.weight': (('encoder', 'final_norm', 'scale'), None, same),
       'decoder.final_layer_norm.weight': (('decoder', 'final_norm', 'scale'), None, same),
       'encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight':
           (('encoder', 'rel_bias'), None, same),
       'decoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight':
           (('decoder', 'rel_bias'), None, same)}
  if not cfg.tie_embeddings:
    m['lm_head.weight'] = (('lm_head',), None, t)
  for stack, n in (('encoder', cfg.encoder_layers), ('decoder', cfg.n_layers)):
    # (HF sublayer, its attention module or None for the MLP, our attention group, our norm)
    subs = [(0, 'SelfAttention', 'attn', 'ln1')]
    subs += [(1, 'EncDecAttention', 'cross', 'ln_cross'), (2, None, 'mlp', 'ln2')] if stack == 'decoder' \
        else [(1, None, 'mlp', 'ln2')]
    for i in range(n):
      for j, module, ours, ln in subs:
        p = f'{stack}.block.{i}.layer.{j}.'
        m[p + 'layer_norm.weight'] = ((stack, 'layers', ln, 'scale'), i, same)
        if module:
          for x, fn in (('q', qkv), ('k', qkv), ('v', qkv), ('o', out)):
            m[p + f'{module}.{x}.weight'] = ((stack, 'layers', ours, 'w' + x), i, fn)
        else:
          m[p + 'DenseReluDense.wi.weight'] = ((stack, 'layers', 'mlp', 'wi'), i, t)
          m[p + 'DenseReluDense.wo.weight'] = ((stack, 'layers', 'mlp', 'wo'), i, t)
  return m


def _name_map(cfg: ModelConfig, kind: str) -> dict:
  return {'gpt2': _gpt2_map, 't5': _t5_map}.get(kind, _llama_map)(cfg)


# Import ----------------------------------------------------------------------------------------------
def _safetensor_files(path: str) -> list[str]:
  index = os.path.join(path, 'model.safetensors.index.json')
  if os.path.exists(index):
    with open(index) as f:
      return sorted({os.path.join(path, v) for v in json.load(f)['weight_map'].values()})
  single = os.path.join(path, 'model.safetensors')
  if os.path.exists(single):
    return [single]
  raise ConfigError(f'No model.safetensors (or index) in {path}; save the model with safe_serialization=True.')


def _iter_tensors(files: list[str]) -> Iterator[tuple[str, np.ndarray]]:
  reader = _Tensors(files)   # pread, not mmap: the file leaves nothing resident behind
  for name in reader.where:
    yield name, reader(name)


def _set(tree: dict, path: tuple, layer, value: np.ndarray) -> None:
  node = tree
  for k in path[:-1]:
    node = node[k]
  target = node[path[-1]]
  dst = target if layer is None else target[layer]
  if dst.shape != value.shape:
    if path == ('embed',) or path == ('lm_head',):   # our vocabulary is padded
      if path == ('embed',):
        dst[:value.shape[0]] = value
      else:
        dst[:, :value.shape[1]] = value
      return
    raise ConfigError(f'Checkpoint tensor for {"/".join(path)} has shape {value.shape}, expected {dst.shape}.')
  dst[...] = value


def config_from_folder(path: str, **overrides) -> tuple[ModelConfig, dict]:
  """(ModelConfig, config.json dict) of a Hugging Face folder; the EOS ids of its
  generation_config.json (LLaMA-3 instruct ends turns there) join config.json's."""
  with open(os.path.join(path, 'config.json')) as f:
    hf = json.load(f)
  cfg = config_from_hf(hf, **overrides)
  gen_path = os.path.join(path, 'generation_config.json')
  if os.path.exists(gen_path) and 'eos_ids' not in overrides and cfg.arch == 'decoder':
    with open(gen_path) as f:
      eos = json.load(f).get('eos_token_id')
    eos = eos if isinstance(eos, list) else ([] if eos is None else [eos])
    cfg = dataclasses.replace(cfg, eos_ids=tuple(dict.fromkeys([*cfg.eos_ids, *eos])))
  return cfg, hf


def import_hf(path: str, dtype=np.float32, **overrides) -> tuple[dict, ModelConfig]:
  """Load a Hugging Face GPT-2 / LLaMA-family / T5 directory (config.json + safetensors) as (params, cfg)."""
  cfg, hf = config_from_folder(path, **overrides)
  specs = model.param_specs(cfg)
  params = _zeros_like_specs(specs, dtype)
  names = _name_map(cfg, hf['model_type'])
  fused = {}  # GPT-2's fused QKV tensor feeds three of our leaves
  for k, v in names.items():
    if isinstance(k, tuple):
      fused.setdefault(k[0], []).append(v)
  seen = set()
  for name, tensor in _iter_tensors(_safetensor_files(path)):
    targets = fused.get(name) or ([names[name]] if name in names else [])
    if not targets:
      if (name.endswith(('attn.bias', 'attn.masked_bias', 'rotary_emb.inv_freq', 'embed_tokens.weight'))
          or name == 'lm_head.weight'):
        continue  # buffers, or copies of the (tied) embedding
      raise ConfigError(f'Unexpected tensor {name!r} in {path}; is it a {hf["model_type"]} checkpoint?')
    for tree_path, layer, fn in targets:
      _set(params, tree_path, layer, np.asarray(fn(tensor.astype(np.float32)), dtype))
      seen.add((tree_path, layer))
  expected = {(v[0], v[1]) for v in names.values()}
  missing = expected - seen
  if missing:
    raise ConfigError(f'{len(missing)} tensors missing from {path}, e.g. {sorted(missing)[0]}.')
  return params, cfg


class _Tensors:
  """Random access by name to the tensors of a checkpoint's safetensors files, read with pread
  into fresh buffers rather than memory-mapped, so nothing of the file stays resident: a host
  holds only the tensor (or rows of a table) being placed."""
  _DTYPES = {'F32': np.float32, 'F16': np.float16, 'F64': np.float64, 'I64': np.int64, 'I32': np.int32}

  def __init__(self, files: list[str]):
    self.where = {}
    for f in files:
      with open(f, 'rb') as fh:
        n = int.from_bytes(fh.read(8), 'little')
        header = json.loads(fh.read(n))
      header.pop('__metadata__', None)
      for name, h in header.items():
        self.where[name] = (f, 8 + n + h['data_offsets'][0], h['dtype'], tuple(h['shape']))

  def _dtype(self, code: str):
    if code == 'BF16':
      return _bfloat16()
    if code not in self._DTYPES:
      raise ConfigError(f'Checkpoint tensors of dtype {code} cannot be imported; store them as F32, F16 or BF16.')
    return self._DTYPES[code]

  def _read(self, name: str, first_row: int = 0, rows: int | None = None) -> np.ndarray:
    f, offset, code, shape = self.where[name]
    dt = np.dtype(self._dtype(code))
    row = math.prod(shape[1:]) * dt.itemsize if shape else dt.itemsize
    rows = (shape[0] if shape else 1) - first_row if rows is None else rows
    buf = np.empty(rows * row, np.uint8)
    with open(f, 'rb') as fh:
      fh.seek(offset + first_row * row)
      fh.readinto(buf)
    return buf.view(dt).reshape((rows, *shape[1:]) if shape else ())

  def __call__(self, name: str) -> np.ndarray:
    return self._read(name)   # as stored (bf16 stays bf16 until placed)

  def table_block(self, name: str, idx: tuple, shape: tuple, transposed: bool, dtype) -> np.ndarray:
    """One device's block of a vocabulary table ([vocab, d] stored; ours padded, and [d, vocab]
    when transposed), read a few thousand rows at a time: the table is never whole in memory."""
    rows = self.where[name][3][0]
    idx = idx[::-1] if transposed else idx
    full = shape[::-1] if transposed else shape
    (r0, r1, _), (c0, c1, _) = (sl.indices(n) for sl, n in zip(idx, full))
    block = np.zeros((r1 - r0, c1 - c0), dtype)
    for a in range(r0, min(r1, rows), 4096):
      b = min(a + 4096, r1, rows)
      block[a - r0:b - r0] = self._read(name, a, b - a)[:, c0:c1]
    return block.T if transposed else block


def _check_tensor_names(names: dict, present, path: str, kind: str) -> None:
  """Every tensor the name map expects is present; nothing unknown is (buffers aside)."""
  wanted = {k[0] if isinstance(k, tuple) else k for k in names}
  missing = sorted(wanted - set(present))
  if missing:
    raise ConfigError(f'{len(missing)} tensors missing from {path}, e.g. {missing[0]!r}.')
  skip = ('attn.bias', 'attn.masked_bias', 'rotary_emb.inv_freq', 'embed_tokens.weight')
  extra = sorted(n for n in set(present) - wanted if not (n.endswith(skip) or n == 'lm_head.weight'))
  if extra:
    raise ConfigError(f'Unexpected tensor {extra[0]!r} in {path}; is it a {kind} checkpoint?')


def _to_leaf(value: np.ndarray, shape: tuple, tree_path: tuple) -> np.ndarray:
  """One checkpoint tensor in our leaf's shape: the vocabulary rows or columns zero-padded."""
  if value.shape == shape:
    return value
  if tree_path in (('embed',), ('lm_head',)) and value.ndim == 2:
    out = np.zeros(shape, value.dtype)
    out[tuple(slice(0, n) for n in value.shape)] = value
    return out
  raise ConfigError(f'Checkpoint tensor for {"/".join(tree_path)} has shape {value.shape}, expected {shape}.')


def import_hf_to_mesh(path: str, mesh, dtype=np.float32, **overrides) -> tuple[dict, ModelConfig]:
  """Stream a (sharded) checkpoint onto `mesh`: params in the shardings the rules table gives.

  Each tensor is read, transformed and placed on its devices alone, and a stacked layer leaf is
  filled one layer at a time in place (a donated update), so a host holds one checkpoint tensor
  beyond its own devices' shards, never the whole model (see tests/test_families.py for the
  peak-RSS figure). Multi-host: every host reads the files and places its own shards.
  """
  import jax
  from lm import sharding
  from lm.layers import Spec
  cfg, hf = config_from_folder(path, **overrides)
  kind = hf['model_type']
  names = _name_map(cfg, kind)
  reader = _Tensors(_safetensor_files(path))
  _check_tensor_names(names, reader.where, path, kind)
  sources = {(tree_path, layer): (k[0] if isinstance(k, tuple) else k, fn)
             for k, (tree_path, layer, fn) in names.items()}
  specs = model.param_specs(cfg)
  abstract = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, dtype), specs,
                          is_leaf=lambda x: isinstance(x, Spec))
  shardings = sharding.tree_shardings(model.logical_axes(cfg), abstract, mesh)

  def tensor(tree_path, layer, shape):
    name, fn = sources[(tree_path, layer)]
    return _to_leaf(np.asarray(fn(reader(name)), dtype), shape, tree_path)

  def leaf(key_path, spec):
    tree_path = tuple(k.key for k in key_path)
    sh = _leaf_sharding(shardings, tree_path)
    if tree_path in (('embed',), ('lm_head',)):   # the largest tensors: read per device block
      name = sources[(tree_path, None)][0]
      return jax.make_array_from_callback(spec.shape, sh, lambda idx: reader.table_block(
          name, idx, spec.shape, tree_path == ('lm_head',), dtype))
    if spec.axes[0] != 'layers':
      value = tensor(tree_path, None, spec.shape)
      return jax.make_array_from_callback(spec.shape, sh, lambda idx: value[idx])
    return _stream_stacked(spec.shape, dtype, sh, lambda i: tensor(tree_path, i, spec.shape[1:]))

  params = jax.tree_util.tree_map_with_path(leaf, specs, is_leaf=lambda x: isinstance(x, Spec))
  return params, cfg


def _leaf_sharding(shardings: dict, tree_path: tuple):
  node = shardings
  for k in tree_path:
    node = node[k]
  return node


def _stream_stacked(shape: tuple, dtype, sh, layer_value: Callable[[int], np.ndarray]):
  """A [layers, ...] array on sh's devices, written one layer at a time (donated in place)."""
  import jax
  import jax.numpy as jnp
  from jax.sharding import NamedSharding, PartitionSpec
  spec = tuple(sh.spec) + (None,) * (len(shape) - len(sh.spec))
  layer_sh = NamedSharding(sh.mesh, PartitionSpec(*spec[1:]))
  arr = jax.jit(lambda: jnp.zeros(shape, dtype), out_shardings=sh)()
  put = jax.jit(lambda a, x, i: jax.lax.dynamic_update_index_in_dim(a, x, i, 0),
                donate_argnums=0, out_shardings=sh)
  for i in range(shape[0]):
    value = layer_value(i)
    arr = put(arr, jax.make_array_from_callback(shape[1:], layer_sh, lambda idx: value[idx]), i)
  return arr


def _zeros_like_specs(specs, dtype) -> dict:
  if hasattr(specs, 'shape') and not isinstance(specs, dict):
    return np.zeros(specs.shape, dtype)
  return {k: _zeros_like_specs(v, dtype) for k, v in specs.items()}


# Export ----------------------------------------------------------------------------------------------
def generation_config(cfg: ModelConfig, special_ids: dict | None = None) -> dict:
  """generation_config.json: every EOS id (cfg.eos_ids and the tokenizer's eos), bos and pad."""
  ids = dict(special_ids or {})
  eos = list(dict.fromkeys([*cfg.eos_ids, *([ids['eos']] if ids.get('eos') is not None else [])]))
  out = {'bos_token_id': ids.get('bos'), 'pad_token_id': ids.get('pad'),
         'eos_token_id': eos[0] if len(eos) == 1 else (eos or None)}
  return {k: v for k, v in out.items() if v is not None}


def export_hf(params: dict, cfg: ModelConfig, path: str, special_ids: dict | None = None,
              dtype: str = 'float32') -> str:
  """Write params as a Hugging Face checkpoint: config.json, generation_config.json (EOS ids
  from cfg.eos_ids and special_ids['eos']), one shard per layer, an index; tensors stored in
  `dtype` ('float32' or 'bfloat16', as released checkpoints are)."""
  from safetensors.numpy import save_file
  store = {'float32': np.float32, 'bfloat16': _bfloat16()}[dtype]
  hf = config_to_hf(cfg)
  hf['torch_dtype'] = hf['dtype'] = dtype   # older transformers read torch_dtype
  kind = hf['model_type']
  gen = generation_config(cfg, special_ids)
  hf.update(gen)   # the special ids in config.json too (generation_config's keys are already *_token_id)
  os.makedirs(path, exist_ok=True)
  with open(os.path.join(path, 'config.json'), 'w') as f:
    json.dump(hf, f, indent=2)
  if gen:
    with open(os.path.join(path, 'generation_config.json'), 'w') as f:
      json.dump(gen, f, indent=2)
  names = _name_map(cfg, kind)
  inverse = _inverse_fns(cfg, kind)
  groups: dict[object, dict[str, np.ndarray]] = {}
  for key, (tree_path, layer, _) in names.items():
    hf_name = key[0] if isinstance(key, tuple) else key
    groups.setdefault(layer, {}).setdefault(hf_name, None)
  weight_map = {}
  for layer, tensors in groups.items():
    shard = {}
    for hf_name in tensors:
      shard[hf_name] = np.ascontiguousarray(inverse(hf_name, params, layer), np.float32).astype(store)
    fname = f'model-{"embed" if layer is None else f"layer{layer:04d}"}.safetensors'
    save_file(shard, os.path.join(path, fname), metadata={'format': 'pt'})
    weight_map.update({n: fname for n in shard})
  with open(os.path.join(path, 'model.safetensors.index.json'), 'w') as f:
    json.dump({'metadata': {}, 'weight_map': weight_map}, f, indent=1)
  return path


def _bfloat16():
  import ml_dtypes   # numpy's bfloat16 (a jax dependency); safetensors stores it as BF16
  return ml_dtypes.bfloat16


def _get_leaf(params, tree_path, layer):
  node = params
  for k in tree_path:
    node = node[k]
  return np.asarray(node if layer is None else node[layer], np.float32)


def _inverse_fns(cfg: ModelConfig, kind: str) -> Callable:
  d, v = cfg.d_model, cfg.vocab_size
  names = _name_map(cfg, kind)
  # A model without biases (use_bias=False, nanoGPT's default) exports zeros where GPT-2 has them.
  bias_shapes = {'bias': (d,), 'bq': (cfg.n_heads, cfg.head_dim), 'bk': (cfg.n_heads, cfg.head_dim),
                 'bv': (cfg.n_heads, cfg.head_dim), 'bo': (d,), 'bi': (cfg.ff_dim,)}

  def _get(params, tree_path, layer):
    try:
      return _get_leaf(params, tree_path, layer)
    except KeyError:
      if tree_path[-1] not in bias_shapes:
        raise
      return np.zeros(bias_shapes[tree_path[-1]], np.float32)

  def inverse(hf_name: str, params: dict, layer):
    if kind == 'gpt2':
      if hf_name.endswith('c_attn.weight'):
        return np.concatenate([_get(params, ('layers', 'attn', n), layer).reshape(d, d) for n in ('wq', 'wk', 'wv')], 1)
      if hf_name.endswith('c_attn.bias'):
        return np.concatenate([_get(params, ('layers', 'attn', n), layer).reshape(d) for n in ('bq', 'bk', 'bv')])
      if hf_name.endswith('attn.c_proj.weight'):
        return _get(params, ('layers', 'attn', 'wo'), layer).reshape(d, d)
    else:
      flat = {'q_proj': 'wq', 'k_proj': 'wk', 'v_proj': 'wv'}
      for hf_key, ours in flat.items():
        if hf_name.endswith(f'{hf_key}.weight'):
          w = _get(params, ('layers', 'attn', ours), layer)
          return w.reshape(d, -1).T
      if hf_name.endswith('o_proj.weight'):
        return _get(params, ('layers', 'attn', 'wo'), layer).reshape(-1, d).T
      if hf_name.endswith(('gate_proj.weight', 'up_proj.weight', 'down_proj.weight')):
        ours = {'gate_proj': 'wg', 'up_proj': 'wi', 'down_proj': 'wo'}[hf_name.split('.')[-2]]
        return _get(params, ('layers', 'mlp', ours), layer).T
      if hf_name == 'lm_head.weight':
        return _get(params, ('lm_head',), None)[:, :v].T
      if hf_name.endswith('_proj.bias'):
        return _get(params, names[hf_name][0], layer).reshape(-1)
    tree_path, lay, _ = names[hf_name]
    w = _get(params, tree_path, lay)
    return w[:v] if tree_path == ('embed',) else w

  return inverse
