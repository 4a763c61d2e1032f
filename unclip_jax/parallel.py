"""Device mesh, parameter sharding rules and the batch layout.

Parameters are plain pytrees everywhere (converters, checkpoints, stages), so
their sharding is declared here once, by name: `PARAM_RULES` maps a regex over
a parameter's '/'-joined path to logical names of its trailing dimensions, and
`logical_axis_rules` (the config's, by default `DEFAULT_RULES`) map those names
to mesh axes. Leading dimensions a rule does not name (conv taps, the layer
axis nn.scan stacks on) stay unsplit, so a stacked [L, in, out] kernel gets
P(None, *spec of [in, out]).

Tensor parallelism is Megatron-paired so that a block needs no all-gather of
its weights over "tensor": q/k/v and ff_in are column-parallel (outputs split),
the attention output and ff_out row-parallel (inputs split), and convolutions
split their output channels. FSDP ("embed" -> "fsdp") takes a large dimension
of every weight of at least `FSDP_MIN_SIZE` elements. A dimension its mesh axes
do not divide stays replicated, so one rule set serves every model size.

The mesh is laid out by jax's mesh_utils (topology-aware on TPU; plain device
order on CPU) and, for multislice, as a hybrid ICI x DCN mesh (`make_mesh`).
"""

import contextlib
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from absl import logging
from flax import traverse_util
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

# Ordered by increasing communication: mesh_utils keeps the last axis on the fastest links.
MESH_AXES = ("data", "fsdp", "tensor")
# config.mesh may add dcn_<axis> sizes: that axis's split across slices (multislice) or processes.
DCN_PREFIX = "dcn_"

# Logical axis name -> mesh axes. "embed" is the FSDP name (see FSDP_NAME).
DEFAULT_RULES = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),  # the model-width side of a weight
    ("mlp", "tensor"),  # feed-forward hidden units
    ("heads", "tensor"),  # attention heads (q/k/v outputs, the output projection's inputs)
    ("channels", "tensor"),  # convolution output channels
)
FSDP_NAME = "embed"

# Parameters smaller than this stay whole on every device: splitting them saves a
# few KiB per device and costs collectives. Kept at 512 elements so small test
# models still split (tests/test_training.py); the rules below already keep
# every bias and norm vector replicated, whatever its size.
FSDP_MIN_SIZE = 2**9

_ATTN_IN = r"to_q|to_k|to_v|add_k_proj|add_v_proj|q_proj|k_proj|v_proj"
_ATTN_OUT = r"to_out|to_out_0|out_proj"
_MLP_IN = r"ff_in|fc1|time_embedding/linear_1"
_MLP_OUT = r"ff_out|fc2|time_embedding/linear_2"
_CONV = r"conv_in|conv_out|conv_shortcut|conv\d*"

# (regex matched against the end of the '/'-joined path, at a '/' boundary;
#  logical names of the trailing dimensions). First match wins.
PARAM_RULES = (
    # Column-parallel [in, out] (prior/U-Net/CLIP attention, MLP and time-MLP inputs).
    (rf"({_ATTN_IN})/kernel", ("embed", "heads")),
    (rf"({_ATTN_IN})/bias", ("heads",)),
    (rf"({_MLP_IN})/kernel", ("embed", "mlp")),
    (rf"({_MLP_IN})/bias", ("mlp",)),
    # Row-parallel [in, out]; their biases fall to the replicated rule below.
    (rf"({_ATTN_OUT})/kernel", ("heads", "embed")),
    (rf"({_MLP_OUT})/kernel", ("mlp", "embed")),
    # Convolutions [kh, kw, in, out] (U-Net convs, CLIP's patch embedding).
    (rf"({_CONV}|patch_embedding)/kernel", ("embed", "channels")),
    (rf"({_CONV})/bias", ("channels",)),
    # Embedding tables [rows, width] and the prior's positional embedding [1, L, width].
    (r"embedding|positional_embedding", ("embed",)),
    # Learned vectors and scalars.
    (r"prd_embedding|class_embedding|learned_classifier_free_guidance_embeddings|logit_scale", ()),
    # Every other Dense kernel [in, out] (projections into and out of the residual stream): FSDP only.
    (r"kernel", ("embed", None)),
    # Biases, norm scales.
    (r"bias|scale", ()),
)


