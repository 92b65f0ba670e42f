"""Import and export Hugging Face GPT-2 and LLaMA checkpoints (safetensors) to our params;
import T5 (v1.0: ReLU MLP) encoder-decoder checkpoints.

Import streams the checkpoint tensor by tensor into preallocated stacked arrays, so
memory holds our params plus one tensor, never two copies of the model (the complaint
behind MaxText #551). Export writes one safetensors shard per layer plus an index, so
it too holds only one layer in the Hugging Face layout at a time.

Layouts: HF GPT-2 uses Conv1D (y = x W, W [in, out]) with fused QKV; HF LLaMA uses
Linear (y = x W^T, W [out, in]) with separate q/k/v/o and gate/up/down projections.
Both use the rotate-half RoPE convention that lm.layers.rope implements. LLaMA's rope_theta is
read from either config layout (transformers >= 5 `rope_parameters`, older `rope_theta`);
scaled RoPE (LLaMA-3.1's 'llama3', linear, dynamic, yarn, ...) is refused with a ConfigError.
"""
from __future__ import annotations

import json
import os
from typing import Callable, Iterator

import numpy as np

from lm import model
from lm.config import ConfigError, ModelConfig


# Configs --------------------------------------------------------------------------------------
def _llama_rope_theta(hf: dict) -> float:
  """RoPE theta of a LLaMA config.json in either layout: transformers >= 5 nests it in
  `rope_parameters` {'rope_theta', 'rope_type', ...}; older versions write a top-level
  `rope_theta` and an optional `rope_scaling` {'rope_type' (or 'type'), ...}."""
  params, scaling = hf.get('rope_parameters') or {}, hf.get('rope_scaling') or {}
  kinds = {params.get('rope_type'), scaling.get('rope_type'), scaling.get('type')} - {None, 'default'}
  if 'llama3' in kinds:  # LLaMA-3.1+: frequency-dependent rescaling of inv_freq
    raise ConfigError("This LLaMA checkpoint uses LLaMA-3.1 ('llama3') RoPE scaling, which lm.layers.rope "
                      "does not implement; import a checkpoint with unscaled RoPE (rope_type 'default').")
  if kinds:
    raise ConfigError(f'This LLaMA checkpoint uses {sorted(kinds)[0]!r} RoPE scaling, which lm.layers.rope '
                      "does not implement; only unscaled RoPE (rope_type 'default') can be imported.")
  return float(params.get('rope_theta', hf.get('rope_theta', 10000.0)))


