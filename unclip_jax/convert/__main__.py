"""python -m unclip_jax.convert --from diffusers --src DIR --dst DIR

Converts a diffusers-format unCLIP pipeline folder (Karlo's kakaobrain/karlo-v1-alpha, or the
image-variations variant) into an inference checkpoint that sample.py --checkpoint reads.
"""

import argparse
import json
import os
import sys

from unclip_jax import cli, paths


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python -m unclip_jax.convert", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--from", dest="source", required=True, choices=["diffusers"],
                      help="the source format (only 'diffusers': an UnCLIPPipeline folder)")
  parser.add_argument("--src", required=True, help="the diffusers pipeline folder (prior/, decoder/, ...)")
  parser.add_argument("--dst", required=True, help="the checkpoint folder to write")
  parser.add_argument("--overwrite", action="store_true", help="write into a non-empty --dst")
  args = parser.parse_args(argv)

  problem = paths.output_folder_problem("dst", args.dst)
  if not os.path.isdir(args.src):
    problem = f"--src {args.src!r} is not a folder: name a diffusers unCLIP pipeline folder (prior/, decoder/, ...)."
  if problem:
    print(f"error: {problem}", file=sys.stderr)
    return 1
  # After the command line's checks: the converter imports transformers, which takes seconds.
  with cli.needs_extra("converting", extra="convert"):  # torch, safetensors, diffusers
    from unclip_jax.convert.common import ConversionError
    from unclip_jax.convert.diffusers_pipeline import convert

  try:
    layout = convert(args.src, args.dst, overwrite=args.overwrite)
  except ConversionError as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  print(f"Wrote {args.dst} ({layout['kind']}): " + json.dumps(layout["options"]))
  return 0


if __name__ == "__main__":
  sys.exit(main())
