"""Modern open-model families against transformers: LLaMA-3.x (every RoPE scaling kind), Qwen2.5,
Qwen3, Mistral (sliding window), Gemma-2 and Gemma-3 (text).

Each test builds a tiny random model with transformers (no downloads), saves it, imports it with
lm.convert, and checks in float32 on a left-padded batch: logits within 1e-4 of transformers'
forward, greedy decoding equal to `generate`, and export -> AutoModelForCausalLM equal logits.
Sequences are longer than the sliding windows, so the windows matter. Run with -s to see the
max |Δlogit| per family.
"""
import json

import numpy as np
import pytest

torch = pytest.importorskip('torch', reason='needs the [hf] extra (torch, transformers)')
transformers = pytest.importorskip('transformers', reason='needs the [hf] extra (torch, transformers)')

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from lm import convert, decode, model  # noqa: E402

VOCAB, T = 300, 24
SIZES = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64)
LLAMA31 = {'rope_type': 'llama3', 'rope_theta': 500000.0, 'factor': 8.0, 'low_freq_factor': 1.0,
           'high_freq_factor': 4.0, 'original_max_position_embeddings': 16}


def _configs():
  t = transformers
  return {
      'llama3.1': t.LlamaConfig(**SIZES, num_hidden_layers=2, rope_parameters=LLAMA31,
                                tie_word_embeddings=True, eos_token_id=[5, 7]),
      'llama-linear': t.LlamaConfig(**SIZES, num_hidden_layers=2,
                                    rope_parameters={'rope_type': 'linear', 'rope_theta': 1e4, 'factor': 4.0}),
      # dynamic NTK only acts past max_position_embeddings: 16 < T
      'llama-dynamic': t.LlamaConfig(**{**SIZES, 'max_position_embeddings': 16}, num_hidden_layers=2,
                                     rope_parameters={'rope_type': 'dynamic', 'rope_theta': 1e4, 'factor': 4.0}),
      'llama-yarn': t.LlamaConfig(**SIZES, num_hidden_layers=2, rope_parameters={
          'rope_type': 'yarn', 'rope_theta': 1e4, 'factor': 4.0, 'original_max_position_embeddings': 16}),
      'qwen2.5': t.Qwen2Config(**SIZES, num_hidden_layers=2, tie_word_embeddings=True,
                               rope_parameters={'rope_type': 'default', 'rope_theta': 1e6}),
      'qwen3': t.Qwen3Config(**SIZES, num_hidden_layers=2, head_dim=32, tie_word_embeddings=True),
      'mistral': t.MistralConfig(**SIZES, num_hidden_layers=2, sliding_window=6, head_dim=16),
      # a window wider than the (bucketed, 8-token) prompt: ring slots start out empty
      'mistral-w12': t.MistralConfig(**SIZES, num_hidden_layers=2, sliding_window=12, head_dim=16),
      'gemma2': t.Gemma2Config(**SIZES, num_hidden_layers=4, head_dim=16, query_pre_attn_scalar=24,
                               sliding_window=6, attn_logit_softcapping=3.0, final_logit_softcapping=2.0),
      'gemma3': t.Gemma3TextConfig(
          **SIZES, num_hidden_layers=4, head_dim=16, query_pre_attn_scalar=24, sliding_window=6,
          layer_types=['sliding_attention', 'sliding_attention', 'full_attention', 'sliding_attention'],
          rope_parameters={'sliding_attention': {'rope_type': 'default', 'rope_theta': 1e4},
                           'full_attention': {'rope_type': 'linear', 'rope_theta': 1e6, 'factor': 4.0}}),
  }


