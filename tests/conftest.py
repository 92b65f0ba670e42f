"""Test setup: 8 fake CPU devices, so every run exercises sharding (must precede importing jax)."""
import os
import sys

# Compile time, not run time, is most of the suite (tiny models, a few steps each), so:
# - LLVM at -O0: the same XLA programs (HLO passes unchanged), about 2x faster to compile
#   and slower only to run; results agree with -O2 to float rounding (~1e-7 relative).
# - XLA:CPU's older elemental emitters for fusions instead of its MLIR fusion emitters: about
#   half the backend compile time again for these small programs, run time unchanged.
# - No persistent compilation cache (a session-only one was used until 9fc9214): the suite's
#   crashes near its end, first seen in the cache's executable.serialize(), were the memory-map
#   limit (see _free_compiled_programs); each test file compiles its own programs anyway.
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
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from data import corpora  # noqa: E402


@pytest.fixture(autouse=True, scope='module')
def _free_compiled_programs():
  """Drop JAX's compiled programs after each test file. XLA:CPU maps each executable's code
  into memory; kept for the whole session they passed 12,000 memory maps in the first 30 files
  and, near the end of the suite, the kernel's limit (vm.max_map_count, 65,530): the process then
  aborted or segfaulted inside XLA (seen in CI and on this machine at 94% of the suite). With the
  limit lowered to 12,000, the first 30 files segfault without this fixture and pass with it."""
  yield
  import gc
  import jax
  jax.clear_caches()
  gc.collect()

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
