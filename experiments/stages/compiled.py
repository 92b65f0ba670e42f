"""A config's sections as a hashable settings value, to key lm.compiled.Programs on: a
stage's jitted functions close over its settings (model config, PEFT config, the config
sections that shape the program), so a later run in the same process with equal settings
(a resume, a test's second run) reuses them instead of compiling again."""
from __future__ import annotations

from ml_collections import ConfigDict


def frozen_config(config: ConfigDict, sections: tuple[str, ...]) -> tuple:
  """The named sections of `config` as a hashable, order-independent value (absent ones skipped)."""
  def freeze(x):
    if isinstance(x, (ConfigDict, dict)):
      return tuple(sorted((k, freeze(v)) for k, v in dict(x).items()))
    if isinstance(x, (list, tuple)):
      return tuple(freeze(v) for v in x)
    return x
  return tuple((s, freeze(config[s])) for s in sections if s in config)
