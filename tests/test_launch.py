"""The launch recipes' dry runs print the exact per-host commands for given arguments."""
import shlex

import pytest

from experiments import launch

OVERRIDE = '--config.train.steps=100'


def _dry(capsys, *argv):
  assert launch.main(list(argv) + ['--dry-run', '--', OVERRIDE]) == 0
  return capsys.readouterr().out


def test_tpu_vm_dry_run(capsys):
  out = _dry(capsys, 'tpu-vm', '--name=pod', '--zone=us-east5-a', '--project=proj',
             '--repo=https://example.com/lm.git', '--config=experiments/configs/shakespeare_works.py',
             '--workdir=gs://bkt/runs/w', '--env=FOO=a b')
  worker = ("cd lm-research && PYTHONUNBUFFERED=1 JAX_PLATFORMS=tpu FOO='a b' python -m experiments.run "
            '--config=experiments/configs/shakespeare_works.py --workdir=gs://bkt/runs/w --multihost '
            '--config.train.steps=100')
  ssh = 'gcloud compute tpus tpu-vm ssh pod --zone=us-east5-a --project=proj --worker=all --command '
  setup = ('(git clone https://example.com/lm.git lm-research || git -C lm-research pull --ff-only) && '
           'pip install -q -e lm-research "jax[tpu]"')
  lines = out.splitlines()
  assert 'warning' not in out       # a gs:// workdir is supported (etils.epath): no caveat printed
  assert lines[1] == f'#   {worker}'
  assert lines[2:] == [ssh + shlex.quote(setup), ssh + shlex.quote(worker)]
  assert shlex.split(lines[3])[-1] == worker   # the shell hands the worker exactly this command


def test_slurm_one_task_per_gpu(capsys):
  out = _dry(capsys, 'slurm', '--nodes=2', '--gpus-per-node=8', '--partition=gpu',
             '--config=experiments/configs/shakespeare_works.py', '--workdir=/shared/runs/w')
  assert '#SBATCH --nodes=2\n#SBATCH --ntasks-per-node=8\n#SBATCH --gpus-per-node=8\n' in out
  assert '#SBATCH --partition=gpu\n' in out and 'cd $SLURM_SUBMIT_DIR\n' in out
  assert 'export JAX_COORDINATOR_PORT=61234\n' in out
  assert ('\nsrun --kill-on-bad-exit=1 python -m experiments.run '
          '--config=experiments/configs/shakespeare_works.py --workdir=/shared/runs/w --multihost '
          '--config.train.steps=100\n') in out


def test_slurm_one_task_per_node_passes_ranks_explicitly(capsys):
  out = _dry(capsys, 'slurm', '--nodes=4', '--per-node', '--config=c.py', '--workdir=/shared/w')
  assert '#SBATCH --ntasks-per-node=1\n' in out
  assert 'export COORDINATOR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1):61234"' in out
  srun = [l for l in out.splitlines() if l.startswith('srun')][0]
  task = shlex.split(srun)[-1]   # what each task's bash runs, expanding its own SLURM_PROCID
  assert task == ('python -m experiments.run --config=c.py --workdir=/shared/w '
                  '--coordinator=$COORDINATOR --num_processes=$SLURM_NTASKS '
                  '--process_id=$SLURM_PROCID --config.train.steps=100')


def test_only_config_overrides_after_double_dash():
  with pytest.raises(SystemExit):
    launch.main(['slurm', '--nodes=1', '--config=c.py', '--workdir=w', '--', '--steps=3'])
