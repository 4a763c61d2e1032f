"""TPU chips and slice topologies, for compiling ahead of time on a machine without TPUs.

A topology is written as the chip's name and the slice's shape in chips, e.g.
v5e:4x4 or v5p:4x4x4. libtpu (installed from requirements-dev.txt) turns it
into compile-only devices; nothing runs on them.
"""

import dataclasses
import importlib.util
import math
import os
import re

from jax.experimental import topologies

GB = 10**9


@dataclasses.dataclass(frozen=True)
class Chip:
  name: str
  peak_flops: float  # dense bf16 FLOP/s per chip
  hbm_bytes: int  # per chip
  hbm_bandwidth: float  # bytes/s per chip
  libtpu_name: str  # the name libtpu's topology strings use
  dims: int  # 2: a 2D torus of single-core chips; 3: a 3D torus of megacore chips
  chip_config: str  # libtpu's chip_config_name


# Per chip, from Google Cloud's TPU pages (tables "Key chip specifications" / "System architecture"):
#   v4:  https://cloud.google.com/tpu/docs/v4   275 TFLOP/s bf16, HBM2 32 GiB, 1200 GB/s
#   v5e: https://cloud.google.com/tpu/docs/v5e  197 TFLOP/s bf16, HBM2 16 GB, 819 GB/s
#   v5p: https://cloud.google.com/tpu/docs/v5p  459 TFLOP/s bf16, HBM2e 95 GB, 2765 GB/s
#   v6e: https://cloud.google.com/tpu/docs/v6e  918 TFLOP/s bf16, HBM 32 GB, 1638 GB/s
# Capacities are taken as the pages write them ("GB" as 10^9 bytes, v4's GiB as 2^30), which errs on the
# safe side: the runtime keeps a little of each chip's HBM for itself.
CHIPS = {
    "v4": Chip("v4", 275e12, 32 * 2**30, 1200 * GB, "v4", 3, "megacore"),
    "v5e": Chip("v5e", 197e12, 16 * GB, 819 * GB, "v5e", 2, "default"),
    "v5p": Chip("v5p", 459e12, 95 * GB, 2765 * GB, "v5", 3, "megacore"),
    "v6e": Chip("v6e", 918e12, 32 * GB, 1638 * GB, "v6e", 2, "default"),
}


@dataclasses.dataclass(frozen=True)
class Topology:
  chip: Chip
  shape: tuple[int, ...]  # chips along each torus axis

  @property
  def chips(self) -> int:
    return math.prod(self.shape)

  def __str__(self):
    return f"{self.chip.name}:{'x'.join(map(str, self.shape))}"

  @property
  def libtpu_name(self) -> str:
    return f"{self.chip.libtpu_name}:{'x'.join(map(str, self.shape))}"

  @property
  def wrap(self) -> tuple[bool, bool, bool]:
    """Which axes close into rings: v4/v5p slices whose sides are all multiples of 4 are tori;
    v5e/v6e rings close along a full side of 16 chips (the pod's)."""
    shape3 = tuple(self.shape) + (1,) * (3 - len(self.shape))
    if self.chip.dims == 3:
      torus = all(s % 4 == 0 for s in self.shape)
      return (torus,) * 3
    return tuple(s == 16 for s in shape3[:2]) + (False,)

  @property
  def chips_per_host_bounds(self) -> tuple[int, int, int]:
    shape3 = tuple(self.shape) + (1,) * (3 - len(self.shape))
    return tuple(min(s, b) for s, b in zip(shape3, (2, 2, 1)))


def parse_topology(text: str) -> Topology:
  """'v5p:4x4x4' -> Topology; a ValueError that says what is wrong otherwise."""
  name, sep, shape = text.partition(":")
  if not sep or not re.fullmatch(r"\d+(x\d+)*", shape):
    raise ValueError(f"bad topology {text!r}; expected CHIP:AxB (v5e, v6e) or CHIP:AxBxC (v4, v5p), "
                     "e.g. v5e:4x4 or v5p:4x4x4.")
  if name not in CHIPS:
    raise ValueError(f"unknown TPU {name!r} in topology {text!r}; known: {', '.join(sorted(CHIPS))}.")
  chip = CHIPS[name]
  dims = tuple(int(s) for s in shape.split("x"))
  if len(dims) != chip.dims or min(dims) < 1:
    example = "4x4" if chip.dims == 2 else "4x4x4"
    raise ValueError(f"a {name} topology has {chip.dims} positive sides (e.g. {name}:{example}), got {text!r}.")
  return Topology(chip, dims)


def libtpu_installed() -> bool:
  return importlib.util.find_spec("libtpu") is not None


def compile_only_devices(topology: Topology) -> list:
  """libtpu's compile-only devices for the topology, one per chip.

  libtpu normally takes a machine-wide lock (/tmp/libtpu_lockfile) so that one
  process owns the TPUs; we never touch a TPU, so we ask it to share (several
  compiles, or other jax processes that loaded libtpu, may run at once).
  """
  if not libtpu_installed():
    raise RuntimeError("libtpu is not installed; pip install -r requirements-dev.txt (it pins libtpu).")
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  # No TPU host to discover: skip the metadata-server query and its warnings.
  os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
  os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
  try:
    devices = topologies.get_topology_desc(
        topology.libtpu_name, "tpu", chip_config_name=topology.chip.chip_config,
        chips_per_host_bounds=topology.chips_per_host_bounds, wrap=topology.wrap).devices
  except Exception as e:  # libtpu reports a bad shape as a runtime error with a long trace
    raise RuntimeError(f"libtpu cannot make topology {topology}: {str(e).splitlines()[0]}") from e
  if len(devices) != topology.chips:
    raise RuntimeError(f"libtpu made {len(devices)} devices for {topology}, expected one per chip "
                       f"({topology.chips}).")
  return list(devices)
