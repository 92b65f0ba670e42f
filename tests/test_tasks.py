"""Instruction tasks: plays parsed from the shipped works, split by play with a held-out family,
answers checked against the text, hh-rlhf chats and instruction files with counted skips, and
task mixtures (pure in (seed, i), pretraining text at a fixed rate with its own loss weight)."""
import gzip
import json
import re

import numpy as np
import pytest

from data import formats, tasks, tokenizers


@pytest.fixture(scope='module')
def plays():
  return tasks.load_plays()


@pytest.fixture(scope='module')
def train():
  return tasks.works_tasks('train', n_per_family=150, seed=0)


@pytest.fixture(scope='module')
def evaluation():
  return tasks.works_tasks('eval', n_per_family=150, seed=0)


def test_plays_parse_into_speeches(plays):
  assert len(plays) == 37 and 'The Sonnets' not in plays     # every play once, no poems
  hamlet = plays['Hamlet']
  assert hamlet[0] == tasks.Speech('Hamlet', 'Bernardo', ("Who's there?",))   # front matter skipped
  assert hamlet[1].lines == ('Nay, answer me: stand, and unfold yourself.',)
  speakers = {s.speaker for s in hamlet}
  assert {'Hamlet', 'Horatio', 'Ophelia', 'Polonius', 'Ghost'} <= speakers   # 'Ham.' -> Hamlet
  assert plays['Macbeth'][0] == tasks.Speech(
      'Macbeth', 'First Witch', ('When shall we three meet again?', 'In thunder, lightning, or in rain?'))
  dream = plays["A Midsummer Night's Dream"]    # names without the period, indented lines
  assert dream[0].speaker == 'Theseus' and dream[0].lines[0].startswith('Now, fair Hippolyta')
  # a nameless block after a stage direction continues the speech before it
  horatio = next(s for s in hamlet if s.lines[0] == 'A mote it is to trouble the mind\'s eye.')
  assert "I'll cross it, though it blast me.--Stay, illusion!" in horatio.lines
  for speeches in plays.values():
    for s in speeches:
      assert s.lines and all(l and '[' not in l and ']' not in l for l in s.lines)
      assert not re.match(r'(ACT|SCENE|Scene)\b', s.lines[0])
  assert sum(map(len, plays.values())) > 25000


def test_split_by_play_no_overlap(plays, train, evaluation):
  split = tasks.split_plays(list(plays))
  assert not set(split['train']) & set(split['eval']) and set(split['train']) | set(split['eval']) == set(plays)
  assert len(split['eval']) == round(0.2 * len(plays))
  train_plays, eval_plays = {e['play'] for e in train}, {e['play'] for e in evaluation}
  assert train_plays <= set(split['train']) and eval_plays <= set(split['eval'])
  assert len(train_plays) > 20 and len(eval_plays) == len(split['eval'])
  # no line of an evaluation play is a training input or answer (the plays differ, so do the texts)
  text = {k: {l for t in split[k] for s in plays[t] for l in s.lines} for k in split}
  only_eval = text['eval'] - text['train']   # (a few short lines occur in several plays)
  pairs = [(e['input'], e['output']) for e in train if e['family'] in ('continue', 'previous')]
  assert pairs and not {l for p in pairs for l in p} & only_eval
  # the split is fixed: a different sampling seed draws other examples from the same plays
  other = tasks.works_tasks('train', n_per_family=150, seed=1)
  assert {e['play'] for e in other} <= set(split['train']) and other != train
  assert tasks.works_tasks('train', n_per_family=150, seed=0) == train       # deterministic
  assert tasks.split_plays(list(plays), split_seed=1) != split


def test_held_out_family_is_never_trained_on(train, evaluation):
  fam = lambda exs: {e['family'] for e in exs}
  assert fam(train) == set(tasks.FAMILIES) - {'previous'}
  assert fam(evaluation) == set(tasks.FAMILIES)
  cloze_out = tasks.works_tasks('train', n_per_family=5, held_out_family='cloze')
  assert fam(cloze_out) == set(tasks.FAMILIES) - {'cloze'}
  assert fam(tasks.works_tasks('train', n_per_family=5, held_out_family=None)) == set(tasks.FAMILIES)
  some = tasks.works_tasks('train', families=['speaker', 'cloze'], n_per_family=5, held_out_family='cloze')
  assert fam(some) == {'speaker'}
  # a family's examples do not depend on which other families were asked for
  assert [e for e in train if e['family'] == 'speaker'][:5] == [e for e in some if e['family'] == 'speaker']
  with pytest.raises(tasks.TaskError, match='Unknown task families'):
    tasks.works_tasks('train', held_out_family='rhyme')


