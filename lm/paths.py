"""Workdirs as `etils.epath.Path`: a local folder or a bucket URL (gs://, s3://) through one
API (open, exists, mkdir, rename), so a run can write straight to a bucket. A URL is never
passed through os.path (os.path.abspath('gs://b/x') is a local '/cwd/gs:/b/x')."""
from __future__ import annotations

import contextlib
import os
import tempfile

from etils import epath


def is_url(p) -> bool:
  return '://' in os.fspath(p)


def path(p) -> epath.Path:
  return epath.Path(p)


def absolute(p) -> epath.Path:
  """A local path made absolute (as os.path.abspath does); a URL unchanged."""
  return epath.Path(p) if is_url(p) else epath.Path(os.path.abspath(p))


def write_text(p, text: str) -> None:
  with path(p).open('w') as f:
    f.write(text)


def read_text(p) -> str:
  with path(p).open('r') as f:
    return f.read()


@contextlib.contextmanager
def local_copy(p, write: bool = False):
  """A local filename for `p`, for code that only opens local files (tokenizers): `p` itself
  when local; else a temporary file holding p's bytes (if it exists), copied back to p on a
  clean exit when `write`."""
  if not is_url(p):
    yield os.fspath(p)
    return
  src = path(p)
  with tempfile.TemporaryDirectory() as d:
    local = os.path.join(d, src.name)
    if src.exists():
      with open(local, 'wb') as f:
        f.write(src.read_bytes())
    yield local
    if write:
      with open(local, 'rb') as f:
        src.write_bytes(f.read())
