"""Instruction formats: templates, loss masks by hand, truncation counts, packing by hand, and
packed rows giving exactly the loss of one example per row on a real (tiny) model."""
import jax
import numpy as np
import pytest

from data import formats, tokenizers
from data.formats import FormatError

CHARS = 'abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ#:.,<|>\n'
CHAT = ['eos', 'system', 'user', 'assistant', 'end']


@pytest.fixture(scope='module')
def tok():
  return tokenizers.add_special_tokens(tokenizers.CharTokenizer(CHARS), CHAT)


def ids(tok, text):
  return tok.encode(text).tolist()


def test_add_special_tokens_appends_missing_ids_and_round_trips(tok, tmp_path):
  base = tokenizers.CharTokenizer(CHARS)
  n = base.vocab_size
  assert base.special_ids == {} and base.eos_id is None
  assert tok.vocab_size == n + 5 and tok.eos_id == n
  assert tok.special_ids == {'eos': n, 'system': n + 1, 'user': n + 2, 'assistant': n + 3, 'end': n + 4}
  assert tok.encode('<|user|>ab').max() < n                  # text never becomes a special id
  seq = [n + 2, *ids(tok, 'ab'), n + 4]
  assert tok.decode(seq) == 'ab' and tok.decode(seq, keep_special=True) == '<|user|>ab<|end|>'
  # adding again keeps every id; only the new name is appended
  more = tokenizers.add_special_tokens(tok, ['end', 'tool'])
  assert more.special_ids == {**tok.special_ids, 'tool': n + 5} and more.base is tok.base
  assert tokenizers.add_special_tokens(tok, ['eos', 'end']) is tok
  tok.save(str(tmp_path / 'tok.json'))
  back = tokenizers.load(str(tmp_path / 'tok.json'))
  assert back.special_ids == tok.special_ids and back.decode(seq, keep_special=True) == '<|user|>ab<|end|>'
  assert tokenizers.sampling_mask(tok).sum() == tok.vocab_size     # a model can end a response


def test_chat_on_a_trained_subword_vocabulary(tmp_path):
  """Our SentencePiece vocabularies already have eos and <|end|>; only the role markers are added."""
  from data import corpora
  text = open(corpora.path('tinyshakespeare'), encoding='utf-8').read()[:50000]
  sp = tokenizers.build_tokenizer('bpe', [text], 400, str(tmp_path / 'bpe'))
  tok = tokenizers.add_special_tokens(sp, CHAT)
  ids = tok.special_ids
  assert ids['eos'] == tokenizers.SPECIAL_IDS['eos'] and ids['end'] == tokenizers.SPECIAL_IDS['end']
  assert [ids[r] for r in ('system', 'user', 'assistant')] == [400, 401, 402] and tok.vocab_size == 403
  chat = {'messages': [{'role': 'user', 'content': 'Who art thou?'}, {'role': 'assistant', 'content': 'A man.'}]}
  r = formats.render(chat, 'chat', tok)
  assert tok.decode(r.tokens, keep_special=True) == '<|user|>Who art thou?<|end|><|assistant|>A man.<|end|>'
  assert tok.decode(r.tokens[r.loss_mask > 0], keep_special=True) == 'A man.<|end|>'
  tok.save(str(tmp_path / 'chat.json'))
  assert tokenizers.load(str(tmp_path / 'chat.json')).special_ids == ids


def test_masks_by_hand_none_template(tok):
  eos = tok.eos_id
  r = formats.render({'instruction': 'ab', 'input': 'c', 'output': 'de'}, 'none', tok)
  assert r.tokens.tolist() == ids(tok, 'abcde') + [eos]
  assert r.loss_mask.tolist() == [0, 0, 0, 1, 1, 1]                 # the output and its eos
  assert r.tokens.dtype == np.int32 and r.weight == 1.0
  r = formats.render({'instruction': 'ab', 'input': 'c', 'output': 'de'}, 'none', tok, train_on='all')
  assert r.loss_mask.tolist() == [1] * 6
  r = formats.render({'instruction': 'ab', 'output': 'd'}, 'none', tok)   # no input field at all
  assert r.tokens.tolist() == ids(tok, 'abd') + [eos] and r.loss_mask.tolist() == [0, 0, 1, 1]


