"""Test setup: 8 fake CPU devices, so every run exercises sharding (must precede importing jax)."""
import os
import sys

os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                           ' --xla_force_host_platform_device_count=8').strip()
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from data import corpora  # noqa: E402

# Real data that ships with the package: every test runs in a bare clone.
TINY_SHAKESPEARE = Path(corpora.path('tinyshakespeare'))
HH_RLHF = Path(corpora.path('hh-rlhf-harmless-base'))


@pytest.fixture
def tiny_corpus(tmp_path):
  """A real text: the first 60k characters of tinyshakespeare."""
  text = TINY_SHAKESPEARE.read_text(encoding='utf-8')[:60000]
  p = tmp_path / 'corpus.txt'
  p.write_text(text, encoding='utf-8')
  return str(p)
