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

import jax
from ml_collections import ConfigDict

from data import formats, pipeline, tokenizers
from experiments.stages import sft_data, sft_eval, stage, trainer
from lm import model, objectives, paths, peft, sharding, train as train_lib
from lm.config import ConfigError


def run(config: ConfigDict, workdir: str):
  paths.path(workdir).mkdir(parents=True, exist_ok=True)   # a local folder or a gs:// bucket
  t = config.train
  # 1. Everything a user can get wrong, before any compile.
  if not config.init_from:
    raise ConfigError('sft needs --config.init_from=DIR (a pretraining workdir) or hf:PATH.')
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

  # 2. Trainable and frozen trees, sharded by the rules table.
  base_axes = model.logical_axes(cfg)
  key = jax.random.key(config.seed)
  if pcfg.method == 'none':
    axes, init_params, frozen, frozen_sh = base_axes, functools.partial(model.init, cfg), None, None
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
  trainer.write_config(config, workdir, {
      'resolved': {'vocab_size': cfg.vocab_size, 'seq_len': seq_len, 'params': cfg.num_params(),
                   'trainable_params': stage.peft_counts(cfg, pcfg)['trainable'],
                   'devices': jax.device_count(), 'mesh': dict(mesh.shape), 'data': data.report},
      'source': source.record(),
      'model': dataclasses.asdict(cfg)})   # the model actually trained: what a next stage reads
  print(f'sft from {source.path} (step {source.step}): {cfg.num_params():,} params, '
        f'{stage.peft_counts(cfg, pcfg)["trainable"]:,} trainable ({pcfg.method}); '
        f'{data.report["train"]["kept"]:,} training examples ({data.report["train"]["dropped"] or "none"} '
        f'dropped, {data.report["train"]["truncated"]} truncated); mesh {dict(mesh.shape)}; '
        + (f'resuming at step {setup.start}' if setup.start else 'starting'))

  # 3. Loss on the combined params; eval before (baseline) and after.
  def loss_fn(params, batch, rng, frozen=None):
    full = params if frozen is None else peft.combine(frozen, params, cfg, pcfg)
    return objectives.next_token_loss(full, batch, rng, cfg=cfg)

  evaluator = sft_eval.Evaluator(config, cfg, tok, template, data, mesh, loss_fn, setup.shardings.params,
                                 batch_sh, frozen_sh, frozen)
  results = {}
  if setup.start == 0 and config.eval.before:
    results['before'] = evaluator.run(setup.state.params, 'before')
  step_fn = train_lib.make_train_step(loss_fn, setup.tx, mesh, setup.shardings, batch_sh,
                                      frozen_sh=frozen_sh, grad_accum=t.grad_accum,
                                      seed=config.seed, schedule=setup.schedule)
  if frozen is not None:
    step_fn = functools.partial(trainer.with_frozen, step_fn, frozen)
  to_global = functools.partial(pipeline.to_global, shardings=batch_sh, global_batch=t.batch_size)
  state = trainer.train(trainer.Run(
      config=config, workdir=workdir, mesh=mesh, state=setup.state, start_step=setup.start,
      step_fn=step_fn, batches=batches, to_global=to_global,
      evaluate=evaluator.val_loss if t.eval_every else None, checkpointer=setup.checkpointer,
      flops_per_token=cfg.flops_per_token(seq_len), tokens_per_step=t.batch_size * seq_len))
  setup.checkpointer.close()
  if int(state.step) >= t.steps:
    results['after'] = evaluator.run(state.params, 'after')
    sft_eval.write(workdir, results, data.report)
  return state


