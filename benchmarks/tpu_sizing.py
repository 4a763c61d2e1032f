"""How the paper stages fit TPU pods: a table of `python -m unclip_jax.aot --fit_batch` runs.

  python -m benchmarks.tpu_sizing --stages prior,decoder,sr1,sr2 \\
      --topologies v5e:16x16,v5p:4x4x4,v4:2x4x4 --remat off,on [--timeout SECONDS]
  python -m benchmarks.tpu_sizing --table   # only print the table of the results so far

Each case (stage x topology x remat) compiles configs/paper.py's train step for the topology
(FSDP over every chip, bf16 compute) at the paper's batch and sizes the largest batch that fits
(`--fit_batch`, fit points at half and all of the paper's per-chip batch, so the paper's batch is
one of them). Every case runs in its own process and writes its report to
benchmarks/results/tpu_sizing/STAGE__TOPOLOGY__remat-{on,off}.json; a case whose JSON holds a fit
is skipped, and every compile's report is kept in benchmarks/results/tpu_sizing/compiles/ (aot
--cache_dir), so a run that the compiles outlast (paper U-Nets take 30-55 minutes each on a 2-core
CPU) resumes where it stopped. Prints the markdown table that docs/scaling.md shows.
"""

import argparse
import glob
import json
import os
import subprocess
import sys
import time

import jax
from jax.sharding import AbstractMesh

from configs import paper
from unclip_jax import aot, parallel, tpu_chips

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "tpu_sizing")
GIB = 2 ** 30


def case_path(stage: str, topology: str, remat: bool, results: str = RESULTS) -> str:
  return os.path.join(results, f"{stage}__{topology.replace(':', '_')}__remat-{'on' if remat else 'off'}.json")


