"""Paths that may be remote: a workdir, export or checkpoint given as a local folder, a file:// URI,
or gs:// (any scheme etils.epath knows), through one type.

epath reads and writes gs:// through tf.io.gfile when TensorFlow is installed (it is a requirement
here), else through fsspec (`pip install gcsfs`). epath has no file:// scheme, so `as_path` turns
file:// URIs into local paths. os.path calls must never see a URI: os.path.abspath("gs://b/run")
is "/cwd/gs:/b/run".
"""

import contextlib
import os
import shutil
import tempfile
import urllib.parse
import urllib.request

from etils import epath

FILE_SCHEME = "file://"


def is_remote(path) -> bool:
  """True for a URI other than file:// (gs://, s3://, ...): a path no os.* call can take."""
  text = os.fspath(path)
  return "://" in text and not text.startswith(FILE_SCHEME)


def _local(text: str) -> str:
  """file:///x (or file://localhost/x) -> /x; anything else unchanged."""
  if not text.startswith(FILE_SCHEME):
    return text
  parsed = urllib.parse.urlparse(text)
  if parsed.netloc not in ("", "localhost"):
    raise ValueError(f"{text!r}: a file:// URI must name this machine (file:///path), not {parsed.netloc!r}.")
  return urllib.request.url2pathname(parsed.path)


def as_path(path) -> epath.Path:
  """Any path or URI as an epath.Path (file:// made local; relative paths stay relative)."""
  if isinstance(path, epath.Path):
    return path
  return epath.Path(_local(os.fspath(path)))


def absolute(path) -> epath.Path:
  """as_path, absolute if local (Orbax wants absolute folders); a remote URI is returned as it is."""
  path = as_path(path)
  return path if is_remote(path) else epath.Path(os.path.abspath(path))


def copy_tree(src, dst):
  """Copies folder src into dst (created; files there are overwritten), across file systems."""
  src, dst = as_path(src), as_path(dst)
  if not is_remote(src) and not is_remote(dst):
    shutil.copytree(src, dst, dirs_exist_ok=True)
    return
  dst.mkdir(parents=True, exist_ok=True)
  for child in src.iterdir():
    if child.is_dir():
      copy_tree(child, dst / child.name)
    else:  # streamed: epath's own copy needs both ends on one backend
      with child.open("rb") as r, (dst / child.name).open("wb") as w:
        shutil.copyfileobj(r, w, 1 << 24)


@contextlib.contextmanager
def local_folder(dest):
  """A local folder to write into that ends up at dest, for writers that only take local paths
  (transformers' save_pretrained): dest itself if local, else a temporary folder copied to dest
  when the block finishes without an error."""
  if not is_remote(dest):
    local = os.fspath(as_path(dest))
    os.makedirs(local, exist_ok=True)
    yield local
    return
  with tempfile.TemporaryDirectory(prefix="unclip_jax_") as tmp:
    yield tmp
    copy_tree(tmp, dest)


@contextlib.contextmanager
def local_copy(src):
  """A local folder with src's files, for readers that only take local paths (transformers'
  from_pretrained): src itself if local, else a temporary copy, deleted after the block. A remote
  src that is not a folder gives a local path that does not exist, so the reader's own check
  reports it."""
  if not is_remote(src):
    yield os.fspath(as_path(src))
    return
  with tempfile.TemporaryDirectory(prefix="unclip_jax_") as tmp:
    local = os.path.join(tmp, as_path(src).name or "folder")
    if as_path(src).is_dir():
      copy_tree(src, local)
    yield local


def output_folder_problem(flag: str, value: str) -> str | None:
  """Why the local folder `value` given as --flag cannot hold a program's outputs (it, or a folder above
  it, is a file; the nearest existing folder is not writable), as one line; None if it can. Checked
  before any model work, so a bad one never discards a finished run. A URI (gs://) is checked by its
  first write."""
  if is_remote(value):
    return None
  path = os.path.abspath(os.fspath(as_path(value)))
  existing = path
  while not os.path.exists(existing):
    existing = os.path.dirname(existing)
  if not os.path.isdir(existing):
    where = "is a file" if existing == path else f"is inside {existing!r}, which is a file"
    return f"--{flag} {value!r} {where}: name a folder (it is created if missing)."
  if not os.access(existing, os.W_OK | os.X_OK):
    return f"--{flag} {value!r}: cannot write in {existing!r}; name a folder you can write to."
  return None
