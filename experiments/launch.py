"""Multi-host launch recipes: a TPU VM pod or a Slurm GPU cluster, one launcher on every host.

  python -m experiments.launch tpu-vm --name=NAME --zone=ZONE --config=CONFIG \
      --workdir=gs://BUCKET/runs/x [--repo=URL] --dry-run -- --config.train.steps=1000
  python -m experiments.launch slurm --nodes=4 --gpus-per-node=8 --config=CONFIG \
      --workdir=/shared/runs/x --dry-run -- --config.train.steps=1000

Every host runs the same `python -m experiments.run ... --multihost`: jax.distributed
finds the coordinator, the process count and this process's index from the TPU
metadata server or from Slurm's variables. `--dry-run` prints the exact commands
(and the sbatch script) instead of running them. Arguments after `--` are config
overrides passed to every host.
"""
from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys

RUN = 'python -m experiments.run'


def run_command(config: str, workdir: str, overrides=(), dist=('--multihost',)) -> str:
  """The launcher line every process runs."""
  return ' '.join([RUN, f'--config={config}', f'--workdir={workdir}', *dist,
                   *(shlex.quote(o) for o in overrides)])


def _env(pairs) -> str:
  return ' '.join(f'{k}={shlex.quote(v)}' for k, v in pairs)


# TPU VM pods ---------------------------------------------------------------------------------
TPU_ENV = (('PYTHONUNBUFFERED', '1'),   # logs stream back through ssh as they happen
           ('JAX_PLATFORMS', 'tpu'))    # fail on a worker without TPUs instead of running on CPU


def tpu_vm_commands(a) -> list[list[str]]:
  """gcloud argv lists: an optional setup step (clone/update, install), then the run."""
  ssh = ['gcloud', 'compute', 'tpus', 'tpu-vm', 'ssh', a.name, f'--zone={a.zone}']
  if a.project:
    ssh.append(f'--project={a.project}')
  ssh.append('--worker=all')
  cmds, a.dir = [], a.dir or 'lm-research'
  if a.repo:   # same code on every worker: clone once, pull afterwards
    setup = (f'(git clone {shlex.quote(a.repo)} {a.dir} || git -C {a.dir} pull --ff-only) && '
             f'pip install -q -e {a.dir} "jax[tpu]"')
    cmds.append(ssh + ['--command', setup])
  env = _env(TPU_ENV + tuple(a.env))
  work = f'cd {a.dir} && {env} {run_command(a.config, a.workdir, a.overrides)}'
  cmds.append(ssh + ['--command', work])
  return cmds


# Slurm GPU clusters --------------------------------------------------------------------------
SLURM_ENV = (('PYTHONUNBUFFERED', '1'),
             ('XLA_PYTHON_CLIENT_MEM_FRACTION', '0.9'))   # XLA may take 90% of HBM (default 75%)


def slurm_script(a) -> str:
  """An sbatch script. One task per GPU (default): jax.distributed's Slurm detection gives
  process i GPU SLURM_LOCALID. One task per node (--per-node): that detection would still
  pin each process to one GPU, so the coordinator and ranks are passed explicitly."""
  tasks = 1 if a.per_node else a.gpus_per_node
  lines = ['#!/bin/bash', f'#SBATCH --job-name={a.job_name}', f'#SBATCH --nodes={a.nodes}',
           f'#SBATCH --ntasks-per-node={tasks}',
           # every task sees all GPUs of its node (no per-task binding): JAX picks its own
           f'#SBATCH --gpus-per-node={a.gpus_per_node}',
           f'#SBATCH --cpus-per-task={a.cpus_per_task}', f'#SBATCH --time={a.time}',
           f'#SBATCH --output={a.log_dir}/%x-%j.out']
  lines += [f'#SBATCH --partition={a.partition}'] * bool(a.partition)
  lines += [f'#SBATCH --account={a.account}'] * bool(a.account)
  lines += ['', 'set -euo pipefail', f'cd {a.dir or "$SLURM_SUBMIT_DIR"}']
  lines += [f'export {k}={shlex.quote(v)}' for k, v in SLURM_ENV + tuple(a.env)]
  if a.per_node:
    lines += ['# process 0 (first node of the job) hosts the jax.distributed coordinator',
              'export COORDINATOR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)'
              f':{a.port}"']
    dist = ('--coordinator=$COORDINATOR', '--num_processes=$SLURM_NTASKS', '--process_id=$SLURM_PROCID')
    # single quotes: each task expands its own SLURM_PROCID
    task = "bash -c '" + run_command(a.config, a.workdir, a.overrides, dist).replace("'", "'\\''") + "'"
  else:
    lines.append(f'export JAX_COORDINATOR_PORT={a.port}')
    task = run_command(a.config, a.workdir, a.overrides)
  lines += ['', f'srun --kill-on-bad-exit=1 {task}']
  return '\n'.join(lines) + '\n'


