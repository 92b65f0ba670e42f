"""The composed-task testbed (data/composed_tasks.py): answers against hand-written ones,
held-out families kept out of training, disjoint phrasings and words, determinism."""
import numpy as np
import pytest

from data import composed_tasks as ct

POOL = ('moon', 'tide')
# Each word's twelve answers, written out by hand.
HAND = {
    'moon': {'lower-plain': 'moon', 'lower-spell': 'm o o n', 'lower-dash': 'm-o-o-n', 'lower-double': 'moon moon',
             'upper-plain': 'MOON', 'upper-spell': 'M O O N', 'upper-dash': 'M-O-O-N', 'upper-double': 'MOON MOON',
             'title-plain': 'Moon', 'title-spell': 'M o o n', 'title-dash': 'M-o-o-n', 'title-double': 'Moon Moon'},
    'tide': {'lower-plain': 'tide', 'lower-spell': 't i d e', 'lower-dash': 't-i-d-e', 'lower-double': 'tide tide',
             'upper-plain': 'TIDE', 'upper-spell': 'T I D E', 'upper-dash': 'T-I-D-E', 'upper-double': 'TIDE TIDE',
             'title-plain': 'Tide', 'title-spell': 'T i d e', 'title-dash': 'T-i-d-e', 'title-double': 'Tide Tide'},
}


@pytest.mark.parametrize('family', ct.FAMILIES)
def test_each_family_answers_as_written_by_hand(family):
  rng = np.random.default_rng(7)
  seen = set()
  for _ in range(8):
    ex = ct.example(family, rng, POOL)
    seen.add(ex['input'])
    assert ex['output'] == HAND[ex['input']][family]
    # four distinct candidates, the answer among them once, all answers of some family
    assert len(set(ex['options'])) == 4 and ex['options'].count(ex['output']) == 1
    assert set(ex['options']) <= set(HAND[ex['input']].values())
  assert seen == set(POOL)


def test_distractors_swap_one_primitive_each():
  ex = ct.example('upper-spell', np.random.default_rng(0), ('moon',))
  assert sorted(ex['options']) == sorted(['M O O N', 'm o o n', 'MOON', 'moon'])
  ex = ct.example('title-dash', np.random.default_rng(0), ('moon',))
  assert sorted(ex['options']) == sorted(['M-o-o-n', 'm-o-o-n', 'Moon', 'moon'])


def test_held_out_families_never_in_training_mixtures():
  assert len(ct.FAMILIES) == 12 and len(ct.SEEN) == 9 and len(ct.HELD_OUT) == 3
  for k in range(1, len(ct.SEEN) + 1):
    for seed in range(5):
      fams = ct.training_families(k, seed)
      assert len(fams) == k and not set(fams) & set(ct.HELD_OUT)
  exs = ct.training_set(ct.SEEN, 400, seed=0)
  assert len(exs) == 400 and not {e['family'] for e in exs} & set(ct.HELD_OUT)
  with pytest.raises(ct.ComposedTaskError, match='held-out'):
    ct.training_set(['lower-plain', 'upper-spell'], 10, seed=0)


def test_held_out_families_are_composed_of_trained_primitives():
  # every held-out case and layout is trained by some seen family ...
  for f in ct.HELD_OUT:
    c, l = f.split('-')
    assert any(g.startswith(c + '-') for g in ct.SEEN) and any(g.endswith('-' + l) for g in ct.SEEN)
    assert ct.composable(f, ct.SEEN)
  # ... but not by a set that lacks one of them
  assert not ct.composable('upper-spell', ['upper-plain', 'lower-dash'])
  assert ct.composable('upper-spell', ['upper-plain', 'lower-spell'])
  assert not ct.composable('title-dash', ['lower-plain'])


def test_paraphrase_split_disjoint():
  train, test = ct.PHRASINGS['train'], ct.PHRASINGS['test']
  assert set(train) == set(test) == set(ct.CASES) | set(ct.LAYOUTS)
  all_train = {p for ps in train.values() for p in ps}
  all_test = {p for ps in test.values() for p in ps}
  assert not all_train & all_test
  # no test-time wording shows up in any training instruction
  instructions = {e['instruction'].lower() for e in ct.training_set(ct.SEEN, 2000, seed=3)}
  for c in ct.CASES:
    assert not any(test[c][0].strip() in i for i in instructions), c
  for l in ct.LAYOUTS:
    assert not any(test[l][0].split('{c}')[1].strip(' .,').lower() in i for i in instructions), l
  for e in ct.examples(ct.HELD_OUT, 20, 'eval', seed=0, phrasing='test'):
    c, l = e['family'].split('-')
    assert e['instruction'] == test[l][0].format(c=test[c][0])


def test_word_split_disjoint_and_evaluation_uses_eval_words():
  tr, ev = set(ct.words('train')), set(ct.words('eval'))
  assert len(ev) > 500 and len(tr) > 2 * len(ev) and not tr & ev
  for e in ct.examples(ct.HELD_OUT, 20, 'eval', seed=0):
    assert e['input'] in ev


def test_deterministic_given_seed():
  a = ct.examples(ct.FAMILIES, 3, 'train', seed=5)
  assert a == ct.examples(ct.FAMILIES, 3, 'train', seed=5)
  assert a != ct.examples(ct.FAMILIES, 3, 'train', seed=6)
  # a family's examples do not depend on the other families asked for
  assert ct.examples(['title-spell'], 3, 'train', seed=5) == [e for e in a if e['family'] == 'title-spell']
  assert ct.training_families(4, 0) == ct.training_families(4, 0) != ct.training_families(4, 1)


def test_bad_requests_are_one_sentence():
  with pytest.raises(ct.ComposedTaskError, match='Unknown family'):
    ct.examples(['upper-sing'], 1, 'train')
  with pytest.raises(ct.ComposedTaskError, match='in 1..'):
    ct.training_families(0, 0)
  with pytest.raises(ct.ComposedTaskError, match='phrasing'):
    ct.examples(['lower-plain'], 1, 'train', phrasing='other')


def test_diagnose_by_hand():
  ex = {'family': 'upper-spell', 'input': 'moon', 'output': 'M O O N'}
  assert ct.diagnose(ex, ' M O  O N ') == 'exact'
  assert ct.diagnose(ex, 'm o o n') == 'layout_only'     # right separators, lower case
  assert ct.diagnose(ex, 'MOON MOON') == 'case_only'      # capitals, doubled instead
  assert ct.diagnose(ex, 'Moon') == 'other_family'        # title-plain
  assert ct.diagnose(ex, 'M O O') == 'other'
  ex = {'family': 'title-dash', 'input': 'tide', 'output': 'T-i-d-e'}
  assert ct.diagnose(ex, 'T-I-D-E') == 'layout_only' and ct.diagnose(ex, 'Tide') == 'case_only'
