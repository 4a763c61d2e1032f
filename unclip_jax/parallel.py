"""Device mesh, logical axis names and the rules that map them onto the mesh.

Parameters get logical axis names from their role (a Dense kernel is
("embed", "mlp"), a conv kernel (None, None, "embed", "mlp"), ...), and the
config's `logical_axis_rules` map those names to mesh axes. The default rules
give FSDP over "fsdp" and tensor parallelism over "tensor"; the batch is split
over ("data", "fsdp"). A dimension that its mesh axes do not divide stays
replicated rather than failing, so one rule set serves every model size.
"""

from typing import Any, Iterator, Mapping, Sequence

import jax
import numpy as np
from flax import traverse_util
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")
DEFAULT_RULES = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
)


def make_mesh(axes: Mapping[str, int] | Sequence[tuple[str, int]], devices=None) -> Mesh:
  """A mesh with the named axis sizes; one size may be -1 to take the remaining devices."""
  axes = dict(axes)
  devices = np.asarray(jax.devices() if devices is None else devices)
  unknown = set(axes) - set(MESH_AXES)
  if unknown:
    raise ValueError(f"Unknown mesh axes {sorted(unknown)}; use {MESH_AXES}.")
  sizes = {name: axes.get(name, 1) for name in MESH_AXES}
  fill = [name for name, size in sizes.items() if size == -1]
  if len(fill) > 1:
    raise ValueError(f"Only one mesh axis may be -1, got {fill}.")
  known = int(np.prod([s for s in sizes.values() if s != -1]))
  if fill:
    if devices.size % known:
      raise ValueError(f"{devices.size} devices do not split into mesh axes {axes}.")
    sizes[fill[0]] = devices.size // known
  if int(np.prod(list(sizes.values()))) != devices.size:
    raise ValueError(f"Mesh axes {sizes} need {int(np.prod(list(sizes.values())))} devices, "
                     f"have {devices.size}.")
  return Mesh(devices.reshape([sizes[n] for n in MESH_AXES]), MESH_AXES)


def sampling_mesh() -> Mesh | None:
  """A data mesh over this process's devices to batch-split sampling, or None with one device."""
  return make_mesh({"data": -1}, devices=jax.local_devices()) if jax.local_device_count() > 1 else None


def logical_axes(leaf) -> tuple:
  """Logical axis names for a parameter, from its shape."""
  ndim = len(leaf.shape)
  if ndim == 2:  # Dense kernel [in, out], embedding table [rows, features]
    return ("embed", "mlp")
  if ndim == 3:  # DenseGeneral [in, heads, head_dim]
    return ("embed", "heads", None)
  if ndim == 4:  # conv kernel [kh, kw, in, out]
    return (None, None, "embed", "mlp")
  return (None,) * ndim  # biases, norm scales, scalars: small, replicated


def _mesh_axes_for(name, rules) -> tuple:
  for logical, mesh_axes in rules:
    if logical == name:
      if mesh_axes is None:
        return ()
      return tuple(mesh_axes) if isinstance(mesh_axes, (tuple, list)) else (mesh_axes,)
  return ()


def spec_for(shape, names, mesh: Mesh, rules=DEFAULT_RULES) -> P:
  """PartitionSpec for an array whose dimensions have these logical names."""
  used, spec = set(), []
  for dim, name in zip(shape, names):
    axes = tuple(a for a in _mesh_axes_for(name, rules) if a not in used and mesh.shape[a] > 1)
    size = int(np.prod([mesh.shape[a] for a in axes])) if axes else 1
    if axes and dim % size == 0:
      used.update(axes)
      spec.append(axes[0] if len(axes) == 1 else axes)
    else:
      spec.append(None)
  return P(*spec)


def param_shardings(params, mesh: Mesh, rules=DEFAULT_RULES):
  """NamedSharding for every leaf of a params (or optimizer state) tree."""
  return jax.tree.map(lambda x: NamedSharding(mesh, spec_for(x.shape, logical_axes(x), mesh, rules)), params)


def batch_sharding(mesh: Mesh, rules=DEFAULT_RULES) -> NamedSharding:
  """Leading (batch) dimension split over the batch axes, the rest replicated."""
  axes = tuple(a for a in _mesh_axes_for("batch", rules) if mesh.shape[a] > 1)
  return NamedSharding(mesh, P(axes if axes else None))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_size_divisor(mesh: Mesh, rules=DEFAULT_RULES) -> int:
  axes = _mesh_axes_for("batch", rules)
  return int(np.prod([mesh.shape[a] for a in axes])) if axes else 1


def host_batch_positions(start: int, batch_size: int, shard_index: int = 0,
                         shard_count: int = 1) -> Iterator[np.ndarray]:
  """Global example positions of this host's share of each global batch, from `start` on.

  Host k of n takes positions k, k + n, ...: the same examples train whatever
  the host count, so a stream resumed on another topology continues exactly.
  """
  if batch_size % shard_count:
    raise ValueError(f"batch_size {batch_size} must divide among {shard_count} hosts.")
  position = start
  while True:
    yield np.arange(position, position + batch_size)[shard_index::shard_count]
    position += batch_size


def global_batch(local_batch: Mapping[str, Any], mesh: Mesh, rules=DEFAULT_RULES):
  """Assembles per-host arrays into global jax.Arrays split along the batch axes."""
  sharding = batch_sharding(mesh, rules)
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), local_batch)


def describe(params, shardings) -> str:
  """One line per parameter: shape and partition spec (for logs)."""
  flat_p = traverse_util.flatten_dict(params)
  flat_s = traverse_util.flatten_dict(shardings)
  return "\n".join(f"{'/'.join(k)}: {tuple(v.shape)} {flat_s[k].spec}" for k, v in flat_p.items())


def shard_map_over_batch(fn, mesh: Mesh, rules=DEFAULT_RULES, out_specs=None):
  """Runs fn per device on its slice of the batch (inputs and outputs batch-split).

  For code that is clearest written per device, e.g. sampling shards of a batch
  or per-device augmentation with per-device rngs.
  """
  spec = batch_sharding(mesh, rules).spec
  return jax.shard_map(fn, mesh=mesh, in_specs=spec, out_specs=spec if out_specs is None else out_specs)
