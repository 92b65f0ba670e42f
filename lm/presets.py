"""Named model presets from the literature: `preset('llama-7b')` -> ModelConfig.

Each entry gives the published shape; tests/test_presets.py checks our parameter count
against the source's figure, exactly where the source gives an exact one (noted beside
each family), else to the digits the paper prints.
"""
from __future__ import annotations

import dataclasses

from lm.config import PRESETS as FAMILIES
from lm.config import ConfigError, ModelConfig

_GPT2 = dict(FAMILIES['gpt2'], vocab_size=50257, max_seq_len=1024, norm_eps=1e-5)
_GPT3 = dict(FAMILIES['gpt2'], vocab_size=50257, max_seq_len=2048)
_OPT = dict(norm='layernorm', activation='relu', positions='learned', use_bias=True,
            tie_embeddings=True, vocab_size=50272, max_seq_len=2050)   # 2 extra learned positions
_LLAMA = dict(FAMILIES['llama'], vocab_size=32000, max_seq_len=2048)
_PALM = dict(norm='rmsnorm', activation='swiglu', positions='rope', use_bias=False,
             tie_embeddings=True, vocab_size=256000, max_seq_len=2048, n_kv_heads=1)
_BERT = dict(norm='layernorm', norm_eps=1e-12, norm_position='post', embed_norm=True, causal=False,
             activation='gelu', positions='learned', use_bias=True, tie_embeddings=True,
             vocab_size=30522, max_seq_len=512)
_T5 = dict(arch='encoder_decoder', norm='rmsnorm', norm_eps=1e-6, activation='relu', positions='relative',
           use_bias=False, scale_attention=False, tie_embeddings=True, vocab_size=32128,
           max_seq_len=512, d_head=64)
# Modern open families (configs as released; the same ModelConfig lm.convert imports from them).
_LLAMA3 = dict(FAMILIES['llama'], vocab_size=128256, max_seq_len=131072, norm_eps=1e-5, rope_theta=500000.0,
               rope_scaling='llama3', rope_factor=8.0, rope_low_freq_factor=1.0, rope_high_freq_factor=4.0,
               rope_original_max_len=8192)
_QWEN2 = dict(FAMILIES['llama'], vocab_size=152064, max_seq_len=131072, rope_theta=1e6, qkv_bias=True)
_GEMMA2 = dict(norm='rmsnorm', norm_eps=1e-6, norm_unit_offset=True, norm_position='sandwich',
               activation='geglu_tanh', positions='rope', use_bias=False, tie_embeddings=True, scale_embeddings=True, vocab_size=256000,
               max_seq_len=8192, d_head=256, attn_softcap=50.0, final_softcap=30.0, sliding_window=4096)
_BLOOM = dict(norm='layernorm', embed_norm=True, positions='alibi', activation='gelu_tanh', use_bias=True,
              tie_embeddings=True, vocab_size=250880, max_seq_len=2048)

