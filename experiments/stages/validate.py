"""Training values that cannot work, refused in one sentence before any data is prepared or
any file is written (the launcher calls `training` before the driver; trainer.check_batch calls
it again for drivers run from Python). A key a config does not have is not checked."""
from __future__ import annotations

from ml_collections import ConfigDict

from lm.config import ConfigError

# Experiments for which train.steps=0 means "no tuning" (tools_qa: few-shot prompting only).
ZERO_STEPS_OK = ('tools_qa',)
# (section, key, smallest allowed value, what the value means): read with .get, so partial
# configs (bench's, aot's) and configs without the key pass.
LIMITS = (
    ('train', 'batch_size', 1, 'the global batch in sequences'),
    ('train', 'grad_accum', 1, 'microbatches per step'),
    ('train', 'log_every', 1, 'steps between logged rows'),
    ('eval', 'every', 0, 'steps between evaluations; 0 turns evaluation off'),
    ('train', 'checkpoint_every', 0, 'steps between checkpoints; 0 saves none'),
    ('train', 'keep_checkpoints', 1, 'checkpoints kept'),
    ('train', 'stop_after', 0, 'steps this invocation runs; 0 runs to train.steps'),
    ('optim', 'lr', 0, 'the peak learning rate'),
    ('optim', 'min_lr', 0, 'the learning rate the schedule decays to'),
    ('optim', 'warmup_steps', 0, 'steps of learning-rate warmup'),
)


def trains(config: ConfigDict) -> bool:
  """A config of a training experiment (train.steps or train.iterations), as the launcher sees it;
  aot's train.batch_size=0 (one sequence per device) is not a training run's batch."""
  return _get(config, 'train', 'steps') is not None or _get(config, 'train', 'iterations') is not None


def _get(config: ConfigDict, section: str, key: str):
  part = config.get(section) if hasattr(config, 'get') else None
  return part.get(key) if part is not None and hasattr(part, 'get') else None


def training(config: ConfigDict) -> None:
  """Raise ConfigError naming the first key whose value no training run can use."""
  for section, key, low, meaning in LIMITS:
    v = _get(config, section, key)
    if isinstance(v, (int, float)) and not isinstance(v, bool) and v < low:
      bound = 'positive' if low == 1 else 'at least 0'
      raise ConfigError(f'{section}.{key}={v} must be {bound} ({meaning}); change '
                        f'--config.{section}.{key}.')
  steps = _get(config, 'train', 'steps')
  if isinstance(steps, int) and not isinstance(steps, bool):
    zero_ok = config.get('experiment') in ZERO_STEPS_OK
    if steps < 0 or (steps == 0 and not zero_ok):
      raise ConfigError(f'train.steps={steps} would train nothing: set --config.train.steps to the '
                        'number of optimizer steps to take (a positive number).')
