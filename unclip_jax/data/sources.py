"""Image-caption sources: tensorflow-datasets, folders (sidecar .txt or .jsonl),
webdataset .tar shards (img2dataset's layout), and the Shapes world.

Folders, shards and tfds are random-access records that data/loader.py turns into this
host's batches {"image": uint8 [b, R, R, 3], "caption": list[str], "index": int [b],
"corrupt": int, "corrupt_names": list[str]} from a global position (examples consumed so
far), so a resumed run continues the same stream without replaying it, and each host reads
only its own share of every global batch. Paths go through unclip_jax.paths (local, file://,
or gs:// where its filesystem is installed).
"""

import dataclasses
import json
import tarfile

import numpy as np

from unclip_jax import paths
from unclip_jax.data import shapes

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


@dataclasses.dataclass
class FileRecords:
  """Images in files or in byte ranges of .tar shards, with captions: records[i] reads item i.

  Plain lists and arrays, so grain's worker processes receive it cheaply; offsets[i] < 0 means
  the whole file.
  """
  paths: list[str]
  captions: list[str]
  offsets: np.ndarray  # int64 [N]
  sizes: np.ndarray  # int64 [N]
  name: str

  def __post_init__(self):
    if not self.paths:
      raise ValueError(f"no image-caption pairs found in {self.name}.")

  def __len__(self):
    return len(self.paths)

  def __getitem__(self, i: int) -> dict:
    i = int(i)
    with paths.as_path(self.paths[i]).open("rb") as f:
      if self.offsets[i] >= 0:
        f.seek(int(self.offsets[i]))
        data = f.read(int(self.sizes[i]))
      else:
        data = f.read()
    return {"image": data, "caption": self.captions[i], "name": self.paths[i]}


def _whole_files(files, captions, name) -> FileRecords:
  return FileRecords(list(files), list(captions), np.full(len(files), -1, np.int64), np.zeros(len(files), np.int64),
                     name)


def folder_source(path: str) -> FileRecords:
  """A folder of images with captions: *.jsonl lines {"image": relpath, "caption": text},
  else a sidecar NAME.txt beside each image, else webdataset *.tar shards."""
  root = paths.as_path(path)
  if not root.is_dir():
    raise ValueError(f"data folder {path!r} does not exist.")
  names = sorted(p.name for p in root.iterdir())
  jsonl = [n for n in names if n.endswith(".jsonl")]
  if jsonl:
    files, captions = [], []
    for name in jsonl:
      for line_no, line in enumerate((root / name).read_text().splitlines(), 1):
        if not line.strip():
          continue
        try:
          record = json.loads(line)
          files.append(str(root / record["image"]))
          captions.append(str(record["caption"]))
        except (json.JSONDecodeError, KeyError, TypeError) as e:
          raise ValueError(f"{name}:{line_no}: expected {{\"image\": ..., \"caption\": ...}}, got "
                           f"{line.strip()[:80]!r}") from e
    return _whole_files(files, captions, path)
  tars = [n for n in names if n.endswith(".tar")]
  if tars:
    return webdataset_source([str(root / n) for n in tars])
  present = set(names)
  pairs = [(n, n.rsplit(".", 1)[0] + ".txt") for n in names if "." in n and "." + n.rsplit(".", 1)[1].lower()
           in IMAGE_SUFFIXES]
  pairs = [(image, text) for image, text in pairs if text in present]
  return _whole_files([str(root / image) for image, _ in pairs], [(root / text).read_text().strip()
                                                                 for _, text in pairs], path)


def webdataset_source(tar_paths: list[str]) -> FileRecords:
  """img2dataset / webdataset shards: members KEY.jpg (or png, webp) with KEY.txt captions,
  indexed once by their byte ranges and read from them."""
  files, captions, offsets, sizes = [], [], [], []
  for tar_path in tar_paths:
    with paths.as_path(tar_path).open("rb") as f, tarfile.open(fileobj=f) as tar:
      members = {m.name: m for m in tar.getmembers() if m.isfile()}
      for name, member in sorted(members.items()):
        key, dot, suffix = name.rpartition(".")
        if dot and "." + suffix.lower() in IMAGE_SUFFIXES and key + ".txt" in members:
          captions.append(tar.extractfile(members[key + ".txt"]).read().decode("utf-8").strip())
          files.append(tar_path)
          offsets.append(member.offset_data)
          sizes.append(member.size)
  return FileRecords(files, captions, np.asarray(offsets, np.int64), np.asarray(sizes, np.int64),
                     ", ".join(tar_paths))


class TfdsRecords:
  """A tensorflow-datasets split through its random-access path (tfds.data_source: ArrayRecord
  files, any example in O(1)), so hosts read only their rows and a resume replays nothing."""

  def __init__(self, name: str, split: str, *, image_key: str = "image", caption_key: str = "captions/text",
               data_dir: str | None = None):
    import tensorflow_datasets as tfds  # only tfds reads pay for importing TensorFlow (seconds, GBs)

    try:
      self.source = tfds.data_source(name, split=split, data_dir=data_dir)
    except Exception as e:  # not prepared, or prepared as TFRecord (no random access)
      raise ValueError(f"tfds {name!r} split {split!r} has no random-access copy ({str(e).splitlines()[0][:160]}); "
                       f"prepare it with `tfds build {name} --file_format=array_record`.") from e
    self.name, self.split, self.image_key, self.caption_key = name, split, image_key, caption_key

  def __len__(self):
    return len(self.source)

  def __getitem__(self, i: int) -> dict:
    example = self.source[int(i)]
    image, caption = _field(example, self.image_key), _field(example, self.caption_key)
    caption = caption[0] if np.ndim(caption) else caption  # e.g. coco's five captions: the first
    caption = caption.decode("utf-8") if isinstance(caption, bytes) else str(caption)
    return {"image": np.asarray(image), "caption": caption, "name": f"{self.name}/{self.split}[{int(i)}]"}


def _field(example, key: str):
  """"captions/text" -> example["captions"]["text"]."""
  for part in key.split("/"):
    example = example[part]
  return example


@dataclasses.dataclass
class ShapesRecords:
  """The Shapes world's first num_examples scenes as records: scene i is item i."""
  seed: int
  num_examples: int
  resolution: int

  def __len__(self):
    return self.num_examples

  def __getitem__(self, i: int) -> dict:
    scene = shapes.sample_scene(self.seed, int(i))
    return {"image": shapes.render(scene, self.resolution), "caption": scene.caption,
            "name": f"shapes/{self.seed}/{int(i)}"}