def test_families_templates_and_answers(plays, train, evaluation):
  for family, templates in tasks.TEMPLATES.items():
    assert len(set(templates)) >= 3
  lines = {t: [s.lines for s in sp] for t, sp in plays.items()}
  for e in train + evaluation:
    assert set(e) == {'instruction', 'input', 'output', 'family', 'play'} and e['output'] and e['input']
    family, play = e['family'], e['play']
    assert any(e['instruction'] == t.format(play=play, speaker=s) for t in tasks.TEMPLATES[family]
               for s in {sp.speaker for sp in plays[play]})
    if family in ('speaker', 'play'):
      text, options = e['input'].split('\n\nOptions:\n')
      options = [o[2:] for o in options.split('\n')]
      assert len(options) == len(set(options)) == 4 and e['output'] in options
      if family == 'speaker':
        assert any(s.speaker == e['output'] and '\n'.join(s.lines[:2]) == text for s in plays[play])
        assert set(options) <= {s.speaker for s in plays[play]} - tasks.CROWDS
      else:
        assert e['output'] == play and any(text in ls for ls in lines[play])
    elif family in ('continue', 'previous'):
      a, b = (e['input'], e['output']) if family == 'continue' else (e['output'], e['input'])
      assert any(ls[i:i + 2] == (a, b) for ls in lines[play] for i in range(len(ls) - 1))
    elif family == 'cloze':
      assert e['input'].count('____') == 1 and ' ' not in e['output']
      assert any(e['input'].replace('____', e['output']) in ls for ls in lines[play])
      assert e['output'].isalpha()
    elif family == 'spelling':
      assert e['output'] == ' '.join(e['input']) and e['input'].isalpha()
    if family != 'continue' and family != 'previous':
      assert len(e['output']) <= 40            # short answers: exact match is meaningful
  per_family = {}
  for e in evaluation:
    per_family[e['family']] = per_family.get(e['family'], 0) + 1
  assert per_family == {f: 150 for f in tasks.FAMILIES}


def test_tasks_render_with_a_template():
  exs = tasks.works_tasks('eval', n_per_family=3)
  tok = tokenizers.add_special_tokens(
      tokenizers.CharTokenizer(''.join(e['instruction'] + e['input'] + e['output'] for e in exs) + '#:\n'), ['eos'])
  kept, report = formats.render_examples(exs, 'alpaca', tok)
  assert report['kept'] == len(exs)
  for e, r in zip(exs, kept):   # the learned tokens are exactly the answer and eos
    assert tok.decode(r.tokens[r.loss_mask > 0]) == e['output']


def write_jsonl_gz(path, rows, raw_lines=()):
  data = ''.join((r if isinstance(r, str) else json.dumps(r)) + '\n' for r in rows) + ''.join(raw_lines)
  path.write_bytes(gzip.compress(data.encode()))
  return str(path)


def test_hh_chat_messages_and_counted_skips(tmp_path):
  good = '\n\nHuman: Hi there\n\nAssistant: Hello!\n\nHuman: Bye\n\nAssistant: Goodbye.'
  rows = [{'chosen': good, 'rejected': 'x'},
          {'rejected': 'no chosen'},                                                   # missing_field
          {'chosen': '\n\nHuman: a\n\nHuman: b\n\nAssistant: c', 'rejected': 'x'},      # not_alternating
          {'chosen': '\n\nHuman: a\n\nAssistant: b\n\nHuman: c', 'rejected': 'x'},      # no_final_answer
          {'chosen': '\n\nHuman: a\n\nAssistant:', 'rejected': 'x'},                    # empty_turn
          {'chosen': 'Hello', 'rejected': 'x'},                                         # not_a_dialogue
          {'chosen': 7, 'rejected': 'x'},                                               # wrong_type
          'not json',                                                                    # bad_json
          '[1, 2]']                                                                      # not_an_object
  path = write_jsonl_gz(tmp_path / 'hh.jsonl.gz', rows)
  examples, report = tasks.hh_chat(path)
  assert examples == [{'messages': [{'role': 'user', 'content': 'Hi there'}, {'role': 'assistant', 'content': 'Hello!'},
                                    {'role': 'user', 'content': 'Bye'}, {'role': 'assistant', 'content': 'Goodbye.'}]}]
  assert report['skipped'] == {'missing_field': 1, 'not_alternating': 1, 'no_final_answer': 1, 'empty_turn': 1,
                               'not_a_dialogue': 1, 'wrong_type': 1, 'bad_json': 1, 'not_an_object': 1}
  assert report['lines'] == 9 and report['records'] == 1
  assert report['first_skipped']['empty_turn'].endswith('hh.jsonl.gz:5')
  # the shipped harmless-base split: every record accounted for, split by the first human turn
  everything, rep = tasks.hh_chat()
  assert rep['lines'] == 2312 == len(everything) + sum(rep['skipped'].values())
  assert rep['skipped'] == {'empty_turn': 4, 'not_alternating': 8}
  tr, _ = tasks.hh_chat(split='train')
  va, _ = tasks.hh_chat(split='validation')
  assert len(tr) + len(va) == len(everything) and 0.05 < len(va) / len(everything) < 0.15
  first = lambda exs: {e['messages'][0]['content'] for e in exs}
  assert not first(tr) & first(va)
  assert all(m['role'] == ('user', 'assistant')[i % 2] for e in everything for i, m in enumerate(e['messages']))


