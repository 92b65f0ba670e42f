"""The launcher at first contact: --help, a wrong --config path, a file that is not a config,
--show, quiet logs by default (with a verbosity switch), and the CPU collective timeouts."""
import os
import re
import subprocess
import sys

import pytest

from experiments import run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cli(*args, env=None, timeout=300):
  return subprocess.run([sys.executable, '-m', 'experiments.run', *args], cwd=ROOT,
                        env=env or dict(os.environ), capture_output=True, text=True, timeout=timeout)


def _one_sentence(r):
  assert r.returncode == 1 and 'Traceback' not in r.stderr, r.stderr[-2000:]
  lines = r.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith('error: '), r.stderr
  return lines[0]


def test_a_mistyped_config_path_is_one_sentence_with_the_near_name(tmp_path):
  line = _one_sentence(_cli('--config=experiments/configs/shakespeare_wrks.py', f'--workdir={tmp_path}'))
  assert 'no such file' in line and 'did you mean experiments/configs/shakespeare_works.py?' in line
  assert not os.listdir(tmp_path)


def test_a_base_config_without_get_config_is_one_sentence(tmp_path):
  line = _one_sentence(_cli('--config=experiments/configs/base.py', f'--workdir={tmp_path}'))
  assert 'defines no get_config()' in line and '--help' in line
  line = _one_sentence(_cli(f'--workdir={tmp_path}'))
  assert '--config=FILE is required' in line


def test_help_exits_0_and_lists_experiments_configs_and_how_to_see_keys():
  r = _cli('--help')
  assert r.returncode == 0, r.stderr[-2000:]
  assert 'experiments/configs/shakespeare_works.py' in r.stdout
  assert 'experiments/configs/evaluate.py' in r.stdout
  assert 'experiments/configs/base.py' not in r.stdout     # a building block, not a config
  listed = re.search(r'Registered experiments \(config.experiment\): (.*)', r.stdout).group(1)
  assert {'pretrain', 'evaluate', 'sft', 'ppo'} <= set(listed.split(', '))
  assert '--config=FILE --show' in r.stdout and '--verbosity' in r.stdout


def test_show_prints_every_key_as_its_override_without_a_workdir():
  r = _cli('--config=experiments/configs/evaluate.py', '--show', '--config.batch_size=4')
  assert r.returncode == 0, r.stderr[-2000:]
  lines = r.stdout.splitlines()
  assert '--config.batch_size=4' in lines and "--config.task.gsm8k.path=''" in lines
  assert "--config.task.jsonl.bleu.tokenize='13a'" in lines
  line = _one_sentence(_cli('--config=experiments/configs/evaluate.py'))
  assert '--workdir=DIR is required' in line


def _tiny_run(tmp_path, *extra):
  env = {k: v for k, v in os.environ.items() if k != 'JAX_PLATFORMS'}   # JAX looks for a TPU
  return _cli('--config=experiments/configs/shakespeare_char.py', f'--workdir={tmp_path / "w"}',
              '--config.train.steps=2', '--config.eval.every=0', '--config.train.samples=0',
              '--config.model.n_layers=1', '--config.model.d_model=32', '--config.train.batch_size=8',
              *extra, env=env)


INFO_LINE = re.compile(r'^I\d{4} ', re.M)   # absl's INFO format (Orbax, JAX's backend search)


def test_logs_are_quiet_by_default(tmp_path):
  r = _tiny_run(tmp_path)
  assert r.returncode == 0, r.stderr[-2000:]
  out = r.stdout + r.stderr
  assert not INFO_LINE.search(out), out[-2000:]
  assert 'Unable to initialize backend' not in out and 'Downloading and preparing' not in out


@pytest.mark.slow
def test_verbosity_0_shows_the_info_lines(tmp_path):
  """The control for the test above: the lines it looks for are there when asked for."""
  r = _tiny_run(tmp_path, '--verbosity=0')
  assert r.returncode == 0, r.stderr[-2000:]
  out = r.stdout + r.stderr
  assert INFO_LINE.search(out) and 'Downloading and preparing' in out


def test_collective_timeouts_raised_unless_the_user_set_them(monkeypatch):
  flags = ('--xla_cpu_collective_call_terminate_timeout_seconds=3600 '
           '--xla_cpu_collective_timeout_seconds=3600')
  env = {}
  run.raise_collective_timeouts(env)
  assert env['XLA_FLAGS'] == flags
  env = {'XLA_FLAGS': '--xla_force_host_platform_device_count=8'}
  run.raise_collective_timeouts(env)
  assert env['XLA_FLAGS'] == '--xla_force_host_platform_device_count=8 ' + flags
  mine = {'XLA_FLAGS': '--xla_cpu_collective_timeout_seconds=5'}
  run.raise_collective_timeouts(mine)
  assert mine == {'XLA_FLAGS': '--xla_cpu_collective_timeout_seconds=5'}
  gpu = {'JAX_PLATFORMS': 'cuda'}
  run.raise_collective_timeouts(gpu)
  assert gpu == {'JAX_PLATFORMS': 'cuda'}
  # the launcher does it first thing (here before --help exits)
  monkeypatch.setenv('XLA_FLAGS', '--xla_force_host_platform_device_count=8')
  monkeypatch.setenv('JAX_PLATFORMS', 'cpu')
  with pytest.raises(SystemExit) as e:
    run.cli(['run', '--help'])
  assert e.value.code == 0 and os.environ['XLA_FLAGS'].endswith(flags)


def test_a_workdir_that_is_a_file_is_one_sentence(tmp_path):
  f = tmp_path / 'notes.txt'
  f.write_text('mine')
  line = _one_sentence(_cli('--config=experiments/configs/shakespeare_char.py', f'--workdir={f}'))
  assert f'--workdir={f} is a file' in line and f.read_text() == 'mine'


