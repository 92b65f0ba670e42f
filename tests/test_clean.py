"""data/clean.py: each cleaning step on hand-built positives and negatives, then on real text."""
import dataclasses

import pytest

from data import clean
from tests.conftest import TINY_SHAKESPEARE as TINY

PARAGRAPH = (
    'The old lighthouse stood at the edge of the harbour for more than a century, and the '
    'keepers who lived there kept careful records of every storm that passed. Their notebooks '
    'describe ships that arrived late with torn sails, fishermen who waited for the fog to lift, '
    'and winters so cold that the water froze near the pier. Historians now read these pages to '
    'understand how the town grew, which families stayed, and why the trade routes slowly moved '
    'south after the railway reached the valley.')

OTHER = (
    'Modern bread baking begins with a simple mixture of flour, water, salt and yeast, yet small '
    'changes to each ingredient have a large effect on the final loaf. A wetter dough gives an '
    'open crumb with irregular holes, while a longer fermentation develops a deeper flavour and a '
    'crust that crackles as it cools. Many bakers keep a starter alive for years, feeding it every '
    'day so that its wild yeasts stay active and predictable in the kitchen.')

FRENCH = (
    'Le vieux phare se dressait au bord du port depuis plus d\'un siècle, et les gardiens qui y '
    'vivaient tenaient un registre soigneux de chaque tempête. Leurs carnets décrivent des navires '
    'arrivés en retard avec des voiles déchirées et des pêcheurs qui attendaient la levée du '
    'brouillard pendant des heures entières.')

GERMAN = (
    'Der alte Leuchtturm stand seit mehr als einem Jahrhundert am Rand des Hafens, und die '
    'Wärter, die dort lebten, führten sorgfältig Buch über jeden Sturm. Ihre Notizbücher '
    'beschreiben Schiffe, die mit zerrissenen Segeln verspätet ankamen, und Fischer, die '
    'stundenlang darauf warteten, dass sich der Nebel hob.')


def words(n, start=0):
  """n distinct made-up words of ordinary length (no repeats, so no repetition rule fires)."""
  return ' '.join(f'word{chr(97 + (i // 26) % 26)}{chr(97 + i % 26)}'
                  for i in range(start, start + n))


# --- quality -------------------------------------------------------------------------------

def test_normal_paragraph_passes_every_rule():
  assert clean.quality_check(PARAGRAPH) is None
  assert clean.quality_check(OTHER) is None
  kept, report = clean.quality_filter([PARAGRAPH, OTHER])
  assert kept == [PARAGRAPH, OTHER] and report == {'in': 2, 'out': 2, 'removed': {}}


@pytest.mark.parametrize('doc, rule', [
    ('The cat sat with the dog.', 'word_count'),
    ('a b c d e of to the and ' * 10, 'mean_word_length'),
    ('the and ' + ' '.join(['incomprehensibilities'] * 3 + ['internationalization'] * 3) * 10,
     'mean_word_length'),
    (PARAGRAPH + ' #tag' * 12, 'symbol_word_ratio'),
    ('\n'.join(f'- {w} of the list item' for w in words(20).split()), 'bullet_lines'),
    ('\n'.join(f'{w} and the story went on...' if i % 2 else f'{w} and the story ended here.'
               for i, w in enumerate(words(20).split())), 'ellipsis_lines'),
    ('the and ' + ' '.join(f'{i}' for i in range(100, 160)), 'alpha_words'),
    (words(60), 'stop_words'),
    ('\n'.join(['Buy the best shoes with free delivery today'] * 10), 'duplicate_lines'),
])
def test_each_rule_fires_and_is_named(doc, rule):
  assert clean.quality_check(doc) == rule
  kept, report = clean.quality_filter([PARAGRAPH, doc])
  assert kept == [PARAGRAPH] and report['removed'] == {rule: 1}


