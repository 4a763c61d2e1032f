"""Wall seconds of two identical `python sample.py` runs, each a fresh process, sharing a fresh
persistent compilation cache: the first compiles every loop and writes the cache, the second
should load them (issue #24, item 4: at least 2x faster).

  python benchmarks/compile_cache.py [--prompt "a red circle above a blue square"] [--runs 2]
      [-- EXTRA SAMPLE.PY FLAGS]

The cache folder and the output folder are temporary (deleted after). Prints a markdown table:
each run's wall seconds, the cache's entries after it, and its speed-up over the first run.
"""

import argparse
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _sample(prompt: str, cache: str, out: str, extra: list[str]) -> float:
  """Wall seconds of one `python sample.py` (process start and image writing included)."""
  command = [sys.executable, os.path.join(ROOT, "sample.py"), "--prompt", prompt, "--compilation_cache", cache,
             "--out", out, *extra]
  start = time.perf_counter()
  done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
  seconds = time.perf_counter() - start
  if done.returncode:
    sys.exit(f"sample.py failed ({done.returncode}):\n{done.stderr[-3000:]}")
  return seconds


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--prompt", default="a red circle above a blue square")
  parser.add_argument("--runs", type=int, default=2)
  parser.add_argument("extra", nargs="*", help="more sample.py flags (after --)")
  args = parser.parse_args()
  with tempfile.TemporaryDirectory() as cache, tempfile.TemporaryDirectory() as out:
    rows = []
    for run in range(args.runs):
      seconds = _sample(args.prompt, cache, out, args.extra)
      rows.append((run + 1, seconds, len(os.listdir(cache))))
  print(f"python sample.py --prompt {args.prompt!r} {' '.join(args.extra)}".rstrip())
  print("| run | wall s | cache entries after | first / this |")
  print("|---|---|---|---|")
  for run, seconds, entries in rows:
    print(f"| {run} | {seconds:.1f} | {entries} | {rows[0][1] / seconds:.2f}x |")


if __name__ == "__main__":
  main()