def test_chat_masks_by_hand(tok):
  s = tok.special_ids
  chat = {'messages': [{'role': 'system', 'content': 'x'}, {'role': 'user', 'content': 'ab'},
                       {'role': 'assistant', 'content': 'cd'}, {'role': 'user', 'content': 'e'},
                       {'role': 'assistant', 'content': 'f'}]}
  r = formats.render(chat, 'chat', tok)
  a, b, c, d, e, f, x = ids(tok, 'abcdefx')
  assert r.tokens.tolist() == [s['system'], x, s['end'], s['user'], a, b, s['end'],
                               s['assistant'], c, d, s['end'], s['user'], e, s['end'],
                               s['assistant'], f, s['end']]
  assert r.loss_mask.tolist() == [0, 0, 0, 0, 0, 0, 0,
                                  0, 1, 1, 1, 0, 0, 0,
                                  0, 1, 1]   # every assistant turn's content and its <|end|>
  # the generation prompt is everything before the last answer (ends with the assistant marker)
  assert formats.prompt_tokens(chat, 'chat', tok).tolist() == r.tokens[:15].tolist()
  assert formats.prompt_tokens({'messages': chat['messages'][:4]}, 'chat', tok).tolist() == \
      r.tokens[:15].tolist()
  # an instruction example in the chat template: one user turn (instruction, blank line, input)
  r = formats.render({'instruction': 'a', 'input': 'b', 'output': 'c'}, 'chat', tok)
  assert r.tokens.tolist() == [s['user'], *ids(tok, 'a\n\nb'), s['end'], s['assistant'], c, s['end']]
  assert r.loss_mask.tolist() == [0] * 7 + [1, 1]


def test_alpaca_prompt_text(tok):
  ex = {'instruction': 'Name a colour.', 'input': 'Sky', 'output': 'blue'}
  r = formats.render(ex, 'alpaca', tok)
  prompt = ('Below is an instruction that describes a task, paired with an input that provides '
            'further context. Write a response that appropriately completes the request.\n\n'
            '### Instruction:\nName a colour.\n\n### Input:\nSky\n\n### Response:\n')
  assert r.tokens.tolist() == ids(tok, prompt + 'blue') + [tok.eos_id]
  assert r.loss_mask.sum() == 5 and r.loss_mask[-5:].all()
  assert formats.prompt_tokens(ex, 'alpaca', tok).tolist() == ids(tok, prompt)
  r = formats.render(dict(ex, input=''), 'alpaca', tok)
  assert tok.decode(r.tokens).startswith('Below is an instruction that describes a task. Write')
  assert '### Input:' not in tok.decode(r.tokens)
  # a single-turn chat renders in a text template; a multi-turn one asks for the chat template
  one = {'messages': [{'role': 'user', 'content': 'Name a colour.'}, {'role': 'assistant', 'content': 'blue'}]}
  assert tok.decode(formats.render(one, 'alpaca', tok).tokens).endswith('### Response:\nblue')
  two = {'messages': one['messages'] * 2}
  with pytest.raises(FormatError, match='chat template'):
    formats.render(two, 'alpaca', tok)


def test_missing_field_fails_at_start_up_in_one_sentence(tok):
  good = {'instruction': 'a', 'output': 'b'}
  for bad, template, field in [({'question': 'a', 'output': 'b'}, 'alpaca', 'instruction'),
                               ({'instruction': 'a'}, 'none', 'output'),
                               ({'instruction': 'a', 'output': 3}, 'chat', 'output')]:
    with pytest.raises(FormatError) as e:
      formats.render_examples([bad] + [good] * 3, template, tok)
    msg = str(e.value)
    assert repr(field) in msg and repr(template) in msg and msg.count('. ') == 0 and '\n' not in msg
  # a custom template is data too: it names its own fields
  qa = formats.Template('qa', 'Q: {question}\nA: ')
  assert formats.render({'question': 'a', 'output': 'b'}, qa, tok).loss_mask.sum() == 2
  with pytest.raises(FormatError, match="'question'"):
    formats.validate(good, qa, tok)
  # a tokenizer without the template's special tokens is caught before any rendering
  for examples in ([good], iter(())):   # even before the first example arrives
    with pytest.raises(FormatError, match='add_special_tokens'):
      formats.render_examples(examples, 'chat', tokenizers.CharTokenizer(CHARS))
  # the first bad example stops a stream before the next one is read
  def stream():
    yield {'instruction': 'a'}
    raise AssertionError('read past the bad first example')
  with pytest.raises(FormatError, match="'output'"):
    formats.render_examples(stream(), 'none', tok)
  with pytest.raises(FormatError, match='Unknown template'):
    formats.render(good, 'vicuna', tok)


