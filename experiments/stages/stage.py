"""What every stage shares: where its weights come from (`init_from`), and its sharded setup.

A stage's output is its workdir (config.json, tokenizer_ref.json, checkpoints/). The next stage
names it with `config.init_from = DIR` (or `hf:PATH`, a local Hugging Face checkpoint):

  source = read_source(config.init_from)     # config, ModelConfig, tokenizer, step: no weights
  cfg    = model_from_source(config, source) # the source's model; conflicting overrides fail
  params = source.restore_params(mesh)       # params only, straight into the new shardings

`build(...)` is the one setup of mesh-sharded train state every driver uses (pretrain, sft,
bench, and the reward / PPO stages): optimizer, shardings, resume-or-init. `load_run(workdir)`
is read_source + restore_params for tools that only need a trained model.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import tempfile
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from ml_collections import ConfigDict

from lm import convert
from data import tokenizers
from lm import checkpoint as ckpt_lib
from lm import model, paths, peft, sharding, train as train_lib
from lm.config import ConfigError, ModelConfig

# Model fields a later stage may change without changing the network the weights belong to.
# config.json's record of invocations (trainer.write_config), not settings of the run itself.
INVOCATION_KEYS = ('history', 'written_at', 'resumed_from_step')
RUNTIME_FIELDS = ('dtype', 'param_dtype', 'remat', 'attention_impl', 'attention_q_block',
                  'scan_unroll')


@dataclasses.dataclass
class Source:
  """A finished stage's workdir or a Hugging Face folder, read without loading weights."""
  kind: str                    # 'run' | 'hf'
  path: str
  cfg: ModelConfig
  tokenizer: Any
  config: ConfigDict | None    # the source run's config (None for hf)
  step: int
  config_hash: str
  # where the model's params sit in the source's saved state: a TrainState's params, or
  # inside a larger state (PPO's policy: train/params/policy; config.json resolved.params_at)
  params_at: tuple = ('params',)
  base: dict | None = None     # what the source was tuned from (its config.json 'source')

  def record(self) -> dict:
    """What a new workdir stores about where it came from."""
    return {'path': str(paths.absolute(self.path)), 'kind': self.kind, 'step': self.step,
            'config_hash': self.config_hash}

  def restore_params(self, mesh, cfg: ModelConfig | None = None) -> Any:
    """The source's params on `mesh`, each leaf in the sharding the rules table gives it."""
    cfg = cfg or self.cfg
    pcfg = self.peft_config()
    if pcfg.method == 'lora':
      return self._merged_lora(mesh, cfg, pcfg)
    if pcfg.method != 'none':
      raise ConfigError(f'{self.path} is a {pcfg.method}-tuned run: its extra parameters have no '
                        'place in the plain model a stage starts from or exports; tune with '
                        'peft.method=lora (merged) or none.')
    if self.kind == 'hf':   # streamed tensor by tensor into the rules table's shardings
      params, _ = convert.import_hf_to_mesh(self.path, mesh, dtype=np.dtype(cfg.param_dtype))
      return params
    abstract = jax.eval_shape(functools.partial(model.init, cfg), jax.random.key(0))
    shardings = sharding.tree_shardings(model.logical_axes(cfg), abstract, mesh)
    return self._restore(train_lib.abstract_with_shardings(abstract, shardings))

  def peft_config(self) -> peft.PeftConfig:
    """How the source run was tuned (none for pretraining runs and Hugging Face folders)."""
    d = self.config.get('peft') if self.config is not None else None
    return peft.PeftConfig.from_dict(d.to_dict() if d is not None else {})

  def _restore(self, abstract):
    checkpointer = ckpt_lib.Checkpointer(paths.path(self.path) / 'checkpoints', async_save=False)
    try:
      return checkpointer.restore_params(self.step, abstract, at=self.params_at)
    except ckpt_lib.CheckpointError as e:
      raise ckpt_lib.CheckpointError(self._intact_before(checkpointer, abstract, e)) from None
    finally:
      checkpointer.close()

  def _intact_before(self, checkpointer, abstract, error) -> str:
    """The refusal for an unreadable newest checkpoint, naming the newest earlier one that reads
    (a stage never silently starts from other weights than the step it records)."""
    for s in reversed([s for s in checkpointer.steps() if s < self.step]):
      try:
        checkpointer.restore_params(s, abstract, at=self.params_at)
      except ckpt_lib.CheckpointError:
        continue
      damaged = checkpointer.directory / str(self.step)
      return (f'{str(error).rstrip(".")}; step {s} before it is intact: to start from it, move the '
              f'damaged one aside (mv {damaged} {damaged}.unreadable) and rerun, or rerun the '
              f'command that trained {self.path} (its resume sets step {self.step} aside and goes '
              f'on from step {s}).')
    return f'{str(error).rstrip(".")}, and no earlier checkpoint in {checkpointer.directory} reads.'

  def _merged_lora(self, mesh, cfg: ModelConfig, pcfg) -> Any:
    """A LoRA run's checkpoints hold only its adapters: they are folded into its base, as the
    base was when tuning started (plain params, as any other source gives)."""
    if not self.base:
      raise ckpt_lib.CheckpointError(f'{self.path} is a LoRA run whose config.json records no base '
                                     "('source'); it cannot be restored without it.")
    base = read_source(('hf:' if self.base.get('kind') == 'hf' else '') + self.base['path'])
    if base.config_hash != self.base.get('config_hash'):
      raise ckpt_lib.CheckpointError(f'The base {self.base["path"]} is no longer the run {self.path} '
                                     'was tuned on (its config changed); the adapters need the '
                                     'original base.')
    base = dataclasses.replace(base, step=self.base.get('step', base.step))
    frozen = base.restore_params(mesh, cfg)   # the same padded rows as the tuned model
    abstract = jax.eval_shape(lambda k: peft.init(cfg, pcfg, k), jax.random.key(0))
    shardings = sharding.tree_shardings(peft.logical_axes(cfg, pcfg), abstract, mesh)
    adapters = self._restore(train_lib.abstract_with_shardings(abstract, shardings))
    return peft.merge(frozen, adapters, cfg, pcfg)


