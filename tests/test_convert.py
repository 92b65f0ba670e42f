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
