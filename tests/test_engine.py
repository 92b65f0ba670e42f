"""The continuous-batching engine against the static path (lm.decode.generate, independent code):
greedy tokens equal with more requests than slots, sampled rows reproducible per seed whatever
their companions, stop rules, prefix sharing and a bounded number of compiled programs."""
import jax
import numpy as np
import pytest

from lm import decode, engine, model
from lm.config import ConfigError, ModelConfig

# init_std 0.3: peaked, varied next-token distributions (as in test_decode)
CFG = ModelConfig(vocab_size=50, d_model=32, n_layers=2, n_heads=4, max_seq_len=64, init_std=0.3)
ROPE = ModelConfig(vocab_size=50, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=64,
                   init_std=0.3, positions='rope', norm='rmsnorm', activation='swiglu', use_bias=False)
LENGTHS = [7, 2, 12, 5, 20, 1, 9, 3, 15, 4]


def detok(ids):
  return ''.join(chr(ord('a') + i % 26) for i in ids)


def prompts(seed=0, lengths=LENGTHS):
  rng = np.random.default_rng(seed)
  return [rng.integers(1, 50, size=n).tolist() for n in lengths]


@pytest.fixture(scope='module')
def params():
  return model.init(CFG, jax.random.key(0))


def static(params, cfg, ps, n, eos=()):
  s = decode.SamplingConfig(temperature=0, max_new_tokens=n, eos_ids=eos)
  gen = decode.generate(params, [np.array(p) for p in ps], jax.random.key(1), cfg=cfg, sampling=s)
  return [np.asarray(gen.tokens[i, :int(gen.lengths[i])]).tolist() for i in range(len(ps))], gen


@pytest.mark.parametrize('cfg', [CFG, ROPE], ids=['learned', 'rope_gqa'])
def test_greedy_equals_static_path(cfg, params):
  """10 prompts of 1-20 tokens through 4 slots (rows join as others end, at other positions)."""
  p = params if cfg is CFG else model.init(cfg, jax.random.key(0))
  ps = prompts()
  ref, gen = static(p, cfg, ps, 24, eos=(3,))
  eng = engine.Engine(p, cfg, slots=4)
  out = eng.generate([engine.Request(prompt=q, max_tokens=24, eos_ids=(3,)) for q in ps])
  assert [o.tokens for o in out] == ref
  assert {o.finish_reason for o in out} == {'stop', 'length'}   # both rules exercised
  for i, o in enumerate(out):
    assert o.finish_reason == ('stop' if ref[i][-1] == 3 else 'length')
    np.testing.assert_allclose(o.raw_logprobs, np.asarray(gen.raw_logprobs[i, :len(ref[i])]),
                               atol=1e-4)
  assert eng.stats['decode_calls'] < sum(map(len, ref)) / 4   # rows really shared the pool


def test_sampled_reproducible_per_seed_whatever_the_companions(params):
  ps = prompts(1)
  mine = engine.Request(prompt=ps[0], max_tokens=20, temperature=1.0, top_p=0.9, seed=7)
  clone = lambda **kw: engine.Request(**{**mine.__dict__, 'on_update': None, **kw})
  eng = engine.Engine(params, CFG, slots=4)
  alone = eng.generate([clone()])[0]
  others = [engine.Request(prompt=q, max_tokens=5 + i, temperature=0.7 * (i % 2), seed=i, top_k=5)
            for i, q in enumerate(ps[1:6])]
  crowded = eng.generate(others[:2] + [clone()] + others[2:])[2]
  late = eng.generate(others[::-1] + [clone()])[-1]     # joins a slot another request freed
  assert alone.tokens == crowded.tokens == late.tokens
  np.testing.assert_allclose(alone.logprobs, late.logprobs, atol=1e-5)
  assert eng.generate([clone(seed=8)])[0].tokens != alone.tokens   # the seed matters


def test_stop_rules(params):
  ps = prompts(2)[:4]
  ref, _ = static(params, CFG, ps, 30)
  texts = [detok(r) for r in ref]
  stops = [t[6:8] for t in texts]    # a string each greedy continuation produces
  eng = engine.Engine(params, CFG, slots=4, detokenize=detok)
  out = eng.generate([engine.Request(prompt=q, max_tokens=30, stop=(s, 'never!'))
                      for q, s in zip(ps, stops)])
  for o, t, r, s in zip(out, texts, ref, stops):
    want, hit = decode.truncate_at_stop([t], [s, 'never!'])
    assert hit[0] and o.finish_reason == 'stop' and o.text == want[0]
    j = next(j for j in range(1, len(r) + 1) if s in detok(r[:j]))   # first token completing it
    assert o.tokens == r[:j]
  short = eng.generate([engine.Request(prompt=ps[0], max_tokens=5)])[0]
  assert short.tokens == ref[0][:5] and short.finish_reason == 'length'
  eos = ref[1][3]                    # the 4th greedy token as an EOS id: it ends there
  early = eng.generate([engine.Request(prompt=ps[1], max_tokens=30, eos_ids=(eos,))])[0]
  assert early.tokens == ref[1][:ref[1].index(eos) + 1] and early.finish_reason == 'stop'
  banned = eng.generate([engine.Request(prompt=ps[1], max_tokens=30, eos_ids=(eos,),
                                        min_tokens=ref[1].index(eos) + 1)])[0]
  assert len(banned.tokens) > ref[1].index(eos) + 1   # min_tokens banned that EOS