def test_a_renamed_key_names_its_new_spelling(tmp_path):
  """The policy stages' one vocabulary: an old key is one sentence with the new key."""
  line = _one_sentence(_cli('--config=experiments/configs/rlhf_grpo.py', f'--workdir={tmp_path}',
                            '--config.k=2', '--config.loss.kl_coef=0.1'))
  assert line == ('error: --config.k was renamed: use --config.rollout.samples; --config.loss.kl_coef '
                  'was renamed: use --config.kl.coef.')
  line = _one_sentence(_cli('--config=experiments/configs/rlhf_ppo.py', f'--workdir={tmp_path}',
                            '--config.ppo.clip_eps=0.1'))
  assert line.endswith('use --config.loss.clip_eps.')
  # Every training stage: the evaluation interval is eval.every (was train.eval_every).
  line = _one_sentence(_cli('--config=experiments/configs/shakespeare_char.py', f'--workdir={tmp_path}',
                            '--config.train.eval_every=2'))
  assert line.endswith('use --config.eval.every.')
  # A key the config has under that name is not a rename: a typo in it gets the ordinary message.
  line = _one_sentence(_cli('--config=experiments/configs/shakespeare_char.py', f'--workdir={tmp_path}',
                            '--config.train.log_everyy=2'))
  assert 'no such config key' in line and 'renamed' not in line
  assert not os.listdir(tmp_path)


@pytest.mark.parametrize('config,override,key', [
    ('shakespeare_works', 'train.batch_size=0', 'train.batch_size=0 must be positive'),
    ('shakespeare_works', 'train.grad_accum=0', 'train.grad_accum=0 must be positive'),
    ('shakespeare_works', 'optim.lr=-0.001', 'optim.lr=-0.001 must be at least 0'),
    ('shakespeare_works', 'train.steps=0', 'train.steps=0 would train nothing'),
    ('shakespeare_works', 'eval.every=-1', 'eval.every=-1 must be at least 0'),
    ('shakespeare_works', 'train.checkpoint_every=-5', 'train.checkpoint_every=-5 must be at least 0'),
    ('sft_works', 'train.batch_size=-4', 'train.batch_size=-4 must be positive'),
    ('sft_works', 'train.steps=-1', 'train.steps=-1 would train nothing'),
])
def test_invalid_training_values_fail_before_anything_is_written(tmp_path, config, override, key):
  wd = tmp_path / 'w'
  line = _one_sentence(_cli(f'--config=experiments/configs/{config}.py', f'--workdir={wd}',
                            f'--config.{override}'))
  assert line.startswith(f'error: {key}') and f'--config.{override.split("=")[0]}' in line
  assert not wd.exists()    # no data prepared, no tokenizer, no config.json


def test_invalid_values_fail_in_a_driver_run_before_training(tmp_path, tiny_corpus):
  """Called from Python (no launcher), the drivers' check_batch refuses them before any
  checkpoint or config.json is written."""
  from experiments import pretrain
  from lm.config import ConfigError
  from tests.test_checkpoint import tiny_config
  for train, optim, match in [({'grad_accum': 0}, {}, 'train.grad_accum=0 must be positive'),
                              ({}, {'lr': -1.0}, 'optim.lr=-1.0 must be at least 0'),
                              ({'steps': 0}, {}, 'train.steps=0 would train nothing')]:
    c = tiny_config(tiny_corpus, **train)
    c.optim.update(optim)
    wd = tmp_path / 'run'
    with pytest.raises(ConfigError, match=match):
      pretrain.run(c, str(wd))
    assert not (wd / 'config.json').exists() and not (wd / 'checkpoints').exists()
  # tools_qa alone reads train.steps=0 as few-shot prompting without tuning
  from experiments.configs import tools_works
  from experiments.stages import validate
  c = tools_works.get_config()
  c.train.steps = 0
  validate.training(c)


def test_the_suite_runs_with_the_collective_timeouts_raised():
  """tests/conftest.py sets them as the launcher does: on a loaded machine the default
  timeouts aborted the whole pytest process in an 8-device collective (issue 21)."""
  flags = os.environ['XLA_FLAGS'].split()
  for flag in run.COLLECTIVE_TIMEOUTS:
    assert any(f.startswith(flag + '=') and int(f.split('=')[1]) >= 600 for f in flags), flag


def test_a_changed_model_shape_on_resume_is_one_line(tmp_path):
  """Resuming with another model shape: one sentence naming the stored and requested shapes.
  (The launcher silences stderr after it, which drops most of the pages of tracebacks Orbax's
  abandoned reads printed at exit; a few lines can still come first, from its threads, so the
  test looks for the sentence rather than counting lines.)"""
  tiny = ['--config=experiments/configs/shakespeare_char.py', f'--workdir={tmp_path / "w"}',
          '--config.model.n_layers=1', '--config.model.n_heads=2', '--config.model.max_seq_len=32',
          '--config.train.steps=2', '--config.train.batch_size=8', '--config.eval.every=0',
          '--config.train.checkpoint_every=2', '--config.train.samples=0']
  first = _cli(*tiny, '--config.model.d_model=32')
  assert first.returncode == 0, first.stderr[-2000:]
  r = _cli(*tiny, '--config.model.d_model=64')
  lines = [l for l in r.stderr.splitlines() if l.startswith('error: ')]
  assert r.returncode == 1 and len(lines) == 1, r.stderr[-2000:]
  assert 'hold a model of another shape' in lines[0] and 'stored shape: (' in lines[0]
