"""Reading PyTorch-layout safetensors into Flax parameter trees, with errors
that name every missing, unused or mis-shaped tensor."""

import os

import numpy as np
from flax import traverse_util
from safetensors.numpy import load_file


class ConversionError(ValueError):
  """A checkpoint does not fit the model it is converted into."""


def load_safetensors(path: str) -> dict[str, np.ndarray]:
  """All tensors of a .safetensors file, or of every such file in a folder."""
  if os.path.isdir(path):
    files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    if not files:
      raise ConversionError(f"No .safetensors file in {path!r} (pickled .bin weights are not read).")
    tensors = {}
    for name in files:
      tensors.update(_load_one(os.path.join(path, name), load_file))
    return tensors
  if not os.path.exists(path):
    raise ConversionError(f"Checkpoint {path!r} does not exist.")
  return _load_one(path, load_file)


def _load_one(path, load_file):
  try:
    return load_file(path)
  except Exception as e:  # safetensors raises several types for corrupt files
    raise ConversionError(f"Could not read {path!r} as safetensors: {e}") from e


def linear(weight: np.ndarray) -> np.ndarray:
  """torch Linear weight [out, in] -> flax Dense kernel [in, out]."""
  return np.ascontiguousarray(weight.T)


def conv2d(weight: np.ndarray) -> np.ndarray:
  """torch Conv2d weight [out, in, kh, kw] -> flax Conv kernel [kh, kw, in, out]."""
  return np.ascontiguousarray(weight.transpose(2, 3, 1, 0))


class TensorReader:
  """Pops tensors from a state dict by name and fills a flat Flax param dict.

  Use `take(name, transform)` for each tensor the model needs; `finish(params)`
  then checks every shape against the target tree and raises one error naming
  all missing, mis-shaped and unused tensors.
  """

  def __init__(self, state_dict: dict[str, np.ndarray], source: str = "checkpoint"):
    self._state = dict(state_dict)
    self._used: set[str] = set()
    self._missing: list[str] = []
    self.source = source
    self.flat: dict[tuple[str, ...], np.ndarray] = {}

  def has(self, name: str) -> bool:
    return name in self._state

  def take(self, name: str, transform=None):
    if name not in self._state:
      self._missing.append(name)
      return None
    self._used.add(name)
    value = np.asarray(self._state[name], dtype=np.float32)
    return transform(value) if transform is not None else value

  def put(self, path: tuple[str, ...], name: str, transform=None):
    value = self.take(name, transform)
    if value is not None:
      self.flat[path] = value

  def finish(self, target_params, *, allow_unused: tuple[str, ...] = ()):
    """Returns the nested params, shaped like target_params (arrays or ShapeDtypeStructs)."""
    target = traverse_util.flatten_dict(target_params)
    problems = [f"missing tensor {name!r}" for name in self._missing]
    for path, value in self.flat.items():
      if path not in target:
        problems.append(f"no parameter {'/'.join(path)} in the model for a converted tensor")
      elif tuple(value.shape) != tuple(target[path].shape):
        problems.append(f"{'/'.join(path)}: checkpoint shape {tuple(value.shape)}, "
                        f"model expects {tuple(target[path].shape)}")
    for path in target:
      if path not in self.flat:
        problems.append(f"model parameter {'/'.join(path)} was not filled")
    unused = sorted(k for k in self._state if k not in self._used and not k.startswith(allow_unused))
    problems += [f"unused tensor {name!r}" for name in unused]
    if problems:
      raise ConversionError(f"{self.source} does not match the model:\n  " + "\n  ".join(problems))
    return traverse_util.unflatten_dict(self.flat)
