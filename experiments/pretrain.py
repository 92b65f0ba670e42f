"""Pretraining driver: corpus -> tokenizer -> sharded model -> train loop -> samples.

Order matters: everything a user can get wrong (config, corpus, tokenizer, sequence
length, mesh, batch size, checkpoints) is checked before the first compile.
"""
from __future__ import annotations

import dataclasses
import functools
import json
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from ml_collections import ConfigDict

from data import pipeline
from experiments.stages import corpus, stage, trainer
from lm import decode, model, objectives, paths, sharding, train as train_lib
from lm.config import ConfigError, ModelConfig


def special_ids(config: ConfigDict) -> int:
  """Ids the objective needs past the tokenizer's vocabulary (span corruption's sentinels)."""
  if config.train.objective != 'span_corruption':
    return 0
  window = config.data.seq_len or config.model.max_seq_len
  if config.model.arch != 'encoder_decoder':
    window = objectives.decoder_span_length(window)
  return objectives.num_special_ids(window)


def model_config(config: ConfigDict, vocab_size: int) -> ModelConfig:
  m = config.model.to_dict()
  want = vocab_size + special_ids(config)
  if m['vocab_size'] == 0:
    m['vocab_size'] = want
  elif m['vocab_size'] != want:
    raise ConfigError(f'model.vocab_size={m["vocab_size"]} does not match the tokenizer\'s '
                      f'{vocab_size} tokens (+{want - vocab_size} objective ids); set '
                      '--config.model.vocab_size=0 to take it from the tokenizer.')
  return ModelConfig.from_dict(m)


def check_objective(config: ConfigDict, cfg: ModelConfig) -> None:
  name = config.train.objective
  if name not in objectives.OBJECTIVES:
    raise ConfigError(f'train.objective={name!r} is not supported; choose one of {sorted(objectives.OBJECTIVES)}.')
  if cfg.arch == 'encoder_decoder' and name != 'span_corruption':
    raise ConfigError(f'train.objective={name} is for decoder-only models; the encoder-decoder '
                      'trains with train.objective=span_corruption.')
  if name == 'masked_lm':
    if cfg.causal:
      raise ConfigError('train.objective=masked_lm needs a bidirectional model: set model.causal=False.')
    if cfg.padded_vocab == cfg.vocab_size:
      raise ConfigError('masked_lm needs a spare id for [MASK]; make model.vocab_multiple leave a padding row.')
  elif not cfg.causal:
    raise ConfigError(f'train.objective={name} needs model.causal=True: a bidirectional model would '
                      'see the tokens it predicts.')


def seq_len_of(config: ConfigDict, cfg: ModelConfig) -> int:
  t = config.data.seq_len or cfg.max_seq_len
  if t > cfg.max_seq_len:
    raise ConfigError(f'data.seq_len={t} is longer than the model context model.max_seq_len='
                      f'{cfg.max_seq_len}; lower data.seq_len or raise model.max_seq_len.')
  return t


# The stage: check -> prepare -> loop -> finish --------------------------------------------------
@dataclasses.dataclass
class Prepared:
  """A pretraining run after start-up: corpus, model config and sampling checked, the
  batches and the fresh or restored state built, nothing compiled."""
  config: ConfigDict
  source: stage.Source | None  # init_from's model and tokenizer, if given
  data: Any                    # corpus.load's tokenizer and token streams
  cfg: ModelConfig
  seq_len: int
  prompt: Any                  # the sample prompt's ids (None: no samples)
  can_sample: bool
  mesh: Any
  spec: dict
  batch_sh: dict
  batches: Any
  setup: stage.Setup