def test_read_instructions_mixed_file_and_counted_skips(tmp_path):
  chat = {'messages': [{'role': 'system', 'content': 's'}, {'role': 'user', 'content': 'u'},
                       {'role': 'assistant', 'content': 'a'}]}
  rows = [{'instruction': 'Add.', 'input': '2 2', 'output': '4'}, chat,
          {'instruction': 'No output'},                                               # missing_field
          {'messages': [{'role': 'user', 'content': 'u'}]},                           # no_final_answer
          {'messages': [{'role': 'robot', 'content': 'u'}, {'role': 'assistant', 'content': 'a'}]},  # bad_role
          {'messages': []},                                                           # missing_field
          {'instruction': 'Say hi.', 'output': 'hi'}]
  path = tmp_path / 'sft.jsonl'
  path.write_text(''.join(json.dumps(r) + '\n' for r in rows) + '\n')             # and a blank_line
  examples, report = tasks.read_instructions(str(path))
  assert examples == [rows[0], chat, {'instruction': 'Say hi.', 'input': '', 'output': 'hi'}]
  assert report['skipped'] == {'missing_field': 2, 'no_final_answer': 1, 'bad_role': 1, 'blank_line': 1}
  tr, _ = tasks.read_instructions(str(path), split='train', val_fraction=0.5)
  va, _ = tasks.read_instructions(str(path), split='validation', val_fraction=0.5)
  assert sorted(map(json.dumps, tr + va)) == sorted(map(json.dumps, examples))


def test_mixture_is_pure_in_seed_and_i_with_capped_sizes():
  data = {'big': [{'instruction': f'b{i}', 'output': 'x'} for i in range(1000)],
          'small': [{'instruction': f's{i}', 'output': 'y'} for i in range(100)]}
  it = tasks.mix(data, seed=3, cap=200)
  np.testing.assert_allclose(it.mixture.rates, [2 / 3, 1 / 3])        # min(n, cap) proportional
  first = [next(it) for _ in range(300)]
  again = tasks.mix(data, seed=3, cap=200)
  again.restore(it.state())
  resumed = [next(again) for _ in range(10)]
  fresh = tasks.mix(data, seed=3, cap=200)
  assert [next(fresh) for _ in range(310)] == first + resumed
  m = it.mixture
  assert [(m.names[s], data[m.names[s]][j]) for s, j in (m.element(i) for i in range(300))] == first
  assert [next(tasks.mix(data, seed=4, cap=200)) for _ in range(20)] != first[:20]
  with pytest.raises(tasks.TaskError, match='not among'):
    tasks.mix(data, cap=200, rates={'web': 0.1})