def test_prefix_sharing_prefills_once(params):
  ps = prompts(3, [9, 6, 11])
  eng = engine.Engine(params, CFG, slots=4)
  k = [engine.Request(prompt=ps[0], max_tokens=12, temperature=1.0, seed=s) for s in range(6)]
  shared = eng.generate(k)
  assert eng.stats['prefill_calls'] == 1 and eng.stats['prefix_hits'] == 5
  for s, o in enumerate(shared):   # the same as each sample prefilled on its own
    fresh = engine.Engine(params, CFG, slots=4, prefix_cache=1)
    fresh._lru.clear()
    assert fresh.generate([engine.Request(prompt=ps[0], max_tokens=12, temperature=1.0,
                                          seed=s)])[0].tokens == o.tokens
  assert len({tuple(o.tokens) for o in shared}) > 1
  # A few-shot head shared by different questions: the head once, then only each tail.
  head = prompts(4, [20])[0]
  full = [head + q for q in ps]
  eng = engine.Engine(params, CFG, slots=2)
  out = eng.generate([engine.Request(prompt=f, max_tokens=10, prefix_len=len(head)) for f in full])
  assert eng.stats['prefill_calls'] == 4
  assert eng.stats['prefill_tokens'] == len(head) + sum(map(len, ps))
  assert [o.tokens for o in out] == static(params, CFG, full, 10)[0]


def test_compiled_programs_bounded(params):
  """A varied stream (prompt lengths 1-40, every sampling knob, shared heads) compiles one
  decode program per window bucket, one insert and at most one prefill per length bucket."""
  before = {k: engine.compiled_programs(k) for k in ('decode', 'insert', 'prefill')}
  eng = engine.Engine(params, CFG, slots=5, sync_every=3, detokenize=detok)
  rng = np.random.default_rng(5)
  reqs = [engine.Request(prompt=rng.integers(1, 50, size=int(n)).tolist(),
                         max_tokens=int(rng.integers(1, 20)), temperature=float(t), seed=i,
                         top_p=float(rng.choice([1.0, 0.8])), top_k=int(rng.choice([0, 4])),
                         min_p=float(rng.choice([0.0, 0.1])), stop=('xy',) if i % 3 else (),
                         eos_ids=(3, 4) if i % 2 else ())
          for i, (n, t) in enumerate(zip(rng.integers(1, 41, size=30), rng.choice([0, 0.5, 1.2], 30)))]
  out = eng.generate(reqs)
  assert all(1 <= len(o.tokens) <= r.max_tokens for o, r in zip(out, reqs))
  grown = {k: engine.compiled_programs(k) - v for k, v in before.items()}
  assert grown['decode'] <= 3 and grown['insert'] <= 1   # windows 16, 32, 64 (3 steps ahead)
  assert grown['prefill'] <= 4          # buckets 8, 16, 32, 64
  eng.generate(reqs[:5])                # a second pass compiles nothing
  assert engine.compiled_programs() - sum(before.values()) == sum(grown.values())


def test_cancel_frees_the_slot_and_bad_requests_fail_clearly(params):
  got = []
  eng = engine.Engine(params, CFG, slots=1)
  long = engine.Request(prompt=[5, 6], max_tokens=40, on_update=lambda t, lp, top, res: got.append(res))
  eng.submit(long)
  eng.step()
  eng.cancel(long.id)
  after = eng.generate([engine.Request(prompt=[7, 8], max_tokens=3)])[0]   # the one slot again
  assert got[-1].finish_reason == 'cancelled' and len(got[-1].tokens) < 40
  assert len(after.tokens) == 3
  with pytest.raises(ConfigError, match='exceeds the context of 64 tokens'):
    eng.submit(engine.Request(prompt=[1] * 60, max_tokens=10))
  with pytest.raises(ConfigError, match='top_p must be in'):
    eng.submit(engine.Request(prompt=[1], max_tokens=4, top_p=0))
  with pytest.raises(ConfigError, match='stop strings need'):
    eng.submit(engine.Request(prompt=[1], max_tokens=4, stop=('x',)))