def make_mesh(axes: Mapping[str, int] | Sequence[tuple[str, int]], devices=None) -> Mesh:
  """A mesh with the named axis sizes; one size may be -1 to take the remaining devices.

  `axes` names sizes of "data", "fsdp", "tensor" within a slice, and optionally
  "dcn_data", "dcn_fsdp", "dcn_tensor": how each axis is further split across
  slices (multislice TPU) or, where devices carry no slice, across processes.
  Mesh axis `a` then has size a * dcn_a, slice-major, so only the collectives
  of axes with a DCN split cross the slow network.
  """
  axes = dict(axes)
  devices = list(np.asarray(jax.devices() if devices is None else devices, dtype=object).flat)
  unknown = set(axes) - set(MESH_AXES) - {DCN_PREFIX + name for name in MESH_AXES}
  if unknown:
    raise ValueError(f"Unknown mesh axes {sorted(unknown)}; use {MESH_AXES} (and {DCN_PREFIX}<axis> for slices).")
  dcn = [int(axes.get(DCN_PREFIX + name, 1)) for name in MESH_AXES]
  if min(dcn) < 1:
    raise ValueError(f"DCN sizes must be positive, got {dict(zip(MESH_AXES, dcn))}.")
  granules = math.prod(dcn)
  if len(devices) % granules:
    raise ValueError(f"{len(devices)} devices do not split into {granules} slices (DCN sizes {dcn}).")
  ici = _fill_sizes({name: axes.get(name, 1) for name in MESH_AXES}, len(devices) // granules,
                    "per slice" if granules > 1 else "")
  return Mesh(device_array([ici[n] for n in MESH_AXES], dcn, devices), MESH_AXES)


def _fill_sizes(sizes: dict, num_devices: int, where: str) -> dict:
  """Resolves the one -1 size; errors if the sizes do not use exactly num_devices."""
  where = f" {where}" if where else ""
  fill = [name for name, size in sizes.items() if size == -1]
  if len(fill) > 1:
    raise ValueError(f"Only one mesh axis may be -1, got {fill}.")
  known = math.prod(s for s in sizes.values() if s != -1)
  if fill:
    if num_devices % known:
      raise ValueError(f"{num_devices} devices{where} do not split into mesh axes {sizes}.")
    sizes[fill[0]] = num_devices // known
  if math.prod(sizes.values()) != num_devices:
    raise ValueError(f"Mesh axes {sizes} need {math.prod(sizes.values())} devices, have {num_devices}{where}.")
  return sizes


def device_array(ici: Sequence[int], dcn: Sequence[int], devices: Sequence[Any]) -> np.ndarray:
  """Devices arranged as a mesh of shape ici * dcn (element-wise), laid out for the interconnect.

  One slice: mesh_utils.create_device_mesh (ring/torus order on TPU; device
  order on CPU, or wherever it cannot place the shape). Several: a hybrid mesh
  whose granules are the devices' slices, or their processes when devices
  have no slice_index (GPU and CPU clusters).
  """
  slices = {getattr(d, "slice_index", None) for d in devices}
  if math.prod(dcn) == 1:
    if len(slices) > 1:
      raise ValueError(f"The devices span {len(slices)} slices; give config.mesh a DCN split, e.g. "
                       f"{DCN_PREFIX}data={len(slices)}.")
    try:
      return mesh_utils.create_device_mesh(ici, devices, allow_split_physical_axes=True)
    except (ValueError, NotImplementedError) as e:  # e.g. a subset of a TPU's chips
      logging.warning("No topology-aware layout for mesh %s (%s); using device order.", ici, e)
      return np.asarray(devices, dtype=object).reshape(ici)
  by_process = len(slices) <= 1
  granules = {getattr(d, "process_index" if by_process else "slice_index") for d in devices}
  if len(granules) != math.prod(dcn):
    kind = "processes" if by_process else "slices"
    raise ValueError(f"DCN sizes {list(dcn)} need {math.prod(dcn)} slices; the devices form {len(granules)} {kind}.")
  return mesh_utils.create_hybrid_device_mesh(ici, dcn, devices, process_is_granule=by_process,
                                              allow_split_physical_axes=True)


def sampling_mesh() -> Mesh | None:
  """A data mesh over this process's devices to batch-split sampling, or None with one device."""
  return make_mesh({"data": -1}, devices=jax.local_devices()) if jax.local_device_count() > 1 else None


