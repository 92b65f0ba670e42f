"""The data-preparation experiment: sources -> cleaning -> tokenizer -> tokens, with a report.

python -m experiments.run --config=experiments/configs/prepare_works.py --workdir=runs/prepare

Steps (each with a progress bar), all written to the workdir:
  1. read every enabled source (text files, JSON-lines documents) as documents; a text file is
     cut into documents of about `doc_chars` at blank lines; bad JSON records are counted
     skips (data/sources.py);
  2. data/clean.py's pipeline with its per-step report. The perplexity step scores documents
     with a trained run of ours (`clean.perplexity.workdir`) and drops the worst fraction;
  3. a tokenizer trained on the cleaned documents (tokenizer_ref.json, + tokenizer.model for
     SentencePiece);
  4. every cleaned document tokenized (token count, bytes per token, MB/s);
  5. documents.jsonl (the cleaned documents) and report.json / report.txt: documents in/out
     per step, what each removed, duplicate rate, tokens, bytes per token.

Pretraining then reads the result with two values:
  --config.data.path=WORKDIR/documents.jsonl --config.data.tokenizer=WORKDIR/tokenizer_ref.json
"""
from __future__ import annotations

import json
import os
import re
import time

import jax
import numpy as np
from ml_collections import ConfigDict
from tqdm import tqdm

from data import clean, sources, tokenizers
from experiments.stages import stage, trainer
from lm import model, objectives
from lm.config import ConfigError

SOURCE_KINDS = ('text', 'documents')


def split_paragraphs(text: str, target_chars: int) -> list[str]:
  """A long text as documents of about target_chars, cut at blank lines (scenes, letters)."""
  if target_chars <= 0:
    return [text]
  out, cur, size = [], [], 0
  for para in re.split(r'\n\s*\n', text):
    if size and size + len(para) > target_chars:
      out.append('\n\n'.join(cur))
      cur, size = [], 0
    cur.append(para)
    size += len(para) + 2
  if cur:
    out.append('\n\n'.join(cur))
  return out


def read_source(src: ConfigDict, data_dir: str) -> tuple[list[str], dict]:
  """(documents, report) of one configured source."""
  if src.kind not in SOURCE_KINDS:
    raise ConfigError(f'sources.*.kind={src.kind!r} is not supported; choose one of {SOURCE_KINDS}.')
  if src.kind == 'text':
    files = sources.prepare_text(src.path, data_dir, val_fraction=0.0)['train']
    docs = [d for f in files for d in split_paragraphs(f, src.doc_chars)]
    return docs, {'files': len(files), 'skipped': {}}
  prepared = sources.prepare_documents(src.path, data_dir, val_fraction=0.0, field=src.field)
  return prepared.documents('train'), {'skipped': prepared.skipped}


def eval_sets(config: ConfigDict, data_dir: str) -> dict[str, list[str]]:
  """Evaluation texts to decontaminate against: name -> texts (a corpus's validation part)."""
  out = {}
  for name, e in config.decontaminate_against.items():
    splits = sources.prepare_text(e.path, os.path.join(data_dir, 'eval'), e.val_fraction)
    out[name] = splits['validation'] if e.val_fraction else splits['train']
  return out


def nll_scorer(run: stage.LoadedRun, batch_size: int):
  """score_fn(docs) -> mean next-token NLL per document under a trained model of ours.

  Each document is cut into context-length windows (no window crosses documents). A document
  the model's tokenizer cannot encode, or with fewer than two tokens, scores NaN, which the
  perplexity filter ranks worst.
  """
  cfg, tok = run.cfg, run.tokenizer
  seq_len = min(run.config.data.seq_len or cfg.max_seq_len, cfg.max_seq_len)

  @jax.jit
  def window_nll(params, inputs, targets, weights):
    logits, _ = model.forward(params, inputs, cfg)
    return (objectives.token_nll(logits, targets) * weights).sum(-1)

  def score(docs: list[str]) -> np.ndarray:
    rows, owner = [], []
    for i, d in enumerate(docs):
      try:
        ids = np.asarray(tok.encode(d), np.int32)
      except tokenizers.TokenizerError:
        continue
      for s in range(0, len(ids) - 1, seq_len):
        rows.append(ids[s:s + seq_len + 1])
        owner.append(i)
    sums, counts = np.zeros(len(docs)), np.zeros(len(docs))
    for b in tqdm(range(0, len(rows), batch_size), desc='perplexity', unit='batch', leave=False):
      chunk = rows[b:b + batch_size]
      toks = np.zeros((batch_size, seq_len + 1), np.int32)
      w = np.zeros((batch_size, seq_len), np.float32)
      for r, ids in enumerate(chunk):
        toks[r, :len(ids)] = ids
        w[r, :len(ids) - 1] = 1
      nll = np.asarray(window_nll(run.params, toks[:, :-1], toks[:, 1:], w))[:len(chunk)]
      np.add.at(sums, owner[b:b + len(chunk)], nll)
      np.add.at(counts, owner[b:b + len(chunk)], w[:len(chunk)].sum(-1))
    with np.errstate(invalid='ignore', divide='ignore'):
      return np.where(counts > 0, sums / counts, np.nan)
  return score