def test_repetition_rules():
  # Few repeated lines but long ones: the line-count rule passes, the character rule does not.
  long_line = 'the museum opens with a long exhibition about the history of glass making and trade'
  doc = '\n'.join([long_line] * 3 + [f'{w} with the note' for w in words(12).split()])
  assert clean.quality_check(doc) == 'duplicate_line_chars'
  # One bigram everywhere: the top 2-gram rule.
  doc = ' '.join(f'of the {w}' for w in words(40).split())
  assert clean.quality_check(doc) == 'top_2gram_chars'
  # A long passage repeated inside a paragraph (one line): duplicated 5..10-grams.
  doc = PARAGRAPH + ' ' + ' '.join(PARAGRAPH.split()[:40])
  assert clean.quality_check(doc).startswith('duplicate_') and clean.quality_check(doc).endswith(
      'gram_chars')
  # A single repeated 5-gram in an otherwise normal text is far below every threshold.
  assert clean.quality_check(PARAGRAPH + ' The old lighthouse stood at the edge.') is None


def test_thresholds_are_config():
  cfg = clean.QualityConfig(min_words=10)
  doc = 'The cat sat with a dog and then it slept there for hours.'
  assert clean.quality_check(doc) == 'word_count' and clean.quality_check(doc, cfg) is None
  with pytest.raises(dataclasses.FrozenInstanceError):
    cfg.min_words = 3


def test_empty_documents_are_counted():
  kept, report = clean.quality_filter(['', '  \n', PARAGRAPH])
  assert kept == [PARAGRAPH] and report['removed'] == {'empty': 2}


def test_perplexity_filter_drops_worst_fraction():
  docs = [f'doc {i}' for i in range(10)]
  nll = {d: float(i % 5) + i / 100 for i, d in enumerate(docs)}  # docs 4 and 9 are worst
  kept, report = clean.perplexity_filter(docs, lambda ds: [nll[d] for d in ds], 0.2)
  assert kept == [d for d in docs if d not in ('doc 4', 'doc 9')]
  assert report['removed'] == {'empty': 0, 'perplexity': 2} and report['threshold'] == 4.04
  with pytest.raises(ValueError, match='one mean NLL per document'):
    clean.perplexity_filter(docs, lambda ds: [0.0], 0.2)


# --- language --------------------------------------------------------------------------------

def test_language_keeps_english_drops_french_and_german():
  kept, report = clean.filter_language([PARAGRAPH, FRENCH, GERMAN, OTHER, ''])
  assert kept == [PARAGRAPH, OTHER]
  assert report['languages'] == {'en': 2, 'fr': 1, 'de': 1}
  assert report['removed'] == {'empty': 1, 'language': 2}
  kept, _ = clean.filter_language([PARAGRAPH, FRENCH, GERMAN], keep=('fr', 'de'))
  assert kept == [FRENCH, GERMAN]
  kept, report = clean.filter_language([PARAGRAPH], min_confidence=1.01)
  assert kept == [] and report['removed'] == {'low_confidence': 1}
  with pytest.raises(ValueError, match='Unknown language codes'):
    clean.filter_language([PARAGRAPH], keep=('english',))


# --- de-duplication ------------------------------------------------------------------------

def test_exact_dedup_normalises_case_space_and_punctuation():
  variant = PARAGRAPH.upper().replace(',', '').replace(' ', '  \n ')
  kept, report = clean.dedup_exact([PARAGRAPH, OTHER, variant, PARAGRAPH, ''])
  assert kept == [PARAGRAPH, OTHER]
  assert report['removed'] == {'empty': 1, 'duplicate': 2} and report['duplicate_rate'] == 0.5


def test_line_dedup_keeps_first_occurrence_and_counts_emptied():
  docs = ['Header line\nfirst body\n', 'HEADER line!\nsecond body\nsecond body\n',
          'header   line\nfirst body', 'new']
  kept, report = clean.dedup_lines(docs)
  # Repeats inside one document stay; a document with only seen lines is dropped as emptied.
  assert kept == ['Header line\nfirst body\n', 'second body\nsecond body\n', 'new']
  assert report['removed'] == {'emptied': 1}
  assert report['lines_in'] == 8 and report['lines_removed'] == 3


