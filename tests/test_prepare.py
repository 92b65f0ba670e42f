"""The prepare experiment end to end on real text: sources -> cleaning -> tokenizer -> report,
then pretraining on its output with two config values, and the perplexity filter with a
trained model of ours."""
import json
import os

import numpy as np
import pytest

from data import tokenizers
from experiments import prepare, pretrain
from experiments.stages import stage
from experiments.configs import prepare_works
from lm.config import ConfigError
from tests.test_pretrain import tiny_config

FRENCH = ('Le petit prince regardait les étoiles depuis sa planète et pensait à sa rose qui '
          'était restée seule dans le jardin. ') * 3


@pytest.fixture
def sources_dir(tiny_corpus, tmp_path):
  """A text corpus plus JSON-lines documents seeded with every kind of problem."""
  text = open(tiny_corpus, encoding='utf-8').read()
  paras = [p for p in text.split('\n\n') if len(p.split()) > 60]
  eval_passage = paras[3]
  dup, edited = paras[5], paras[5].replace('the', 'thy', 1) + ' Amen.'
  lines = [json.dumps({'text': dup}), json.dumps({'text': dup}),        # exact duplicate
           json.dumps({'text': edited}),                                # near duplicate of it
           json.dumps({'text': paras[7] + ' Write to me at juliet.capulet@example.com today.'}),
           json.dumps({'text': FRENCH}),
           '{"text": "no closing brace"', json.dumps({'body': 'wrong field'}), json.dumps({'text': ''})]
  jsonl = tmp_path / 'docs.jsonl'
  jsonl.write_text('\n'.join(lines) + '\n', encoding='utf-8')
  evals = tmp_path / 'eval.txt'
  evals.write_text('x' * 10 + '\n\n' + eval_passage, encoding='utf-8')   # all of it "validation"
  return {'text': tiny_corpus, 'jsonl': str(jsonl), 'eval': str(evals), 'eval_passage': eval_passage}


def small_config(src):
  c = prepare_works.get_config()
  c.sources.works.update(path=src['text'], doc_chars=1500)
  c.sources.hh_rlhf.update(path=src['jsonl'], field='text')
  c.decontaminate_against.tinyshakespeare_val.update(path=src['eval'], val_fraction=0.99)
  c.clean.quality.min_words = 20
  c.tokenizer.vocab_size = 400
  return c


def test_prepare_cleans_reports_and_feeds_pretraining(sources_dir, tmp_path):
  wd = str(tmp_path / 'prep')
  report = prepare.run(small_config(sources_dir), wd)
  steps = {s['step']: s for s in report['clean']['steps']}
  # every step starts from what the previous one kept
  chain = report['clean']['steps']
  assert all(a['out'] == b['in'] for a, b in zip(chain, chain[1:]))
  assert report['documents_out'] == chain[-1]['out'] < report['documents_in']
  assert report['sources']['hh_rlhf']['skipped'] == {'bad_json': 1, 'missing_field': 1, 'empty': 1}
  assert steps['exact_dedup']['removed']['duplicate'] == 1
  assert steps['near_dedup']['removed']['near_duplicate'] == 1
  assert steps['decontaminate']['removed']['contaminated'] >= 1
  assert steps['pii']['replaced']['email'] == 1
  assert report['duplicate_rate'] == 2 / steps['exact_dedup']['in']   # one exact + one near copy
  docs = [json.loads(l)['text'] for l in open(os.path.join(wd, 'documents.jsonl'), encoding='utf-8')]
  assert len(docs) == report['documents_out']
  assert not any(sources_dir['eval_passage'] in d for d in docs)
  assert any('<EMAIL>' in d for d in docs) and not any('juliet.capulet@' in d for d in docs)
  assert not any(d.startswith('Le petit prince') for d in docs)   # quality or language removed it
  tok = tokenizers.load(os.path.join(wd, 'tokenizer_ref.json'))
  assert tok.decode(tok.encode(docs[0])) == docs[0]
  assert report['tokens'] == sum(len(tok.encode(d)) for d in docs)
  assert open(os.path.join(wd, 'report.txt')).read().count('\n') >= len(chain) + 3
  # Pretraining reads the prepared documents and vocabulary with two values.
  c = tiny_config(os.path.join(wd, 'documents.jsonl'), steps=4, eval_every=4, checkpoint_every=4,
                  samples=0)
  c.data.tokenizer = os.path.join(wd, 'tokenizer_ref.json')
  c.data.val_fraction = 0.2
  pretrain.run(c, str(tmp_path / 'pt'))
  resolved = json.load(open(tmp_path / 'pt' / 'config.json'))['resolved']
  assert resolved['vocab_size'] == tok.vocab_size
  rows = [json.loads(l) for l in open(tmp_path / 'pt' / 'metrics.jsonl')]
  assert np.isfinite(rows[-1]['val_loss'])


def test_perplexity_filter_uses_a_trained_model(sources_dir, tiny_corpus, tmp_path):
  lm_dir = str(tmp_path / 'lm')
  pretrain.run(tiny_config(tiny_corpus, steps=30, eval_every=0, checkpoint_every=30, samples=0), lm_dir)
  run = stage.load_run(lm_dir)
  assert run.step == 30
  score = prepare.nll_scorer(run, batch_size=8)
  text = open(tiny_corpus, encoding='utf-8').read()
  shuffled = ''.join(np.random.default_rng(0).permutation(list(text[:400])))
  nll = score([text[1000:1400], shuffled, 'é€ unseen characters'])
  assert nll[0] < nll[1]                 # Shakespeare beats its own letters shuffled
  assert np.isnan(nll[2])                # the char vocabulary cannot encode it: ranked worst
  c = small_config(sources_dir)
  c.clean.perplexity.update(enabled=True, workdir=lm_dir, drop_fraction=0.25)
  report = prepare.run(c, str(tmp_path / 'prep'))
  step = [s for s in report['clean']['steps'] if s['step'] == 'perplexity'][0]
  assert step['removed']['perplexity'] == round(0.25 * step['in'])
  assert step['mean_nll_dropped'] > step['mean_nll_kept']


def test_prepare_bad_config_fails_before_work(sources_dir, tmp_path):
  c = small_config(sources_dir)
  c.clean.perplexity.enabled = True
  with pytest.raises(ConfigError, match='perplexity.workdir is empty'):
    prepare.run(c, str(tmp_path / 'a'))
  c = small_config(sources_dir)
  c.sources.works.enabled = c.sources.hh_rlhf.enabled = False
  with pytest.raises(ConfigError, match='disabled'):
    prepare.run(c, str(tmp_path / 'b'))
  with pytest.raises(ConfigError, match='no config.json'):
    stage.load_run(str(tmp_path))
