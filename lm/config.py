"""ModelConfig: the sizes and variant switches of a decoder, its parameter count and FLOPs.

A ModelConfig is built from the `model` section of an experiment's ConfigDict
(`ModelConfig.from_dict(config.model)`). Every variant is an orthogonal switch
(norm, activation, positions, biases, tying), so "GPT-2" and "LLaMA" are just
presets: see `PRESETS` at the bottom.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

NORMS = ('layernorm', 'rmsnorm')
ACTIVATIONS = ('gelu', 'gelu_tanh', 'relu', 'swiglu', 'geglu', 'geglu_tanh')  # geglu_tanh: Gemma's gated tanh-GELU
POSITIONS = ('learned', 'sinusoidal', 'rope', 'alibi', 'relative', 'none')  # relative: T5's bucketed bias
ARCHS = ('decoder', 'encoder_decoder')
NORM_POSITIONS = ('pre', 'post', 'sandwich', 'deepnorm')
ATTENTION_IMPLS = ('auto', 'xla', 'cudnn')
REMAT_POLICIES = ('none', 'full', 'dots', 'dots_no_batch')
DTYPES = ('float32', 'bfloat16', 'float16')
ROPE_SCALINGS = ('none', 'linear', 'dynamic', 'yarn', 'llama3')   # as transformers' modeling_rope_utils
LAYER_TYPES = ('full', 'sliding')


class ConfigError(ValueError):
  """A bad configuration value; the message says what is wrong and how to fix it."""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  vocab_size: int = 256          # tokens the tokenizer can produce
  arch: str = 'decoder'          # 'encoder_decoder': T5-style, n_encoder_layers + n_layers (lm/encdec.py)
  n_encoder_layers: int = 0      # encoder depth of an encoder-decoder; 0 means = n_layers
  d_model: int = 128
  n_layers: int = 4
  n_heads: int = 4
  n_kv_heads: int = 0            # 0 means = n_heads (multi-head); 1 is multi-query
  d_ff: int = 0                  # 0 means 4 * d_model
  d_head: int = 0                # 0 means d_model // n_heads (PaLM 540B decouples them)
  max_seq_len: int = 256         # context length; also the size of learned positions
  norm: str = 'layernorm'
  norm_eps: float = 1e-5
  norm_position: str = 'pre'     # pre-LN, post-LN, sandwich-LN (CogView), DeepNorm (post-LN, scaled)
  embed_norm: bool = False       # a norm right after the embedding (BLOOM)
  scale_embeddings: bool = False  # token embeddings * sqrt(d_model) (Vaswani et al.), so fixed
                                  # sinusoids of amplitude 1 do not swamp std-0.02 embeddings
  parallel_block: bool = False   # x + attn(norm(x)) + mlp(norm(x)) (GPT-J, PaLM)
  causal: bool = True            # False: bidirectional (encoder) attention
  moe_experts: int = 0           # > 0: every MLP is a mixture of this many experts
  moe_top_k: int = 2
  moe_capacity_factor: float = 1.25
  moe_balance_weight: float = 0.01   # Switch load-balancing loss
  moe_z_weight: float = 1e-3         # router z-loss
  activation: str = 'gelu'
  positions: str = 'learned'
  rope_theta: float = 10000.0
  rel_buckets: int = 32          # T5 relative-position buckets (half exact, half log-spaced)
  rel_max_distance: int = 128    # distances beyond this share the last bucket
  scale_attention: bool = True   # scores / sqrt(head_dim); T5 folds the scale into its init instead
  use_bias: bool = True          # biases of linear layers and LayerNorms (nanoGPT's bias=False: none)
  tie_embeddings: bool = True
  init_std: float = 0.02
  vocab_multiple: int = 128      # pad the embedding table so it shards evenly
  dtype: str = 'float32'         # compute dtype (bfloat16 on accelerators)
  param_dtype: str = 'float32'
  attention_impl: str = 'auto'
  attention_q_block: int = 0     # >0: XLA causal attention in query blocks, skipping keys past each
                                 # block (exact; 64: 16-19% faster step at T=256 on CPU); 0: one block
  remat: str = 'none'
  scan_unroll: int = 0           # layers per layer-scan iteration; 0 = auto (all on CPU with <= 8 layers, else 1)
  # Modern open families (LLaMA-3.x, Qwen2.5/3, Mistral, Gemma-2/3); every default is "off".
  qkv_bias: bool = False         # biases on q/k/v only, even with use_bias=False (Qwen2/2.5)
  qk_norm: bool = False          # per-head norm of q and k before RoPE (Qwen3, Gemma-3)
  norm_unit_offset: bool = False  # norm scale is (1 + w), w initialised at 0 (Gemma)
  sliding_window: int = 0        # >0: 'sliding' layers see only keys with q_pos - k_pos < this (Mistral, Gemma)
  layer_types: tuple = ()        # per layer 'full' or 'sliding'; () = all 'sliding' if sliding_window else all 'full'
  rope_local_theta: float = 0.0  # >0: 'sliding' layers use unscaled RoPE with this base (Gemma-3); 0 = as 'full'
  rope_scaling: str = 'none'     # 'linear' | 'dynamic' (NTK) | 'yarn' | 'llama3' (LLaMA-3.1)
  rope_factor: float = 1.0       # the scaling factor of every kind
  rope_original_max_len: int = 0  # llama3 / yarn / dynamic: the pretraining context the factor extends
  rope_low_freq_factor: float = 1.0   # llama3
  rope_high_freq_factor: float = 4.0  # llama3
  rope_beta_fast: float = 32.0   # yarn: ramp bounds in rotations
  rope_beta_slow: float = 1.0
  rope_attention_factor: float = 0.0  # yarn: cos/sin multiplier; 0 = 0.1 ln(factor) + 1
  rope_truncate: bool = True     # yarn: round the ramp bounds to whole dims
  attn_softcap: float = 0.0      # >0: scores = cap * tanh(scores / cap) (Gemma-2)
  final_softcap: float = 0.0     # >0: logits = cap * tanh(logits / cap) (Gemma-2)
  query_pre_attn_scalar: float = 0.0  # >0: scores scaled by this ** -0.5 instead of head_dim ** -0.5 (Gemma)
  eos_ids: tuple = ()            # end-of-sequence ids an imported checkpoint declares (generation stops at any)

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> 'ModelConfig':
    d = dict(d)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
      raise ConfigError(f'Unknown model config key(s) {unknown}; valid keys are {sorted(names)}.')
    return cls(**d)

  def __post_init__(self):
    def check(ok, msg):
      if not ok:
        raise ConfigError(msg)
    # Lists (from JSON / ml_collections) become tuples so the config stays hashable (a jit static arg).
    object.__setattr__(self, 'layer_types', tuple(self.layer_types or ()))
    object.__setattr__(self, 'eos_ids', tuple(int(i) for i in (self.eos_ids or ())))
    for name, allowed in (('arch', ARCHS), ('norm', NORMS), ('activation', ACTIVATIONS), ('positions', POSITIONS),
                          ('norm_position', NORM_POSITIONS),
                          ('attention_impl', ATTENTION_IMPLS), ('remat', REMAT_POLICIES),
                          ('dtype', DTYPES), ('param_dtype', DTYPES), ('rope_scaling', ROPE_SCALINGS)):
      value = getattr(self, name)
      check(value in allowed, f'model.{name}={value!r} is not supported; choose one of {allowed}.')
    for name in ('vocab_size', 'd_model', 'n_layers', 'n_heads', 'max_seq_len', 'vocab_multiple'):
      check(getattr(self, name) > 0, f'model.{name} must be positive, got {getattr(self, name)}.')
    check(self.d_head > 0 or self.d_model % self.n_heads == 0,
          f'model.d_model={self.d_model} is not divisible by model.n_heads={self.n_heads}; '
          'pick sizes so that d_model = n_heads * head_dim, or set model.d_head.')
    check(self.kv_heads <= self.n_heads and self.n_heads % self.kv_heads == 0,
          f'model.n_heads={self.n_heads} is not a multiple of model.n_kv_heads={self.kv_heads}; '
          'grouped-query attention needs n_kv_heads to divide n_heads.')
    check(self.positions != 'rope' or self.head_dim % 2 == 0,
          f'RoPE needs an even head_dim, got {self.head_dim}; change d_model or n_heads.')
    check(self.positions != 'sinusoidal' or self.d_model % 2 == 0,
          f'Sinusoidal positions need an even d_model, got {self.d_model}.')
    check(self.attention_q_block >= 0,
          f'model.attention_q_block must be >= 0 (0 turns blocking off), got {self.attention_q_block}.')
    check(self.scan_unroll >= 0,
          f'model.scan_unroll must be >= 0 (0 = auto), got {self.scan_unroll}.')
    check(self.moe_experts == 0 or 1 <= self.moe_top_k <= self.moe_experts,
          f'model.moe_top_k={self.moe_top_k} must be between 1 and model.moe_experts={self.moe_experts}.')
    check(not (self.parallel_block and self.norm_position != 'pre'),
          f'model.parallel_block needs norm_position="pre", got {self.norm_position!r}.')
    self._check_families(check)
    check(self.n_encoder_layers >= 0, f'model.n_encoder_layers must be >= 0, got {self.n_encoder_layers}.')
    if self.arch == 'encoder_decoder':
      check(self.positions in ('relative', 'learned', 'sinusoidal', 'none'),
            f'model.positions={self.positions!r} does not combine with the encoder-decoder: it uses '
            "T5's relative position bias (positions='relative') or absolute positions "
            "('learned', 'sinusoidal'); ALiBi and RoPE are decoder-only here.")
      check(self.norm_position in ('pre', 'post', 'sandwich'),
            f'model.norm_position={self.norm_position!r} is not supported by the encoder-decoder '
            "(DeepNorm's encoder/decoder constants differ); use 'pre', 'post' or 'sandwich'.")
      check(not self.parallel_block, 'model.parallel_block is decoder-only; set it False for the encoder-decoder.')
      check(self.moe_experts == 0, 'model.moe_experts is decoder-only here; set it to 0 for the encoder-decoder.')
      check(self.causal, 'model.causal must stay True for the encoder-decoder: its encoder is always '
            'bidirectional and its decoder always causal.')

  def _check_families(self, check):
    check(not self.layer_types or len(self.layer_types) == self.n_layers,
          f'model.layer_types has {len(self.layer_types)} entries but model.n_layers={self.n_layers}; '
          'give one per layer (or none).')
    bad = sorted(set(self.layer_types) - set(LAYER_TYPES))
    check(not bad, f'model.layer_types holds {bad}; each entry is one of {LAYER_TYPES}.')
    check(self.sliding_window >= 0, f'model.sliding_window must be >= 0 (0 = off), got {self.sliding_window}.')
    check(self.sliding_window > 0 or 'sliding' not in self.layer_types,
          "model.layer_types has 'sliding' layers but model.sliding_window=0; set the window size.")
    check(self.rope_scaling == 'none' or self.positions == 'rope',
          f'model.rope_scaling={self.rope_scaling!r} needs model.positions="rope".')
    check(self.rope_scaling == 'none' or self.rope_factor > 0,
          f'model.rope_factor must be positive, got {self.rope_factor}.')
    check(self.rope_scaling not in ('llama3', 'yarn') or self.rope_original_max_len > 0,
          f'model.rope_scaling={self.rope_scaling!r} needs model.rope_original_max_len (the pretraining context).')
    check(self.rope_scaling != 'llama3' or self.rope_high_freq_factor > self.rope_low_freq_factor,
          'model.rope_high_freq_factor must exceed model.rope_low_freq_factor for llama3 RoPE scaling.')
    check(min(self.attn_softcap, self.final_softcap, self.query_pre_attn_scalar) >= 0,
          'model.attn_softcap, final_softcap and query_pre_attn_scalar must be >= 0 (0 = off).')
    check(not self.qk_norm or self.norm == 'rmsnorm',
          f'model.qk_norm is an RMSNorm of each head (Qwen3, Gemma-3); it needs model.norm="rmsnorm", got {self.norm!r}.')
    new = [n for n in ('qkv_bias', 'qk_norm', 'sliding_window', 'layer_types', 'attn_softcap')
           if getattr(self, n)] + (['rope_scaling'] if self.rope_scaling != 'none' else [])
    check(self.arch == 'decoder' or not new,
          f'model.{new[0] if new else ""} is decoder-only here; turn it off for the encoder-decoder.')

  @property
  def local_layers(self) -> tuple[bool, ...]:
    """Per layer: does it attend within the sliding window?"""
    if self.layer_types:
      return tuple(t == 'sliding' for t in self.layer_types)
    return (self.sliding_window > 0,) * self.n_layers

  # Derived sizes -------------------------------------------------------------
  @property
  def head_dim(self) -> int:
    return self.d_head or self.d_model // self.n_heads

  @property
  def kv_heads(self) -> int:
    return self.n_kv_heads or self.n_heads

  @property
  def ff_dim(self) -> int:
    return self.d_ff or 4 * self.d_model

  @property
  def gated(self) -> bool:
    return self.activation in ('swiglu', 'geglu', 'geglu_tanh')

  @property
  def encoder_layers(self) -> int:
    return (self.n_encoder_layers or self.n_layers) if self.arch == 'encoder_decoder' else 0

  @property
  def has_final_norm(self) -> bool:
    # Post-LN blocks already end in a norm.
    return self.norm_position in ('pre', 'sandwich')

  @property
  def deepnorm_alpha(self) -> float:
    # DeepNet (Wang et al. 2022), decoder-only: residual x * (2N)^(1/4); init scale (8N)^(-1/4).
    return (2 * self.n_layers) ** 0.25

  @property
  def padded_vocab(self) -> int:
    m = self.vocab_multiple
    return (self.vocab_size + m - 1) // m * m

  # Counting ------------------------------------------------------------------
  def param_counts(self) -> dict[str, int]:
    """Parameters by group, counted analytically (the real vocab, not the padded one)."""
    d, f, h, kv, hd = self.d_model, self.ff_dim, self.n_heads, self.kv_heads, self.head_dim
    norm = d * (2 if self.norm == 'layernorm' and self.use_bias else 1)
    attn = d * h * hd + 2 * d * kv * hd + h * hd * d
    if self.qkv_bias and not self.use_bias:
      attn += h * hd + 2 * kv * hd
    if self.qk_norm:
      attn += 2 * hd
    mlp = d * f * (3 if self.gated else 2)
    if self.use_bias:
      attn += h * hd + 2 * kv * hd + d
      mlp += f * (2 if self.gated else 1) + d
    if self.moe_experts:  # experts carry no biases; the router is d x E
      mlp = self.moe_experts * d * f * (3 if self.gated else 2) + d * self.moe_experts
    norms_per_sublayer = 2 if self.norm_position == 'sandwich' else 1
    norms_per_layer = 2 * norms_per_sublayer
    if self.parallel_block:
      norms_per_layer = 1
    per_layer = attn + mlp + norms_per_layer * norm
    embed = self.vocab_size * d
    final_norm = norm if self.has_final_norm else 0
    stacks = 2 if self.arch == 'encoder_decoder' else 1
    counts = {
        'embedding': embed + (norm if self.embed_norm else 0),
        'positions': (self.max_seq_len * d if self.positions == 'learned' else 0)
                     + (stacks * self.rel_buckets * h if self.positions == 'relative' else 0),
        'layers': self.n_layers * per_layer,
        'final_norm': final_norm,
        'lm_head': 0 if self.tie_embeddings else embed,
    }
    if self.arch == 'encoder_decoder':
      # every decoder layer adds cross-attention and its norm(s); the encoder has its own final norm
      counts['layers'] += self.n_layers * (attn + norms_per_sublayer * norm)
      counts['encoder'] = self.encoder_layers * per_layer + final_norm
    counts['total'] = sum(counts.values())
    # Kaplan et al.'s N: everything except embeddings and positions.
    counts['non_embedding'] = counts['layers'] + counts['final_norm'] + counts.get('encoder', 0)
    return counts

  def num_params(self, non_embedding: bool = False) -> int:
    c = self.param_counts()
    return c['non_embedding'] if non_embedding else c['total']

  def flops_per_token(self, seq_len: int | None = None) -> float:
    """Training FLOPs per token: 6 * (matmul params) + attention scores and values.

    The 6N term counts forward (2) and backward (4) matmul FLOPs of every weight a token
    touches, the output projection included even when tied. The attention term is
    6 * n_layers * seq_len * n_heads * head_dim (QK^T and AV, forward + backward, causal masking not
    discounted: PaLM's convention, so MFU is comparable across codebases).
    """
    t = seq_len or self.max_seq_len
    c = self.param_counts()
    # An encoder-decoder is counted as if each token went through both stacks (an upper
    # bound: span corruption shortens both sides).
    matmul_params = c['layers'] + c.get('encoder', 0) + self.vocab_size * self.d_model
    attn_layers = self.n_layers * (2 if self.arch == 'encoder_decoder' else 1) + self.encoder_layers
    return 6.0 * matmul_params + 6.0 * attn_layers * t * self.n_heads * self.head_dim


PRESETS: dict[str, dict[str, Any]] = {
    # Block families; sizes come from the experiment config.
    'gpt2': dict(norm='layernorm', activation='gelu_tanh', positions='learned', use_bias=True,
                 tie_embeddings=True),
    'llama': dict(norm='rmsnorm', activation='swiglu', positions='rope', use_bias=False,
                  tie_embeddings=False, norm_eps=1e-6),
}