def test_pretraining_text_at_a_fixed_rate_with_its_own_loss_weight():
  data = {'a': [{'instruction': f'a{i}', 'output': 'x'} for i in range(300)],
          'b': [{'instruction': f'b{i}', 'output': 'y'} for i in range(100)],
          'pretrain': tasks.pretraining_examples(['to be or not to be ' * 40, 'that is the question'],
                                                 chunk_chars=64, weight=0.5)}
  assert len(data['pretrain']) == 13 and data['pretrain'][-1] == {'text': 'that is the question', 'weight': 0.5}
  it = tasks.mix(data, seed=0, rates={'pretrain': 0.1})
  np.testing.assert_allclose(it.mixture.rates, [0.675, 0.225, 0.1])   # the rest: examples-proportional
  drawn = [next(it) for _ in range(4000)]
  share = sum(name == 'pretrain' for name, _ in drawn) / len(drawn)
  assert share == pytest.approx(0.1, abs=0.005)
  # a pretraining chunk is learned whole, its loss weight carried into the packed weights
  tok = tokenizers.add_special_tokens(tokenizers.CharTokenizer(json.dumps(data)), ['eos'])
  exs = [ex for _, ex in drawn[:40]]
  kept, _ = formats.render_examples(exs, 'none', tok, max_len=32)
  batch = formats.pack(kept, 64)
  text_rows = [k for k, ex in enumerate(exs) if 'text' in ex]
  assert text_rows
  for k in text_rows:
    assert kept[k].loss_mask.all() and kept[k].weight == 0.5
  w = batch['weights']
  assert set(np.unique(w).tolist()) == {0.0, 0.5, 1.0}
  assert w.sum() == pytest.approx(sum((ex.loss_mask[1:] * ex.weight).sum() for ex in kept))


def test_cloze_options_copies_one_of_four_listed_words(plays):
  exs = tasks.works_tasks('eval', families=['cloze_options'], n_per_family=30, seed=0)
  assert len(exs) == 30 and {e['family'] for e in exs} == {'cloze_options'}
  for e in exs:
    line, options = e['input'].split('\n\nOptions:\n')
    options = [o[2:] for o in options.split('\n')]
    assert len(options) == len(set(options)) == 4 and e['output'] in options
    assert line.count('____') == 1 and e['output'].isalpha()
    assert any(line.replace('____', e['output']) in s.lines for s in plays[e['play']])
    assert all(abs(len(o) - len(e['output'])) <= 1 for o in options)   # no length give-away
    assert len({o.lower() for o in options}) == 4
  assert tasks.works_tasks('eval', families=['cloze_options'], n_per_family=30, seed=0) == exs


def test_phrase_options_copies_one_of_four_listed_multi_word_phrases(plays):
  exs = tasks.works_tasks('eval', families=['phrase_options'], n_per_family=200, seed=0)
  assert len(exs) == 200 and {e['family'] for e in exs} == {'phrase_options'}
  words = lambda s: re.findall(r"[A-Za-z]+(?:'[A-Za-z]+)*", s.lower())
  has = lambda line, phrase: f' {" ".join(words(phrase))} ' in f' {" ".join(words(line))} '
  for e in exs:
    line, options = e['input'].split('\n\nOptions:\n')
    options = [o[2:] for o in options.split('\n')]
    assert len(options) == len({o.lower() for o in options}) == 4 and e['output'] in options
    assert any(line in s.lines for s in plays[e['play']]) and len(words(line)) >= 6
    # the answer is a run of the line's words, title-cased like 'Romeo and Juliet'; no other
    # option occurs in the line, so exactly one is right
    assert [o for o in options if has(line, o)] == [e['output']]
    assert not set(options) & set(plays)    # the held-out family's titles are not used
    for o in options:
      ws = o.split(' ')
      assert 2 <= len(ws) <= 4 and len(o) <= tasks.MAX_PHRASE_CHARS and ws[0][0].isupper()
      assert all(w[0].isupper() or w in ('a', 'an', 'and', 'of', 'the', 'to', 'in') for w in ws)
  assert any("'" in e['output'] for e in exs)                            # "All's", "o'er"
  assert tasks.works_tasks('eval', families=['phrase_options'], n_per_family=200, seed=0) == exs
  assert not {e['play'] for e in exs} & set(tasks.split_plays(list(plays))['train'])
  # a play whose other lines share the target's phrases: those are never offered as distractors;
  # and whose phrases recur in other cases: each is offered once
  line = 'I am your king, and master of this house'
  play = [tasks.Speech('P', 'A', (line,)), tasks.Speech('P', 'B', ('I am your king', 'Master of this')),
          tasks.Speech('P', 'C', ('Good night sweet prince', 'Hold your tongue now', 'Come away with me')),
          tasks.Speech('P', 'D', ('GOOD NIGHT', 'good night', 'hold YOUR tongue', 'COME AWAY'))]
  made_any = 0
  for seed in range(40):
    made = tasks._phrase_options_task(np.random.default_rng(seed), play[0], {'speeches': {'P': play}})
    if made is not None:
      made_any += 1
      options = [o[2:] for o in made[0].split('\n\nOptions:\n')[1].split('\n')]
      assert [o for o in options if has(line, o)] == [made[1]]
      assert len({o.lower() for o in options}) == 4, options
  assert made_any >= 20
