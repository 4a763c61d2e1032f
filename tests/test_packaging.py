"""The wheel ships every package: pyproject.toml names them by hand (configs/ and assets/ are mapped
into unclip_jax, which automatic discovery cannot see), so a new subpackage must be listed."""

import os
import tomllib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_every_unclip_jax_package_is_in_the_wheel():
  with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
    tool = tomllib.load(f)["tool"]["setuptools"]
  on_disk = {os.path.relpath(d, ROOT).replace(os.sep, ".") for d, _, files in os.walk(os.path.join(ROOT, "unclip_jax"))
             if "__init__.py" in files}
  assert on_disk | set(tool["package-dir"]) == set(tool["packages"])
  for package, folder in tool["package-dir"].items():
    assert os.path.isdir(os.path.join(ROOT, folder)), (package, folder)
