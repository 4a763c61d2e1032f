"""Writes a store of precomputed CLIP embeddings (unclip_jax/data/embeddings.py has its layout).

  unclip-embed --clip DIR --out DIR --data_kind folder --data_path IMAGES \\
      [--num_examples N] [--shard_size 65536] [--process_index I --process_count P]
  # or --data_kind tfds --tfds_name coco_captions --tfds_split train, or --data_kind shapes --num_examples N
  python -m unclip_jax.cli.embed ...   (the same program, without installing the package)

The prior then trains on the store alone (--config.data.kind=embeddings --config.data.path=DIR) and the
decoder reads each image beside its row (--config.data.embeddings=DIR, same source flags as here).
Rerun the same command to resume: complete shards are skipped. Several processes (on any machines that
share the folder) split the shards by --process_index / --process_count.
"""

import sys

import ml_collections
from absl import app, flags, logging

from unclip_jax import cli
from unclip_jax.models import clip as clip_lib

_CLIP = flags.DEFINE_string("clip", None, "CLIP folder (Hugging Face format, with its vision tower).")
_OUT = flags.DEFINE_string("out", None, "Output folder (local, mounted or gs://); rerun the same command to resume.")
_KIND = flags.DEFINE_enum("data_kind", "shapes", ["shapes", "folder", "tfds"], "Data source.")
_PATH = flags.DEFINE_string("data_path", "", "Folder (or .tar shards) for --data_kind folder.")
_NUM = flags.DEFINE_integer("num_examples", None, "Items 0 .. N-1 of the source (default: all; Shapes: required).")
_SHARD = flags.DEFINE_integer("shard_size", 65536, "Items per shard (the unit of resuming and of process work).")
_INDEX = flags.DEFINE_integer("process_index", 0, "This process writes shards k with k % process_count == "
                              "process_index.")
_COUNT = flags.DEFINE_integer("process_count", 1, "Processes writing the store together.")
_TFDS_NAME = flags.DEFINE_string("tfds_name", "coco_captions", "Data set for --data_kind tfds.")
_TFDS_SPLIT = flags.DEFINE_string("tfds_split", "train", "Split for --data_kind tfds.")
_TFDS_IMAGE = flags.DEFINE_string("tfds_image_key", "image", "Image feature for --data_kind tfds.")
_TFDS_CAPTION = flags.DEFINE_string("tfds_caption_key", "captions/text", "Caption feature for --data_kind tfds.")
_TFDS_DIR = flags.DEFINE_string("tfds_data_dir", "", "tfds data_dir.")
_SEED = flags.DEFINE_integer("seed", 0, "Shapes world seed (--data_kind shapes).")
_BATCH = flags.DEFINE_integer("batch_size", 64, "Encoding batch size.")
_RESOLUTION = flags.DEFINE_integer("resolution", 0, "Images are decoded at this size for CLIP (0: CLIP's input "
                                   "size).")
_WORKERS = flags.DEFINE_integer("workers", 0, "Decoding processes (0: threads only).")
_THREADS = flags.DEFINE_integer("threads", 8, "Decoding threads per process.")


def data_config() -> ml_collections.ConfigDict:
  """The flags as a training config's `data` (configs/common.data_config), so the store is read
  back from the very source training names."""
  return ml_collections.ConfigDict(dict(
      kind=_KIND.value, path=_PATH.value, seed=_SEED.value, name=_TFDS_NAME.value, split=_TFDS_SPLIT.value,
      image_key=_TFDS_IMAGE.value, caption_key=_TFDS_CAPTION.value, data_dir=_TFDS_DIR.value))


def main(argv):
  if len(argv) > 1:
    sys.exit(f"error: unexpected arguments {' '.join(argv[1:])}")
  if not _CLIP.value or not _OUT.value:
    sys.exit(f"error: --clip and --out are required, e.g. {cli.command('unclip-embed')} --clip runs/shapes/clip/"
             "export --out runs/shapes/embeddings --data_kind shapes --num_examples 100000")
  if _KIND.value == "folder" and not _PATH.value:
    sys.exit("error: --data_kind folder needs --data_path")
  if _KIND.value == "shapes" and not _NUM.value:
    sys.exit("error: a Shapes world is endless: say how many scenes (--num_examples).")
  with cli.needs_extra("writing embeddings"):  # grain, and tensorflow-datasets for tfds
    from unclip_jax.data import batches, embeddings

  try:
    clip = clip_lib.load_clip(_CLIP.value)
    resolution = _RESOLUTION.value or (clip.preprocess.crop_size[0] if clip.preprocess else 224)
    records, source = batches.source_records(data_config(), resolution, num_examples=_NUM.value)
    done = embeddings.write(clip, records, _OUT.value, source=source, num_examples=_NUM.value,
                            shard_size=_SHARD.value, batch_size=_BATCH.value, resolution=resolution,
                            process_index=_INDEX.value, process_count=_COUNT.value, workers=_WORKERS.value,
                            threads=_THREADS.value)
  except (ValueError, FileNotFoundError) as e:
    sys.exit(f"error: {e}")
  logging.info("%s: %s", _OUT.value, "complete (index.json written)" if done else
               "this process's shards written; index.json follows when the other processes finish")


def run():
  """The unclip-embed console script (and `python -m unclip_jax.cli.embed`)."""
  cli.show_in_help(__name__, __doc__)
  app.run(main)


if __name__ == "__main__":
  run()