def fsdp_size(stage: str, chips: int) -> int:
  """The largest FSDP axis, a divisor of the chip count, that splits as many parameters as any: FSDP
  over every chip leaves a weight replicated when no dimension of it divides by the chip count
  (parallel.param_spec), e.g. sr1's 192 x k channels on 256 chips (37.6% of its parameters), so
  such a stage gets data x FSDP instead, as MaxText's ici_data x ici_fsdp."""
  config = paper.get_config(stage)
  params = jax.eval_shape(aot.build_stage(config, aot.clip_shapes(config)).init_params, jax.random.key(0))
  leaves = jax.tree.leaves(params)

  def split(f: int) -> int:
    specs = jax.tree.leaves(parallel.param_specs(params, AbstractMesh((chips // f, f), ("data", "fsdp"))),
                            is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
    return sum(leaf.size for leaf, spec in zip(leaves, specs) if any(s is not None for s in spec))

  counts = {f: split(f) for f in range(1, chips + 1) if chips % f == 0}
  return max(f for f, count in counts.items() if count == max(counts.values()))


def mesh_overrides(stage: str, topology: str) -> list[str]:
  """aot's --config.mesh.* flags for a case: none when FSDP over every chip splits every parameter."""
  chips = tpu_chips.parse_topology(topology).chips
  f = fsdp_size(stage, chips)
  return [] if f == chips else [f"--config.mesh.data={chips // f}", f"--config.mesh.fsdp={f}"]


def fit_points(stage: str, topology: str) -> str:
  """Per-chip batches half of and equal to the paper's (so its compile is reused), at least 1 and 2."""
  per_chip = max(paper.get_config(stage).batch_size // tpu_chips.parse_topology(topology).chips, 2)
  return f"{per_chip // 2},{per_chip}"


def run_case(stage: str, topology: str, remat: bool, timeout: float, results: str = RESULTS, fit: bool = True,
             fit_checks: int = 3) -> str:
  """Runs one aot sizing in its own process (fit=False: the paper's batch only; fit_checks: check compiles
  of the fit's line); returns a one-word outcome."""
  out = case_path(stage, topology, remat, results)
  if os.path.exists(out):
    with open(out) as f:
      if "fit_batch" in json.load(f) or not fit:
        return "cached"
  command = [sys.executable, "-m", "unclip_jax.aot", "--config", f"configs/paper.py:{stage}", "--topology", topology,
             f"--config.model.remat={remat}", *mesh_overrides(stage, topology), "--json", out,
             "--cache_dir", os.path.join(results, "compiles")]
  if fit:
    command += ["--fit_batch", f"--fit_points={fit_points(stage, topology)}", f"--fit_checks={fit_checks}"]
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  start = time.time()
  with open(out.replace(".json", ".log"), "w") as log:
    try:
      done = subprocess.run(command, check=False, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=timeout)
    except subprocess.TimeoutExpired:
      return f"timeout after {timeout:.0f} s"
  return f"{'done' if done.returncode == 0 else 'failed'} in {time.time() - start:.0f} s"


def _row(path: str) -> str:
  """One case: per-chip numbers at the paper's batch, or at the largest batch that fits if that one does not."""
  stage, topology, remat = os.path.basename(path)[:-len(".json")].split("__")
  with open(path) as f:
    r = json.load(f)
  fit = r.get("fit_batch") or {}
  paper_batch = paper.get_config(stage).batch_size
  if "per_chip_bytes" in r:
    shown, batch = r, str(paper_batch)
  else:
    shown, batch = fit.get("report"), (f"{fit['batch_size']}*" if fit else "-")
  largest = str(fit["batch_size"]) if fit.get("verified") else ("none checked" if fit else "not sized")
  predicted = fit.get("predicted_batch_size")
  if predicted and not fit.get("checks") and predicted > fit.get("batch_size", 0):  # --fit_checks 0
    largest += f" (line: ~{predicted}, unchecked)"
  hbm = r.get("hbm_bytes_per_chip") or (fit.get("report") or {}).get("hbm_bytes_per_chip")
  refused = [guess for guess, total in fit.get("checks", []) if total is None or (hbm and total > hbm)]
  if refused and fit.get("per_chip_batch"):  # checks that XLA refused bound the answer from above
    largest += f" (refused: {min(refused) * fit['batch_size'] // fit['per_chip_batch']})"
  cells = [stage, topology.replace("_", ":"), remat[len("remat-"):], "yes" if r["fits"] else "no", largest, batch]
  if shown is None:
    return "| " + " | ".join(cells + ["-"] * 8) + " |"
  pc, coll = shown["per_chip_bytes"], shown["collective_bytes_per_step"]
  cells += [f"{pc['arguments'] / GIB:.2f}", f"{pc['temps'] / GIB:.2f}", f"{pc['total'] / GIB:.2f}",
            f"{shown['hbm_bytes_per_chip'] / GIB:.0f}", f"{shown['flops_per_step']:.3g}",
            " / ".join(f"{coll[kind] / GIB:.1f}" for kind in ("all-gather", "reduce-scatter", "all-reduce",
                                                            "collective-permute")),
            f"{shown['roofline_step_s'] * 1e3:.0f}", f"{shown['mfu_bound']:.2f}"]
  return "| " + " | ".join(cells) + " |"


def table(results: str = RESULTS) -> str:
  """Markdown; a batch marked * is the largest that fits, shown because the paper's does not."""
  head = ("| stage | topology | remat | paper batch fits | largest batch | batch shown | args GiB | temps GiB | "
          "total GiB | HBM GiB | FLOPs/chip | all-gather / reduce-scatter / all-reduce / permute GiB/chip | "
          "roofline ms | "
          "MFU bound |\n|" + "---|" * 14)
  return "\n".join([head] + [_row(p) for p in sorted(glob.glob(os.path.join(results, "*__*.json")))])


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--stages", default="prior,decoder,sr1,sr2")
  parser.add_argument("--topologies", default="v5e:16x16,v5p:4x4x4,v4:2x4x4")
  parser.add_argument("--remat", default="off,on", help="off, on or off,on")
  parser.add_argument("--timeout", type=float, default=7 * 86400,
                      help="wall-clock seconds per case (a paper U-Net compile takes 30-55 CPU-minutes on 2 "
                           "cores, far longer beside other work: a short limit throws finished work away)")
  parser.add_argument("--results", default=RESULTS)
  parser.add_argument("--table", action="store_true", help="only print the table of the results so far")
  parser.add_argument("--fit_checks", type=int, default=3,
                      help="check compiles of each fit's line (0: report the line's batch, unchecked)")
  parser.add_argument("--paper_batch_only", action="store_true",
                      help="one compile per case, at the paper's batch (a first pass; a later fit reuses it)")
  args = parser.parse_args()
  if not args.table:
    try:
      for stage in args.stages.split(","):
        paper.get_config(stage)
      for topology in args.topologies.split(","):
        tpu_chips.parse_topology(topology)
    except ValueError as e:
      sys.exit(f"error: {e}")
    if not set(args.remat.split(",")) <= {"off", "on"}:
      sys.exit(f"error: --remat takes off, on or off,on, got {args.remat!r}")
    os.makedirs(args.results, exist_ok=True)
    for stage in args.stages.split(","):
      for topology in args.topologies.split(","):
        for remat in args.remat.split(","):
          outcome = run_case(stage, topology, remat == "on", args.timeout, args.results,
                             fit=not args.paper_batch_only, fit_checks=args.fit_checks)
          print(f"{stage} {topology} remat {remat}: {outcome}", flush=True)
  print(table(args.results))


if __name__ == "__main__":
  main()
