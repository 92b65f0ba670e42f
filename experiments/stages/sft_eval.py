"""SFT evaluation: validation loss on response tokens, and exact-match accuracy of greedy
answers per task family on held-out plays (seen families and the held-out one), before and
after tuning. Written to eval.json and printed as a table."""
from __future__ import annotations

import json
import re

import jax
import jax.numpy as jnp
import numpy as np
from ml_collections import ConfigDict

from data import formats, pipeline
from experiments.stages import trainer
from lm import decode, model, paths, peft, train as train_lib


def normalise(text: str) -> str:
  return re.sub(r'\s+', ' ', text).strip()


def options_of(example: dict) -> list[str]:
  """The listed options of a multiple-choice instruction ('Options:' then '- X' lines)."""
  text = example.get('input', '')
  if 'Options:' not in text:
    return []
  return [l[2:].strip() for l in text.split('Options:')[-1].splitlines() if l.startswith('- ')]


class Evaluator:
  def __init__(self, config: ConfigDict, cfg, tok, template, data, mesh, loss_fn, param_sh,
               batch_sh, frozen_sh, frozen):
    self.config, self.cfg, self.tok, self.template = config, cfg, tok, template
    self.data, self.mesh, self.frozen = data, mesh, frozen
    self.pcfg = peft.PeftConfig.from_dict(config.peft.to_dict())
    self.step = train_lib.make_eval_step(loss_fn, mesh, param_sh, batch_sh, frozen_sh)
    b = config.train.eval_batch_size or config.train.batch_size
    self.val = [self._global(rows, b) for rows, _ in pipeline.padded_batches(data.val_rows, b)]

  def _global(self, rows, b):
    lo, hi = pipeline.local_rows(next(iter(self._sh(b).values())), b, self.data.seq_len)
    return pipeline.to_global({k: v[lo:hi] for k, v in rows.items()}, self._sh(b), b)

  def _sh(self, b):
    spec = {k: jax.ShapeDtypeStruct((b, self.data.seq_len), v.dtype) for k, v in self.data.val_rows.items()}
    return train_lib.batch_shardings(self.mesh, spec)

  def val_loss(self, params) -> dict:
    """Mean loss per response token of the validation examples."""
    if not self.val:
      return {}
    extra = () if self.frozen is None else (self.frozen,)
    outs = []
    for b in self.val:   # few programs in flight (XLA:CPU collectives, see trainer.bounded)
      outs.append(self.step(params, b, *extra))
      trainer.bounded(outs)
    loss, weight = sum(float(o[0]) for o in outs), sum(float(o[1]) for o in outs)
    return {'val_loss': loss / max(weight, 1e-9), 'val_tokens': weight}

  def generation_params(self, trainable):
    """Params decode can run: LoRA folded into the base (exact), or the base with hooks."""
    if self.pcfg.method == 'none':
      return trainable, self.mesh
    if self.pcfg.method == 'lora':
      return peft.merge(self.frozen, trainable, self.cfg, self.pcfg), self.mesh
    # Prefix / prompt / adapter params are not in the rules table's model tree: let jit
    # follow the arrays' own shardings.
    return peft.combine(self.frozen, trainable, self.cfg, self.pcfg), None

  def answers(self, trainable) -> list[str]:
    e = self.config.eval
    params, mesh = self.generation_params(trainable)
    end = self.tok.special_ids[self.template.end]
    sampling = decode.SamplingConfig(temperature=0.0, max_new_tokens=e.max_new_tokens, eos_ids=(end,))
    prompts = []
    for ex in self.data.eval_examples:
      p = formats.prompt_tokens(ex, self.template, self.tok)
      keep = self.cfg.max_seq_len - e.max_new_tokens
      prompts.append(p[-keep:])            # long prompts lose their start, like training does
    out = []
    for i in range(0, len(prompts), e.batch_size):
      gen = decode.generate(params, prompts[i:i + e.batch_size], jax.random.key(0), cfg=self.cfg,
                            sampling=sampling, mesh=mesh)
      toks, mask = np.asarray(gen.tokens), np.asarray(gen.mask)
      for row, m in zip(toks, mask):
        ids = [int(t) for t, k in zip(row, m) if k and int(t) != end]
        out.append(self.tok.decode(np.asarray(ids, np.int32)))
    return out

  def choice_scores(self, trainable) -> list[int]:
    """Rank classification (T0 / FLAN's multiple-choice evaluation): for each example with
    listed options, the index of the option (+ the end token) the model finds most likely
    after the prompt; -1 for examples without options."""
    params, _ = self.generation_params(trainable)
    end = self.tok.special_ids[self.template.end]
    seqs, owner = [], []
    for k, ex in enumerate(self.data.eval_examples):
      prompt = formats.prompt_tokens(ex, self.template, self.tok)
      for opt in options_of(ex):
        cont = np.concatenate([self.tok.encode(opt), [end]]).astype(np.int32)
        seq = np.concatenate([prompt, cont])[-self.cfg.max_seq_len - 1:]
        seqs.append((seq, len(cont)))
        owner.append(k)
    if not seqs:
      return [-1] * len(self.data.eval_examples)
    t = self.cfg.max_seq_len
    logp = _sequence_logprob_fn(self.cfg)
    totals = []
    for i in range(0, len(seqs), self.config.eval.batch_size):
      chunk = seqs[i:i + self.config.eval.batch_size]
      toks = np.zeros((self.config.eval.batch_size, t + 1), np.int32)
      w = np.zeros((self.config.eval.batch_size, t), np.float32)
      for r, (seq, n) in enumerate(chunk):
        toks[r, :len(seq)] = seq
        w[r, len(seq) - 1 - n:len(seq) - 1] = 1.0      # the targets that are the option
      totals += list(np.asarray(logp(params, toks[:, :-1], toks[:, 1:], w))[:len(chunk)])
    best = [-1] * len(self.data.eval_examples)
    score = {}
    for k, (total, (seq, n)) in zip(owner, zip(totals, seqs)):
      score.setdefault(k, []).append(total)
    for k, v in score.items():
      best[k] = int(np.argmax(v))
    return best

  def run(self, trainable, tag: str) -> dict:
    result = {'tag': tag, **self.val_loss(trainable)}
    if not self.data.eval_examples:
      return result
    answers = self.answers(trainable)
    held = self.config.data.works.held_out_family if self.config.data.source == 'works' else ''
    fams: dict = {}
    for ex, ans in zip(self.data.eval_examples, answers):
      f = fams.setdefault(ex.get('family', 'all'), {'correct': 0, 'n': 0})
      f['correct'] += normalise(ans) == normalise(ex['output'])
      f['n'] += 1
    for name, f in fams.items():
      f['accuracy'] = f['correct'] / f['n']
      f['held_out_family'] = name == held
    picks = self.choice_scores(trainable)
    for ex, pick in zip(self.data.eval_examples, picks):
      if pick >= 0:
        f = fams[ex.get('family', 'all')]
        f['choice_correct'] = f.get('choice_correct', 0) + (options_of(ex)[pick] == ex['output'])
        f['choice_n'] = f.get('choice_n', 0) + 1
    for f in fams.values():
      if f.get('choice_n'):
        f['choice_accuracy'] = f['choice_correct'] / f['choice_n']
    seen = [f for n, f in fams.items() if n != held]
    result['families'] = fams
    result['seen_accuracy'] = sum(f['correct'] for f in seen) / max(sum(f['n'] for f in seen), 1)
    if held in fams:
      result['held_out_accuracy'] = fams[held]['accuracy']
    result['examples'] = [{'family': ex.get('family'), 'output': ex['output'], 'answer': a}
                          for ex, a in list(zip(self.data.eval_examples, answers))[:20]]
    return result


