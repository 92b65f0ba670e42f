"""The encoder-decoder (T5): logits against transformers' T5, masking invariants, decoding,
parameter count, and 1-device vs 8-device training with span corruption."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lm import encdec, layers, model, objectives, sharding, train
from lm.config import ConfigError, ModelConfig

T5_LIKE = dict(arch='encoder_decoder', positions='relative', norm='rmsnorm', activation='relu',
               use_bias=False, scale_attention=False, norm_eps=1e-6)


def small(**kw):
  base = dict(T5_LIKE, vocab_size=50, d_model=32, n_layers=2, n_encoder_layers=3, n_heads=4,
              max_seq_len=32, rel_buckets=8, rel_max_distance=12, init_std=0.2)
  base.update(kw)
  return ModelConfig(**base)


def test_relative_buckets_match_transformers():
  torch = pytest.importorskip('torch', reason='needs the [test] extra (torch, transformers)')
  t5 = pytest.importorskip('transformers.models.t5.modeling_t5')
  rel = np.arange(-300, 301)
  for bidirectional in (True, False):
    for buckets, dist in ((32, 128), (8, 20)):
      ref = t5.T5Attention._relative_position_bucket(torch.tensor(rel), bidirectional=bidirectional,
                                                     num_buckets=buckets, max_distance=dist).numpy()
      ours = np.asarray(layers.relative_bucket(jnp.asarray(rel), bidirectional, buckets, dist))
      np.testing.assert_array_equal(ours, ref)


def test_t5_checkpoint_import_matches_transformers_logits(tmp_path):
  torch = pytest.importorskip('torch', reason='needs the [test] extra (torch, transformers)')
  transformers = pytest.importorskip('transformers')
  from lm import convert
  hf_cfg = transformers.T5Config(
      vocab_size=99, d_model=64, d_kv=16, d_ff=96, num_layers=2, num_decoder_layers=3, num_heads=4,
      relative_attention_num_buckets=8, relative_attention_max_distance=20, dropout_rate=0.0,
      feed_forward_proj='relu', tie_word_embeddings=True, decoder_start_token_id=0, pad_token_id=0)
  hf = transformers.T5ForConditionalGeneration(hf_cfg).eval()
  g = torch.Generator().manual_seed(1)
  with torch.no_grad():  # random values everywhere, norm scales around 1
    for name, p in hf.named_parameters():
      p.copy_(torch.randn(p.shape, generator=g) * 0.1 + (1.0 if 'layer_norm' in name else 0.0))
  hf.save_pretrained(tmp_path / 'hf', safe_serialization=True)
  params, cfg = convert.import_hf(str(tmp_path / 'hf'))
  assert (cfg.arch, cfg.encoder_layers, cfg.n_layers, cfg.head_dim) == ('encoder_decoder', 2, 3, 16)
  rng = np.random.default_rng(0)
  src, dec = rng.integers(1, 99, (2, 30)), rng.integers(1, 99, (2, 25))   # 30 > max_distance 20
  mask = np.ones_like(src)
  mask[1, 21:] = 0                                                        # a padded row
  with torch.no_grad():
    ref = hf(input_ids=torch.tensor(src), attention_mask=torch.tensor(mask),
             decoder_input_ids=torch.tensor(dec)).logits.numpy()
  ours, _ = encdec.forward(params, jnp.asarray(src), jnp.asarray(dec), cfg,
                           input_segment_ids=jnp.asarray(mask))
  assert np.max(np.abs(np.asarray(ours)[..., :99] - ref)) <= 1e-4


def test_padding_and_future_tokens_do_not_leak():
  cfg = small()
  params = model.init(cfg, jax.random.key(0))
  src = jax.random.randint(jax.random.key(1), (2, 12), 0, 50)
  dec = jax.random.randint(jax.random.key(2), (2, 10), 0, 50)
  seg = jnp.array([[1] * 12, [1] * 8 + [0] * 4])
  out, _ = encdec.forward(params, src, dec, cfg, input_segment_ids=seg)
  # changing padded encoder tokens changes nothing; changing a real one changes row 1
  src2 = src.at[1, 9:].set((src[1, 9:] + 7) % 50)
  out2, _ = encdec.forward(params, src2, dec, cfg, input_segment_ids=seg)
  np.testing.assert_allclose(out2, out, atol=1e-6)
  out3, _ = encdec.forward(params, src.at[1, 3].set((src[1, 3] + 7) % 50), dec, cfg, input_segment_ids=seg)
  assert np.abs(np.asarray(out3[1]) - np.asarray(out[1])).max() > 1e-3
  # the decoder is causal: a later decoder token leaves earlier logits alone
  dec2 = dec.at[:, 6].set((dec[:, 6] + 5) % 50)
  out4, _ = encdec.forward(params, src, dec2, cfg, input_segment_ids=seg)
  np.testing.assert_allclose(out4[:, :6], out[:, :6], atol=1e-6)
  assert np.abs(np.asarray(out4[:, 6:]) - np.asarray(out[:, 6:])).max() > 1e-3


def test_greedy_generate_equals_step_by_step_argmax():
  cfg = small()
  params = model.init(cfg, jax.random.key(0))
  src = jax.random.randint(jax.random.key(1), (2, 12), 0, 50)
  out = encdec.generate(params, src, cfg, max_new_tokens=6, start_id=49)
  buf = jnp.full((2, 1), 49)
  for _ in range(6):
    logits, _ = encdec.forward(params, src, buf, cfg)
    buf = jnp.concatenate([buf, jnp.argmax(logits[:, -1], -1)[:, None]], 1)
  np.testing.assert_array_equal(out, buf[:, 1:])


@pytest.mark.parametrize('kw', [dict(), dict(positions='learned', norm_position='sandwich',
                                             tie_embeddings=False, use_bias=True)])
def test_param_count_matches_leaves(kw):
  cfg = small(**kw)
  params = model.init(cfg, jax.random.key(0))
  pad = (cfg.padded_vocab - cfg.vocab_size) * cfg.d_model * (1 if cfg.tie_embeddings else 2)
  assert sum(x.size for x in jax.tree.leaves(params)) - pad == cfg.num_params()


@pytest.mark.parametrize('bad,match', [
    (dict(positions='alibi'), 'does not combine with the encoder-decoder'),
    (dict(positions='rope'), 'does not combine with the encoder-decoder'),
    (dict(norm_position='deepnorm'), 'DeepNorm'),
    (dict(moe_experts=4), 'decoder-only'),
])
def test_incompatible_encoder_decoder_configs_fail_clearly(bad, match):
  with pytest.raises(ConfigError, match=match):
    small(**bad)


def _span_losses(mesh, steps=8):
  cfg = small(vocab_size=64 + objectives.num_special_ids(16), max_seq_len=16)
  axes = model.logical_axes(cfg)
  optim = dict(lr=3e-3, min_lr=3e-4, warmup_steps=2, b1=0.9, b2=0.99, weight_decay=0.1, grad_clip=1.0)
  tx, sched = train.make_optimizer(optim, axes, steps)
  state, sh = train.init_train_state(functools.partial(model.init, cfg), axes, tx, mesh, jax.random.key(0))
  spec = {k: jax.ShapeDtypeStruct((8, 16), d) for k, d in
          (('inputs', jnp.int32), ('targets', jnp.int32), ('weights', jnp.float32))}
  bsh = train.batch_shardings(mesh, spec)
  step = train.make_train_step(functools.partial(objectives.span_corruption_loss, cfg=cfg), tx, mesh,
                               sh, bsh, schedule=sched)
  rng = np.random.default_rng(0)
  out = []
  for _ in range(steps):
    t = ((rng.integers(0, 64, (8, 1)) + np.arange(17)) % 64).astype(np.int32)
    b = {'inputs': t[:, :-1], 'targets': t[:, 1:], 'weights': np.ones((8, 16), np.float32)}
    state, m = step(state, {k: jax.device_put(v, bsh[k]) for k, v in b.items()})
    out.append([float(m['loss']), float(m['grad_norm'])])
  return np.array(out), state


def test_encoder_decoder_one_device_equals_eight():
  one = sharding.make_mesh({'data': 1}, devices=jax.devices()[:1])
  eight = sharding.make_mesh({'data': 2, 'fsdp': 2, 'tensor': 2})
  l1, _ = _span_losses(one)
  l8, s8 = _span_losses(eight)
  np.testing.assert_allclose(l8, l1, rtol=2e-5, atol=2e-5)
  assert l1[-1, 0] < l1[0, 0]
  wq = s8.params['decoder']['layers']['cross']['wq']
  assert wq.sharding.spec == jax.sharding.PartitionSpec(None, 'fsdp', 'tensor', None)
  assert wq.addressable_shards[0].data.shape == (2, 16, 2, 8)