def _build(name, tmp_path):
  """A random transformers model saved to tmp_path/hf (weights ~ N(0, 0.1), norm scales ~ 1)."""
  cfg = _configs()[name]
  cfg._attn_implementation = 'eager'   # soft-capping needs eager; one reference for all
  hf = transformers.AutoModelForCausalLM.from_config(cfg).eval()
  g = torch.Generator().manual_seed(sum(map(ord, name)))
  with torch.no_grad():
    for pname, p in hf.named_parameters():
      unit = p.ndim == 1 and 'norm' in pname and not name.startswith('gemma')   # Gemma's are 1 + w
      p.copy_(torch.randn(p.shape, generator=g) * 0.1 + (1.0 if unit else 0.0))
  hf.save_pretrained(tmp_path / 'hf', safe_serialization=True)
  return hf


@pytest.fixture(scope='module')
def built(tmp_path_factory):
  """built(name) -> (transformers model, folder holding it in hf/): each family built once."""
  cache = {}

  def get(name):
    if name not in cache:
      path = tmp_path_factory.mktemp(name.replace('.', '_'))
      cache[name] = (_build(name, path), path)
    return cache[name]
  return get


def _batch():
  """Three left-padded rows of lengths T, T - 5 and 9 (mask 1 on real tokens)."""
  rng = np.random.default_rng(0)
  tokens = rng.integers(1, VOCAB, (3, T))
  mask = np.ones((3, T), np.int64)
  mask[1, :5] = 0
  mask[2, :T - 9] = 0
  tokens[mask == 0] = 0
  return tokens, mask


def _hf_logits(hf, tokens, mask):
  pos = np.maximum(np.cumsum(mask, 1) - 1, 0)
  with torch.no_grad():
    out = hf(input_ids=torch.tensor(tokens), attention_mask=torch.tensor(mask),
             position_ids=torch.tensor(pos)).logits.numpy()
  return out


def _our_logits(params, cfg, tokens, mask):
  pos = np.maximum(np.cumsum(mask, 1) - 1, 0)
  out, _ = model.forward(params, jnp.asarray(tokens), cfg, positions=jnp.asarray(pos),
                         segment_ids=jnp.asarray(mask, jnp.int32))   # pads: their own segment
  return np.asarray(out)[..., :cfg.vocab_size]


def _max_diff(a, b, mask):
  return float(np.max(np.abs(a - b)[mask.astype(bool)]))


def _greedy_equal(hf, params, cfg, tokens, mask, n=5):
  prompts = [row[m.astype(bool)][:12] for row, m in zip(tokens, mask)]
  ours = decode.generate(params, prompts, jax.random.key(0), cfg=cfg, sampling=decode.SamplingConfig(
      temperature=0.0, max_new_tokens=n, eos_ids=cfg.eos_ids))
  width = max(map(len, prompts))
  ids = np.zeros((len(prompts), width), np.int64)
  am = np.zeros_like(ids)
  for i, p in enumerate(prompts):
    ids[i, width - len(p):], am[i, width - len(p):] = p, 1
  with torch.no_grad():
    ref = hf.generate(input_ids=torch.tensor(ids), attention_mask=torch.tensor(am), do_sample=False,
                      max_new_tokens=n, pad_token_id=0).numpy()[:, width:]
  for i in range(len(prompts)):
    got = np.asarray(ours.tokens[i])[:int(ours.lengths[i])]
    assert got.tolist() == ref[i, :len(got)].tolist(), (i, got, ref[i])


@pytest.mark.parametrize('name', [n for n in _configs() if n != 'mistral-w12'])
def test_family_matches_transformers(name, built, tmp_path):
  hf, folder = built(name)
  params, cfg = convert.import_hf(str(folder / 'hf'))
  assert cfg.num_params() == hf.num_parameters()
  tokens, mask = _batch()
  ref = _hf_logits(hf, tokens, mask)
  diff = _max_diff(_our_logits(params, cfg, tokens, mask), ref, mask)
  print(f'\n{name}: max |dlogit| = {diff:.2e}')
  assert diff <= 1e-4
  _greedy_equal(hf, params, cfg, tokens, mask)
  # export: transformers loads our folder and gives the same logits
  convert.export_hf(params, cfg, str(tmp_path / 'out'))
  back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / 'out', attn_implementation='eager').eval()
  assert type(back) is type(hf)
  assert _max_diff(_hf_logits(back, tokens, mask), ref, mask) <= 1e-4