def test_near_dedup_removes_edited_copy_keeps_unrelated():
  original = PARAGRAPH + '\n' + OTHER
  edited = original.split()
  for i in (5, 70, 120):
    edited[i] = 'changed'
  edited = ' '.join(edited)
  a, b = clean._shingles(original, 5), clean._shingles(edited, 5)
  assert 0.7 < len(a & b) / len(a | b) < 0.9  # the true Jaccard of the word 5-gram shingles
  docs = [original, FRENCH, edited]
  kept, report = clean.dedup_near(docs, threshold=0.7)
  assert kept == [original, FRENCH]
  assert report['removed'] == {'near_duplicate': 1} and report['duplicate_rate'] == 1 / 3
  # Deterministic, and a stricter threshold keeps the edited copy.
  assert clean.dedup_near(docs, threshold=0.7) == (kept, report)
  assert clean.dedup_near(docs, threshold=0.95)[0] == docs


# --- decontamination ---------------------------------------------------------------------------

def test_decontamination_13gram_vs_12gram():
  train = PARAGRAPH.split()
  shared13 = ' '.join(train[10:23])
  shared12 = ' '.join(train[10:22])
  evals = {'qa': [f'Question: {shared13.upper()}?'], 'other': ['An unrelated evaluation text.']}
  kept, report = clean.decontaminate([PARAGRAPH, OTHER], evals)
  assert kept == [OTHER]
  assert report['removed'] == {'contaminated': 1} and report['matched'] == {'qa': 1}
  assert report['eval_texts_too_short'] == 1
  kept, report = clean.decontaminate([PARAGRAPH, OTHER], [f'x {shared12} y'])
  assert kept == [PARAGRAPH, OTHER] and report['matched'] == {}


# --- PII -------------------------------------------------------------------------------------

@pytest.mark.parametrize('text, expected', [
    ('Write to jane.doe+news@mail.example.co.uk today.', 'Write to <EMAIL> today.'),
    ('Call +44 20 7946 0958 now.', 'Call <PHONE> now.'),
    ('Call (555) 123-4567 or 555-123-4567.', 'Call <PHONE> or <PHONE>.'),
    ('From 192.168.0.1 and 10.0.0.255.', 'From <IP> and <IP>.'),
    ('Host 2001:db8:85a3::8a2e:370:7334 and fe80::1 here', 'Host <IP> and <IP> here'),
    ('Pay with 4111 1111 1111 1111.', 'Pay with <CREDIT_CARD>.'),
    ('Pay with 4111-1111-1111-1111 or 4111111111111111', 'Pay with <CREDIT_CARD> or <CREDIT_CARD>'),
])
def test_pii_positives(text, expected):
  assert clean.scrub_pii_text(text)[0] == expected


@pytest.mark.parametrize('text', [
    'Card 4111 1111 1111 1112 fails the Luhn check.',
    'On 2023-01-15 and 15.01.2023 in 1999 we released 1.2.3 and v10.0.19045.',
    'Not an address: 1.2.3.4.5, nor 256.1.1.1, nor 12:30:45.',
    'We counted 42 ships, 3.14 miles, 1,000,000 coins and ISBN 978-3-16-148410-0.',
    'C++ uses std::vector and Python slices a[::2].',
])
def test_pii_negatives(text):
  assert clean.scrub_pii_text(text) == (text, {})


def test_scrub_pii_report_counts_per_kind():
  docs = ['mail a@b.org or c@d.net', 'ip 8.8.8.8 card 4111 1111 1111 1111', PARAGRAPH]
  kept, report = clean.scrub_pii(docs)
  assert kept[2] == PARAGRAPH and report['documents_changed'] == 2
  assert report['replaced'] == {'email': 2, 'credit_card': 1, 'ip': 1, 'phone': 0}


# --- pipeline --------------------------------------------------------------------------------

def test_clean_pipeline_runs_steps_in_order():
  contaminated = OTHER.replace('Many bakers', 'Mail baker@example.com. Many bakers')
  docs = [PARAGRAPH, '', FRENCH, PARAGRAPH.lower(), contaminated, 'Far too short.']
  kept, report = clean.clean(docs, {'decontaminate': {'eval_sets': {'bake': [OTHER[:200]]}},
                                    'quality': {'min_words': 40, 'min_stop_words': 0}})
  assert kept == [PARAGRAPH]
  names = [s['step'] for s in report['steps']]
  assert names == ['empty', 'quality', 'language', 'exact_dedup', 'near_dedup', 'decontaminate',
                   'pii']
  by = {s['step']: s for s in report['steps']}
  assert by['empty']['removed'] == {'empty': 1}
  assert by['quality']['removed'] == {'word_count': 1}
  assert by['language']['removed'] == {'language': 1}
  assert by['exact_dedup']['removed'] == {'duplicate': 1}
  assert by['decontaminate']['matched'] == {'bake': 1}
  assert all(s['out'] == t['in'] for s, t in zip(report['steps'], report['steps'][1:]))
  assert report['in'] == 6 and report['out'] == 1


