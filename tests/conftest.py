"""Test setup: 8 fake CPU devices, so every run exercises sharding (must precede importing jax)."""
import atexit
import os
import shutil
import sys
import tempfile

# Compile time, not run time, is most of the suite (tiny models, a few steps each), so:
# - LLVM at -O0: the same XLA programs (HLO passes unchanged), about 2x faster to compile
#   and slower only to run; results agree with -O2 to float rounding (~1e-7 relative).
# - XLA:CPU's older elemental emitters for fusions instead of its MLIR fusion emitters: about
#   half the backend compile time again for these small programs, run time unchanged.
# - A persistent compilation cache for this session only (a fresh temp dir, removed at exit):
#   a resumed run, a sweep's repeated shapes and launcher children (they inherit the env)
#   reuse programs an earlier test compiled, instead of compiling them again.
# - XLA:CPU's collective timeouts at an hour (as the launcher sets them): the 8 fake devices'
#   threads wait on each other in every collective, and on a loaded machine (a laptop, CI) the
#   default timeouts abort the whole pytest process instead of letting it run slower.
_flags = os.environ.get('XLA_FLAGS', '')
os.environ['XLA_FLAGS'] = (_flags +
                           ' --xla_force_host_platform_device_count=8'
                           ' --xla_backend_optimization_level=0'
                           ' --xla_cpu_use_fusion_emitters=false' +
                           ''.join(f' {flag}=3600' for flag in (
                               '--xla_cpu_collective_call_terminate_timeout_seconds',
                               '--xla_cpu_collective_timeout_seconds') if flag not in _flags)).strip()
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
if 'JAX_COMPILATION_CACHE_DIR' not in os.environ:
  _cache = tempfile.mkdtemp(prefix='jax-test-cache-')
  atexit.register(shutil.rmtree, _cache, ignore_errors=True)
  os.environ['JAX_COMPILATION_CACHE_DIR'] = _cache
  os.environ['JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS'] = '0'
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