def clean_options(config: ConfigDict, data_dir: str) -> dict:
  """config.clean (each step: enabled + its options) -> the mapping data.clean.clean takes."""
  out = {}
  for name, step in config.clean.items():
    opts = step.to_dict()
    if not opts.pop('enabled'):
      out[name] = False
      continue
    if name == 'decontaminate':
      opts['eval_sets'] = eval_sets(config, data_dir)
      if not opts['eval_sets']:
        raise ConfigError('clean.decontaminate is enabled but config.decontaminate_against names no '
                          'evaluation set; add one or disable the step.')
    if name == 'perplexity':
      if not opts.get('workdir'):
        raise ConfigError('clean.perplexity is enabled but clean.perplexity.workdir is empty; point '
                          'it at a pretraining workdir whose model scores the documents.')
      run = stage.load_run(opts.pop('workdir'))
      opts['score_fn'] = nll_scorer(run, opts.pop('batch_size'))
    out[name] = opts
  return out


def run(config: ConfigDict, workdir: str):
  os.makedirs(workdir, exist_ok=True)
  data_dir = config.data_dir or os.path.join(workdir, 'data')
  t0 = time.time()
  # 1. Sources. Everything that can be wrong with the config fails before the slow steps.
  enabled = {n: s for n, s in config.sources.items() if s.enabled}
  if not enabled:
    raise ConfigError('Every source in config.sources is disabled; enable at least one.')
  options = clean_options(config, data_dir)
  docs, source_report = [], {}
  for name, src in tqdm(enabled.items(), desc='read sources', unit='source'):
    d, rep = trainer.process_zero_first(lambda src=src: read_source(src, data_dir), f'prepare {name}')
    source_report[name] = {**rep, 'documents': len(d), 'bytes': sum(len(x.encode()) for x in d)}
    docs += d
  # 2. Cleaning.
  t1 = time.time()
  steps = [n for n in clean.STEPS if options.get(n, False) is not False]
  print(f'cleaning {len(docs):,} documents: {", ".join(steps)}')
  cleaned, clean_report = clean.clean(docs, options, progress=True)
  clean_s = time.time() - t1
  if not cleaned:
    raise ConfigError('Cleaning removed every document; loosen config.clean (see report.json).')
  # 3. Tokenizer, trained on what survived cleaning.
  t = config.tokenizer
  t2 = time.time()
  tok = tokenizers.build_tokenizer(t.kind, cleaned, t.vocab_size, os.path.join(workdir, 'tokenizer'))
  tok.save(os.path.join(workdir, tokenizers.RUN_FILE))
  train_s = time.time() - t2
  # 4. Tokens.
  t3 = time.time()
  n_tokens = sum(len(tok.encode(d)) for d in tqdm(cleaned, desc='tokenize', unit='doc', mininterval=1.0))
  encode_s = time.time() - t3
  # 5. Outputs.
  with open(os.path.join(workdir, 'documents.jsonl'), 'w', encoding='utf-8') as f:
    for d in cleaned:
      f.write(json.dumps({'text': d}, ensure_ascii=False) + '\n')
  n_bytes = sum(len(d.encode()) for d in cleaned)
  report = {
      'sources': source_report, 'documents_in': len(docs), 'documents_out': len(cleaned),
      'clean': clean_report, 'clean_s': round(clean_s, 1),
      'duplicate_rate': duplicate_rate(clean_report),
      'tokenizer': {'kind': t.kind, 'vocab_size': tok.vocab_size, 'train_s': round(train_s, 1)},
      'tokens': n_tokens, 'bytes': n_bytes, 'bytes_per_token': n_bytes / max(n_tokens, 1),
      'tokenize_mb_per_s': n_bytes / 1e6 / max(encode_s, 1e-9), 'seconds': round(time.time() - t0, 1),
  }
  table = format_table(report)
  print(table)
  if jax.process_index() == 0:
    with open(os.path.join(workdir, 'report.json'), 'w') as f:
      json.dump(report, f, indent=2, default=_jsonable)
    with open(os.path.join(workdir, 'report.txt'), 'w') as f:
      f.write(table + '\n')
  trainer.write_config(config, workdir)
  return report


def _jsonable(x):
  return float(x) if isinstance(x, np.floating) else str(x)


def duplicate_rate(clean_report: dict) -> float:
  """Fraction of the documents reaching de-duplication that were exact or near duplicates."""
  by_step = {s['step']: s for s in clean_report['steps']}
  first = by_step.get('exact_dedup') or by_step.get('near_dedup')
  if first is None:
    return 0.0
  dups = sum(by_step[s]['removed'].get(k, 0) for s, k in
             (('exact_dedup', 'duplicate'), ('near_dedup', 'near_duplicate')) if s in by_step)
  return dups / max(first['in'], 1)


def format_table(r: dict) -> str:
  lines = [f"{'step':<16}{'docs in':>10}{'docs out':>10}{'removed':>10}  why", '-' * 78]
  for s in r['clean']['steps']:
    counts = sorted(((v, k) for k, v in s['removed'].items() if v), reverse=True)
    why = ', '.join(f'{k} {v:,}' for v, k in counts[:4]) + (f' (+{len(counts) - 4} rules)' if len(counts) > 4 else '')
    if s['step'] == 'pii':
      why = 'replaced ' + ', '.join(f'{k} {v:,}' for k, v in s['replaced'].items()) + \
            f" in {s['documents_changed']:,} documents"
    lines.append(f"{s['step']:<16}{s['in']:>10,}{s['out']:>10,}{s['in'] - s['out']:>10,}  {why}")
  lines += ['-' * 78,
            f"documents {r['documents_in']:,} -> {r['documents_out']:,}; duplicate rate "
            f"{100 * r['duplicate_rate']:.2f}%; {r['tokens']:,} tokens ({r['tokenizer']['kind']}, vocab "
            f"{r['tokenizer']['vocab_size']:,}); {r['bytes_per_token']:.2f} bytes/token; "
            f"tokenized at {r['tokenize_mb_per_s']:.1f} MB/s"]
  return '\n'.join(lines)
