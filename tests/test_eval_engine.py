"""The harness's generate_until through lm/engine.py (engine=True) against the static path
(lm.decode.generate, engine=False) and a naive greedy loop of plain forward passes: the same
texts, stop strings and max_new_tokens honoured, rows ended at their stop string, a few-shot
head prefilled once, sampled outputs independent of the batch size."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from data import tokenizers
from experiments.evaluation import eval_model as em
from lm import decode, model, sharding
from lm.config import ModelConfig

TEXT = ('First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n\n'
        'First Citizen:\nYou are all resolved rather to die than to famish?\n')
TOK = tokenizers.CharTokenizer.from_texts([TEXT + "?!.,;:'-0123456789 ABCDEFGHIJKLMNOPQRSTUVWXYZ"
                                           'abcdefghijklmnopqrstuvwxyz\n'])
# init_std 0.3: peaked, varied next-token distributions (no near-ties between paths)
CFG = ModelConfig(vocab_size=TOK.vocab_size, d_model=32, n_layers=2, n_heads=4, max_seq_len=96,
                  init_std=0.3)
HEAD = 'Q: Before we proceed?\nA: Speak.\n\n'            # a few-shot head every prompt shares
TAILS = ['Q: all', 'R', 'Speak, speak.', 'You are all resolved', 'famish', 'hear me speak',
         'x', 'Z: die', '12 - 3', 'Citizen', 'proceed any', 'mm']   # 12 > the engine's LRU of 8
MAX_NEW = [6, 20, 30, 9, 25, 30, 14, 30, 3, 22, 30, 17]

_FORWARD = jax.jit(model.forward, static_argnums=2)


@pytest.fixture(scope='module')
def params():
  return model.init(CFG, jax.random.key(2))


def naive_greedy(params, ids, n):
  """n greedy tokens, each from one plain forward pass over everything so far (no cache)."""
  ids = list(ids)
  for _ in range(n):
    padded = np.zeros(CFG.max_seq_len, np.int32)
    padded[:len(ids)] = ids
    logits, _ = _FORWARD(params, jnp.asarray(padded)[None], CFG)
    ids.append(int(np.argmax(np.asarray(logits[0, len(ids) - 1, :CFG.vocab_size]))))
  return TOK.decode(ids[-n:])


def requests(params, count=len(TAILS)):
  """Mixed prompt lengths and budgets; stops drawn from each greedy continuation at varied
  places (multi-character, one character: a stop id in the loop, and one never produced).
  Returns (requests, expected texts, tokens each row needs up to its stop or budget)."""
  reqs, want, need = [], [], []
  for i, (tail, n) in enumerate(zip(TAILS[:count], MAX_NEW)):
    prompt = HEAD + tail
    free = naive_greedy(params, TOK.encode(prompt), n)
    k = (3 * i) % max(n - 2, 1)
    until = [[], [free[k:k + 2]], [free[k], 'never!'], ['never!']][i % 4] if n > 3 else []
    cut, _ = decode.truncate_at_stop([free], until)
    reqs.append((prompt, {'max_new_tokens': n, 'until': until}))
    want.append(cut[0])
    ends = [j for j in range(1, n + 1) if any(u in free[:j] for u in until)]
    need.append(ends[0] if ends else n)
  return reqs, want, need


def test_engine_texts_equal_static_and_naive_and_rows_end_at_their_stop(params):
  reqs, want, need = requests(params)
  assert any(len(w) < n for w, (_, kw) in zip(want, reqs) for n in [kw['max_new_tokens']])
  assert any(len(w) == kw['max_new_tokens'] for w, (_, kw) in zip(want, reqs))   # both rules
  static = em.LanguageModel(params, CFG, TOK, batch_size=4, engine=False)
  eng = em.LanguageModel(params, CFG, TOK, batch_size=4, engine=True)
  got_static, got_engine = static.generate_until(reqs), eng.generate_until(reqs)
  assert got_static == want
  assert got_engine == want
  # The engine ended each row at its stop string (the static path runs multi-character stops
  # to max_new_tokens and cuts the text afterwards).
  assert eng.stats['generated_tokens'] == sum(need)
  assert static.stats['generated_tokens'] > sum(need)


def test_few_shot_head_prefilled_once(params):
  reqs, _, _ = requests(params)
  lm = em.LanguageModel(params, CFG, TOK, batch_size=4, engine=True)
  lm.generate_until(reqs)
  assert lm.stats['shared_prefix_tokens'] == len(HEAD) >= em.MIN_SHARED_PREFIX
  assert lm.stats['shared_prefix_requests'] == len(TAILS)
  s = lm._engine.stats
  assert s['prefill_tokens'] == len(HEAD) + sum(map(len, TAILS))   # the head once, then tails
  # Without a long enough common head nothing is shared (each prompt prefilled whole).
  lm = em.LanguageModel(params, CFG, TOK, batch_size=4, engine=True)
  lm.generate_until([(t, {'max_new_tokens': 4}) for t in TAILS])
  assert lm.stats['shared_prefix_tokens'] == 0
  assert lm._engine.stats['prefill_tokens'] == sum(map(len, TAILS))


def test_shared_head_saves_the_most_prefill():
  a = lambda *x: np.array(x)
  L, m = em.shared_head([a(1, 2, 3, 4), a(1, 2, 5), a(1, 2, 3)])
  assert (L, m.tolist()) == (2, [True, True, True])        # 2 * 2 tokens beat 1 * 3
  # first_n few-shot: documents 0 and 1 leave themselves out, so their heads differ from the
  # rest's; the head the other four share is chosen, and only they use it.
  head, other = [9, 8, 7, 6, 5], [9, 4, 7, 6, 5]
  seqs = [a(*other, 1), a(*other, 2)] + [a(*head, q) for q in (3, 4, 1, 2)]
  L, m = em.shared_head(seqs, minimum=3)
  assert (L, m.tolist()) == (5, [False, False, True, True, True, True])
  # a longer head shared by fewer wins when it saves more: 2 * 10 tokens beat 3 * 2
  seqs = [a(1, 2, 3), a(*range(1, 11), 4), a(*range(1, 11), 5), a(*range(1, 11), 6)]
  L, m = em.shared_head(seqs)
  assert (L, m.tolist()) == (10, [False, True, True, True])
  assert em.shared_head([a(7), a(1, 2)])[0] == 0
  assert em.shared_head([a(1, 2, 3), a(1, 2, 4)], minimum=3)[0] == 0


def test_sampled_outputs_do_not_depend_on_the_batch_size(params):
  # one group of settings: the static path would batch these together (and draw per batch)
  reqs = [(HEAD + t, {'max_new_tokens': 20, 'temperature': 1.0, 'until': ['\n']}) for t in TAILS[:6]]
  outs = [em.LanguageModel(params, CFG, TOK, batch_size=b, engine=True, seed=5).generate_until(reqs)
          for b in (2, 3)]
  assert outs[0] == outs[1]
  other = em.LanguageModel(params, CFG, TOK, batch_size=2, engine=True, seed=6).generate_until(reqs)
  assert other != outs[0]                                    # the harness seed matters


def test_repetition_penalty_takes_the_static_path(params):
  reqs = [(HEAD + t, {'max_new_tokens': 8, 'repetition_penalty': 1.3}) for t in TAILS[:3]]
  a = em.LanguageModel(params, CFG, TOK, batch_size=2, engine=True).generate_until(reqs)
  b = em.LanguageModel(params, CFG, TOK, batch_size=2, engine=False).generate_until(reqs)
  assert a == b


def test_evaluate_passes_the_switch():
  from experiments import evaluate
  from experiments.configs import evaluate as evaluate_config
  config = evaluate_config.get_config()

  class Source:
    tokenizer = TOK

    def restore_params(self, mesh, mcfg):
      return model.init(mcfg, jax.random.key(0))

    def record(self):
      return {}

  for on in (True, False):
    config.engine = on
    assert evaluate._model(config, Source(), CFG)[0].use_engine is on


def test_engine_on_a_mesh_equals_one_device(params):
  """Params placed on 8 devices (data, fsdp, tensor = 2): the engine gives the same texts."""
  reqs, want, _ = requests(params, 6)
  mesh = sharding.make_mesh({'data': 2, 'fsdp': 2, 'tensor': 2})
  placed = jax.device_put(params, sharding.tree_shardings(model.logical_axes(CFG), params, mesh))
  lm = em.LanguageModel(placed, CFG, TOK, mesh, batch_size=4, engine=True)
  assert lm.generate_until(reqs) == want