def config_from_hf(hf: dict, **overrides) -> ModelConfig:
  """ModelConfig from a Hugging Face config.json dict (GPT-2 or LLaMA families)."""
  kind = hf.get('model_type')
  if kind == 'gpt2':
    act = {'gelu_new': 'gelu_tanh', 'gelu_pytorch_tanh': 'gelu_tanh', 'gelu': 'gelu',
           'relu': 'relu'}[hf.get('activation_function', 'gelu_new')]
    c = dict(vocab_size=hf['vocab_size'], d_model=hf['n_embd'], n_layers=hf['n_layer'],
             n_heads=hf['n_head'], d_ff=hf.get('n_inner') or 4 * hf['n_embd'],
             max_seq_len=hf['n_positions'], norm='layernorm', norm_eps=hf.get('layer_norm_epsilon', 1e-5),
             activation=act, positions='learned', use_bias=True, tie_embeddings=True)
  elif kind == 'llama':
    c = dict(vocab_size=hf['vocab_size'], d_model=hf['hidden_size'], n_layers=hf['num_hidden_layers'],
             n_heads=hf['num_attention_heads'],
             n_kv_heads=hf.get('num_key_value_heads') or hf['num_attention_heads'],
             d_ff=hf['intermediate_size'], max_seq_len=hf.get('max_position_embeddings', 2048),
             norm='rmsnorm', norm_eps=hf.get('rms_norm_eps', 1e-6), activation='swiglu',
             positions='rope', rope_theta=_llama_rope_theta(hf), use_bias=False,
             tie_embeddings=bool(hf.get('tie_word_embeddings', False)))
    if hf.get('head_dim') not in (None, c['d_model'] // c['n_heads']):
      raise ConfigError('This LLaMA checkpoint has head_dim != hidden_size / heads, which is not supported.')
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
    raise ConfigError(f'Unsupported model_type {kind!r}; lm.convert handles gpt2, llama and t5.')
  c.update(overrides)
  return ModelConfig(**c)


def config_to_hf(cfg: ModelConfig) -> dict:
  if cfg.positions == 'learned' and cfg.norm == 'layernorm':
    return {'model_type': 'gpt2', 'architectures': ['GPT2LMHeadModel'], 'vocab_size': cfg.vocab_size,
            'n_embd': cfg.d_model, 'n_layer': cfg.n_layers, 'n_head': cfg.n_heads,
            'n_inner': cfg.ff_dim, 'n_positions': cfg.max_seq_len, 'layer_norm_epsilon': cfg.norm_eps,
            'activation_function': {'gelu_tanh': 'gelu_new', 'gelu': 'gelu', 'relu': 'relu'}[cfg.activation],
            'tie_word_embeddings': True}
  if cfg.positions == 'rope' and cfg.norm == 'rmsnorm' and cfg.activation == 'swiglu':
    return {'model_type': 'llama', 'architectures': ['LlamaForCausalLM'], 'vocab_size': cfg.vocab_size,
            'hidden_size': cfg.d_model, 'num_hidden_layers': cfg.n_layers,
            'num_attention_heads': cfg.n_heads, 'num_key_value_heads': cfg.kv_heads,
            'intermediate_size': cfg.ff_dim, 'max_position_embeddings': cfg.max_seq_len,
            'rms_norm_eps': cfg.norm_eps, 'hidden_act': 'silu',
            # both layouts: transformers >= 5 reads rope_parameters, older versions rope_theta
            'rope_theta': cfg.rope_theta,
            'rope_parameters': {'rope_type': 'default', 'rope_theta': cfg.rope_theta},
            'tie_word_embeddings': cfg.tie_embeddings, 'attention_bias': False, 'mlp_bias': False}
  raise ConfigError('Only GPT-2-like (learned positions, LayerNorm) and LLaMA-like (RoPE, RMSNorm, '
                    'SwiGLU) models can be exported to Hugging Face.')


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
  d, h, kv, hd = cfg.d_model, cfg.n_heads, cfg.kv_heads, cfg.head_dim
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
        p + 'input_layernorm.weight': (('layers', 'ln1', 'scale'), i, lambda w: w),
        p + 'post_attention_layernorm.weight': (('layers', 'ln2', 'scale'), i, lambda w: w),
    })
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
  return {'gpt2': _gpt2_map, 'llama': _llama_map, 't5': _t5_map}[kind](cfg)


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
  from safetensors import safe_open
  for f in files:
    with safe_open(f, framework='np') as st:
      for name in st.keys():
        yield name, st.get_tensor(name)


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


def import_hf(path: str, dtype=np.float32, **overrides) -> tuple[dict, ModelConfig]:
  """Load a Hugging Face GPT-2 / LLaMA / T5 directory (config.json + safetensors) as (params, cfg)."""
  with open(os.path.join(path, 'config.json')) as f:
    hf = json.load(f)
  cfg = config_from_hf(hf, **overrides)
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


def _zeros_like_specs(specs, dtype) -> dict:
  if hasattr(specs, 'shape') and not isinstance(specs, dict):
    return np.zeros(specs.shape, dtype)
  return {k: _zeros_like_specs(v, dtype) for k, v in specs.items()}


# Export ----------------------------------------------------------------------------------------------
def export_hf(params: dict, cfg: ModelConfig, path: str) -> str:
  """Write params as a Hugging Face checkpoint: config.json, one shard per layer, an index."""
  from safetensors.numpy import save_file
  hf = config_to_hf(cfg)
  kind = hf['model_type']
  os.makedirs(path, exist_ok=True)
  with open(os.path.join(path, 'config.json'), 'w') as f:
    json.dump(hf, f, indent=2)
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
      shard[hf_name] = np.ascontiguousarray(inverse(hf_name, params, layer), np.float32)
    fname = f'model-{"embed" if layer is None else f"layer{layer:04d}"}.safetensors'
    save_file(shard, os.path.join(path, fname), metadata={'format': 'pt'})
    weight_map.update({n: fname for n in shard})
  with open(os.path.join(path, 'model.safetensors.index.json'), 'w') as f:
    json.dump({'metadata': {}, 'weight_map': weight_map}, f, indent=1)
  return path


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
    tree_path, lay, _ = names[hf_name]
    w = _get(params, tree_path, lay)
    return w[:v] if tree_path == ('embed',) else w

  return inverse