def test_truncation_from_the_prompt_left_and_counted_drops(tok):
  ex = {'instruction': 'abcdefgh', 'output': 'xyz'}          # 8 prompt + 3 output + eos = 12
  r = formats.render(ex, 'none', tok, max_len=5)
  assert r.tokens.tolist() == ids(tok, 'hxyz') + [tok.eos_id]  # prompt's end kept, answer whole
  r = formats.render(ex, 'none', tok, max_len=6)
  assert r.tokens.tolist() == ids(tok, 'ghxyz') + [tok.eos_id] and r.loss_mask.tolist() == [0, 0, 1, 1, 1, 1]
  # an answer longer than the row keeps one prompt token and loses its own end
  r = formats.render(ex, 'none', tok, max_len=3)
  assert r.tokens.tolist() == ids(tok, 'hxy') and r.loss_mask.tolist() == [0, 1, 1]
  r = formats.render(ex, 'none', tok, max_len=10, truncate='right')
  assert r.tokens.tolist() == ids(tok, 'abcdefghxy')
  with pytest.raises(formats.Dropped):
    formats.render(ex, 'none', tok, max_len=8, truncate='right')   # no answer left
  exs = [ex, {'instruction': 'ab', 'output': 'c'}, dict(ex, instruction='a' * 20)]
  kept, report = formats.render_examples(exs, 'none', tok, max_len=9, truncate='right')
  assert report == {'examples': 3, 'kept': 2, 'truncated': 1, 'dropped': {'empty_response': 1}}
  assert [len(k) for k in kept] == [9, 4]
  kept, report = formats.render_examples(exs, 'none', tok, max_len=9)
  assert report == {'examples': 3, 'kept': 3, 'truncated': 2, 'dropped': {}}
  assert all(len(k) <= 9 for k in kept)


def test_pack_by_hand(tok):
  ex = [formats.TokenizedExample(np.array(t, np.int32), np.array(m, np.float32), w) for t, m, w in [
      ([1, 2, 3], [0, 1, 1], 1.0), ([4, 5, 6, 7, 8], [0, 0, 1, 1, 1], 1.0), ([9, 10], [0, 1], 0.5)]]
  b = formats.pack(ex, 6)
  # first fit: row 0 = ex0 (3) + ex2 (2, it fits behind ex0), row 1 = ex1 (5)
  np.testing.assert_array_equal(b['inputs'], [[1, 2, 3, 9, 10, 0], [4, 5, 6, 7, 8, 0]])
  np.testing.assert_array_equal(b['targets'], [[2, 3, 0, 10, 0, 0], [5, 6, 7, 8, 0, 0]])
  np.testing.assert_array_equal(b['weights'], [[1, 1, 0, .5, 0, 0], [0, 1, 1, 1, 0, 0]])
  np.testing.assert_array_equal(b['segment_ids'], [[1, 1, 1, 2, 2, 0], [1, 1, 1, 1, 1, 0]])
  np.testing.assert_array_equal(b['positions'], [[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 4, 0]])
  assert {k: v.dtype for k, v in b.items()} == {'inputs': np.int32, 'targets': np.int32,
                                               'weights': np.float32, 'segment_ids': np.int32,
                                               'positions': np.int32}
  p = formats.pad(ex, 6)
  np.testing.assert_array_equal(p['inputs'], [[1, 2, 3, 0, 0, 0], [4, 5, 6, 7, 8, 0], [9, 10, 0, 0, 0, 0]])
  np.testing.assert_array_equal(p['weights'], [[1, 1, 0, 0, 0, 0], [0, 1, 1, 1, 0, 0], [.5, 0, 0, 0, 0, 0]])
  np.testing.assert_array_equal(p['segment_ids'], [[1, 1, 1, 0, 0, 0], [1] * 5 + [0], [1, 1, 0, 0, 0, 0]])
  # a fixed number of rows: what does not fit is counted, or an error
  report = {}
  b = formats.pack(ex, 5, rows=1, report=report)
  assert report == {'overflow': 1, 'packed': 2} and b['inputs'].shape == (1, 5)
  np.testing.assert_array_equal(b['segment_ids'], [[1, 1, 1, 2, 2]])
  with pytest.raises(FormatError, match='do not fit'):
    formats.pack(ex, 5, rows=1)
  with pytest.raises(FormatError, match='max_len=4'):
    formats.pack(ex, 4)
  # a seed packs a fixed permutation: same seed, same rows
  a1, a2 = formats.pack(ex * 5, 8, seed=3), formats.pack(ex * 5, 8, seed=3)
  assert all((a1[k] == a2[k]).all() for k in a1)


