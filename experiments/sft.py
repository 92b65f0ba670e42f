"""Instruction tuning (InstructGPT's step 1), full or parameter-efficient, from an earlier stage.

  init_from (a pretraining workdir or hf:PATH) -> instruction examples rendered by a template
  (loss on responses only) -> packed rows -> the shared train loop -> eval.json (before/after)

With peft.method != none the base params are the *frozen* tree (an argument of the step, never
differentiated) and only the adapters train; checkpoints hold the adapters and the workdir's
config.json names the base (path, step, config hash), which a resume checks.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
from ml_collections import ConfigDict

from data import formats, pipeline, tokenizers
from experiments.stages import sft_data, sft_eval, stage, trainer
from lm import model, objectives, paths, peft, sharding, train as train_lib
from lm.config import ConfigError, ModelConfig


def _loss(params, batch, rng, frozen=None, *, cfg: ModelConfig, pcfg: peft.PeftConfig):
  """Next-token loss on the combined params (the frozen base + adapters, with PEFT)."""
  full = params if frozen is None else peft.combine(frozen, params, cfg, pcfg)
  return objectives.next_token_loss(full, batch, rng, cfg=cfg)


# The stage: check -> prepare -> loop -> finish --------------------------------------------------
@dataclasses.dataclass
class Prepared:
  """An SFT run after start-up: everything checked, examples rendered, trees and state built."""
  config: ConfigDict
  cfg: ModelConfig
  pcfg: peft.PeftConfig
  source: stage.Source
  tok: Any
  template: Any
  seq_len: int
  data: Any                  # sft_data.load's rendered, counted examples
  mesh: Any
  frozen: Any                # the PEFT base (None: full fine-tuning)
  frozen_sh: Any
  batch_sh: dict
  batches: pipeline.RowBatches
  setup: stage.Setup
  loss_fn: Callable


def check(config: ConfigDict) -> None:
  """The config errors that need nothing read (the rest come in prepare, before any compile)."""
  if not config.init_from:
    raise ConfigError('sft needs --config.init_from=DIR (a pretraining workdir) or hf:PATH.')


def _open(config: ConfigDict, workdir: str):
  """(pcfg, source, cfg, tok, template, seq_len, data, mesh), each checked; ConfigError at start-up."""
  pcfg = stage.peft_config(config)
  source = stage.read_source(config.init_from)
  cfg = stage.model_from_source(config, source)
  if cfg.arch != 'decoder' or not cfg.causal:
    raise ConfigError('sft tunes causal decoder-only models; init_from holds a '
                      f'{cfg.arch} model with causal={cfg.causal}.')
  template = formats.get_template(config.data.template)
  tok = tokenizers.add_special_tokens(source.tokenizer, sft_data.needed_tokens(template, source.tokenizer))
  cfg = stage.with_tokens(cfg, tok)
  seq_len = config.data.seq_len or cfg.max_seq_len
  if seq_len > cfg.max_seq_len:
    raise ConfigError(f'data.seq_len={seq_len} is longer than the model context {cfg.max_seq_len}.')
  # A soft prompt sits before each row's tokens, so prompt tuning trains one example per row.
  pack = config.data.pack and pcfg.method != 'prompt'
  if config.data.pack and not pack:
    print('peft.method=prompt: one example per row (a soft prompt cannot precede packed examples)')
  data = sft_data.load(config, tok, seq_len, pack)   # rendered, counted; FormatError at start-up
  mesh = sharding.make_mesh(config.mesh.to_dict())
  trainer.check_batch(config, mesh)
  stage.check_resume_source(workdir, source)
  if jax.process_index() == 0:
    stage.save_tokenizer(tok, workdir)
  return pcfg, source, cfg, tok, template, seq_len, data, mesh


def prepare(config: ConfigDict, workdir: str) -> Prepared:
  """Open and check everything, then the trainable and frozen trees, sharded by the rules
  table, and the fresh or restored state."""
  t = config.train
  pcfg, source, cfg, tok, template, seq_len, data, mesh = _open(config, workdir)
  if pcfg.method == 'none':
    axes, init_params, frozen, frozen_sh = model.logical_axes(cfg), functools.partial(model.init, cfg), None, None
    initial = lambda: source.restore_params(mesh, cfg)
  else:
    frozen = source.restore_params(mesh, cfg)
    frozen_sh = jax.tree.map(lambda x: x.sharding, frozen)
    axes = peft.logical_axes(cfg, pcfg)
    init_params = functools.partial(peft.init, cfg, pcfg, base_params=frozen)
    initial = None
  spec = {k: jax.ShapeDtypeStruct((seq_len,), v.dtype) for k, v in data.train_rows(0).items()}
  batch_sh = train_lib.batch_shardings(mesh, spec)
  rows = pipeline.local_rows(batch_sh['inputs'], t.batch_size, seq_len)
  batches = pipeline.RowBatches(data.train_rows, t.batch_size, rows)
  setup = stage.build(config, workdir, mesh, axes=axes, init_params=init_params,
                      total_steps=t.steps, initial_params=initial)
  if setup.data_state is not None:
    batches.restore(setup.data_state)
  p = Prepared(config, cfg, pcfg, source, tok, template, seq_len, data, mesh, frozen, frozen_sh,
               batch_sh, batches, setup, functools.partial(_loss, cfg=cfg, pcfg=pcfg))
  _announce(p, workdir)
  return p


def _announce(p: Prepared, workdir: str) -> None:
  config, cfg, pcfg, data, mesh = p.config, p.cfg, p.pcfg, p.data, p.mesh
  trainer.write_config(config, workdir, {
      'resolved': {'vocab_size': cfg.vocab_size, 'seq_len': p.seq_len, 'params': cfg.num_params(),
                   'trainable_params': stage.peft_counts(cfg, pcfg)['trainable'],
                   'devices': jax.device_count(), 'mesh': dict(mesh.shape), 'data': data.report},
      'source': p.source.record(),
      'model': dataclasses.asdict(cfg)})   # the model actually trained: what a next stage reads
  print(f'sft from {p.source.path} (step {p.source.step}): {cfg.num_params():,} params, '
        f'{stage.peft_counts(cfg, pcfg)["trainable"]:,} trainable ({pcfg.method}); '
        f'{data.report["train"]["kept"]:,} training examples ({data.report["train"]["dropped"] or "none"} '
        f'dropped, {data.report["train"]["truncated"]} truncated); mesh {dict(mesh.shape)}; '
        + (f'resuming at step {p.setup.start}' if p.setup.start else 'starting'))
  note = skipped_records(data.report.get('read'))
  if note:
    print(note)


def skipped_records(read: dict | None) -> str | None:
  """One line for the records the reader skipped (bad JSON, missing fields, undecodable
  bytes), with where the first of each kind is, or None when none were."""
  skipped = (read or {}).get('skipped') or {}
  if not sum(skipped.values()):
    return None
  first = (read or {}).get('first_skipped') or {}
  kinds = ', '.join(f'{k} {n}' + (f' (first at {first[k]})' if k in first else '')
                    for k, n in sorted(skipped.items()) if n)
  return f'note: {sum(skipped.values())} of {read.get("lines", "?")} records were skipped while reading: {kinds}.'


def evaluator(p: Prepared) -> sft_eval.Evaluator:
  return sft_eval.Evaluator(p.config, p.cfg, p.tok, p.template, p.data, p.mesh, p.loss_fn,
                            p.setup.shardings.params, p.batch_sh, p.frozen_sh, p.frozen)


def loop(p: Prepared, workdir: str, ev: sft_eval.Evaluator):
  """The shared train loop (validation loss from the evaluator); the state it reached."""
  config, t, setup = p.config, p.config.train, p.setup
  step_fn = train_lib.make_train_step(p.loss_fn, setup.tx, p.mesh, setup.shardings, p.batch_sh,
                                      frozen_sh=p.frozen_sh, grad_accum=t.grad_accum,
                                      seed=config.seed, schedule=setup.schedule)
  if p.frozen is not None:
    step_fn = functools.partial(trainer.with_frozen, step_fn, p.frozen)
  to_global = functools.partial(pipeline.to_global, shardings=p.batch_sh, global_batch=t.batch_size)
  state = trainer.train(trainer.Run(
      config=config, workdir=workdir, mesh=p.mesh, state=setup.state, start_step=setup.start,
      step_fn=step_fn, batches=p.batches, to_global=to_global,
      evaluate=ev.val_loss if p.config.eval.every else None, checkpointer=setup.checkpointer,
      flops_per_token=p.cfg.flops_per_token(p.seq_len), tokens_per_step=t.batch_size * p.seq_len))
  setup.checkpointer.close()
  return state


def baseline(p: Prepared, ev: sft_eval.Evaluator) -> dict:
  """{'before': the evaluation of the untrained model} on a fresh run with eval.before, else {}."""
  if p.setup.start == 0 and p.config.eval.before:
    return {'before': ev.run(p.setup.state.params, 'before')}
  return {}


def finish(p: Prepared, ev: sft_eval.Evaluator, state, results: dict, workdir: str) -> None:
  """The same evaluation after training, beside the baseline: eval.json."""
  results['after'] = ev.run(state.params, 'after')
  sft_eval.write(workdir, results, p.data.report)


def run(config: ConfigDict, workdir: str):
  paths.path(workdir).mkdir(parents=True, exist_ok=True)   # a local folder or a gs:// bucket
  check(config)
  p = prepare(config, workdir)
  ev = evaluator(p)
  results = baseline(p, ev)
  state = loop(p, workdir, ev)
  if int(state.step) >= config.train.steps:
    finish(p, ev, state, results, workdir)
  return state