def test_multiple_eos_ids_are_imported_and_exported(built, tmp_path):
  params, cfg = convert.import_hf(str(built('llama3.1')[1] / 'hf'))
  assert cfg.eos_ids == (5, 7)
  convert.export_hf(params, cfg, str(tmp_path / 'out'))
  gen = json.loads((tmp_path / 'out' / 'generation_config.json').read_text())
  assert gen['eos_token_id'] == [5, 7]
  assert transformers.GenerationConfig.from_pretrained(tmp_path / 'out').eos_token_id == [5, 7]


# Each family's switch, turned off, moves the logits far past the tolerance: the parity above
# is not passing by accident of a feature that does nothing at these sizes.
SWITCHES = [
    ('llama3.1', dict(rope_scaling='none')),
    ('llama-linear', dict(rope_scaling='none')),
    ('llama-dynamic', dict(rope_scaling='none')),
    ('llama-yarn', dict(rope_scaling='none')),
    ('llama-yarn', dict(rope_attention_factor=1.0)),
    ('mistral', dict(sliding_window=0, layer_types=())),
    ('gemma2', dict(sliding_window=0, layer_types=())),
    ('gemma2', dict(attn_softcap=0.0)),
    ('gemma2', dict(final_softcap=0.0)),
    ('gemma2', dict(query_pre_attn_scalar=0.0)),
    ('gemma2', dict(scale_embeddings=False)),
    ('gemma3', dict(rope_local_theta=0.0)),
    ('gemma3', dict(sliding_window=0, layer_types=())),
    ('gemma3', dict(rope_scaling='none')),
]


@pytest.mark.parametrize('name,off', SWITCHES, ids=[f'{n}-{next(iter(o))}' for n, o in SWITCHES])
def test_each_switch_matters(name, off, built):
  hf, folder = built(name)
  tokens, mask = _batch()
  params, cfg = convert.import_hf(str(folder / 'hf'), **off)
  assert _max_diff(_our_logits(params, cfg, tokens, mask), _hf_logits(hf, tokens, mask), mask) > 1e-3


