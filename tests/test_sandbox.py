"""The code sandbox on passing, failing, looping, forking, setsid-ing and memory-hungry
programs; what it passes to them (its environment); and whether its report matches what a
program observes."""
import os
import time

import pytest

from experiments.evaluation import sandbox

FAST = sandbox.Limits(wall_s=2.5, cpu_s=2, memory_mb=512)
ALLOWED_ENV = {'PATH', 'LANG', 'LC_ALL', 'LC_CTYPE', 'TZ'}


def _alive(pid):
  """Running (not a zombie and not gone)?"""
  try:
    with open(f'/proc/{pid}/stat') as f:
      return f.read().rsplit(')', 1)[1].split()[0] != 'Z'
  except OSError:
    return False


def test_sandbox_pass_fail_and_isolation():
  ok, bad, cwd = sandbox.run_programs([
      'def f(x):\n  return x + 1\nassert f(1) == 2\nprint("fine")',
      'assert 1 + 1 == 3, "wrong"',
      'import os, sys\nprint(os.getcwd())\nprint(sorted(k for k in os.environ if "proxy" in k.lower()))\n'
      'print(sys.flags.isolated)\nprint(sys.stdin is None or sys.stdin.read() == "")'], FAST)
  assert (ok.status, ok.stdout.strip()) == ('passed', 'fine')
  assert bad.status == 'failed' and 'AssertionError: wrong' in bad.stderr
  lines = cwd.stdout.split('\n')
  assert cwd.status == 'passed' and os.path.basename(lines[0]).startswith('sandbox_')
  assert lines[1:4] == ['[]', '1', 'True']
  assert not os.path.exists(lines[0])     # the temporary directory is gone


def test_program_cannot_see_the_harness_environment(monkeypatch):
  monkeypatch.setenv('HF_TOKEN', 'hf_secret_token_1234')
  monkeypatch.setenv('MY_API_KEY', 'sk-another-secret-5678')
  monkeypatch.setenv('PYTHONPATH', '/somewhere/private')
  r = sandbox.run_program('import os\nfor k, v in sorted(os.environ.items()):\n  print(k, "=", v)', FAST)
  assert r.status == 'passed'
  keys = {line.split(' = ')[0] for line in r.stdout.splitlines() if ' = ' in line}
  assert keys <= ALLOWED_ENV, keys - ALLOWED_ENV
  for secret in ('hf_secret_token_1234', 'sk-another-secret-5678', '/somewhere/private'):
    assert secret not in r.stdout


def test_sandbox_infinite_loop_times_out_and_is_killed():
  t0 = time.perf_counter()
  # A program that hangs without using CPU (a spinning one would hit the 2 s CPU limit before
  # the 2.5 s wall limit on an idle machine: test_sandbox_cpu_limit_is_a_timeout covers that).
  r = sandbox.run_program('import time\nwhile True:\n  time.sleep(0.05)', FAST)
  assert (r.status, r.reason) == ('timeout', 'wall') and r.returncode == -9
  assert time.perf_counter() - t0 < FAST.wall_s + 2


def test_sandbox_cpu_limit_is_a_timeout():
  r = sandbox.run_program('while True:\n  pass', sandbox.Limits(wall_s=10, cpu_s=1))
  assert (r.status, r.reason) == ('timeout', 'cpu')


def test_sandbox_memory_hog_is_stopped():
  # bytes(n) is calloc'd: address space grows without touching pages, so the hog reaches the
  # RLIMIT_AS cap in well under a CPU second anywhere (CI's slower page faults once took a
  # page-touching hog past a 2 s CPU limit first), and a machine without the cap is not filled.
  r = sandbox.run_program('a = []\nwhile True:\n  a.append(bytes(10**7))',
                          sandbox.Limits(wall_s=20, cpu_s=10, memory_mb=256))
  assert (r.status, r.reason) == ('error', 'memory')
  assert 'MemoryError' in r.stderr


