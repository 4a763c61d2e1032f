"""Shapes training on a CPU host: one JAX device against one device per core (train.py's default).

XLA's CPU backend runs a device's narrow convolutions on one thread, so a single device leaves
cores idle; train.py splits a CPU-only host into one device per core and trains data-parallel
over them (unclip_jax/cli/train.py). This runs the real training script (`train.py`, the Shapes
configs, the Shapes world's input pipeline, AdamW, EMA) for each stage under both device counts,
in the same run, and reads the steady-state steps/s the run writes to TensorBoard (the first
logged interval, which holds the compile, is left out).

  python -m benchmarks.cpu_data_parallel [--stages clip,prior,ar_prior,decoder,sr1,sr2] [--steps 60]
"""

import argparse
import os
import subprocess
import sys
import tempfile

from tensorboard.backend.event_processing import event_accumulator
from tensorboard.util import tensor_util

from configs import shapes
from unclip_jax import cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLIP_DIR = os.path.join(ROOT, "assets", "shapes_demo", "clip")  # what the prior and decoder embed with
READS_CLIP = ("prior", "ar_prior", "decoder")


def steady_steps_per_sec(workdir: str) -> float:
  """Mean steps/s over the logged intervals after the first (which includes the compile)."""
  events = event_accumulator.EventAccumulator(workdir, size_guidance={"tensors": 0})
  events.Reload()
  rates = [float(tensor_util.make_ndarray(e.tensor_proto)) for e in events.Tensors("steps_per_sec")][1:]
  if not rates:
    raise RuntimeError(f"no steady-state steps_per_sec in {workdir}")
  return sum(rates) / len(rates)


def run_stage(stage: str, devices: int, steps: int, log_every: int) -> float:
  """Trains `stage` for log_every + steps steps on `devices` CPU devices; returns steady steps/s."""
  with tempfile.TemporaryDirectory() as workdir:
    command = [sys.executable, os.path.join(ROOT, "train.py"), "--config", f"configs/shapes.py:{stage}",
               "--workdir", workdir, f"--config.total_steps={log_every + steps}", f"--config.log_every={log_every}",
               "--config.checkpoint_every=1000000", "--config.optim.warmup_steps=0"]
    if stage in READS_CLIP:
      command.append(f"--config.clip_dir={CLIP_DIR}")
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} {cli.DEVICE_COUNT_FLAG}={devices}".strip())
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    if done.returncode:
      sys.exit(f"error: train.py {stage} on {devices} devices failed:\n{done.stderr[-3000:]}")
    return steady_steps_per_sec(workdir)


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--stages", default="clip,prior,ar_prior,decoder,sr1,sr2")
  parser.add_argument("--steps", type=int, default=60, help="timed steps per run (after one log interval)")
  parser.add_argument("--log_every", type=int, default=10)
  args = parser.parse_args()
  if cli.DEVICE_COUNT_FLAG in os.environ.get("XLA_FLAGS", ""):
    sys.exit(f"error: XLA_FLAGS sets {cli.DEVICE_COUNT_FLAG}; this benchmark sets it for each run itself")
  print("| stage | batch | steps/s, 1 device | steps/s, one device per core | ratio |")
  print("|---|---|---|---|---|")
  for stage in args.stages.split(","):
    batch = shapes.get_config(stage).batch_size
    devices = cli.use_cpu_cores(batch, environ={}, divide_batch=True)
    one = run_stage(stage, 1, args.steps, args.log_every)
    many = run_stage(stage, devices, args.steps, args.log_every)
    print(f"| {stage} | {batch} | {one:.2f} | {many:.2f} ({devices} devices) | {many / one:.2f} |", flush=True)


if __name__ == "__main__":
  main()
