"""The evaluation harness: the model contract against naive forward passes, tasks, few-shot
sampling, answer extraction, and the `evaluate` experiment end to end."""
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from data import tokenizers
from experiments.evaluation import eval_model as em
from lm import model, sharding
from lm.config import ConfigError, ModelConfig

TEXT = ('First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n\n'
        'First Citizen:\nYou are all resolved rather to die than to famish?\n')
TOK = tokenizers.CharTokenizer.from_texts([TEXT + "?!.,;:'-0123456789#$ ABCDEFGHIJKLMNOPQRSTUVWXYZ"
                                           'abcdefghijklmnopqrstuvwxyz()[]=+*/<>_"\n'])
CFG = ModelConfig(vocab_size=TOK.vocab_size, d_model=32, n_layers=2, n_heads=4, max_seq_len=48,
                  init_std=0.3)
ROPE = ModelConfig(vocab_size=TOK.vocab_size, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                   max_seq_len=48, init_std=0.3, positions='rope', norm='rmsnorm',
                   activation='swiglu', use_bias=False)
BOS_TOK = tokenizers.add_special_tokens(TOK, ['bos'])
BOS_CFG = ModelConfig(vocab_size=BOS_TOK.vocab_size, d_model=32, n_layers=2, n_heads=4,
                      max_seq_len=48, init_std=0.3)


@pytest.fixture(scope='module')
def params():
  return model.init(CFG, jax.random.key(0))


_FORWARD = jax.jit(model.forward, static_argnums=2)


def forward_logp(params, cfg, toks):
  """log_softmax of one plain forward pass over toks (right-padded to the context: causal
  attention makes the padding invisible, and one shape compiles once)."""
  padded = np.zeros(cfg.max_seq_len, np.int32)
  padded[:len(toks)] = toks
  logits, _ = _FORWARD(params, jnp.asarray(padded)[None], cfg)
  return np.asarray(jax.nn.log_softmax(logits[0]), np.float64)[:len(toks)]


def naive_loglikelihood(params, cfg, ctx, cont):
  """One plain forward pass over context + continuation (no cache)."""
  logp = forward_logp(params, cfg, np.concatenate([ctx, cont])[:cfg.max_seq_len])
  rows = np.arange(len(ctx) - 1, len(ctx) + len(cont) - 1)
  return logp[rows, cont].sum(), bool((logp[rows].argmax(-1) == cont).all())


# Shared contexts (multiple choice) and single requests of varied lengths.
REQUESTS = ([('Before we proceed', c) for c in (' any further', ' no', ' any', ' further, hear me')] +
            [('All:\nSpeak,', ' speak.'), ('You are all resolved rather', ' to die'),
             ('F', 'irst Citizen'), ('hear me ', 'speak'), ('Speak, speak.\n', '\n'),
             ('You are all resolved rather to die than', ' to famish?')] +
            [('All:\n', c) for c in ('Speak', 'Die', 'Famish', 'No', 'Yes', 'Speak, speak.')])


@pytest.mark.parametrize('cfg,sizes', [(CFG, (1, 4, 16)), (ROPE, (4,))], ids=['learned', 'rope_gqa'])
def test_loglikelihood_same_for_any_batch_size_and_equal_to_naive(cfg, sizes):
  params = model.init(cfg, jax.random.key(1))
  results = {b: em.LanguageModel(params, cfg, TOK, batch_size=b).loglikelihood(REQUESTS)
             for b in sizes}
  lm = em.LanguageModel(params, cfg, TOK)
  for i, (ctx, cont) in enumerate(REQUESTS):
    c, t = lm.split(ctx, cont)
    ref, greedy = naive_loglikelihood(params, cfg, c, t)
    first = results[sizes[0]][i]
    for b in sizes:
      lp, g = results[b][i]
      assert lp == pytest.approx(ref, abs=1e-4), (b, ctx, cont)
      assert abs(lp - first[0]) < 1e-5 and g == first[1]
    assert first[1] == greedy


def test_is_greedy_true_for_the_models_own_greedy_continuation(params):
  lm = em.LanguageModel(params, CFG, TOK)
  ctx = 'Before we'
  out = lm.generate_until([(ctx, {'max_new_tokens': 6})])[0]
  (lp, greedy), = lm.loglikelihood([(ctx, out)])
  assert greedy and lp < 0
  (_, other), = lm.loglikelihood([(ctx, out[:-1] + ('a' if out[-1] != 'a' else 'b'))])
  assert not other


def test_shared_context_is_prefilled_once(params, monkeypatch):
  calls = []
  orig = em.LanguageModel._jit

  def counting(self, name, fn, **static):
    f = orig(self, name, fn, **static)
    return lambda *a: (calls.append((name, np.asarray(a[1]).copy())), f(*a))[1]
  monkeypatch.setattr(em.LanguageModel, '_jit', counting)
  lm = em.LanguageModel(params, CFG, TOK, batch_size=2)   # 4 choices: two scoring calls
  choices = [(' any', ' no', ' all', ' hear'), (' me', ' us')]
  lm.loglikelihood([(ctx, c) for ctx, cs in zip(('Before we proceed', 'hear'), choices) for c in cs])
  names = [n for n, _ in calls]
  assert names == ['prefill', 'score', 'score', 'score']
  rows = calls[0][1]          # both contexts in one prefill, one row each
  assert [TOK.decode(r[r > 0]) for r in rows] == ['Before we proceed', 'hear']


