"""Quality against sampling time on the Shapes demo: today's settings, DPM-Solver++ at fewer steps, and
the autoregressive prior in the diffusion prior's place.

  python -m benchmarks.time_to_quality [--num_prompts 200] [--steps 5,8,10,15] [--plot docs/time_to_quality.png]
  python -m benchmarks.time_to_quality --rows checkpoint,ar_prior   # the two priors (docs/benchmarks.md)
  python -m benchmarks.time_to_quality --steps 8,10 --upsampler_steps 4,6   # the upsamplers faster too
  python -m benchmarks.time_to_quality --setting dpmpp_2m:10/ddpm:10/dpmpp_2m:4   # any mix, per stage
  python -m benchmarks.time_to_quality --table   # the table (and plot) of the rows run so far

Each row is one benchmarks/eval_shapes.py run (its own process, the same 200 held-out captions and
seeds): "checkpoint" samples with the demo's recommended settings; "ar_prior" the same with the
demo's AR prior (--prior ar); "dpmpp_2m N" runs the prior and the decoder with DPM-Solver++ (2M,
log-SNR spacing) at N steps each, the upsamplers as recommended; "dpmpp_2m N up M" the upsamplers too,
at M steps; --setting PRIOR/DECODER/UPSAMPLERS gives each part its own SAMPLER:STEPS ("-": the
checkpoint's), DPM-Solver++ with log-SNR spacing, DDPM and DDIM with the checkpoint's.
A row's JSON is kept in benchmarks/results/time_to_quality/ and a kept row is not run again, so the
table fills in over several sessions; the table reads each row's samplers and steps from its JSON, so a
kept row shows what it ran with even after the checkpoint's recommended settings changed (the kept
"checkpoint" and "dpmpp_2m N" rows ran with 2026-12-05's earlier 25 / 25 / 10 / 10: delete a row's JSON to
run it at today's settings). Prints a markdown table (seconds per image after compiling;
R-precision, colour and relation accuracy with their standard errors) and draws quality against
seconds per image to --plot.
"""

import argparse
import glob
import json
import math
import os
import subprocess
import sys

import matplotlib

matplotlib.use("Agg")  # files only
import matplotlib.pyplot as plt  # noqa: E402

from unclip_jax.diffusion.samplers import SAMPLERS  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "results", "time_to_quality")
METRICS = (("r_precision", "R-precision", "num_images"), ("color", "colour acc", "num_images"),
           ("relation", "relation acc (two-object)", "num_two_object"))


STAGE_PARTS = (("prior",), ("decoder",), ("sr1", "sr2"))  # a --setting's three parts


def _sampler_flags(stages, sampler: str, n: int) -> list[str]:
  spacing = ("logsnr",) if sampler.startswith("dpmpp") else ()  # DDPM / DDIM: the checkpoint's spacing
  return [flag for stage in stages for flag in (
      f"--{stage}_sampler={sampler}", f"--{stage}_steps={n}", *(f"--{stage}_spacing={x}" for x in spacing))]


def _dpmpp(stages, n: int) -> list[str]:
  return _sampler_flags(stages, "dpmpp_2m", n)


def parse_setting(text: str) -> tuple[str, list[str]]:
  """"dpmpp_2m:10/ddpm:10/-" -> ("prior dpmpp_2m 10, decoder ddpm 10", eval_shapes flags)."""
  parts = text.split("/")
  if len(parts) != len(STAGE_PARTS):
    raise ValueError(f"--setting {text!r}: expected PRIOR/DECODER/UPSAMPLERS, each SAMPLER:STEPS or -")
  names, flags = [], []
  for part, stages in zip(parts, STAGE_PARTS):
    if part == "-":
      continue
    sampler, _, steps = part.partition(":")
    if sampler not in SAMPLERS or not steps.isdigit() or int(steps) < 1:
      raise ValueError(f"--setting {text!r}: {part!r} is not SAMPLER:STEPS with a sampler of {SAMPLERS}")
    names.append(f"{'up' if len(stages) > 1 else stages[0]} {sampler} {int(steps)}")
    flags += _sampler_flags(stages, sampler, int(steps))
  return (", ".join(names) or "checkpoint"), flags


def rows(steps: list[int], upsampler_steps: list[int] = (), settings: list[str] = ()) -> dict[str, list[str]]:
  """Row name -> eval_shapes flags. "dpmpp_2m N up M": the upsamplers too, at M DPM-Solver++ steps
  (they take most of the stack's time)."""
  out = {"checkpoint": [], "ar_prior": ["--prior=ar"]}
  for n in steps:
    out[f"dpmpp_2m {n}"] = _dpmpp(("prior", "decoder"), n)
    for m in upsampler_steps:
      out[f"dpmpp_2m {n} up {m}"] = _dpmpp(("prior", "decoder"), n) + _dpmpp(("sr1", "sr2"), m)
  out.update(parse_setting(text) for text in settings)
  return out


