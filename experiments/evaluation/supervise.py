"""The sandbox's supervisor: one per program, started by sandbox.run_program as

  python -I supervise.py ARGS_JSON      # prints {"rc", "why", "seconds", "leftover", "subreaper"}

It is a separate process (not a thread of the harness) so that it can make itself a child
subreaper (Linux prctl PR_SET_CHILD_SUBREAPER): every process the program forks, including
children that call setsid() and double-fork to leave its session and process group, is
reparented to the supervisor when its parent dies, so the supervisor can find all of them
in /proc (by parent id) and kill them once the program ends. It imports nothing from this
repository (it runs under `python -I` from its file path).

Its jobs: start the program (resource limits and oom_score_adj set between fork and exec),
enforce the wall clock, count the program's processes where the kernel does not (root
without a separate uid ignores RLIMIT_NPROC), and at the end kill every descendant.
"""
import ctypes
import json
import os
import resource
import signal
import subprocess
import sys
import time

PR_SET_CHILD_SUBREAPER = 36
POLL_S = 0.02

def apply_limits(lim: dict) -> None:
  """In the program's process between fork and exec (a preexec_fn: safe, as the supervisor
  has one thread; after Popen's setuid, so an unprivileged program gets them too)."""
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
  try:   # if the machine runs out of memory, the kernel kills this program first, not the harness
    with open('/proc/self/oom_score_adj', 'w') as f:
      f.write('1000')
  except OSError:
    pass


def become_subreaper() -> bool:
  if not sys.platform.startswith('linux'):
    return False
  try:
    return ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
  except (OSError, AttributeError):
    return False


def descendants(root: int) -> list[tuple[int, str]]:
  """(pid, state) of every process below `root`, from /proc's parent ids ([] without /proc)."""
  children: dict = {}
  try:
    names = os.listdir('/proc')
  except OSError:
    return []
  for name in names:
    if not name.isdigit():
      continue
    try:
      with open(f'/proc/{name}/stat', 'rb') as f:
        fields = f.read().rsplit(b')', 1)[1].split()   # the command name may hold spaces or ')'
    except OSError:
      continue   # exited meanwhile
    children.setdefault(int(fields[1]), []).append((int(name), fields[0].decode()))
  out, todo = [], [root]
  while todo:
    for pid, state in children.get(todo.pop(), ()):
      out.append((pid, state))
      todo.append(pid)
  return out


def reap() -> None:
  """Collect the exit status of every finished child (orphans adopted by us included)."""
  while True:
    try:
      pid, _ = os.waitpid(-1, os.WNOHANG)
    except ChildProcessError:
      return
    if pid == 0:
      return


def kill_all(me: int, pgid: int) -> int:
  """SIGKILL every descendant until none is left; the number that were still running."""
  with_state = descendants(me)
  leftover = sum(s != 'Z' for _, s in with_state)
  for _ in range(500):   # a forking program may add processes between two sweeps
    try:
      os.killpg(pgid, signal.SIGKILL)   # also the fallback where /proc is missing
    except (ProcessLookupError, PermissionError):
      pass
    for pid, _ in with_state:
      try:
        os.kill(pid, signal.SIGKILL)
      except (ProcessLookupError, PermissionError):
        pass
    reap()
    with_state = descendants(me)
    if not with_state:
      break
    time.sleep(0.005)
  return leftover


def supervise(a: dict) -> dict:
  lim = a['limits']
  subreaper = become_subreaper()
  kw = {'user': a['uid'], 'group': a['uid'], 'extra_groups': []} if a['uid'] is not None else {}
  t0 = time.perf_counter()
  with open(a['stdout'], 'wb') as out, open(a['stderr'], 'wb') as err:
    proc = subprocess.Popen([sys.executable, '-I', a['program']], cwd=a['cwd'],
                            stdin=subprocess.DEVNULL, stdout=out, stderr=err, env=a['env'],
                            start_new_session=True, close_fds=True,
                            preexec_fn=lambda: apply_limits(lim), **kw)
  deadline = time.monotonic() + lim['wall_s']
  count = a['count_processes'] and subreaper
  why, rc = '', None
  while rc is None:
    try:
      rc = proc.wait(timeout=POLL_S)   # returns as soon as the program exits
      break
    except subprocess.TimeoutExpired:
      pass
    if time.monotonic() >= deadline:
      why = 'wall'
    elif count and sum(s != 'Z' for _, s in descendants(os.getpid())) > lim['max_processes']:
      why = 'processes'
    if why:
      os.kill(proc.pid, signal.SIGKILL)
      rc = proc.wait()
  seconds = time.perf_counter() - t0
  leftover = kill_all(os.getpid(), proc.pid)
  return {'rc': rc, 'why': why, 'seconds': seconds, 'leftover': leftover, 'subreaper': subreaper}


if __name__ == '__main__':
  print(json.dumps(supervise(json.loads(sys.argv[1]))), flush=True)