def _hash(obj) -> str:
  return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:12]


def read_source(init_from: str) -> Source:
  """The model a stage starts from: `DIR` (a finished run's workdir) or `hf:PATH`."""
  if init_from.startswith('hf:'):
    path = os.path.expanduser(init_from[3:])
    cfg_path = os.path.join(path, 'config.json')
    if not os.path.exists(cfg_path):
      raise ConfigError(f'init_from={init_from} has no config.json; point hf: at a local Hugging '
                        'Face model folder (config.json, *.safetensors, tokenizer.json).')
    cfg, hf = convert.config_from_folder(path)   # EOS ids: config.json's and generation_config.json's
    if not os.path.exists(os.path.join(path, 'tokenizer.json')):
      raise ConfigError(f'init_from={init_from} has no tokenizer.json; save the tokenizer with the '
                        'model (tokenizer.save_pretrained(PATH)).')
    return Source('hf', path, cfg, tokenizers.load_hf_folder(path), None, 0, _hash(hf))
  path = init_from if paths.is_url(init_from) else os.path.expanduser(init_from)
  cfg_path = paths.path(path) / 'config.json'
  if not cfg_path.exists():
    raise ConfigError(f'init_from={init_from} holds no config.json, so it is not the workdir of a '
                      'finished run; point it at the --workdir of an earlier stage.')
  if _looks_like_hf(path, cfg_path):
    raise ConfigError(f'init_from={init_from} looks like a Hugging Face model folder (its config.json '
                      f'has no run settings); write init_from=hf:{init_from} to start from it.')
  steps = ckpt_lib.Checkpointer.steps_in(paths.path(path) / 'checkpoints')
  if not steps:
    raise ckpt_lib.CheckpointError(f'{path} has no checkpoints to start from; train it first '
                                   '(train.checkpoint_every > 0).')
  try:
    saved = json.loads(paths.read_text(cfg_path))
    resolved = saved.pop('resolved', {})
    base = saved.pop('source', None)
    for k in INVOCATION_KEYS:   # the record of invocations is not the run's settings (nor its hash)
      saved.pop(k, None)
    config = ConfigDict(saved)
    m = config.model.to_dict()
    m['vocab_size'] = resolved.get('vocab_size', m['vocab_size'])
    cfg = ModelConfig.from_dict(m)
  except (ValueError, KeyError, AttributeError) as e:
    raise ConfigError(f'{cfg_path} is not a readable run config ({type(e).__name__}: {e}); point '
                      'init_from at the --workdir of a run of this codebase.') from None
  tokenizer = load_tokenizer(path)
  return Source('run', path, cfg, tokenizer, config, steps[-1], _hash(saved),
                tuple(resolved.get('params_at', ('params',))), base)


