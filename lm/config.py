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
ACTIVATIONS = ('gelu', 'gelu_tanh', 'relu', 'swiglu', 'geglu')
POSITIONS = ('learned', 'sinusoidal', 'rope', 'alibi', 'relative', 'none')  # relative: T5's bucketed bias
ARCHS = ('decoder', 'encoder_decoder')
NORM_POSITIONS = ('pre', 'post', 'sandwich', 'deepnorm')
ATTENTION_IMPLS = ('auto', 'xla', 'cudnn')
REMAT_POLICIES = ('none', 'full', 'dots', 'dots_no_batch')
DTYPES = ('float32', 'bfloat16', 'float16')


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
    for name, allowed in (('arch', ARCHS), ('norm', NORMS), ('activation', ACTIVATIONS), ('positions', POSITIONS),
                          ('norm_position', NORM_POSITIONS),
                          ('attention_impl', ATTENTION_IMPLS), ('remat', REMAT_POLICIES),
                          ('dtype', DTYPES), ('param_dtype', DTYPES)):
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
    return self.activation in ('swiglu', 'geglu')

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
