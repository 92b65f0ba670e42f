"""Preset parameter counts against published figures; big presets are built abstractly only."""
import dataclasses
import functools

import jax
import pytest

from lm import model, presets
from lm.config import ConfigError

# Exact counts: transformers' num_parameters() of the matching model class, built on the meta
# device with the preset's shape (checked with transformers 5.24; for gpt2*, llama*, bert*, t5*
# and bloom* these are the released checkpoints' counts).
EXACT = {
    # GPT2LMHeadModel: tied embeddings, 50257 tokens, 1024 positions
    'gpt2-124m': 124_439_808, 'gpt2-355m': 354_823_168, 'gpt2-774m': 774_030_080,
    'gpt2-1.5b': 1_557_611_200,
    # LlamaForCausalLM: untied embeddings, 32000 tokens
    'llama-7b': 6_738_415_616, 'llama-13b': 13_015_864_320, 'llama-33b': 32_528_943_616,
    'llama-65b': 65_285_660_672, 'llama2-70b': 68_976_648_192,
    # BertModel (with its pooler and token-type embeddings: see BERT_UNMODELLED)
    'bert-base': 109_482_240, 'bert-large': 335_141_888,
    # T5ForConditionalGeneration (v1.0), BloomForCausalLM
    't5-small': 60_506_624, 't5-base': 222_903_552, 't5-large': 737_668_096,
    'bloom-560m': 559_214_592, 'bloom-176b': 176_247_271_424,
    # GPT-3 is GPT-2's architecture (2048 positions; sparse layers add no parameters):
    # GPT2LMHeadModel at Table 2.1's shapes.
    'gpt3-125m': 125_226_240, 'gpt3-350m': 355_871_744, 'gpt3-760m': 760_300_032,
    'gpt3-1.3b': 1_315_723_264, 'gpt3-2.7b': 2_651_553_280, 'gpt3-6.7b': 6_658_404_352,
    'gpt3-13b': 12_952_938_780, 'gpt3-175b': 174_604_259_328,
    # OPTForCausalLM (pre-LN, 2048 + 2 learned positions) at Table 1's shapes.
    'opt-125m': 125_239_296, 'opt-1.3b': 1_315_758_080, 'opt-2.7b': 2_651_596_800,
    'opt-6.7b': 6_658_473_984, 'opt-13b': 12_853_473_280, 'opt-30b': 29_974_540_288,
    'opt-66b': 65_719_701_504, 'opt-175b': 174_604_468_224,
    # LlamaForCausalLM / Qwen2ForCausalLM / Gemma2ForCausalLM from the released config.json
    # (tests/test_families.REAL) on the meta device: the published checkpoints' counts.
    'llama3.1-8b': 8_030_261_248, 'qwen2.5-7b': 7_615_616_512, 'gemma2-9b': 9_241_705_984,
}
# The preset of a modern family is the model lm.convert imports from its released config.json.
RELEASED = {'llama3.1-8b': 'Llama-3.1-8B', 'qwen2.5-7b': 'Qwen2.5-7B', 'gemma2-9b': 'gemma-2-9b'}
# transformers' BertModel has a pooler (d x d + d) and token-type embeddings (2 x d) that our
# BERT (a bidirectional encoder with an LM head) does not have; they are added back explicitly.
BERT_UNMODELLED = lambda d: d * d + d + 2 * d
# PaLM has no transformers class: Table 1 prints its counts to 0.01B, so we must agree to 0.01B
# (a flipped tie, 256000 x d, or a switched bias is far more).
PALM = {'palm-8b': 8.63e9, 'palm-62b': 62.50e9, 'palm-540b': 540.35e9}
# Rounded figures as the papers print them (GPT-3 Table 2.1, OPT Table 1): the literature anchor.
ROUNDED = {
    'gpt3-125m': 125e6, 'gpt3-350m': 350e6, 'gpt3-760m': 760e6, 'gpt3-1.3b': 1.3e9,
    'gpt3-2.7b': 2.7e9, 'gpt3-6.7b': 6.7e9, 'gpt3-13b': 13e9, 'gpt3-175b': 175e9,
    'opt-125m': 125e6, 'opt-1.3b': 1.3e9, 'opt-2.7b': 2.7e9, 'opt-6.7b': 6.7e9, 'opt-13b': 13e9,
    'opt-30b': 30e9, 'opt-66b': 66e9, 'opt-175b': 175e9,
}


def matches_source(name: str, cfg) -> bool:
  """Whether cfg's count is the source's figure, as exactly as the source gives it."""
  n = cfg.num_params()
  if name in PALM:
    return abs(n - PALM[name]) < 0.01e9
  if name.startswith('bert'):
    n += BERT_UNMODELLED(cfg.d_model)
  return n == EXACT[name]


@pytest.mark.parametrize('name', sorted(EXACT) + sorted(PALM))
def test_counts_match_the_source_exactly(name):
  cfg = presets.preset(name)
  assert matches_source(name, cfg), (name, cfg.num_params())


@pytest.mark.parametrize('name', sorted(EXACT) + sorted(PALM))
def test_a_flipped_tie_or_bias_is_caught(name):
  """The comparison is tight enough to see the smallest structural slip in every preset."""
  cfg = presets.preset(name)
  assert not matches_source(name, dataclasses.replace(cfg, tie_embeddings=not cfg.tie_embeddings))
  if name not in ('palm-8b', 'palm-62b'):  # their biases (1.5M, 5.8M) hide below Table 1's 0.01B
    assert not matches_source(name, dataclasses.replace(cfg, use_bias=not cfg.use_bias))


@pytest.mark.parametrize('name', sorted(ROUNDED))
def test_rounded_counts(name):
  # the papers round to 2-3 significant figures, so allow the rounding plus 1%
  assert presets.preset(name).num_params() == pytest.approx(ROUNDED[name], rel=0.03)


@pytest.mark.parametrize('name', sorted(RELEASED))
def test_modern_presets_are_the_imported_configs(name):
  from lm import convert
  from tests.test_families import REAL
  hf = convert.config_from_hf(REAL[RELEASED[name]][0])
  assert presets.preset(name) == dataclasses.replace(hf, eos_ids=())   # eos ids: the tokenizer's business


def test_every_preset_is_covered():
  assert set(presets.names()) == set(EXACT) | set(PALM)


@pytest.mark.parametrize('name', ['gpt3-175b', 'palm-540b', 'llama2-70b', 'bloom-176b', 't5-large', 'gemma2-9b'])
def test_big_presets_build_abstractly(name):
  cfg = presets.preset(name)
  shapes = jax.eval_shape(functools.partial(model.init, cfg), jax.random.key(0))
  n = sum(x.size for x in jax.tree.leaves(shapes))
  padding = (cfg.padded_vocab - cfg.vocab_size) * cfg.d_model * (1 if cfg.tie_embeddings else 2)
  assert n - padding == cfg.num_params()


def test_unknown_preset():
  with pytest.raises(ConfigError, match='Unknown preset'):
    presets.preset('gpt5')