def _looks_like_hf(path: str, cfg_path) -> bool:
  """A Hugging Face folder's config.json (model_type / architectures, no run settings), so that
  a missing `hf:` prefix is named instead of reported as a run with no checkpoints."""
  try:
    saved = json.loads(paths.read_text(cfg_path))
  except ValueError:
    return False
  if not isinstance(saved, dict) or 'model' in saved or 'experiment' in saved:
    return False
  return ('model_type' in saved or 'architectures' in saved
          or any(paths.path(path).glob('*.safetensors')))


def save_tokenizer(tok, workdir: str) -> None:
  """WORKDIR/tokenizer_ref.json and the files it points at (a base's .base.json, a .model,
  a .hf.json); in a bucket (gs://) written locally first and copied up file by file, since a
  tokenizer saves only to local files."""
  if not paths.is_url(workdir):
    tok.save(os.path.join(workdir, tokenizers.RUN_FILE))
    return
  with tempfile.TemporaryDirectory() as d:
    tok.save(os.path.join(d, tokenizers.RUN_FILE))
    for name in sorted(os.listdir(d)):
      with open(os.path.join(d, name), 'rb') as f:
        (paths.path(workdir) / name).write_bytes(f.read())


def load_tokenizer(workdir: str):
  """The tokenizer a workdir saved (save_tokenizer, or pretraining's). From a bucket its
  tokenizer* files are copied to a local folder that is kept: a SentencePiece or Hugging Face
  tokenizer reads its file by path and copies it again when the next stage saves it."""
  if not paths.is_url(workdir):
    return tokenizers.load(tokenizers.run_file(workdir))
  src = paths.path(workdir)
  if not (src / tokenizers.RUN_FILE).exists() and not (src / tokenizers.OLD_RUN_FILE).exists():
    raise tokenizers.TokenizerError(f'{workdir} has no {tokenizers.RUN_FILE}; point init_from at the '
                                    '--workdir of a finished run of this codebase.')
  local = tempfile.mkdtemp(prefix='tokenizer-')
  for f in src.iterdir():
    if f.name.startswith('tokenizer') and f.is_file():
      with open(os.path.join(local, f.name), 'wb') as out:
        out.write(f.read_bytes())
  return tokenizers.load(tokenizers.run_file(local))


def model_from_source(config: ConfigDict, source: Source) -> ModelConfig:
  """The source's ModelConfig with the runtime fields of config.model applied.

  config.model keeps every field so any may be overridden on the command line; a field that
  differs from both its default and the source's value is a conflicting override.
  """
  # (the defaults of configs/base.model(): ModelConfig's, vocab_size 0 = from the tokenizer)
  defaults = {**dataclasses.asdict(ModelConfig()), 'vocab_size': 0}
  asked = config.model.to_dict()
  src = dataclasses.asdict(source.cfg)
  out = dict(src)
  for k, v in asked.items():
    if k in RUNTIME_FIELDS:
      out[k] = v
    elif k == 'vocab_size' and v and v != src[k]:
      raise ConfigError(f'model.vocab_size={v} conflicts with init_from ({src[k]} tokens); drop '
                        'the override: the vocabulary comes from the source model.')
    elif k != 'vocab_size' and v != defaults.get(k) and v != src.get(k):
      raise ConfigError(f'model.{k}={v!r} conflicts with the init_from model ({k}={src.get(k)!r}); '
                        'a later stage keeps its source\'s architecture, so drop the override (or use a '
                        'config whose model section is configs/base.model(), as the sft configs do).')
  return ModelConfig.from_dict(out)


def load_run(workdir: str, mesh_cfg: dict | None = None):
  """(source, params on a mesh): a finished run's model, e.g. to score documents with it."""
  source = read_source(workdir)
  mesh = sharding.make_mesh(mesh_cfg or {'data': -1})
  return LoadedRun(source.config, source.cfg, source.tokenizer, source.restore_params(mesh),
                   source.step, mesh)


@dataclasses.dataclass
class LoadedRun:
  config: ConfigDict
  cfg: ModelConfig
  tokenizer: Any
  params: Any
  step: int
  mesh: Any