# name -> (family defaults, n_layers, d_model, n_heads, d_ff or 0 for 4*d, extra)
_TABLE = {
    # GPT-2 (Radford et al. 2019); exact counts: Hugging Face num_parameters() of gpt2*.
    'gpt2-124m': (_GPT2, 12, 768, 12, 0, {}),
    'gpt2-355m': (_GPT2, 24, 1024, 16, 0, {}),
    'gpt2-774m': (_GPT2, 36, 1280, 20, 0, {}),
    'gpt2-1.5b': (_GPT2, 48, 1600, 25, 0, {}),
    # GPT-3 (Brown et al. 2020, Table 2.1); heads chosen so d_model divides (counts do not
    # depend on the head split; the paper's 1.3B and 13B rows list inconsistent head sizes).
    # Exact counts: transformers' GPT2LMHeadModel at these shapes (GPT-3 is GPT-2's architecture).
    'gpt3-125m': (_GPT3, 12, 768, 12, 0, {}),
    'gpt3-350m': (_GPT3, 24, 1024, 16, 0, {}),
    'gpt3-760m': (_GPT3, 24, 1536, 16, 0, {}),
    'gpt3-1.3b': (_GPT3, 24, 2048, 16, 0, {}),
    'gpt3-2.7b': (_GPT3, 32, 2560, 32, 0, {}),
    'gpt3-6.7b': (_GPT3, 32, 4096, 32, 0, {}),
    'gpt3-13b': (_GPT3, 40, 5140, 20, 0, {}),
    'gpt3-175b': (_GPT3, 96, 12288, 96, 0, {}),
    # OPT (Zhang et al. 2022, Table 1); OPT-350M (projected embeddings, post-LN) is omitted.
    # Exact counts: transformers' OPTForCausalLM at these shapes.
    'opt-125m': (_OPT, 12, 768, 12, 0, {}),
    'opt-1.3b': (_OPT, 24, 2048, 32, 0, {}),
    'opt-2.7b': (_OPT, 32, 2560, 32, 0, {}),
    'opt-6.7b': (_OPT, 32, 4096, 32, 0, {}),
    'opt-13b': (_OPT, 40, 5120, 40, 0, {}),
    'opt-30b': (_OPT, 48, 7168, 56, 0, {}),
    'opt-66b': (_OPT, 64, 9216, 72, 0, {}),
    'opt-175b': (_OPT, 96, 12288, 96, 0, {}),
    # LLaMA (Touvron et al. 2023a, Table 2); exact counts from the released checkpoints.
    'llama-7b': (_LLAMA, 32, 4096, 32, 11008, {}),
    'llama-13b': (_LLAMA, 40, 5120, 40, 13824, {}),
    'llama-33b': (_LLAMA, 60, 6656, 52, 17920, {}),
    'llama-65b': (_LLAMA, 80, 8192, 64, 22016, {}),
    # LLaMA 2 70B (Touvron et al. 2023b): grouped-query attention with 8 KV heads.
    'llama2-70b': (_LLAMA, 80, 8192, 64, 28672, dict(n_kv_heads=8, max_seq_len=4096, norm_eps=1e-5)),
    # PaLM (Chowdhery et al. 2022, Table 1): multi-query, SwiGLU with d_ff = 4d, shared embeddings;
    # Table 1 prints counts to 0.01B.
    'palm-8b': (_PALM, 32, 4096, 16, 4 * 4096, {}),
    'palm-62b': (_PALM, 64, 8192, 32, 4 * 8192, {}),
    'palm-540b': (_PALM, 118, 18432, 48, 4 * 18432, dict(d_head=256)),
    # BERT (Devlin et al. 2019): bidirectional, post-LN, LayerNorm on the embeddings. Exact
    # counts: transformers' BertModel, whose token-type embeddings (2 x d) and pooler (d x d + d)
    # we do not model; the test adds them to our count and then compares exactly.
    'bert-base': (_BERT, 12, 768, 12, 0, {}),
    'bert-large': (_BERT, 24, 1024, 16, 0, {}),
    # T5 v1.0 (Raffel et al. 2020, section 3.7): encoder-decoder, n_layers in each stack,
    # relative position bias, ReLU, d_kv = 64. Exact counts: T5ForConditionalGeneration.
    't5-small': (_T5, 6, 512, 8, 2048, {}),
    't5-base': (_T5, 12, 768, 12, 3072, {}),
    't5-large': (_T5, 24, 1024, 16, 4096, {}),
    # LLaMA-3.1 8B, Qwen2.5 7B, Gemma-2 9B (their config.json). Exact counts: transformers'
    # LlamaForCausalLM / Qwen2ForCausalLM (q/k/v biases) / Gemma2ForCausalLM (4 norms a layer, tied).
    'llama3.1-8b': (_LLAMA3, 32, 4096, 32, 14336, dict(n_kv_heads=8)),
    'qwen2.5-7b': (_QWEN2, 28, 3584, 28, 18944, dict(n_kv_heads=4)),
    'gemma2-9b': (_GEMMA2, 42, 3584, 16, 14336, dict(n_kv_heads=8, query_pre_attn_scalar=256.0,
                                                     layer_types=('sliding', 'full') * 21)),
    # BLOOM (BigScience 2022): ALiBi, LayerNorm after the embedding. Exact counts: BloomForCausalLM.
    'bloom-560m': (_BLOOM, 24, 1024, 16, 0, {}),
    'bloom-176b': (_BLOOM, 70, 14336, 112, 0, {}),
}


def names() -> list[str]:
  return sorted(_TABLE)


def preset(name: str, **overrides) -> ModelConfig:
  if name not in _TABLE:
    raise ConfigError(f'Unknown preset {name!r}; available: {", ".join(names())}.')
  family, n_layers, d_model, n_heads, d_ff, extra = _TABLE[name]
  fields = dict(family, n_layers=n_layers, d_model=d_model, n_heads=n_heads, d_ff=d_ff, **extra)
  fields.update(overrides)
  return ModelConfig(**fields)


def as_dict(name: str) -> dict:
  """A preset as a plain dict, e.g. to fill an experiment's config.model."""
  return dataclasses.asdict(preset(name))
