"""The one cache of compiled programs: jitted functions keyed on a hashable settings value.

A jitted function closes over settings (a ModelConfig, a mesh, static options); building it
again for equal settings would compile again. Every cache of jitted functions in the project
(decoding, the evaluation harness, the online-RL loop) is a `Programs`:

  _PROGRAMS = compiled.Programs(max_entries=1)            # keep the newest set only
  fn = _PROGRAMS.get(key, lambda: jax.jit(...))          # key: a tuple of hashable settings

`max_entries` bounds what stays alive (compiled programs hold memory); the oldest entry goes
first. `count()` is how many are held (tests check that shapes stay bucketed)."""
from __future__ import annotations

import collections
from typing import Any, Callable, Hashable


class Programs:
  def __init__(self, max_entries: int | None = None):
    self.max_entries = max_entries
    self._entries: collections.OrderedDict = collections.OrderedDict()

  def get(self, key: Hashable, make: Callable[[], Any]) -> Any:
    if key in self._entries:
      self._entries.move_to_end(key)
      return self._entries[key]
    if self.max_entries is not None:
      while len(self._entries) >= self.max_entries:     # drop the oldest before compiling anew
        self._entries.popitem(last=False)
    value = self._entries[key] = make()
    return value

  def count(self, where: Callable[[Hashable], bool] = lambda key: True) -> int:
    return sum(1 for k in self._entries if where(k))

  def clear(self) -> None:
    self._entries.clear()