# The config.json fields of released checkpoints (sizes as published; weights not needed): each
# must import with nothing refused, and its switches must land where they belong.
REAL = {
    'Llama-3.1-8B': ({'architectures': ['LlamaForCausalLM'], 'attention_bias': False, 'attention_dropout': 0.0,
                      'bos_token_id': 128000, 'eos_token_id': 128001, 'hidden_act': 'silu', 'hidden_size': 4096,
                      'initializer_range': 0.02, 'intermediate_size': 14336, 'max_position_embeddings': 131072,
                      'mlp_bias': False, 'model_type': 'llama', 'num_attention_heads': 32, 'num_hidden_layers': 32,
                      'num_key_value_heads': 8, 'pretraining_tp': 1, 'rms_norm_eps': 1e-05,
                      'rope_scaling': {'factor': 8.0, 'low_freq_factor': 1.0, 'high_freq_factor': 4.0,
                                       'original_max_position_embeddings': 8192, 'rope_type': 'llama3'},
                      'rope_theta': 500000.0, 'tie_word_embeddings': False, 'torch_dtype': 'bfloat16',
                      'transformers_version': '4.43.0.dev0', 'use_cache': True, 'vocab_size': 128256},
                     dict(rope_scaling='llama3', rope_original_max_len=8192, kv_heads=8, eos_ids=(128001,))),
    'Qwen2.5-7B': ({'architectures': ['Qwen2ForCausalLM'], 'attention_dropout': 0.0, 'bos_token_id': 151643,
                    'eos_token_id': 151643, 'hidden_act': 'silu', 'hidden_size': 3584, 'initializer_range': 0.02,
                    'intermediate_size': 18944, 'max_position_embeddings': 131072, 'max_window_layers': 28,
                    'model_type': 'qwen2', 'num_attention_heads': 28, 'num_hidden_layers': 28,
                    'num_key_value_heads': 4, 'rms_norm_eps': 1e-06, 'rope_theta': 1000000.0,
                    'sliding_window': 131072, 'tie_word_embeddings': False, 'torch_dtype': 'bfloat16',
                    'transformers_version': '4.43.1', 'use_cache': True, 'use_sliding_window': False,
                    'vocab_size': 152064, 'rope_scaling': None},
                   dict(qkv_bias=True, sliding_window=0, rope_theta=1e6)),
    'gemma-2-9b': ({'architectures': ['Gemma2ForCausalLM'], 'attention_bias': False, 'attention_dropout': 0.0,
                    'attn_logit_softcapping': 50.0, 'bos_token_id': 2, 'cache_implementation': 'hybrid',
                    'eos_token_id': 1, 'final_logit_softcapping': 30.0, 'head_dim': 256,
                    'hidden_act': 'gelu_pytorch_tanh', 'hidden_activation': 'gelu_pytorch_tanh',
                    'hidden_size': 3584, 'initializer_range': 0.02, 'intermediate_size': 14336,
                    'max_position_embeddings': 8192, 'model_type': 'gemma2', 'num_attention_heads': 16,
                    'num_hidden_layers': 42, 'num_key_value_heads': 8, 'pad_token_id': 0,
                    'query_pre_attn_scalar': 256, 'rms_norm_eps': 1e-06, 'rope_theta': 10000.0,
                    'sliding_window': 4096, 'sliding_window_size': 4096, 'torch_dtype': 'float32',
                    'transformers_version': '4.42.0.dev0', 'use_cache': True, 'vocab_size': 256000},
                   dict(attn_softcap=50.0, final_softcap=30.0, sliding_window=4096, head_dim=256,
                        local_layers=(True, False) * 21, activation='geglu_tanh')),
    'gemma-3-1b': ({'architectures': ['Gemma3ForCausalLM'], 'attention_bias': False, 'attention_dropout': 0.0,
                    'attn_logit_softcapping': None, 'bos_token_id': 2, 'cache_implementation': 'hybrid',
                    'eos_token_id': [1, 106], 'final_logit_softcapping': None, 'head_dim': 256,
                    'hidden_activation': 'gelu_pytorch_tanh', 'hidden_size': 1152, 'initializer_range': 0.02,
                    'intermediate_size': 6912, 'max_position_embeddings': 32768, 'model_type': 'gemma3_text',
                    'num_attention_heads': 4, 'num_hidden_layers': 26, 'num_key_value_heads': 1,
                    'pad_token_id': 0, 'query_pre_attn_scalar': 256, 'rms_norm_eps': 1e-06,
                    'rope_local_base_freq': 10000, 'rope_scaling': None, 'rope_theta': 1000000,
                    'sliding_window': 512, 'sliding_window_pattern': 6, 'torch_dtype': 'bfloat16',
                    'transformers_version': '4.50.0.dev0', 'use_cache': True, 'vocab_size': 262144},
                   dict(qk_norm=True, rope_local_theta=10000.0, rope_theta=1e6, eos_ids=(1, 106),
                        local_layers=tuple((i + 1) % 6 != 0 for i in range(26)))),
}


# num_parameters() of the released checkpoints (checked: transformers builds each config above on
# the meta device and counts exactly these).
RELEASED_PARAMS = {'Llama-3.1-8B': 8_030_261_248, 'Qwen2.5-7B': 7_615_616_512, 'gemma-2-9b': 9_241_705_984,
                   'gemma-3-1b': 999_885_952}