_LOGP = {}


def _sequence_logprob_fn(cfg):
  """jit: summed log-probs of the weighted targets per row."""
  if cfg not in _LOGP:
    def fn(params, inputs, targets, weights):
      logits, _ = model.forward(params, inputs, cfg)
      lp = jax.nn.log_softmax(logits, axis=-1)
      tok = jnp.take_along_axis(lp, targets[..., None], -1)[..., 0]
      return (tok * weights).sum(-1)
    _LOGP[cfg] = jax.jit(fn)
  return _LOGP[cfg]


def table(results: dict) -> str:
  cols = [k for k in ('before', 'after') if k in results]
  fams = sorted({f for k in cols for f in results[k].get('families', {})})
  lines = [f"{'':<22}" + ''.join(f'{c:>10}' for c in cols)]
  rows = [('val_loss (responses)', 'val_loss')]
  rows += [(f'acc {f}' + (' (held out)' if results[cols[0]]['families'][f]['held_out_family'] else ''),
            ('families', f)) for f in fams]
  rows += [(f'choice {f}' + (' (held out)' if results[cols[0]]['families'][f]['held_out_family'] else ''),
            ('choice', f)) for f in fams if 'choice_accuracy' in results[cols[0]]['families'][f]]
  rows += [('acc seen families', 'seen_accuracy'), ('acc held-out family', 'held_out_accuracy')]
  for label, key in rows:
    vals = []
    for c in cols:
      r = results[c]
      if isinstance(key, tuple):
        v = r.get('families', {}).get(key[1], {}).get('accuracy' if key[0] == 'families' else 'choice_accuracy')
      else:
        v = r.get(key)
      vals.append('' if v is None else f'{v:.3f}')
    if any(vals):
      lines.append(f'{label:<22}' + ''.join(f'{v:>10}' for v in vals))
  return '\n'.join(lines)


def write(workdir: str, results: dict, data_report: dict) -> None:
  text = table(results)
  print(text)
  if jax.process_index() == 0:
    out = paths.path(workdir)   # epath: the workdir may be a bucket (gs://)
    paths.write_text(out / 'eval.json', json.dumps({**results, 'data': data_report}, indent=2))
    paths.write_text(out / 'eval.txt', text + '\n')
