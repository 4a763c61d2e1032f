"""One process of a multi-process toy-stage run, for tests/test_multiprocess.py:

  python tests/multiprocess_toy.py WORKDIR TOTAL_STEPS --mesh data=2,fsdp=4 \
      [--coordinator_address HOST:PORT --num_processes N --process_id I] [--sleep S]

Every batch's global positions that this process read are appended to
WORKDIR/positions.<process index>.jsonl (one line per step). `run` is the same training in a
process that has its devices already (the test's single-process runs).
"""

import argparse
import json
import os

from toy_stage import ToyStage, toy_batches, toy_config

BATCH_SIZE = 16
HIDDEN = 256  # kernels [8, 256] and [256, 16]: FSDP splits them


def run(workdir: str, total_steps: int, mesh: str, sleep: float = 0.0):
  """Trains the toy stage to total_steps (resuming from workdir's last checkpoint), recording positions."""
  import jax

  from unclip_jax import train_loop

  record = os.path.join(workdir, f"positions.{jax.process_index()}.jsonl")

  def recorded_batches(start, rows=None):
    os.makedirs(workdir, exist_ok=True)
    for batch in toy_batches(start, rows, batch_size=BATCH_SIZE):
      with open(record, "a") as f:
        f.write(json.dumps([int(i) for i in batch["index"]]) + "\n")
      yield batch

  mesh = {k: int(v) for k, v in (part.split("=") for part in mesh.split(","))}
  config = toy_config(total_steps, batch_size=BATCH_SIZE, checkpoint_every=1, mesh=mesh, sample_every=total_steps)
  train_loop.train(config, workdir, ToyStage(sleep, hidden=HIDDEN), recorded_batches)


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("workdir")
  parser.add_argument("total_steps", type=int)
  parser.add_argument("--mesh", required=True, help="e.g. data=2,fsdp=4")
  parser.add_argument("--coordinator_address")
  parser.add_argument("--num_processes", type=int)
  parser.add_argument("--process_id", type=int)
  parser.add_argument("--sleep", type=float, default=0.0)
  args = parser.parse_args()
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  import jax

  from unclip_jax import parallel

  if args.coordinator_address:
    parallel.initialize_distributed(args.coordinator_address, args.num_processes, args.process_id)
  run(args.workdir, args.total_steps, args.mesh, args.sleep)
  print("finished", jax.process_index(), flush=True)


if __name__ == "__main__":
  main()