def check_model(config: ConfigDict, cfg: ModelConfig, tok) -> tuple[int, Any, bool]:
  """(seq_len, sample prompt ids, can sample?): the objective, sequence length and sample
  length checked against the model (ConfigError). Needs the tokenizer, so it runs inside
  prepare, after the corpus is read."""
  t = config.train
  check_objective(config, cfg)
  seq_len = seq_len_of(config, cfg)
  prompt = tok.encode(t.sample_prompt) if t.samples else None
  can_sample = cfg.causal and cfg.arch == 'decoder' and t.objective != 'span_corruption'
  if t.samples and can_sample:
    decode.check_length(cfg, len(prompt), t.sample_tokens)
  return seq_len, prompt, can_sample


def prepare(config: ConfigDict, workdir: str) -> Prepared:
  """Data and model config, validated (init_from: the source's model and tokenizer); then
  mesh, data shardings, and resume, or init (from init_from's weights if given)."""
  t = config.train
  source = stage.read_source(config.init_from) if config.init_from else None
  data = corpus.load(config, workdir, tokenizer=source.tokenizer if source else None)
  tok = data.tokenizer
  cfg = stage.model_from_source(config, source) if source else model_config(config, tok.vocab_size)
  seq_len, prompt, can_sample = check_model(config, cfg, tok)
  mesh = sharding.make_mesh(config.mesh.to_dict())
  trainer.check_batch(config, mesh)
  spec = data.batch_spec(seq_len)
  batch_sh = train_lib.batch_shardings(mesh, spec)
  rows = pipeline.local_rows(batch_sh['inputs'], t.batch_size, seq_len)
  batches = corpus.train_batches(config, data, seq_len, rows)
  setup = stage.build(config, workdir, mesh, axes=model.logical_axes(cfg),
                      init_params=functools.partial(model.init, cfg), total_steps=t.steps,
                      initial_params=(lambda: source.restore_params(mesh, cfg)) if source else None)
  if setup.data_state is not None:
    batches.restore(setup.data_state)
  p = Prepared(config, source, data, cfg, seq_len, prompt, can_sample, mesh, spec, batch_sh,
               batches, setup)
  _announce(p, workdir)
  return p


def _announce(p: Prepared, workdir: str) -> None:
  config, cfg, data, source, mesh, start = p.config, p.cfg, p.data, p.source, p.mesh, p.setup.start
  counts = cfg.param_counts()
  n_train = sum(map(len, data.train.values()))
  n_val = sum(map(len, data.validation.values()))
  trainer.write_config(config, workdir, {'resolved': {
      'vocab_size': cfg.vocab_size, 'seq_len': p.seq_len, 'params': counts['total'],
      'non_embedding_params': counts['non_embedding'], 'devices': jax.device_count(),
      'mesh': dict(mesh.shape), 'train_tokens': n_train, 'val_tokens': n_val},
      **({'source': source.record(), 'model': dataclasses.asdict(cfg)} if source else {})})
  print(f'model: {counts["total"]:,} params ({counts["non_embedding"]:,} non-embedding); '
        f'corpus: {n_train:,} train / {n_val:,} val tokens'
        + (f' in {len(data.train)} sources' if data.is_mixture else '') + '; '
        f'mesh {dict(mesh.shape)}; ' + (f'resuming at step {start}' if start else
                                        f'starting from {config.init_from} (step {source.step})'
                                        if source else 'starting fresh'))


def _evaluate(p: Prepared, loss_fn: Callable):
  """Validation loss on fixed batches of each validation stream (a mixture: each source's
  and their token-weighted mean), or None without eval.every."""
  t, mesh, seq_len = p.config.train, p.mesh, p.seq_len
  if not p.config.eval.every:
    return None
  eb = t.eval_batch_size or t.batch_size
  eval_sh = train_lib.batch_shardings(mesh, p.spec)
  if eb % sharding.batch_size_divisor(mesh):
    raise ConfigError(f'train.eval_batch_size={eb} does not divide over the batch mesh axes '
                      f'({sharding.batch_size_divisor(mesh)} devices); change it.')
  eval_rows = pipeline.local_rows(eval_sh['inputs'], eb, seq_len)
  eval_step = train_lib.make_eval_step(loss_fn, mesh, p.setup.shardings.params, eval_sh)
  to_global_eval = functools.partial(pipeline.to_global, shardings=eval_sh, global_batch=eb)
  per_source = {}
  for name, stream in p.data.validation.items():
    local = [{k: v[eval_rows[0]:eval_rows[1]] for k, v in b.items()}
             for b in pipeline.eval_batches(stream, seq_len, eb, t.eval_batches, name)]
    per_source[name] = trainer.eval_fn(eval_step, local, to_global_eval)
  return per_source['data'] if not p.data.is_mixture else trainer.combine_evals(per_source)


