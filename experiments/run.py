"""Launcher: python -m experiments.run --config=experiments/configs/NAME.py --workdir=DIR

Any config value can be overridden (`--config.train.steps=50`); unknown keys fail. On
several hosts pass --multihost (TPU pods, SLURM: auto-detected) or --coordinator,
--num_processes and --process_id.

  --help                     the flags, the registered experiments and the config files
  --config=FILE --show       print FILE's keys and values (what --config.KEY=VALUE can set)
  --verbosity=0              also INFO logs (Orbax checkpointing, JAX's backend search, tfds
                             preparation); by default only warnings and errors (-1)

On CPU the XLA:CPU collective timeouts are raised to an hour unless XLA_FLAGS sets them: on a
busy machine (a laptop, CI) a device thread that waits its turn past the default aborts the
whole process.

Exit status: 0 done; 1 with one `error: ...` line on stderr for bad input (flags, config,
corpus, checkpoints) or a run that cannot go on (a full disk: what is full and the newest
intact checkpoint); 128 + N after signal N (143 SIGTERM, 130 SIGINT), with a checkpoint saved
at the step reached: rerun the same command to continue.
"""
from __future__ import annotations

import ast
import difflib
import glob
import importlib.util
import keyword
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

# The project's own modules (and JAX with them) are imported inside the functions that need
# them, on purpose: --help, --show and a bad flag or config path answer in a second, before
# JAX starts (and the CPU collective timeouts must reach XLA_FLAGS before it does).

config_flags.DEFINE_config_file('config', None, 'Experiment config file.', lock_config=True)
flags.DEFINE_string('workdir', None, 'Where the run writes everything (created if absent).')
flags.DEFINE_bool('multihost', False, 'Call jax.distributed.initialize() with auto-detection.')
flags.DEFINE_string('coordinator', None, 'host:port of process 0 for jax.distributed.')
flags.DEFINE_integer('num_processes', None, 'Number of processes for jax.distributed.')
flags.DEFINE_integer('process_id', None, 'This process index for jax.distributed.')
flags.DEFINE_bool('show', False, "Print the config's keys and values and exit (no --workdir needed).")
FLAGS = flags.FLAGS
CONFIG_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'configs')
# XLA:CPU's collective timeouts: generous, so that a loaded machine slows a run down instead of
# aborting it (an 8-device CPU mesh's threads wait on each other in every collective).
COLLECTIVE_TIMEOUTS = ('--xla_cpu_collective_call_terminate_timeout_seconds',
                       '--xla_cpu_collective_timeout_seconds')
COLLECTIVE_TIMEOUT_S = 3600


def raise_collective_timeouts(env=os.environ) -> None:
  """Add the CPU collective timeouts to XLA_FLAGS where the user set neither (before JAX starts)."""
  platforms = env.get('JAX_PLATFORMS', '')
  if platforms and 'cpu' not in platforms.split(','):
    return
  current = env.get('XLA_FLAGS', '')
  if any(f in current for f in COLLECTIVE_TIMEOUTS):
    return   # the user's choice stands
  env['XLA_FLAGS'] = ' '.join([current] * bool(current) +
                              [f'{f}={COLLECTIVE_TIMEOUT_S}' for f in COLLECTIVE_TIMEOUTS])


# First contact: --help, a config path that is wrong, a file that is not a config ------------
def _config_arg(argv) -> str | None:
  for i, a in enumerate(argv[1:], 1):
    if a.startswith('--config='):
      return a[len('--config='):]
    if a == '--config' and i + 1 < len(argv):
      return argv[i + 1]
  return None


def _has_get_config(path: str) -> bool:
  with open(path, encoding='utf-8') as f:
    tree = ast.parse(f.read(), path)
  return any(isinstance(n, ast.FunctionDef) and n.name == 'get_config' for n in tree.body)


def config_files() -> dict[str, str]:
  """{path relative to the working directory: the first line of its docstring} for every
  config file (one with get_config) in experiments/configs."""
  out = {}
  for path in sorted(glob.glob(os.path.join(CONFIG_DIR, '*.py'))):
    try:
      with open(path, encoding='utf-8') as f:
        tree = ast.parse(f.read(), path)
    except (OSError, SyntaxError):
      continue
    if any(isinstance(n, ast.FunctionDef) and n.name == 'get_config' for n in tree.body):
      doc = (ast.get_docstring(tree) or '').strip().split('\n')[0]
      out[os.path.relpath(path)] = doc
  return out