def _path_str(path) -> str:
  """'/'-joined keys of a tree path: ('0', 'mu', 'block_0', 'ff_in', 'kernel') for an Adam moment."""
  parts = []
  for key in path:
    for attr in ("key", "name", "idx"):  # DictKey / FlattenedIndexKey, GetAttrKey, SequenceKey
      if hasattr(key, attr):
        parts.append(str(getattr(key, attr)))
        break
    else:
      parts.append(str(key))
  return "/".join(parts)


def _rule_for(path: str, param_rules) -> tuple | None:
  """The logical names the first matching rule gives the trailing dimensions; None if none matches."""
  for pattern, names in param_rules:
    if re.search(rf"(?:^|/)(?:{pattern})$", path):
      return tuple(names)
  return None


def param_logical_axes(path: str, ndim: int, param_rules=PARAM_RULES) -> tuple | None:
  """Logical names of all dimensions of the parameter at `path` (leading ones None); None if unknown."""
  names = _rule_for(path, param_rules)
  if names is None:
    return None
  names = names[len(names) - ndim:] if len(names) > ndim else names
  return (None,) * (ndim - len(names)) + names


def _mesh_axes_for(name, rules) -> tuple:
  for logical, mesh_axes in rules:
    if logical == name:
      if mesh_axes is None:
        return ()
      return tuple(mesh_axes) if isinstance(mesh_axes, (tuple, list)) else (mesh_axes,)
  return ()


def _split(mesh: Mesh, axes) -> tuple:
  """The axes that really split (present in the mesh, size > 1)."""
  return tuple(a for a in axes if mesh.shape.get(a, 1) > 1)


def spec_for(shape, names, mesh: Mesh, rules=DEFAULT_RULES) -> P:
  """PartitionSpec for an array whose dimensions have these logical names."""
  used, spec = set(), []
  for dim, name in zip(shape, names):
    axes = tuple(a for a in _split(mesh, _mesh_axes_for(name, rules)) if a not in used)
    if axes and dim % math.prod(mesh.shape[a] for a in axes) == 0:
      used.update(axes)
      spec.append(axes[0] if len(axes) == 1 else axes)
    else:
      spec.append(None)
  return P(*spec)


def param_spec(path: str, shape, mesh: Mesh, rules=DEFAULT_RULES, *, min_size: int = FSDP_MIN_SIZE,
               param_rules=PARAM_RULES) -> P:
  """PartitionSpec of one parameter (or optimizer moment) from its path and shape.

  The FSDP axes go where its rule puts "embed"; when that dimension does not
  divide (or no rule matches the path), on the largest dimension they divide
  among those the rule names. Below `min_size` elements, no FSDP.
  """
  shape = tuple(shape)
  rule = _rule_for(path, param_rules)
  wants_fsdp = rule is None or FSDP_NAME in rule
  big = math.prod(shape) >= min_size
  names = param_logical_axes(path, len(shape), param_rules) or (None,) * len(shape)
  # Dimensions FSDP may fall back to: those the rule names (all, for unknown parameters).
  candidates = range(len(shape) - min(len(rule), len(shape)) if rule is not None else 0, len(shape))
  if not big:
    names = tuple(None if n == FSDP_NAME else n for n in names)
  spec = list(spec_for(shape, names, mesh, rules))
  fsdp = _split(mesh, _mesh_axes_for(FSDP_NAME, rules))
  taken = {a for s in spec if s is not None for a in ((s,) if isinstance(s, str) else s)}
  if wants_fsdp and big and fsdp and not taken & set(fsdp):
    size = math.prod(mesh.shape[a] for a in fsdp)
    free = [i for i in candidates if spec[i] is None and shape[i] % size == 0]
    if free:
      spec[max(free, key=lambda i: shape[i])] = fsdp[0] if len(fsdp) == 1 else fsdp
  return P(*spec)


def _shape(leaf) -> tuple:
  return tuple(leaf.shape) if hasattr(leaf, "shape") else np.shape(leaf)


def param_specs(tree, mesh: Mesh, rules=DEFAULT_RULES, **kwargs):
  """PartitionSpec for every leaf of a params tree, or of a state whose leaves mirror param paths
  (optax moments: opt_state[0].mu['block_0']['ff_in']['kernel']; counts and scalars replicated)."""
  return jax.tree_util.tree_map_with_path(lambda p, x: param_spec(_path_str(p), _shape(x), mesh, rules, **kwargs),
                                          tree)