def test_split_moves_trailing_space_and_adds_bos():
  lm = em.LanguageModel(None, BOS_CFG, BOS_TOK)
  ctx, cont = lm.split('Question: who? Answer: ', 'Speak')
  bos = BOS_TOK.special_ids['bos']
  assert ctx[0] == bos and (ctx[1:] != bos).all()
  assert BOS_TOK.decode(ctx) == 'Question: who? Answer:' and BOS_TOK.decode(cont) == ' Speak'
  ctx2, _ = lm.split(np.concatenate([[bos], TOK.encode('ab')]), 'c')   # never a double BOS
  assert (ctx2 == bos).sum() == 1
  no_bos = em.LanguageModel(None, BOS_CFG, BOS_TOK, add_bos=False)
  assert no_bos.split('ab', 'c')[0][0] != bos
  with pytest.raises(ConfigError, match='empty context'):
    em.LanguageModel(None, CFG, TOK).split('', 'abc')


def test_long_prompts_truncated_left_with_a_count_or_refused(params):
  lm = em.LanguageModel(params, CFG, TOK)
  long_ctx = TEXT * 2
  (lp, _), = lm.loglikelihood([(long_ctx, ' speak')])
  assert lm.stats['truncated'] == 1 and lm.stats['truncated_tokens'] == (len(long_ctx) - 1) - (49 - 7)
  ctx, cont = lm.split(long_ctx, ' speak')   # (the trailing newline joins the continuation)
  assert len(ctx) + len(cont) - 1 == CFG.max_seq_len
  assert lp == pytest.approx(naive_loglikelihood(params, CFG, ctx, cont)[0], abs=1e-4)
  strict = em.LanguageModel(params, CFG, TOK, truncate='error')
  with pytest.raises(ConfigError, match='does not fit'):
    strict.loglikelihood([(long_ctx, ' speak')])
  with pytest.raises(ConfigError, match='truncate'):
    em.LanguageModel(params, CFG, TOK, truncate='right')


def naive_rolling_per_token(params, cfg, toks, window):
  """Each token t >= 1 predicted from the up-to-`window` tokens before it, one forward each."""
  total = 0.0
  for t in range(1, len(toks)):
    total += forward_logp(params, cfg, toks[max(0, t - window):t])[-1, toks[t]]
  return total


def naive_rolling_windows(params, cfg, toks, window, stride):
  total = 0.0
  for start, first, end in em.rolling_windows(len(toks), window, stride):
    logp = forward_logp(params, cfg, toks[start:end])
    for t in range(first + 1, end + 1):
      total += logp[t - 1 - start, toks[t]]
  return total


def test_rolling_windows_score_every_token_once():
  for n, w, s in [(10, 4, 4), (10, 4, 1), (11, 4, 3), (3, 8, 8), (9, 8, 2)]:
    scored = [t for _, first, end in em.rolling_windows(n, w, s) for t in range(first + 1, end + 1)]
    assert scored == list(range(1, n)), (n, w, s)
    for start, first, end in em.rolling_windows(n, w, s):
      assert end - start <= w and start <= first


def test_rolling_short_text_equals_one_forward(params):
  lm = em.LanguageModel(params, CFG, TOK)
  text = 'Speak, speak.'
  toks = TOK.encode(text)
  logp = forward_logp(params, CFG, toks)
  one = logp[np.arange(len(toks) - 1), toks[1:]].sum()
  (lp,), (n,) = lm.loglikelihood_rolling([text], return_counts=True)
  assert lp == pytest.approx(one, abs=1e-4) and n == len(toks) - 1


@pytest.mark.parametrize('stride', [1, 7, 48])
def test_rolling_long_text_equals_naive_windows(params, stride):
  texts = [TEXT[:130], TEXT[40:75], 'ab']
  lm = em.LanguageModel(params, CFG, TOK, batch_size=3, rolling_stride=stride)
  got = lm.loglikelihood_rolling(texts)
  for text, lp in zip(texts, got):
    toks = TOK.encode(text)
    assert lp == pytest.approx(naive_rolling_windows(params, CFG, toks, 48, stride), abs=2e-4)
    if stride == 1:   # every token with the full window before it
      assert lp == pytest.approx(naive_rolling_per_token(params, CFG, toks, 48), abs=2e-4)


def test_rolling_with_bos_scores_the_first_token():
  params = model.init(BOS_CFG, jax.random.key(3))
  lm = em.LanguageModel(params, BOS_CFG, BOS_TOK)
  (_,), (n,) = lm.loglikelihood_rolling(['Speak'], return_counts=True)
  assert n == 5


