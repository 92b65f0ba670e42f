"""Launcher: python -m experiments.run --config=experiments/configs/NAME.py --workdir=DIR

Any config value can be overridden (`--config.train.steps=50`); unknown keys fail. On
several hosts pass --multihost (TPU pods, SLURM: auto-detected) or --coordinator,
--num_processes and --process_id.

Exit status: 0 done; 1 with one `error: ...` line on stderr for bad input (flags, config,
corpus, checkpoints) or a run that cannot go on; 128 + N after signal N (143 SIGTERM,
130 SIGINT), with a checkpoint saved at the step reached: rerun the same command to continue.
"""
from __future__ import annotations

import ast
import keyword
import sys

from absl import app, flags
from ml_collections import config_flags

config_flags.DEFINE_config_file('config', None, 'Experiment config file.', lock_config=True)
flags.DEFINE_string('workdir', None, 'Where the run writes everything (created if absent).')
flags.DEFINE_bool('multihost', False, 'Call jax.distributed.initialize() with auto-detection.')
flags.DEFINE_string('coordinator', None, 'host:port of process 0 for jax.distributed.')
flags.DEFINE_integer('num_processes', None, 'Number of processes for jax.distributed.')
flags.DEFINE_integer('process_id', None, 'This process index for jax.distributed.')
flags.mark_flags_as_required(['config', 'workdir'])
FLAGS = flags.FLAGS


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
    for a in argv[1:]:         # e.g. the task family `continue`: a key that is a Python keyword
      name, _, value = a.partition('=')
      keys = name.split('.')[1:]
      reserved = [k for k in keys if keyword.iskeyword(k)]
      if name.startswith('--config.') and reserved:
        fixed = ''.join(f"['{k}']" if k in reserved else f'.{k}' for k in keys)
        msg = (f'{name} cannot be parsed because {reserved[0]!r} is a Python keyword; write it as a '
               f'subscript: "--config{fixed}={value}"')
    sys.exit(f'error: {msg}; the keys and types are those of the --config file.')


def main(argv):
  del argv
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
  try:
    fn(config, FLAGS.workdir)
  except USER_ERRORS as e:  # bad input: one sentence, no traceback
    sys.exit(f'error: {e}')
  if jax.process_count() > 1:
    # Processes finish host-side work (evals written by process 0, plots) at different times;
    # meet here so none waits out jax.distributed's shutdown barrier timeout on a slow host.
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices('experiment finished')


if __name__ == '__main__':
  app.run(main, flags_parser=parse_flags)