def param_shardings(params, mesh: Mesh, rules=DEFAULT_RULES, **kwargs):
  """NamedSharding for every leaf of a params (or optimizer state, EMA) tree; see `param_specs`."""
  return jax.tree.map(lambda spec: NamedSharding(mesh, spec), param_specs(params, mesh, rules, **kwargs),
                      is_leaf=lambda x: isinstance(x, P))


def batch_sharding(mesh: Mesh, rules=DEFAULT_RULES) -> NamedSharding:
  """Leading (batch) dimension split over the batch axes, the rest replicated."""
  axes = tuple(a for a in _mesh_axes_for("batch", rules) if mesh.shape[a] > 1)
  return NamedSharding(mesh, P(axes if axes else None))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_size_divisor(mesh: Mesh, rules=DEFAULT_RULES) -> int:
  axes = _mesh_axes_for("batch", rules)
  return int(np.prod([mesh.shape[a] for a in axes])) if axes else 1


def host_rows(sharding: jax.sharding.Sharding, batch_size: int) -> np.ndarray:
  """Sorted rows of a [batch_size, ...] global array that this process's devices hold.

  A host reads exactly these examples of each global batch (row i is example
  position + i), so hosts may own interleaved rows on any mesh layout and a
  run on N hosts sees the same global arrays as a run on one.
  """
  rows = set()
  for index in sharding.addressable_devices_indices_map((batch_size,)).values():
    rows.update(range(batch_size)[index[0]])
  return np.array(sorted(rows), dtype=np.int64)


def global_batch(local_batch: Mapping[str, Any], mesh: Mesh, rules=DEFAULT_RULES, *,
                 batch_size: int | None = None, rows: np.ndarray | None = None):
  """This host's rows of a global batch -> global jax.Arrays split along the batch axes.

  rows: this host's rows (`host_rows`) of a global batch of batch_size; both
  None when one process holds the whole batch. Each device's slice is looked
  up among the host's rows, so any mesh layout works.
  """
  sharding = batch_sharding(mesh, rules)
  if rows is None:
    if jax.process_count() > 1:
      raise ValueError("global_batch needs this host's rows and the global batch_size with several processes.")
    batch_size = len(jax.tree.leaves(local_batch)[0])
    rows = np.arange(batch_size)
  where = np.full(batch_size, -1)
  where[rows] = np.arange(len(rows))

  def one(x):
    x = np.asarray(x)
    if x.shape[0] != len(rows):
      raise ValueError(f"A host batch field has {x.shape[0]} rows; this host owns {len(rows)} of {batch_size}.")
    return jax.make_array_from_callback(
        (batch_size,) + x.shape[1:], sharding, lambda index: x[where[index[0]]][(slice(None),) + index[1:]])

  return jax.tree.map(one, local_batch)


@contextlib.contextmanager
def activation_sharding(mesh: Mesh, rules=DEFAULT_RULES):
  """While tracing a step under it, `constrain_batch` pins activations to the batch axes.

  jax's ambient mesh and flax's logical axis rules, the two contexts MaxText
  traces its steps under; outside them (sampling, tests) models are unconstrained.
  """
  with jax.sharding.use_abstract_mesh(mesh.abstract_mesh), nn.logical_axis_rules(rules):
    yield


def constrain_batch(x: jax.Array) -> jax.Array:
  """x [B, ...] with B split over the batch mesh axes, the other dimensions left to XLA.

  Models call it on the residual stream between blocks. Without it XLA's SPMD
  partitioner may meet an FSDP-split weight by gathering the activations to the
  whole global batch (and all-reducing them back) instead of gathering the
  weight, so per-chip memory grows with the chip count. A no-op unless traced
  under `activation_sharding`.
  """
  rules, mesh = nn.get_logical_axis_rules(), jax.sharding.get_abstract_mesh()
  if not rules or mesh.empty:
    return x
  axes = _split(mesh, _mesh_axes_for("batch", rules))
  if not axes or x.shape[0] % math.prod(mesh.shape[a] for a in axes):
    return x
  return jax.lax.with_sharding_constraint(x, P(axes, *[P.UNCONSTRAINED] * (x.ndim - 1)))


def initialize_distributed(coordinator_address: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None):
  """Joins a multi-process run (before any other JAX computation). With no
  arguments jax.distributed asks the cluster (TPU VM metadata, Slurm, ...) for
  its peers. CPU processes exchange collectives through gloo; accelerators ignore it."""
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address, num_processes, process_id)


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
