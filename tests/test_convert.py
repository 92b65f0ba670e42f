"""Hugging Face GPT-2 and LLaMA checkpoints: import, logits parity with transformers, export."""
import numpy as np
import pytest

torch = pytest.importorskip('torch', reason='needs the [hf] extra (torch, transformers)')
transformers = pytest.importorskip('transformers', reason='needs the [hf] extra (torch, transformers)')

import jax.numpy as jnp  # noqa: E402

from lm import convert, model  # noqa: E402


def _randomise(m, seed):
  """Random values everywhere (biases and norm scales too), so every mapping is exercised."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in m.named_parameters():
      is_scale = p.ndim == 1 and ('norm' in name or 'ln_' in name) and name.endswith('weight')
      p.copy_(torch.randn(p.shape, generator=g) * 0.1 + (1.0 if is_scale else 0.0))
  return m


def _models():
  gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(
      vocab_size=99, n_embd=64, n_layer=2, n_head=4, n_positions=32, resid_pdrop=0, embd_pdrop=0,
      attn_pdrop=0))
  llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(
      vocab_size=99, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
      num_key_value_heads=2, max_position_embeddings=32, rope_theta=10000.0, tie_word_embeddings=False))
  return {'gpt2': gpt2, 'llama': llama}


@pytest.mark.parametrize('kind', ['gpt2', 'llama'])
def test_import_matches_transformers_logits_and_export_round_trips(kind, tmp_path):
  hf = _randomise(_models()[kind].eval(), seed=1)
  hf.save_pretrained(tmp_path / 'hf', safe_serialization=True)
  params, cfg = convert.import_hf(str(tmp_path / 'hf'))
  tokens = np.random.default_rng(0).integers(0, 99, (2, 17))
  with torch.no_grad():
    ref = hf(torch.tensor(tokens)).logits.numpy()
  ours, _ = model.forward(params, jnp.asarray(tokens), cfg)
  ours = np.asarray(ours)[..., :cfg.vocab_size]
  assert np.max(np.abs(ours - ref)) <= 1e-4
  # export, then let transformers load it: same logits again
  convert.export_hf(params, cfg, str(tmp_path / 'out'))
  back = type(hf).from_pretrained(tmp_path / 'out').eval()
  with torch.no_grad():
    again = back(torch.tensor(tokens)).logits.numpy()
  assert np.max(np.abs(again - ref)) <= 1e-4


def test_unsupported_checkpoint_is_a_clear_error(tmp_path):
  (tmp_path / 'config.json').write_text('{"model_type": "bert"}')
  with pytest.raises(convert.ConfigError, match='Unsupported model_type'):
    convert.import_hf(str(tmp_path))


def _llama3_tiny(tmp_path):
  """A LLaMA-3-shaped tiny checkpoint: rope_theta 500000 and grouped-query attention."""
  hf = _randomise(transformers.LlamaForCausalLM(transformers.LlamaConfig(
      vocab_size=128, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=8,
      num_key_value_heads=2, max_position_embeddings=64, rope_theta=500000.0,
      tie_word_embeddings=False)).eval(), seed=2)
  hf.save_pretrained(tmp_path / 'hf', safe_serialization=True)
  tokens = np.random.default_rng(0).integers(0, 128, (2, 48))
  with torch.no_grad():
    ref = hf(torch.tensor(tokens)).logits.numpy()
  return hf, tokens, ref


def _logits(params, cfg, tokens):
  ours, _ = model.forward(params, jnp.asarray(tokens), cfg)
  return np.asarray(ours)[..., :cfg.vocab_size]


def test_llama3_rope_theta_is_imported_and_matters(tmp_path):
  hf, tokens, ref = _llama3_tiny(tmp_path)
  params, cfg = convert.import_hf(str(tmp_path / 'hf'))
  assert cfg.rope_theta == 500000.0 and cfg.kv_heads == 2 < cfg.n_heads == 8
  assert np.max(np.abs(_logits(params, cfg, tokens) - ref)) <= 1e-4
  # theta is not cosmetic: the same weights with the LLaMA-2 default are far off
  params, cfg10k = convert.import_hf(str(tmp_path / 'hf'), rope_theta=10000.0)
  assert np.max(np.abs(_logits(params, cfg10k, tokens) - ref)) > 1e-2
  # export keeps theta: transformers reads it back and gives the same logits
  convert.export_hf(params, cfg, str(tmp_path / 'out'))
  back = type(hf).from_pretrained(tmp_path / 'out').eval()
  with torch.no_grad():
    assert np.max(np.abs(back(torch.tensor(tokens)).logits.numpy() - ref)) <= 1e-4


LLAMA = {'model_type': 'llama', 'vocab_size': 99, 'hidden_size': 64, 'num_hidden_layers': 2,
         'num_attention_heads': 4, 'intermediate_size': 96}
LLAMA31_SCALING = {'factor': 8.0, 'low_freq_factor': 1.0, 'high_freq_factor': 4.0,
                   'original_max_position_embeddings': 8192}


@pytest.mark.parametrize('layout,theta', [
    ({}, 10000.0),
    ({'rope_theta': 500000.0}, 500000.0),                                        # transformers < 5
    ({'rope_theta': 500000.0, 'rope_scaling': None}, 500000.0),
    ({'rope_parameters': {'rope_type': 'default', 'rope_theta': 250000.0}}, 250000.0),  # >= 5
])
def test_llama_rope_theta_from_either_config_layout(layout, theta):
  assert convert.config_from_hf({**LLAMA, **layout}).rope_theta == theta


@pytest.mark.parametrize('layout,want', [
    ({'rope_theta': 5e5, 'rope_scaling': {'rope_type': 'llama3', **LLAMA31_SCALING}},
     dict(rope_scaling='llama3', rope_factor=8.0, rope_original_max_len=8192, rope_theta=5e5)),
    ({'rope_parameters': {'rope_type': 'llama3', 'rope_theta': 5e5, **LLAMA31_SCALING}},
     dict(rope_scaling='llama3', rope_high_freq_factor=4.0)),
    ({'rope_scaling': {'type': 'linear', 'factor': 2.0}}, dict(rope_scaling='linear', rope_factor=2.0)),
    ({'rope_parameters': {'rope_type': 'yarn', 'rope_theta': 1e4, 'factor': 4.0,
                          'original_max_position_embeddings': 16}},
     dict(rope_scaling='yarn', rope_factor=4.0, rope_original_max_len=16)),
])
def test_scaled_rope_is_mapped(layout, want):
  cfg = convert.config_from_hf({**LLAMA, **layout})
  assert {k: getattr(cfg, k) for k in want} == want


@pytest.mark.parametrize('extra,match', [
    ({'rope_parameters': {'rope_type': 'longrope', 'rope_theta': 1e4}}, "rope_type='longrope'"),
    ({'rope_parameters': {'rope_type': 'default', 'rope_theta': 1e4, 'partial_rotary_factor': 0.5}},
     'partial_rotary_factor=0.5'),
    ({'hidden_act': 'relu'}, "hidden_act='relu'"),
    ({'attention_bias': True}, 'attention_bias=True'),
    ({'mlp_bias': True}, 'mlp_bias=True'),
    ({'sliding_window': 16}, 'sliding_window=16'),          # LLaMA has none: unknown, refused
    ({'some_new_switch': 3}, 'some_new_switch=3'),
])
def test_unmapped_config_fields_are_refused_in_one_sentence(extra, match):
  with pytest.raises(convert.ConfigError, match=match) as e:
    convert.config_from_hf({**LLAMA, **extra})
  assert str(e.value).count('. ') == 0 and str(e.value).endswith('.')


def test_llama_gelu_is_a_gated_gelu_not_silu():
  assert convert.config_from_hf({**LLAMA, 'hidden_act': 'gelu'}).activation == 'geglu'
  assert convert.config_from_hf(LLAMA).activation == 'swiglu'


GPT2 = {'model_type': 'gpt2', 'vocab_size': 99, 'n_embd': 64, 'n_layer': 2, 'n_head': 4, 'n_positions': 32}


@pytest.mark.parametrize('extra,match', [
    ({'activation_function': 'silu'}, "activation_function='silu'"),
    ({'scale_attn_by_inverse_layer_idx': True}, 'scale_attn_by_inverse_layer_idx=True'),
    ({'scale_attn_weights': False}, 'scale_attn_weights=False'),
    ({'add_cross_attention': True}, 'add_cross_attention=True'),
    ({'tie_word_embeddings': False}, 'tie_word_embeddings=False'),
    ({'some_new_switch': 1}, 'some_new_switch=1'),
])
def test_gpt2_fields_we_lack_are_refused_in_one_sentence(extra, match):
  assert convert.config_from_hf({**GPT2, 'resid_pdrop': 0.1, 'summary_type': 'cls_index'}).activation == 'gelu_tanh'
  with pytest.raises(convert.ConfigError, match=match) as e:
    convert.config_from_hf({**GPT2, **extra})
  assert str(e.value).count('. ') == 0 and str(e.value).endswith('.')
