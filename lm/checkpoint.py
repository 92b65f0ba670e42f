"""Orbax checkpoints: the train state (restored straight into its sharded layout), the data
iterator position and a small JSON of metadata, saved together per step.

`restore_or_none` is the one resume-or-init decision: no checkpoints -> None (start
fresh); checkpoints that cannot be read -> CheckpointError, never a silent restart.
"""
from __future__ import annotations

import logging
import sys
from typing import Any

import orbax.checkpoint as ocp

from lm import paths


class CheckpointError(RuntimeError):
  """Checkpoints exist but cannot be used; the message says what to do."""


class Checkpointer:
  def __init__(self, directory: str, max_to_keep: int = 3, async_save: bool = True):
    # an epath.Path: orbax writes gs:// itself (tensorstore's GCS driver); local paths absolute
    self.directory = paths.absolute(directory)
    self.manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                             enable_async_checkpointing=async_save))

  def steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  @staticmethod
  def steps_in(directory: str) -> list[int]:
    """Steps saved in `directory`, without creating it."""
    directory = paths.path(directory)
    if not directory.is_dir():
      return []
    return sorted(ocp.utils.checkpoint_steps(directory))

  def save(self, step: int, state: Any, data_state: dict, meta: dict | None = None,
           force: bool = False) -> bool:
    args = ocp.args.Composite(state=ocp.args.StandardSave(state),
                              data=ocp.args.JsonSave(data_state),
                              meta=ocp.args.JsonSave(meta or {}))
    return self.manager.save(step, args=args, force=force)

  def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict, dict]:
    args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                              data=ocp.args.JsonRestore(), meta=ocp.args.JsonRestore())
    out = self.manager.restore(step, args=args)
    return out['state'], out['data'], out['meta']

  def restore_params(self, step: int, abstract_params: Any, at: tuple = ('params',)) -> Any:
    """Only the params of a saved TrainState (no optimizer state is read or allocated),
    each leaf placed in the sharding its ShapeDtypeStruct carries (any mesh: resharding).
    `at` is their key path in the saved state (PPO's policy: train/params/policy)."""
    # A fresh manager: one that saved with StandardSave cannot restore a partial tree.
    manager = ocp.CheckpointManager(self.directory)
    target = abstract_params
    for key in reversed(at):
      target = {key: target}
    try:
      out = manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
          item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
          partial_restore=True)))
    except Exception as e:  # orbax raises many types
      raise CheckpointError(f'Could not read the params of step {step} in {self.directory} '
                            f'({type(e).__name__}: {str(e).splitlines()[0][:300]}); it may be '
                            'from a different model or damaged.') from None
    finally:
      manager.close()
    out = out['state']
    for key in at:
      out = out[key]
    return out

  def restore_or_none(self, abstract_state: Any):
    """Latest readable checkpoint as (step, state, data_state, meta), or None if there are none.

    An unreadable newest checkpoint (e.g. killed mid-write, a truncated file) falls back to
    the one before, says so, and is renamed `STEP.unreadable` (kept for inspection, but out
    of the way of the step that will be saved again); if none can be read, raises instead
    of starting over.
    """
    steps = self.steps()
    if not steps:
      return None
    errors = []
    for step in reversed(steps):
      try:
        state, data, meta = self.restore(step, abstract_state)
      except Exception as e:  # orbax raises many types; report them all below
        errors.append(f'step {step}: {type(e).__name__}: {str(e).splitlines()[0][:300]}')
        continue
      if errors:
        moved = self._set_aside([s for s in steps if s > step])
        msg = (f'Checkpoints newer than step {step} in {self.directory} could not be read '
               f'({"; ".join(errors)}); resuming from step {step} (moved aside: {moved}).')
        logging.warning(msg)
        print('warning: ' + msg, file=sys.stderr, flush=True)
      return step, state, data, meta
    if all('not compatible with the stored shape' in e for e in errors):
      shapes = errors[0].split(': ', 2)[-1].split('. ')[0]
      raise CheckpointError(
          f'The checkpoints in {self.directory} (steps {steps}) hold a model of another shape than '
          f'this config asks for ({shapes}); rerun with the model settings they were trained with '
          '(the workdir\'s config.json), or use a new --workdir.')
    raise CheckpointError(
        f'Checkpoints exist in {self.directory} (steps {steps}) but none could be read '
        f'({"; ".join(errors)}). Fix or move that directory, or use a new --workdir; '
        'refusing to start from step 0 over them.')

  def _set_aside(self, steps: list[int]) -> list[str]:
    import jax
    moved = []
    for s in steps:
      src = self.directory / str(s)
      dst = self.directory / f'{s}.unreadable'
      n = 1
      while dst.exists():
        n += 1
        dst = self.directory / f'{s}.unreadable{n}'
      if jax.process_index() == 0 and src.exists():
        src.rename(dst)
      moved.append(dst.name)
    if jax.process_count() > 1:   # every host sees the renamed directory before going on
      from jax.experimental import multihost_utils
      multihost_utils.sync_global_devices('checkpoint_set_aside')
    self.manager.reload()
    return moved

  def delete_after(self, step: int) -> None:
    """Drop the checkpoints newer than `step` (e.g. a trajectory abandoned after a loss spike)."""
    self.manager.wait_until_finished()
    for s in self.steps():
      if s > step:
        self.manager.delete(s)

  def saving(self) -> bool:
    """An async save is still being written (not final yet); does not block."""
    return self.manager.is_saving_in_progress()

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()