# The sharded setup every driver shares --------------------------------------------------------
@dataclasses.dataclass
class Setup:
  mesh: Any
  tx: Any
  schedule: Any
  shardings: train_lib.TrainState
  state: train_lib.TrainState    # restored or fresh, in its sharded layout
  start: int                     # steps already taken (0: fresh)
  data_state: dict | None        # the data iterator's saved position, if resumed
  meta: dict                     # the checkpoint's metadata, if resumed
  checkpointer: ckpt_lib.Checkpointer | None


def build(config: ConfigDict, workdir: str | None, mesh, *, axes, init_params: Callable,
          total_steps: int, initial_params: Callable[[], Any] | None = None) -> Setup:
  """Optimizer, state shardings (derived abstractly), then the latest checkpoint in
  `workdir`, or else a fresh state: `initial_params()` (e.g. init_from's weights, called
  only when there is nothing to resume) or `init_params(key)`.

  `workdir=None` keeps no checkpoints (benchmarks).
  """
  tx, schedule = train_lib.make_optimizer(config.optim.to_dict(), axes, total_steps)
  key = jax.random.key(config.seed)
  init_state, abstract, shardings = train_lib.state_shardings(init_params, axes, tx, mesh, key)

  def fresh():
    if initial_params is None:
      return jax.jit(init_state, out_shardings=shardings)(key)
    start = lambda p: train_lib.TrainState(step=jnp.zeros((), jnp.int32), params=p, opt_state=tx.init(p))
    return jax.jit(start, out_shardings=shardings)(initial_params())

  if workdir is None:
    return Setup(mesh, tx, schedule, shardings, fresh(), 0, None, {}, None)
  checkpointer = ckpt_lib.Checkpointer(paths.path(workdir) / 'checkpoints',
                                       config.train.get('keep_checkpoints', 3))
  found = checkpointer.restore_or_none(train_lib.abstract_with_shardings(abstract, shardings))
  if found is None:
    return Setup(mesh, tx, schedule, shardings, fresh(), 0, None, {}, checkpointer)
  step, state, data_state, meta = found
  return Setup(mesh, tx, schedule, shardings, state, step, data_state, meta, checkpointer)


def peft_config(config: ConfigDict) -> peft.PeftConfig:
  return peft.PeftConfig.from_dict(config.peft.to_dict())


def with_tokens(cfg: ModelConfig, tok) -> ModelConfig:
  """The model's vocabulary grown to the tokenizer's added special tokens, inside the padded
  embedding rows the model already has (so the source's params keep their shapes)."""
  if tok.vocab_size == cfg.vocab_size:
    return cfg
  grown = dataclasses.replace(cfg, vocab_size=tok.vocab_size)
  if tok.vocab_size < cfg.vocab_size or grown.padded_vocab != cfg.padded_vocab:
    raise ConfigError(f'The template needs {tok.vocab_size} token ids but the init_from model has '
                      f'{cfg.vocab_size} ({cfg.padded_vocab} embedding rows); use a template whose '
                      'special tokens the source vocabulary already has (e.g. data.template=alpaca).')
  return grown


def check_resume_source(workdir: str, source: Source) -> None:
  """A resumed PEFT run must find the same base it was trained on."""
  path = paths.path(workdir) / 'config.json'   # epath: the workdir may be a bucket (gs://)
  if not path.exists():
    return
  old = json.loads(paths.read_text(path)).get('source')
  if old and (old['step'], old['config_hash']) != (source.step, source.config_hash):
    raise ckpt_lib.CheckpointError(
        f'{workdir} was trained on {old["path"]} at step {old["step"]} (config {old["config_hash"]}) '
        f'but init_from now gives step {source.step} (config {source.config_hash}); point '
        'init_from at the original base or use a new --workdir.')


def peft_counts(cfg: ModelConfig, pcfg: peft.PeftConfig) -> dict:
  total = cfg.num_params()
  return {'trainable': total if pcfg.method == 'none' else peft.num_params(cfg, pcfg)}


def read_model_source(config: ConfigDict):
  """(source, ModelConfig with config.model's runtime fields) for a run workdir or hf:PATH;
  no weights are read yet."""
  if not config.init_from:
    raise ConfigError("config.init_from is empty; give a run workdir, hf:PATH, or 'reference'.")
  source = read_source(config.init_from)
  runtime = {k: v for k, v in config.model.to_dict().items() if k in RUNTIME_FIELDS}
  return source, dataclasses.replace(source.cfg, **runtime)