def test_clean_pii_and_line_dedup_options():
  docs = [PARAGRAPH + '\nContact: ops@example.com', OTHER + '\nContact: ops@example.com']
  kept, report = clean.clean(docs, {'quality': False, 'language': False,
                                    'exact_dedup': {'lines': True}})
  assert kept == [PARAGRAPH + '\nContact: <EMAIL>', OTHER + '\n']
  assert report['steps'][-1]['replaced']['email'] == 1


def test_clean_rejects_unknown_options():
  with pytest.raises(ValueError, match="valid options are .*'near_dedup'"):
    clean.clean([PARAGRAPH], {'neardedup': True})
  with pytest.raises(ValueError, match="valid options are .*'threshold'"):
    clean.clean([PARAGRAPH], {'near_dedup': {'treshold': 0.5}})
  with pytest.raises(ValueError, match="valid options are .*'min_words'"):
    clean.clean([PARAGRAPH], {'quality': {'minwords': 5}})
  with pytest.raises(ValueError, match='needs the option'):
    clean.clean([PARAGRAPH], {'decontaminate': True})


def test_clean_accepts_config_dict():
  import ml_collections
  cfg = ml_collections.ConfigDict({'language': {'keep': ('en',)}, 'near_dedup': False,
                                   'decontaminate': {'eval_sets': {'qa': [OTHER[:300]]}}})
  kept, report = clean.clean([PARAGRAPH, GERMAN, OTHER], cfg)
  assert kept == [PARAGRAPH] and 'near_dedup' not in [s['step'] for s in report['steps']]
  assert report['steps'][-2]['matched'] == {'qa': 1}


def test_clean_perplexity_step_takes_a_score_fn():
  nll = {PARAGRAPH: 2.0, OTHER: 5.0}
  kept, report = clean.clean([PARAGRAPH, OTHER], {
      'perplexity': {'score_fn': lambda ds: [nll[d] for d in ds], 'drop_fraction': 0.5}})
  assert kept == [PARAGRAPH]
  step = [s for s in report['steps'] if s['step'] == 'perplexity'][0]
  assert step['removed']['perplexity'] == 1 and step['mean_nll_dropped'] == 5.0


def test_near_dedup_rejects_thresholds_lsh_cannot_band():
  with pytest.raises(ValueError, match='strictly between 0 and 1'):
    clean.dedup_near([PARAGRAPH], threshold=1.0)
  with pytest.raises(ValueError, match='lower the threshold or raise num_perm'):
    clean.dedup_near([PARAGRAPH], threshold=0.99)


# --- real text -------------------------------------------------------------------------------

@pytest.fixture(scope='module')
def shakespeare_chunks():
  text = TINY.read_text(encoding='utf-8')
  return [text[i:i + 2000] for i in range(0, len(text), 2000)]


def test_quality_keeps_most_of_shakespeare(shakespeare_chunks):
  kept, report = clean.quality_filter(shakespeare_chunks)
  assert len(kept) >= 0.9 * len(shakespeare_chunks), report
  kept, report = clean.scrub_pii(shakespeare_chunks)
  assert kept == shakespeare_chunks and report['documents_changed'] == 0
  kept, report = clean.filter_language(shakespeare_chunks)
  assert len(kept) >= 0.95 * len(shakespeare_chunks), report
  kept, report = clean.dedup_near(shakespeare_chunks)
  assert kept == shakespeare_chunks, report


def test_exact_dedup_on_shakespeare_removes_exactly_the_copies(shakespeare_chunks):
  copies = shakespeare_chunks[10:60:5]
  kept, report = clean.dedup_exact(shakespeare_chunks + copies)
  assert kept == shakespeare_chunks
  assert report['removed'] == {'duplicate': len(copies)}
