"""Preset parameter counts against published figures; big presets are built abstractly only."""
import functools

import jax
import pytest

from lm import model, presets
from lm.config import ConfigError

# Exact counts (Hugging Face num_parameters() of the released checkpoints).
EXACT = {
    'gpt2-124m': 124_439_808, 'gpt2-355m': 354_823_168, 'gpt2-774m': 774_030_080,
    'gpt2-1.5b': 1_557_611_200,
    'llama-7b': 6_738_415_616, 'llama-13b': 13_015_864_320, 'llama-33b': 32_528_943_616,
    'llama-65b': 65_285_660_672, 'llama2-70b': 68_976_648_192,
    # transformers' BertModel / T5ForConditionalGeneration / BloomForCausalLM num_parameters()
    'bert-base': 109_482_240, 'bert-large': 335_141_888,
    't5-small': 60_506_624, 't5-base': 222_903_552, 't5-large': 737_668_096,
    'bloom-560m': 559_214_592, 'bloom-176b': 176_247_271_424,
}
# Rounded figures as the papers print them (GPT-3 Table 2.1, OPT Table 1, PaLM Table 1).
ROUNDED = {
    'gpt3-125m': 125e6, 'gpt3-350m': 350e6, 'gpt3-760m': 760e6, 'gpt3-1.3b': 1.3e9,
    'gpt3-2.7b': 2.7e9, 'gpt3-6.7b': 6.7e9, 'gpt3-13b': 13e9, 'gpt3-175b': 175e9,
    'opt-125m': 125e6, 'opt-1.3b': 1.3e9, 'opt-2.7b': 2.7e9, 'opt-6.7b': 6.7e9, 'opt-13b': 13e9,
    'opt-30b': 30e9, 'opt-66b': 66e9, 'opt-175b': 175e9,
    'palm-8b': 8.63e9, 'palm-62b': 62.50e9, 'palm-540b': 540.35e9,
}


@pytest.mark.parametrize('name', sorted(EXACT))
def test_exact_counts(name):
  assert presets.preset(name).num_params() == pytest.approx(EXACT[name], rel=0.01)


@pytest.mark.parametrize('name', sorted(ROUNDED))
def test_rounded_counts(name):
  # the papers round to 2-3 significant figures, so allow the rounding plus 1%
  assert presets.preset(name).num_params() == pytest.approx(ROUNDED[name], rel=0.03)


def test_every_preset_is_covered():
  assert set(presets.names()) == set(EXACT) | set(ROUNDED)


@pytest.mark.parametrize('name', ['gpt3-175b', 'palm-540b', 'llama2-70b', 'bloom-176b', 't5-large'])
def test_big_presets_build_abstractly(name):
  cfg = presets.preset(name)
  shapes = jax.eval_shape(functools.partial(model.init, cfg), jax.random.key(0))
  n = sum(x.size for x in jax.tree.leaves(shapes))
  padding = (cfg.padded_vocab - cfg.vocab_size) * cfg.d_model * (1 if cfg.tie_embeddings else 2)
  assert n - padding == cfg.num_params()


def test_unknown_preset():
  with pytest.raises(ConfigError, match='Unknown preset'):
    presets.preset('gpt5')