@pytest.mark.skipif(not os.path.exists('/proc/self/oom_score_adj'), reason='Linux only')
def test_program_is_the_out_of_memory_killers_first_choice():
  # Should the machine run out of memory anyway (several programs at once), the kernel kills
  # the program (score 1000), not the evaluation.
  r = sandbox.run_program('print(open("/proc/self/oom_score_adj").read())', FAST)
  assert r.stdout.strip() == '1000'


def test_guard_refuses_fork_inside_the_program():
  g = sandbox.run_program('import os\nos.fork()', FAST)
  assert g.status == 'failed' and 'disabled in the evaluation sandbox' in g.stderr


FORK_BOMB = ('import os, sys, time\n'
             'for i in range(40):\n'
             '  try:\n'
             '    pid = os.fork()\n'
             '  except OSError:\n'
             '    break\n'
             '  if pid == 0:\n'
             '    time.sleep(60)\n'
             '    os._exit(0)\n'
             '  print(pid, flush=True)\n'
             '  time.sleep(0.04)\n'     # slow enough that a polling limit sees each fork
             'time.sleep(60)\n')


def test_forked_children_are_limited_and_killed():
  # guard off: the process limit stops the forks (the kernel's RLIMIT_NPROC, or in weak mode
  # the supervisor's count), and the whole family dies with the program
  lim = sandbox.Limits(wall_s=2.5, guard=False, max_processes=8)
  r = sandbox.run_program(FORK_BOMB, lim)
  pids = [int(p) for p in r.stdout.split()]
  assert pids and r.status in ('timeout', 'error')
  time.sleep(0.2)
  assert not [p for p in pids if _alive(p)]
  assert sandbox.run_program('print(2)', FAST).status == 'passed'   # the harness carries on


# A program that exits at once, leaving two children that each called setsid() (new session
# and process group, out of reach of killpg) and forked a grandchild; all sleep 60 s.
SETSID = ('import os, time\n'
          'for i in range(2):\n'
          '  if os.fork() == 0:\n'
          '    os.setsid()\n'
          '    if os.fork() == 0:\n'
          '      print(os.getpid(), flush=True)\n'
          '      time.sleep(60)\n'
          '      os._exit(0)\n'
          '    print(os.getpid(), flush=True)\n'
          '    time.sleep(60)\n'
          '    os._exit(0)\n'
          'time.sleep(0.5)\n'
          'print("parent done", flush=True)\n')


@pytest.mark.skipif(not sandbox.sandbox_report(FAST)['setsid_children_killed'],
                    reason='no child subreaper here (not Linux)')
def test_setsid_children_are_gone_after_the_call():
  r = sandbox.run_program(SETSID, sandbox.Limits(wall_s=5, guard=False))
  assert r.status == 'passed' and 'parent done' in r.stdout
  pids = [int(p) for p in r.stdout.split() if p.isdigit()]
  assert len(pids) == 4
  assert not [p for p in pids if _alive(p)]    # gone when run_program returns, no waiting
  assert r.leftover == 4


def test_sandbox_report_is_honest():
  """What the report claims, checked against what programs observe."""
  rep = sandbox.sandbox_report(FAST)
  assert rep['as_root'] == (os.geteuid() == 0)
  uid = sandbox.run_program('import os\nprint(os.getuid())', FAST)
  # 'unprivileged_uid' claims the program does not run as root
  assert (int(uid.stdout) != 0) == (rep['unprivileged_uid'] or not rep['as_root'])
  assert rep['mode'] == ('strong' if rep['process_limit'] == 'kernel' else 'weak')
  if rep['process_limit_enforced']:    # then 40 forks cannot all succeed with a limit of 8
    r = sandbox.run_program(FORK_BOMB, sandbox.Limits(wall_s=2.5, guard=False, max_processes=8))
    assert len(r.stdout.split()) < 20
  assert rep['network_isolated'] is False
  line = sandbox.describe(rep)
  assert f"{rep['mode']} mode" in line and f'process limit {FAST.max_processes}' in line