@pytest.mark.parametrize('name', list(REAL))
def test_released_configs_import(name):
  hf, want = REAL[name]
  cfg = convert.config_from_hf(hf)
  assert {k: getattr(cfg, k) for k in want} == want
  assert cfg.num_params() == RELEASED_PARAMS[name]   # biases, q/k norms, sandwich norms counted
  assert convert.export_family(cfg) == hf['model_type']
  convert.config_to_hf(cfg)   # and it exports (the round trip holds)


def test_generation_config_eos_ids_join(tmp_path):
  hf, _ = REAL['Llama-3.1-8B']
  (tmp_path / 'config.json').write_text(json.dumps(hf))
  (tmp_path / 'generation_config.json').write_text(json.dumps({'eos_token_id': [128001, 128008, 128009]}))
  cfg, _ = convert.config_from_folder(str(tmp_path))
  assert cfg.eos_ids == (128001, 128008, 128009)


def test_multimodal_gemma3_is_refused():
  with pytest.raises(convert.ConfigError, match="gemma3_text"):
    convert.config_from_hf({'model_type': 'gemma3', 'text_config': {}})


@pytest.mark.parametrize('name', ['qwen2.5', 'gemma3'])
def test_sharded_checkpoint_streams_onto_a_mesh(name, built, tmp_path):
  """A checkpoint saved in many small shards (model.safetensors.index.json) streams onto 8
  fake devices leaf by leaf: every leaf equals the single-file import and sits in the sharding
  the rules table gives it."""
  from lm import sharding
  hf, folder = built(name)   # folder/hf: one file
  hf.save_pretrained(tmp_path / 'sharded', safe_serialization=True, max_shard_size='40KB')
  assert (tmp_path / 'sharded' / 'model.safetensors.index.json').exists()
  assert len(list((tmp_path / 'sharded').glob('*.safetensors'))) > 4
  want, cfg = convert.import_hf(str(folder / 'hf'))
  mesh = sharding.make_mesh({'fsdp': 4, 'tensor': 2})
  got, cfg2 = convert.import_hf_to_mesh(str(tmp_path / 'sharded'), mesh)
  assert cfg2 == cfg
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), want)
  target = sharding.tree_shardings(model.logical_axes(cfg), abstract, mesh)
  for (path, w), g, t in zip(jax.tree_util.tree_leaves_with_path(want), jax.tree.leaves(got),
                             jax.tree.leaves(target, is_leaf=lambda x: hasattr(x, 'spec'))):
    assert g.sharding.is_equivalent_to(t, g.ndim), path
    np.testing.assert_array_equal(np.asarray(g), w, err_msg=str(path))
  assert sharding.sharded_fraction(got, target) > 0.5


@pytest.mark.slow
def test_streamed_import_peak_host_memory(tmp_path):
  """A random Qwen2-0.5B-shaped checkpoint (bf16, 25 shards) onto 8 fake devices: the streamed
  import's peak host memory stays within one largest tensor (the f32 embedding) of the params it
  places, where import_hf + device_put holds about a second copy of the model."""
  import subprocess
  import sys
  worker = [sys.executable, str(__import__('pathlib').Path(__file__).with_name('peak_rss_worker.py'))]
  subprocess.run([*worker, 'make', str(tmp_path)], check=True)
  size_mb = sum(f.stat().st_size for f in tmp_path.glob('*.safetensors')) / 2**20
  runs = {how: json.loads(subprocess.run([*worker, how, str(tmp_path)], check=True, capture_output=True,
                                         text=True).stdout.strip().splitlines()[-1])
          for how in ('stream', 'naive')}
  largest_mb = 151936 * 896 * 4 / 2**20
  over = {how: r['peak_mb'] - r['baseline_mb'] - r['params_mb'] for how, r in runs.items()}
  print(f"\ncheckpoint {size_mb:.0f} MB bf16 ({runs['stream']['n_params'] / 1e6:.0f}M params); "
        f"params on 8 devices {runs['stream']['params_mb']:.0f} MB f32; peak RSS above baseline: streamed "
        f"{runs['stream']['peak_mb'] - runs['stream']['baseline_mb']:.0f} MB (+{over['stream']:.0f} MB beyond the "
        f"params), import_hf + device_put {runs['naive']['peak_mb'] - runs['naive']['baseline_mb']:.0f} MB "
        f"(+{over['naive']:.0f} MB); largest tensor {largest_mb:.0f} MB f32")
  assert over['stream'] < largest_mb < over['naive']


