"""A full disk (ENOSPC, or a quota: EDQUOT) met while a run writes its files: one sentence
saying what is full, what is safely saved and how to go on, in place of the pages of
tracebacks that the writing threads (Orbax, TensorStore, TensorBoard) print.

TensorStore reports it as a ValueError whose text carries the OS error code, so the exception
chain is searched by errno and by text. Checkpoints are safe by construction: a save that
fails stays a `STEP.orbax-checkpoint-tmp` directory (never listed as a step), and the older
steps are deleted only after a newer one is final.
"""
from __future__ import annotations

import errno
import logging
import os
import re
import sys
import threading

from lm import checkpoint as ckpt_lib
from lm import paths

CODES = (errno.ENOSPC, errno.EDQUOT)
_TEXT = re.compile(r"No space left on device|Disk quota exceeded|"
                   rf"os_error_code='({errno.ENOSPC}|{errno.EDQUOT})'")
_PATH = re.compile(r'"((?:/|[a-z][a-z0-9+.-]*://)[^"]+)"')


def cause(exc: BaseException | None) -> BaseException | None:
  """The exception in `exc`'s chain (itself, its __cause__ / __context__) that says the disk
  is full, or None."""
  seen = set()
  while exc is not None and id(exc) not in seen:
    seen.add(id(exc))
    if isinstance(exc, OSError) and exc.errno in CODES:
      return exc
    if _TEXT.search(str(exc)):
      return exc
    exc = exc.__cause__ or exc.__context__
  return None


def is_full(text: str) -> bool:
  return bool(_TEXT.search(text))


def where(exc: BaseException) -> str | None:
  """The file whose write failed: the OSError's filename, else the first quoted path in the
  message (TensorStore's), else None."""
  if isinstance(exc, OSError) and exc.filename:
    return os.fspath(exc.filename)
  m = _PATH.search(str(exc))
  return m.group(1) if m else None


def message(exc: BaseException, workdir: str) -> str:
  """The sentence for a full disk met by a run in `workdir` (exc: what `cause` found)."""
  quota = getattr(exc, 'errno', None) == errno.EDQUOT or 'quota' in str(exc).lower()
  wd = os.fspath(paths.absolute(workdir))
  file = where(exc)
  if file is None or file == wd:
    place = wd
  elif file.startswith(wd + os.sep):
    place = f'{wd} (writing {os.path.relpath(file, wd)})'
  else:
    place = file
  steps = ckpt_lib.Checkpointer.steps_in(os.path.join(wd, 'checkpoints'))
  if steps:
    saved = (f'the checkpoints up to step {steps[-1]} are intact; free some space and rerun the '
             f'same command: it resumes from step {steps[-1]}')
  else:
    saved = 'no checkpoint had been saved yet; free some space and rerun the same command'
  what = 'disk quota exceeded' if quota else 'no space left'
  return f'{what} on the device holding {place}; {saved}.'


class QuietFullDisk(logging.Filter):
  """Drops log records about a full disk (Orbax logs each failed write of a save, with its
  traceback, from its threads): the launcher's one sentence says it once."""

  def filter(self, record: logging.LogRecord) -> bool:
    exc = record.exc_info[1] if record.exc_info else None
    return not (is_full(record.getMessage()) or cause(exc) is not None)


def quiet_threads(workdir: str) -> None:
  """For the launcher's process: log records and unraisable exceptions about a full disk are
  left to the one sentence (the main thread meets the same error at its next wait for a save
  or write). A thread that dies of it ends the process with the sentence at once: TensorBoard's
  writer thread dying leaves its queue full and the main thread blocked on it for ever."""
  quiet = QuietFullDisk()
  logging.getLogger('absl').addFilter(quiet)    # Orbax logs through absl's logger
  for handler in logging.getLogger().handlers:
    handler.addFilter(quiet)
  thread_hook, unraisable_hook = threading.excepthook, sys.unraisablehook

  def on_thread(args):
    full = cause(args.exc_value)
    if full is None:
      return thread_hook(args)
    print(f'\nerror: {message(full, workdir)}', file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(1)      # the main thread may be blocked on this thread's queue

  def on_unraisable(u):
    if cause(u.exc_value) is None:
      unraisable_hook(u)
  threading.excepthook, sys.unraisablehook = on_thread, on_unraisable