# CLI -----------------------------------------------------------------------------------------
def parse(argv):
  p = argparse.ArgumentParser(prog='python -m experiments.launch', description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = p.add_subparsers(dest='target', required=True)
  common = argparse.ArgumentParser(add_help=False)
  common.add_argument('--config', required=True, help='experiment config file (as for experiments.run)')
  common.add_argument('--workdir', required=True, help='shared by every host: gs://... or a shared filesystem')
  common.add_argument('--dir', default='', help='the checkout on every host (tpu-vm: lm-research, '
                      'slurm: the directory sbatch was run from)')
  common.add_argument('--env', action='append', default=[], metavar='K=V', help='extra environment')
  common.add_argument('--dry-run', action='store_true', help='print the commands, run nothing')
  tpu = sub.add_parser('tpu-vm', parents=[common], help='a Cloud TPU VM pod slice (gcloud)')
  tpu.add_argument('--name', required=True)
  tpu.add_argument('--zone', required=True)
  tpu.add_argument('--project', default='')
  tpu.add_argument('--repo', default='', help='git URL to clone/pull on every worker first')
  slurm = sub.add_parser('slurm', parents=[common], help='an sbatch job on a GPU cluster')
  slurm.add_argument('--nodes', type=int, required=True)
  slurm.add_argument('--gpus-per-node', type=int, default=8)
  slurm.add_argument('--per-node', action='store_true', help='one process per node, not per GPU')
  slurm.add_argument('--cpus-per-task', type=int, default=8)
  slurm.add_argument('--time', default='24:00:00')
  slurm.add_argument('--partition', default='')
  slurm.add_argument('--account', default='')
  slurm.add_argument('--job-name', default='lm')
  slurm.add_argument('--log-dir', default='logs')
  slurm.add_argument('--port', type=int, default=61234, help='jax.distributed coordinator port')
  slurm.add_argument('--script', default='', help='where to write the sbatch script (default: print)')
  argv = list(argv)
  overrides = argv[argv.index('--') + 1:] if '--' in argv else []
  a = p.parse_args(argv[:argv.index('--')] if '--' in argv else argv)
  bad = [o for o in overrides if not o.startswith('--config.')]
  if bad:
    p.error(f'after -- only config overrides (--config.KEY=VALUE) are passed on; got {bad}')
  a.overrides = overrides
  try:
    a.env = [tuple(kv.split('=', 1)) for kv in a.env]
    assert all(len(kv) == 2 for kv in a.env)
  except AssertionError:
    p.error('--env takes KEY=VALUE')
  return a


def main(argv=None) -> int:
  a = parse(sys.argv[1:] if argv is None else argv)
  if a.target == 'tpu-vm':
    cmds = tpu_vm_commands(a)
    if a.dry_run:
      print('# on every worker (jax.distributed reads the process index from the TPU metadata):')
      print(f'#   {cmds[-1][-1]}')
      for c in cmds:
        print(shlex.join(c))
      return 0
    for c in cmds:
      subprocess.run(c, check=True)
    return 0
  script = slurm_script(a)
  if a.dry_run:
    print(script, end='')
    print(f'# submit with: sbatch {a.script or "job.sbatch"}')
    return 0
  path = a.script or 'job.sbatch'
  with open(path, 'w') as f:
    f.write(script)
  os.makedirs(a.log_dir, exist_ok=True)   # sbatch does not create the --output folder
  return subprocess.run(['sbatch', path]).returncode


if __name__ == '__main__':
  sys.exit(main())