def test_bits_per_byte_and_word_perplexity():
  assert em.bits_per_byte([-math.log(2) * 8], ['ab', 'cd']) == pytest.approx(2.0)
  assert em.word_perplexity([-4.0], ['a b', 'c d']) == pytest.approx(math.e)


def test_generate_until_stops_and_matches_lm_decode(params):
  from lm import decode
  lm = em.LanguageModel(params, CFG, TOK, batch_size=2)
  prompts = ['Before we', 'All:\nSpeak', 'You are all']
  free = lm.generate_until([(p, {'max_new_tokens': 12}) for p in prompts])
  for p, f in zip(prompts, free):
    g = decode.generate(params, [TOK.encode(p)], jax.random.key(0), cfg=CFG,
                        sampling=decode.SamplingConfig(temperature=0, max_new_tokens=12))
    assert f == TOK.decode(np.asarray(g.tokens[0]))
  stop = free[0][3:5]
  cut = lm.generate_until([(prompts[0], {'max_new_tokens': 12, 'until': [stop]})])[0]
  assert cut == free[0][:free[0].find(stop)]
  with pytest.raises(ConfigError, match='Unknown generation settings'):
    lm.generate_until([('a', {'max_tokens': 3})])


def test_one_device_equals_eight(params):
  mesh = sharding.make_mesh({'data': 2, 'fsdp': 2, 'tensor': 2})
  placed = jax.device_put(params, sharding.tree_shardings(model.logical_axes(CFG), params, mesh))
  one = em.LanguageModel(params, CFG, TOK, batch_size=4)
  eight = em.LanguageModel(placed, CFG, TOK, mesh, batch_size=4)
  reqs = REQUESTS[:8]
  for (a, ga), (b, gb) in zip(one.loglikelihood(reqs), eight.loglikelihood(reqs)):
    assert a == pytest.approx(b, abs=1e-5) and ga == gb
  texts = [TEXT[:100]]
  assert one.loglikelihood_rolling(texts)[0] == pytest.approx(eight.loglikelihood_rolling(texts)[0], abs=1e-4)
  gen = [('Before', {'max_new_tokens': 5})]
  assert one.generate_until(gen) == eight.generate_until(gen)


def test_reference_model_answers_the_references():
  ref = em.ReferenceModel()
  assert ref.loglikelihood([('q', ' a'), ('q', ' b')], [False, True]) == [(ref.WRONG, False), (0.0, True)]
  assert ref.generate_until([('q', {})], ['gold']) == ['gold']
  with pytest.raises(ConfigError, match='reference'):
    ref.generate_until([('q', {})])


def test_tasks_this_model_cannot_run_are_left_out_in_one_sentence(tmp_path, monkeypatch, capsys):
  """The quick-start case: a character model whose vocabulary lacks '#' (alpaca's '### ' and
  HumanEval's stop strings), with a context shorter than HumanEval's 256 new tokens."""
  from experiments import evaluate
  from experiments.configs import evaluate as evaluate_config
  from experiments.evaluation import eval_tasks as tasks
  config = evaluate_config.get_config()          # default tasks: cloze, ppl, instruct, humaneval
  config.task.works_cloze.options.n = 4
  config.task.works_ppl.limit = 1
  config.task.works_ppl.options.chunk_chars = 300
  config.bootstrap_iters = 10
  texts = [c for name in ('works_cloze', 'works_ppl')
           for d in tasks.load(evaluate.task_configs(_only(config, name))[0])[0]
           for c in [d.get('text', '')] + d.get('choices', []) + [d.get('query', '')]]
  tok = tokenizers.CharTokenizer.from_texts(texts)
  assert '#' not in tok.chars
  cfg = ModelConfig(vocab_size=tok.vocab_size, d_model=32, n_layers=1, n_heads=4, max_seq_len=128)

  class Source:   # what stage.read_model_source gives for a run workdir
    tokenizer = tok

    def restore_params(self, mesh, mcfg):
      return model.init(mcfg, jax.random.key(0))

    def record(self):
      return {'init_from': 'fake'}
  monkeypatch.setattr(evaluate.stage, 'read_model_source', lambda c: (Source(), cfg))
  config.init_from = str(tmp_path / 'run')
  results = evaluate.run(config, str(tmp_path / 'eval'))
  assert sorted(k for k in results if not k.startswith('_')) == ['works_cloze', 'works_ppl']
  skipped = results['_meta']['skipped']
  assert "'#'" in skipped['works_instruct'] and 'drop it from --config.tasks' in skipped['works_instruct']
  assert '--config.task.humaneval.generation.max_new_tokens=64' in skipped['humaneval']
  saved = json.loads((tmp_path / 'eval' / 'results.json').read_text())
  assert saved['works_cloze']['acc']['n'] == 4 and saved['_meta']['skipped'] == skipped
  out = capsys.readouterr().out
  assert out.count('warning: task ') == 2 and 'works_cloze: 4 documents' in out


def _only(config, name):
  c = type(config)(config.to_dict())
  c.tasks = (name,)
  return c