def check_config_arg(argv) -> str | None:
  """One sentence for a --config that cannot work (absent, missing file, no get_config), or None."""
  value = _config_arg(argv)
  if value is None:
    return ('--config=FILE is required, e.g. --config=experiments/configs/shakespeare_works.py '
            '(python -m experiments.run --help lists them).')
  path = value if os.path.exists(value) else value.split(':')[0]   # FILE:ARG is allowed
  if not os.path.isfile(path):
    near = difflib.get_close_matches(path, list(config_files()), n=1, cutoff=0.6)
    hint = f'did you mean {near[0]}? ' if near else ''
    return f'--config={value}: no such file; {hint}python -m experiments.run --help lists the configs.'
  try:
    ok = _has_get_config(path)
  except SyntaxError as e:
    return f'--config={value} is not valid Python (line {e.lineno}: {e.msg}).'
  if not ok:
    return (f'--config={value} defines no get_config(): it holds defaults that other configs '
            'import, not an experiment; python -m experiments.run --help lists the configs.')
  return None


def help_text() -> str:
  from experiments import registry   # a table of names: imports no experiment
  lines = [__doc__.strip(), '', 'Flags:']
  for name in ('config', 'workdir', 'show', 'multihost', 'coordinator', 'num_processes', 'process_id'):
    lines.append(f'  --{name}: {FLAGS[name].help}')
  lines += ['  --verbosity: -1 warnings only (default), 0 INFO, 1 debug', '',
            'Registered experiments (config.experiment): ' + ', '.join(sorted(registry.EXPERIMENTS)),
            '', 'Config files (see one\'s keys: --config=FILE --show):']
  files = config_files()
  width = max(map(len, files), default=0)
  lines += [f'  {path.ljust(width)}  {doc}' for path, doc in files.items()]
  return '\n'.join(lines)


def quiet_logs() -> None:
  """Warnings and errors only, unless --verbosity was given: no Orbax INFO lines inside progress
  bars, no JAX 'Unable to initialize backend' line, tfds's preparation messages as INFO logs."""
  if FLAGS['verbosity'].present:
    return
  logging.set_verbosity(logging.WARNING)
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  try:
    from tensorflow_datasets.core import dataset_builder
  except ImportError:
    return
  builder = dataset_builder.DatasetBuilder
  messages = {'_log_download_bytes': 'tfds: preparing dataset %s in %s',
              '_log_download_done': 'tfds: dataset %s prepared in %s'}
  for name, text in messages.items():   # tfds prints these to stdout whatever the log level
    if hasattr(builder, name):
      setattr(builder, name, lambda self, _t=text: logging.info(_t, self.name, self.data_dir))


def show(config) -> str:
  """Every key as the override that sets it, with its current value."""
  lines = []

  def walk(d, prefix):
    for k in sorted(d):
      v = d[k]
      if isinstance(v, dict) and v:
        walk(v, f'{prefix}{k}.')
      else:
        lines.append(f'--config.{prefix}{k}={v!r}')
  walk(config.to_dict(), '')
  return '\n'.join(lines)


def _user_errors():
  from data.pipeline import DataError
  from data.sources import CorpusError
  from data.tokenizers import TokenizerError
  from lm.checkpoint import CheckpointError
  from lm.config import ConfigError
  from lm.sharding import ShardingError
  from experiments.stages.trainer import TrainingError
  return (ConfigError, CorpusError, TokenizerError, DataError, ShardingError, CheckpointError,
          TrainingError)


def renamed_hint(argv, keys) -> str | None:
  """The new spelling of an override whose key was renamed (experiments/configs/renamed.py)."""
  from experiments.configs import renamed
  try:
    spec = importlib.util.spec_from_file_location('_config_for_hint', _config_arg(argv).split(':')[0])
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
  except Exception:   # any failure here only loses the hint, never the error itself
    config = None
  hints = [h for h in (renamed.hint(k, config) for k in keys) if h]
  return '; '.join(hints) or None