def _file_stem(name: str) -> str:
  return name.replace(",", "").replace(" ", "_")


def run_row(name: str, flags: list[str], num_prompts: int) -> str:
  path = os.path.join(RESULTS, f"{_file_stem(name)}__{num_prompts}.json")
  if not os.path.exists(path):
    command = [sys.executable, os.path.join(ROOT, "benchmarks", "eval_shapes.py"), f"--num_prompts={num_prompts}",
               f"--json={path}", *flags]
    subprocess.run(command, check=True, cwd=ROOT)
  return path


def _stderr(p: float, n: int) -> float:
  return math.sqrt(max(p * (1 - p), 0.0) / n) if n else float("nan")


def _stage_cell(options: dict) -> str:
  return f"{options['sampler']} {options['num_steps']}"


def _sampling(settings: dict) -> dict[str, str]:
  """What each part of the stack ran, from the row's own settings: "ddpm 25", "AR", ..."""
  options = settings["options"]
  upsamplers = sorted({_stage_cell(options[s]) for s in ("sr1", "sr2") if s in options})
  return {"prior": "AR" if settings.get("prior") == "ar" else _stage_cell(options["prior"]),
          "decoder": _stage_cell(options["decoder"]), "upsamplers": " / ".join(upsamplers)}


def table(paths: list[str]) -> tuple[str, list[dict]]:
  results = []
  for path in paths:
    with open(path) as f:
      r = json.load(f)
    generated, settings = r["rows"]["generated"], r["settings"]
    images = generated["num_images"]
    prior_seconds = settings.get("prior_seconds")  # (absent from rows run before it was timed)
    results.append({**_sampling(settings), "seconds": settings["generation_seconds"] / images,
                    "prior_seconds": float("nan") if prior_seconds is None else prior_seconds / images,
                    **{k: (generated[k], _stderr(generated[k], generated[n])) for k, _, n in METRICS}})
  results.sort(key=lambda r: r["seconds"])
  head = ("| prior | decoder | upsamplers | s / image | prior's s / image | "
          + " | ".join(label for _, label, _ in METRICS) + " |")
  lines = [head, "|" + "---|" * (5 + len(METRICS))]
  for r in results:
    lines.append(f"| {r['prior']} | {r['decoder']} | {r['upsamplers']} | {r['seconds']:.3f} | "
                 f"{r['prior_seconds']:.3f} | "
                 + " | ".join(f"{r[k][0]:.3f} +- {r[k][1]:.3f}" for k, _, _ in METRICS) + " |")
  return "\n".join(lines), results


def plot(results: list[dict], path: str):
  fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=120)
  for key, label, _ in METRICS:
    ax.errorbar([r["seconds"] for r in results], [r[key][0] for r in results], yerr=[r[key][1] for r in results],
                marker="o", capsize=3, label=label)
  for r in results:
    label = r["prior"] if r["prior"] == "AR" else f"{r['prior']} | {r['decoder']} | {r['upsamplers']}"
    ax.annotate(label, (r["seconds"], r["r_precision"][0]), textcoords="offset points", xytext=(4, 4), fontsize=6)
  ax.set_xlabel("seconds per image (after compiling)")
  ax.set_ylabel("score")
  ax.set_title("Shapes demo: quality against sampling time")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--num_prompts", type=int, default=200)
  parser.add_argument("--steps", default="5,8,10,15", help="DPM-Solver++ steps of the prior and the decoder")
  parser.add_argument("--upsampler_steps", default="", help="also rows with the upsamplers at these DPM-Solver++ "
                      "steps (comma-separated; default none)")
  parser.add_argument("--setting", action="append", default=[], help="a row of PRIOR/DECODER/UPSAMPLERS, each "
                      "SAMPLER:STEPS or - for the checkpoint's, e.g. dpmpp_2m:10/ddpm:10/dpmpp_2m:4 (repeatable)")
  parser.add_argument("--rows", default=None, help="comma-separated row names to run (default: all)")
  parser.add_argument("--table", action="store_true", help="only tabulate the rows run so far")
  parser.add_argument("--plot", default=None, help="draw the plot to this PNG")
  args = parser.parse_args()
  os.makedirs(RESULTS, exist_ok=True)
  if args.table:
    paths = sorted(glob.glob(os.path.join(RESULTS, f"*__{args.num_prompts}.json")))
  else:
    try:
      every = rows([int(n) for n in args.steps.split(",")], [int(m) for m in args.upsampler_steps.split(",") if m],
                   args.setting)
    except ValueError as e:
      parser.error(str(e))
    names = args.rows.split(",") if args.rows else list(every)
    unknown = [n for n in names if n not in every]
    if unknown:
      parser.error(f"unknown rows {unknown}; expected some of {', '.join(every)}.")
    paths = [run_row(name, every[name], args.num_prompts) for name in names]
  text, results = table(paths)
  print(text)
  if args.plot and results:
    plot(results, args.plot)


if __name__ == "__main__":
  main()
