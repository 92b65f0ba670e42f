"""Mesh, the one logical-axis rules table, and shardings derived from it.

Params carry logical axis names (('embed', 'mlp'), ...). `RULES` maps each logical
name to the mesh axes it is split over. Changing the parallelism is a config change
(`config.mesh`), never a code change:

  data    pure data parallelism: params replicated, batch split
  fsdp    ZeRO-3: params, grads and optimizer state split along 'embed', batch split
  tensor  Megatron-style tensor parallelism over heads / mlp / vocab
  expert  mixture-of-experts parallelism (experts split)
"""
from __future__ import annotations

import contextlib
import math
import threading
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ('data', 'fsdp', 'tensor', 'expert')

# logical name -> mesh axes (a tuple means "split over all of them").
RULES: dict[str, tuple[str, ...]] = {
    'batch': ('data', 'fsdp', 'expert'),
    'length': (),
    'vocab': ('tensor',),
    'embed': ('fsdp',),
    'heads': ('tensor',),
    'kv_heads': ('tensor',),
    'head_dim': (),
    'mlp': ('tensor',),
    'layers': (),
    'expert': ('expert',),
    'norm': (),
}
BATCH_AXES = RULES['batch']


class ShardingError(ValueError):
  """A mesh or rule that cannot work; the message says how to fix it."""


# Mesh -----------------------------------------------------------------------------
def mesh_shape(mesh_cfg: Mapping[str, int], n_devices: int) -> dict[str, int]:
  """Resolve config.mesh (one axis may be -1 = all remaining devices) to sizes."""
  sizes = {a: int(mesh_cfg.get(a, 1)) for a in MESH_AXES}
  unknown = set(mesh_cfg) - set(MESH_AXES)
  if unknown:
    raise ShardingError(f'Unknown mesh axes {sorted(unknown)}; use only {MESH_AXES}.')
  free = [a for a, s in sizes.items() if s == -1]
  if len(free) > 1:
    raise ShardingError(f'Only one mesh axis may be -1, got {free}; give the others explicit sizes.')
  if any(s == 0 or s < -1 for s in sizes.values()):
    raise ShardingError(f'Mesh sizes must be positive or -1, got {sizes}.')
  fixed = math.prod(s for s in sizes.values() if s != -1)
  if free:
    if n_devices % fixed:
      raise ShardingError(f'The fixed mesh axes {sizes} use {fixed} devices, which does not divide '
                          f'the {n_devices} available; change config.mesh.')
    sizes[free[0]] = n_devices // fixed
  elif fixed != n_devices:
    raise ShardingError(f'config.mesh {sizes} uses {fixed} devices but {n_devices} are available; '
                        'make the product of the sizes equal the device count or set one axis to -1.')
  return sizes


def make_mesh(mesh_cfg: Mapping[str, int], devices: Sequence[Any] | None = None) -> Mesh:
  """A Mesh with axes (data, fsdp, tensor, expert), auto-sharded (classic jit semantics)."""
  devices = list(devices if devices is not None else jax.devices())
  sizes = mesh_shape(mesh_cfg, len(devices))
  shape = tuple(sizes[a] for a in MESH_AXES)
  try:  # topology-aware device order on real accelerators
    from jax.experimental import mesh_utils
    arr = mesh_utils.create_device_mesh(shape, devices=devices)
  except Exception:  # fake CPU devices and odd counts: plain order is fine
    arr = np.asarray(devices).reshape(shape)
  return Mesh(arr, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES))


def batch_size_divisor(mesh: Mesh) -> int:
  return math.prod(mesh.shape[a] for a in BATCH_AXES)


# Logical names -> PartitionSpecs ------------------------------------------------------
def logical_to_pspec(axes: Sequence[str | None], shape: Sequence[int] | None = None,
                     mesh: Mesh | None = None, name: str = '') -> P:
  """PartitionSpec for one array from its logical axis names.

  Mesh axes of size 1 are dropped (they shard nothing). A mesh axis that an earlier
  dimension of the same array already uses is skipped for the later one (first use wins: a
  PartitionSpec may name each mesh axis once). A name with no rule, or a dimension that its
  mesh axes do not divide, raises.
  """
  spec, used = [], set()
  for i, ax in enumerate(axes):
    if ax is None:
      spec.append(None)
      continue
    if ax not in RULES:
      raise ShardingError(f'Logical axis {ax!r} of {name or "an array"} has no rule in '
                          f'lm.sharding.RULES; add one (known: {sorted(RULES)}).')
    mesh_axes = tuple(m for m in RULES[ax] if mesh is None or mesh.shape[m] > 1)
    mesh_axes = tuple(m for m in mesh_axes if m not in used)  # first use wins
    used.update(mesh_axes)
    if mesh is not None and shape is not None and mesh_axes:
      n = math.prod(mesh.shape[m] for m in mesh_axes)
      if shape[i] % n:
        raise ShardingError(
            f'{name or "An array"} has {ax!r} size {shape[i]}, which mesh axes {mesh_axes} '
            f'(total {n}) do not divide; change the model size or config.mesh.')
    spec.append(mesh_axes[0] if len(mesh_axes) == 1 else (mesh_axes or None))
  return P(*spec)


def _path_name(path) -> str:
  return '/'.join(str(getattr(k, 'key', getattr(k, 'name', k))) for k in path)


def tree_shardings(axes_tree, shapes_tree, mesh: Mesh):
  """NamedSharding for every leaf of a tree, from a parallel tree of logical axes."""
  def one(path, axes, shape):
    pspec = logical_to_pspec(axes, shape.shape, mesh, _path_name(path))
    return NamedSharding(mesh, pspec)
  return jax.tree_util.tree_map_with_path(
      one, axes_tree, shapes_tree, is_leaf=lambda x: isinstance(x, tuple))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
  """Leading (batch) dimension split over the batch axes, the rest replicated."""
  return NamedSharding(mesh, logical_to_pspec(('batch',) + (None,) * (ndim - 1), None, mesh))


def sharded_fraction(params, shardings) -> float:
  """Fraction of parameter bytes that are split over at least one mesh axis."""
  total = sharded = 0
  for x, s in zip(jax.tree.leaves(params), jax.tree.leaves(shardings)):
    nbytes = x.size * x.dtype.itemsize
    total += nbytes
    if any(p is not None for p in s.spec):
      sharded += nbytes
  return sharded / max(total, 1)


# Activation constraints ----------------------------------------------------------------
_ctx = threading.local()


@contextlib.contextmanager
def activation_sharding(mesh: Mesh | None):
  """While tracing inside this context, `constrain` pins activations to the mesh."""
  prev = getattr(_ctx, 'mesh', None)
  _ctx.mesh = mesh
  try:
    yield
  finally:
    _ctx.mesh = prev


def constrain(x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
  """with_sharding_constraint by logical names; a no-op outside `activation_sharding`."""
  mesh = getattr(_ctx, 'mesh', None)
  if mesh is None:
    return x
  spec = []
  used = set()
  for dim, ax in zip(x.shape, axes):
    mesh_axes = tuple(m for m in RULES.get(ax, ()) if mesh.shape[m] > 1 and m not in used)
    n = math.prod(mesh.shape[m] for m in mesh_axes)
    if not mesh_axes or dim % n:  # activations that do not divide stay replicated
      spec.append(None)
      continue
    used.update(mesh_axes)
    spec.append(mesh_axes[0] if len(mesh_axes) == 1 else mesh_axes)
  return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, P(*spec)))