def loop(p: Prepared, workdir: str):
  """The shared train loop on the configured objective; the state it reached."""
  config, t, setup, cfg = p.config, p.config.train, p.setup, p.cfg
  loss_fn = functools.partial(objectives.OBJECTIVES[t.objective], cfg=cfg)
  step_fn = train_lib.make_train_step(loss_fn, setup.tx, p.mesh, setup.shardings, p.batch_sh,
                                      grad_accum=t.grad_accum, seed=config.seed,
                                      schedule=setup.schedule)
  to_global = functools.partial(pipeline.to_global, shardings=p.batch_sh, global_batch=t.batch_size)
  evaluate = _evaluate(p, loss_fn)   # may still raise ConfigError: nothing has compiled yet
  state = trainer.train(trainer.Run(
      config=config, workdir=workdir, mesh=p.mesh, state=setup.state, start_step=setup.start,
      step_fn=step_fn, batches=p.batches, to_global=to_global, evaluate=evaluate,
      checkpointer=setup.checkpointer, flops_per_token=cfg.flops_per_token(p.seq_len),
      tokens_per_step=t.batch_size * p.seq_len, meta=setup.meta))
  setup.checkpointer.close()
  return state


def finish(p: Prepared, state, workdir: str) -> None:
  """mixture.json (target rates vs. rows drawn), then samples from the trained model."""
  t, cfg = p.config.train, p.cfg
  if p.data.is_mixture:
    report = p.batches.report()
    print('mixture, target rates vs. rows drawn:\n' + corpus.format_report(report))
    if jax.process_index() == 0:
      paths.write_text(paths.path(workdir) / 'mixture.json', json.dumps(report, indent=2))
  if t.samples and int(state.step) >= t.steps:
    if p.can_sample:
      write_samples(state.params, cfg, p.data.tokenizer, p.prompt, p.config, workdir)
    else:
      print(f'(no free-running samples: the {t.objective} objective on a {cfg.arch} model '
            'does not train a left-to-right generator over the tokenizer\'s vocabulary)')


def run(config: ConfigDict, workdir: str):
  paths.path(workdir).mkdir(parents=True, exist_ok=True)   # a local folder or a gs:// bucket
  p = prepare(config, workdir)   # checks inside (check_model): they need the corpus
  state = loop(p, workdir)
  finish(p, state, workdir)
  return state


def write_samples(params, cfg: ModelConfig, tok, prompt: np.ndarray, config: ConfigDict,
                  workdir: str) -> list[str]:
  t = config.train
  prompts = jnp.asarray(np.tile(prompt[None], (t.samples, 1)))
  params = jax.device_get(params)  # decoding a small model: one device is plenty
  out = decode.generate(params, prompts, jax.random.key(config.seed + 1), cfg=cfg,
                        max_new_tokens=t.sample_tokens, temperature=t.temperature, top_k=t.top_k)
  texts = [tok.decode(np.asarray(row)) for row in out]
  if jax.process_index() == 0:
    paths.write_text(paths.path(workdir) / 'samples.txt', '\n\n-----\n\n'.join(texts))
    for i, s in enumerate(texts):
      print(f'--- sample {i} ---\n{s}')
  return texts