def test_pretraining_text_is_learned_whole_with_its_weight(tok):
  r = formats.render({'text': 'abc', 'weight': 0.25}, 'alpaca', tok)
  assert r.tokens.tolist() == ids(tok, 'abc') + [tok.eos_id]
  assert r.loss_mask.tolist() == [1, 1, 1, 1] and r.weight == 0.25
  b = formats.pack([r], 6)
  np.testing.assert_array_equal(b['weights'], [[.25, .25, .25, 0, 0, 0]])
  for w in (-1, float('nan'), '1'):
    with pytest.raises(FormatError, match='weight'):
      formats.render({'text': 'abc', 'weight': w}, 'none', tok)


def test_packed_loss_equals_unpacked_loss(tok):
  """Segment ids and restarting positions make a packed row exactly the separate examples."""
  from lm import model, objectives
  from lm.config import ModelConfig
  rng = np.random.default_rng(0)
  words = ['to', 'be', 'or', 'not', 'that', 'is', 'the', 'question', 'whether', 'tis', 'nobler']
  examples = []
  for i in range(12):
    say = lambda k: ' '.join(rng.choice(words, k))
    ex = {'instruction': say(rng.integers(1, 5)), 'input': say(rng.integers(0, 3)), 'output': say(rng.integers(1, 3))}
    if i % 3 == 0:
      ex = {'messages': [{'role': 'user', 'content': ex['instruction']}, {'role': 'assistant', 'content': ex['output']},
                         {'role': 'user', 'content': ex['input'] or 'a'}, {'role': 'assistant', 'content': 'be'}]}
    examples.append(ex)
  examples.append({'text': 'to be or not', 'weight': 0.5})
  seq_len = 96
  rendered, report = formats.render_examples(examples, 'chat', tok, max_len=seq_len)
  assert report['kept'] == len(examples)
  packed, unpacked = formats.pack(rendered, seq_len), formats.pad(rendered, seq_len)
  assert len(packed['inputs']) < len(rendered) // 2 and (packed['segment_ids'].max(1) >= 3).any()
  assert packed['weights'].sum() == pytest.approx(unpacked['weights'].sum())

  cfg = ModelConfig(vocab_size=tok.vocab_size, d_model=32, n_layers=1, n_heads=2, max_seq_len=seq_len,
                    positions='learned')
  params = model.init(cfg, jax.random.key(0))

  @jax.jit
  def per_token(b):   # weighted next-token losses [B, T], as next_token_loss sums them
    logits = model.forward(params, b['inputs'], cfg, positions=b['positions'], segment_ids=b['segment_ids'])[0]
    return objectives.token_nll(logits, b['targets']) * b['weights']
  # one compiled function for every variant: packed rows padded to the unpacked row count
  grow = lambda b: {k: np.concatenate([v, np.zeros((len(rendered) - len(v), seq_len), v.dtype)])
                    for k, v in b.items()}
  want = np.asarray(per_token(unpacked))

  def matches(b):
    """Every packed example's per-token losses equal those of the same example in its own row."""
    got, p = np.asarray(per_token(grow(b))), packed   # p: where each example lies
    for r, seg in zip(*np.nonzero((p['positions'] == 0) & (p['segment_ids'] > 0))):
      n = int((p['segment_ids'][r] == p['segment_ids'][r, seg]).sum())
      k = next(k for k, ex in enumerate(rendered) if ex.tokens.tolist() == p['inputs'][r, seg:seg + n].tolist())
      if not np.allclose(got[r, seg:seg + n], want[k, :n], rtol=0, atol=1e-5):
        return False
    return True
  assert matches(packed)
  # the existing next-token loss gives the same sum and weight on packed and unpacked rows
  next_token = jax.jit(lambda b: objectives.next_token_loss(params, b, None, cfg)[:2])
  (loss, weight), (loss_u, weight_u) = next_token(grow(packed)), next_token(unpacked)
  assert float(weight) == float(weight_u) and float(loss) == pytest.approx(float(loss_u), rel=1e-6)
  # ...and it is the packing keys that make them equal
  assert not matches(dict(packed, segment_ids=np.where(packed['segment_ids'] > 0, 1, 0).astype(np.int32)))
  assert not matches(dict(packed, positions=np.broadcast_to(np.arange(seq_len, dtype=np.int32), packed['positions'].shape)))