def test_bfloat16_export_reads_back_rounded(built, tmp_path):
  """export_hf(dtype='bfloat16') stores bf16 tensors (as released checkpoints are) that
  transformers loads and both importers read back as the params rounded to bf16."""
  import ml_dtypes
  from lm import sharding
  params, cfg = convert.import_hf(str(built('qwen3')[1] / 'hf'))
  convert.export_hf(params, cfg, str(tmp_path / 'bf16'), dtype='bfloat16')
  back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / 'bf16')
  assert next(back.parameters()).dtype == torch.bfloat16
  rounded = jax.tree.map(lambda x: x.astype(ml_dtypes.bfloat16).astype(np.float32), params)
  again, _ = convert.import_hf(str(tmp_path / 'bf16'))
  streamed, _ = convert.import_hf_to_mesh(str(tmp_path / 'bf16'), sharding.make_mesh({'fsdp': 8}))
  for want, a, b in zip(jax.tree.leaves(rounded), jax.tree.leaves(again), jax.tree.leaves(streamed)):
    np.testing.assert_array_equal(a, want)
    np.testing.assert_array_equal(np.asarray(b), want)


@pytest.mark.parametrize('name,slots', [('mistral', 8), ('mistral-w12', 12)])
def test_all_sliding_model_decodes_from_a_ring_cache(name, slots, built):
  """Mistral (every layer sliding, window 6 or 12) generating 30 tokens after an 8-token prompt
  keeps max(8, window) cache slots, not 40, and still gives transformers' greedy tokens; so does
  beam search with one beam (greedy by construction) on the same ring."""
  hf, folder = built(name)
  params, cfg = convert.import_hf(str(folder / 'hf'))
  assert decode.cache_slots(cfg, 8, 32) == slots
  prompts = np.random.default_rng(1).integers(1, VOCAB, (2, 8))
  with torch.no_grad():
    ref = hf.generate(input_ids=torch.tensor(prompts), do_sample=False, max_new_tokens=30,
                      min_new_tokens=30, pad_token_id=0).numpy()[:, 8:]
  ours = decode.generate(params, list(prompts), jax.random.key(0), cfg=cfg,
                         sampling=decode.SamplingConfig(temperature=0.0, max_new_tokens=30, min_new_tokens=30,
                                                        eos_ids=cfg.eos_ids))
  np.testing.assert_array_equal(np.asarray(ours.tokens), ref)
  beams = decode.beam_search(params, prompts[0], cfg=cfg, num_beams=1, max_new_tokens=30, early_stopping=True)
  n = int(beams.lengths[0, 0])   # beam search has no min length: it may end at an EOS first
  np.testing.assert_array_equal(np.asarray(beams.tokens[0, 0, :n]), ref[0, :n])
  assert n == 30 or ref[0, n - 1] in cfg.eos_ids


def test_gemma3_sliding_layers_keep_unscaled_rope_when_the_bases_agree():
  """Gemma-3's sliding layers take their own (default) RoPE even when its base equals the
  global one: only the global layers are scaled."""
  hf = dict(REAL['gemma-3-1b'][0], rope_local_base_freq=1000000,
            rope_scaling={'rope_type': 'linear', 'factor': 8.0})
  cfg = convert.config_from_hf(hf)
  assert (cfg.rope_scaling, cfg.rope_factor, cfg.rope_local_theta) == ('linear', 8.0, 1e6)
  back = convert.config_to_hf(cfg)['rope_parameters']
  assert back['sliding_attention'] == {'rope_type': 'default', 'rope_theta': 1e6}
  assert back['full_attention']['rope_type'] == 'linear'