def parse_flags(argv):
  """absl's parser, but a bad override (unknown config key, value of the wrong type) is one
  `error:` sentence rather than a usage dump or an ml_collections traceback."""
  try:
    return FLAGS(argv)
  except (flags.Error, AttributeError, KeyError, TypeError, ValueError) as e:
    text = str(e)
    try:                       # ml_collections wraps its KeyError's message in quotes
      text = str(ast.literal_eval(text))
    except (ValueError, SyntaxError):
      pass
    msg = ' '.join(text.split())
    if isinstance(e, (AttributeError, KeyError)):
      bad = [a.split('=')[0] for a in argv[1:] if a.startswith('--config.')]
      msg = f'no such config key {msg} (overrides given: {", ".join(bad)})'
      renamed = renamed_hint(argv, [b[len('--config.'):] for b in bad])
      if renamed:
        sys.exit(f'error: {renamed}.')
    for a in argv[1:]:         # e.g. the task family `continue`: a key that is a Python keyword
      name, _, value = a.partition('=')
      keys = name.split('.')[1:]
      reserved = [k for k in keys if keyword.iskeyword(k)]
      if name.startswith('--config.') and reserved:
        fixed = ''.join(f"['{k}']" if k in reserved else f'.{k}' for k in keys)
        msg = (f'{name} cannot be parsed because {reserved[0]!r} is a Python keyword; write it as a '
               f'subscript: "--config{fixed}={value}"')
    sys.exit(f'error: {msg}; the keys and types are those of the --config file.')


def check_values(config) -> None:
  """Values no training run can use (batch size, learning rate, steps, intervals): one sentence
  before the driver prepares data or writes into the workdir."""
  from experiments.stages import validate
  if validate.trains(config):
    validate.training(config)


def fail(sentence: str) -> None:
  """Exit 1 with one `error:` sentence on stderr."""
  if not AS_PROCESS:
    sys.exit(f'error: {sentence}')
  # The launcher's own process: say it, then keep library threads that die with the
  # interpreter (e.g. Orbax's reads of a checkpoint that did not fit, or its writes to a full
  # disk) from printing pages of tracebacks after the one sentence.
  print(f'error: {sentence}', file=sys.stderr, flush=True)
  sys.stdout.flush()
  os.dup2(os.open(os.devnull, os.O_WRONLY), 2)
  sys.exit(1)


def main(argv):
  del argv
  quiet_logs()
  if FLAGS.show:
    print(show(FLAGS.config))
    return
  if not FLAGS.workdir:
    sys.exit('error: --workdir=DIR is required (where the run writes everything; rerun with the '
             'same DIR to resume); --show prints the config without one.')
  if os.path.exists(FLAGS.workdir) and not os.path.isdir(FLAGS.workdir):
    sys.exit(f'error: --workdir={FLAGS.workdir} is a file; give a directory (created if absent).')
  import jax
  from experiments import registry
  from experiments.stages import trainer
  if FLAGS.coordinator:
    jax.distributed.initialize(FLAGS.coordinator, FLAGS.num_processes, FLAGS.process_id)
  elif FLAGS.multihost:
    jax.distributed.initialize()
  if FLAGS.coordinator or FLAGS.multihost:
    trainer.hold_stop_signals()   # JAX's own handler would swallow a SIGTERM before the loop
  config = FLAGS.config
  global USER_ERRORS
  USER_ERRORS = _user_errors()
  try:
    fn = registry.get(config.experiment)
  except KeyError as e:
    sys.exit(f'error: {e.args[0]}')
  from experiments.stages import diskfull
  if AS_PROCESS:
    diskfull.quiet_threads(FLAGS.workdir)
  try:
    check_values(config)
    fn(config, FLAGS.workdir)
  except USER_ERRORS as e:  # bad input: one sentence, no traceback
    fail(str(e))
  except Exception as e:    # a full disk: what is full, what is safe, how to go on
    full = diskfull.cause(e)
    if full is None:
      raise
    fail(diskfull.message(full, FLAGS.workdir))
  if jax.process_count() > 1:
    # Processes finish host-side work (evals written by process 0, plots) at different times;
    # meet here so none waits out jax.distributed's shutdown barrier timeout on a slow host.
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices('experiment finished')


def cli(argv=None) -> None:
  argv = list(sys.argv if argv is None else argv)
  raise_collective_timeouts()   # before JAX starts its CPU client
  if any(a in ('--help', '-h', '--helpshort', '-?') for a in argv[1:]):
    print(help_text())
    sys.exit(0)
  why = check_config_arg(argv)
  if why:
    sys.exit(f'error: {why}')
  app.run(main, argv=argv, flags_parser=parse_flags)


AS_PROCESS = False   # True when this module is the launched program (not imported by a test)

if __name__ == '__main__':
  AS_PROCESS = True
  cli()
