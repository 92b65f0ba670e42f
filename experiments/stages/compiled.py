"""One cache for compiled programs, keyed on a hashable settings object.

A stage's jitted functions close over its settings (model config, PEFT config, the config
sections that shape the program), so a later run in the same process with equal settings
(a resume, a test's second run) can reuse them instead of compiling again. Only the newest
entry is kept: compiled programs hold device memory."""
from __future__ import annotations

from typing import Any, Callable, Hashable

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


class ProgramCache:
  def __init__(self):
    self._key: Hashable = None
    self._value: Any = None

  def get(self, key: Hashable, make: Callable[[], Any]) -> Any:
    if self._value is None or self._key != key:
      self._key, self._value = None, None       # drop the old programs before compiling new ones
      self._value = make()
      self._key = key
    return self._value
