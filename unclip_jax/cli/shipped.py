"""The files that ship beside the code, found in a checkout and in an installed wheel alike.

A checkout has them at the top level (configs/, assets/shapes_demo); a wheel carries the same folders
inside the package (unclip_jax/configs, unclip_jax/assets; pyproject.toml's package-dir). So
`--config configs/shapes.py:prior` and sample's default checkpoint work from any directory after
`pip install .`.

The configs import each other as `from configs import common`, which only works when `configs` is
importable: in a checkout `python train.py` puts the repository on sys.path, but a console script
(and an installed wheel, where the folder is unclip_jax/configs) does not. resolve_config therefore
binds the name `configs` to the folder the config file lives in before ml_collections loads it.
"""

import importlib.util
import os
import sys

from absl import flags

PACKAGE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # .../unclip_jax
CHECKOUT = os.path.dirname(PACKAGE)


def find(relative: str) -> str | None:
  """The shipped folder `relative` (e.g. "configs", "assets/shapes_demo"): the wheel's copy inside the
  package, else the checkout's at the top level; None when this installation has neither."""
  roots = [PACKAGE]
  if os.path.isfile(os.path.join(CHECKOUT, "pyproject.toml")):  # a checkout, not site-packages
    roots.append(CHECKOUT)
  for root in roots:
    path = os.path.join(root, relative)
    if os.path.isdir(path):
      return path
  return None


def _is_configs_package(folder: str) -> bool:
  return os.path.basename(folder) == "configs" and os.path.isfile(os.path.join(folder, "__init__.py"))


def _bind_configs(config_file: str):
  """Makes `from configs import ...` inside config_file import its own folder's modules (or the
  shipped configs, for a config file of one's own elsewhere), unless `configs` is already imported
  or, for such a file of one's own, already importable."""
  if "configs" in sys.modules:
    return
  folder = os.path.dirname(os.path.abspath(config_file))
  if not _is_configs_package(folder):
    try:
      if importlib.util.find_spec("configs") is not None:
        return
    except (ImportError, ValueError):
      pass
    folder = find("configs")
    if folder is None:
      return
  spec = importlib.util.spec_from_file_location("configs", os.path.join(folder, "__init__.py"),
                                                submodule_search_locations=[folder])
  module = importlib.util.module_from_spec(spec)
  sys.modules["configs"] = module
  try:
    spec.loader.exec_module(module)
  except BaseException:
    del sys.modules["configs"]
    raise


def _config_names(folder: str | None) -> list[str]:
  """The runnable configs in folder (those with a get_config; common.py is shared code), for errors."""
  names = []
  for name in sorted(os.listdir(folder)) if folder else []:
    if name.endswith(".py"):
      with open(os.path.join(folder, name)) as f:
        if "\ndef get_config(" in f.read():
          names.append(f"configs/{name}")
  return names


def resolve_config(argument: str) -> str:
  """--config's "PATH[:ARG]" with PATH as given when that file exists (relative to the working
  directory, as ml_collections reads it), else the shipped config of that name ("configs/shapes.py"
  or "shapes.py" -> the installation's configs/shapes.py)."""
  path, colon, arg = argument.partition(":")
  if not os.path.isfile(path):
    shipped = find("configs")
    parts = os.path.normpath(path).split(os.sep)
    if parts[0] == "configs":
      parts = parts[1:]
    candidate = os.path.join(shipped, *parts) if shipped and parts and not os.path.isabs(path) else None
    if candidate is None or not os.path.isfile(candidate):
      names = ", ".join(_config_names(shipped)) or "none in this installation"
      raise ValueError(f"no config file {path!r} in {os.getcwd()!r} nor among the shipped configs ({names}).")
    path = candidate
  _bind_configs(path)
  return path + colon + arg


class _ResolvingParser(flags.ArgumentParser):
  """A config flag's own parser, given the config path resolve_config finds."""

  def __init__(self, parser: flags.ArgumentParser):
    self._parser = parser

  def parse(self, argument):
    return self._parser.parse(resolve_config(argument))

  def flag_type(self):
    return self._parser.flag_type()


def resolve_config_flag(holder: flags.FlagHolder, flag_values: flags.FlagValues = flags.FLAGS):
  """Lets a config_flags.DEFINE_config_file flag take shipped config names (resolve_config)."""
  flag = flag_values[holder.name]
  flag.parser = _ResolvingParser(flag.parser)
