"""Compile seconds of the paper stages' train steps, unscanned vs scanned (scan_layers).

  JAX_PLATFORMS=cpu python -m benchmarks.compile_time [--stages prior,sr2,sr1,decoder]
      [--batch 1] [--timeout 600] [--remat]

For each stage of configs/paper.py (its model, compute dtype bf16, the stage's own loss and
Table 3's AdamW), jits one train step -- loss, gradients, optimizer update -- and times
`.lower()` and `.compile()` on the default backend, once with scan_layers=False and once with
True. Params, optimizer state and batch are jax.ShapeDtypeStructs: nothing is allocated. Each
measurement runs in its own subprocess under --timeout (a row that runs out says "> N"), so one
slow compile neither poisons the cache of the next nor ends the run. Prints a markdown table:
"HLO lines" is the lowered StableHLO's line count (compile time follows program size); "compile
CPU s" is the process's CPU time during .compile(), all threads, which other jobs on a shared
machine disturb much less than the wall-clock "compile s".
"""

import argparse
import functools
import json
import os
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from configs import paper
from unclip_jax import optim
from unclip_jax.diffusion import schedules
from unclip_jax.models import prior as prior_lib
from unclip_jax.models import unet as unet_lib
from unclip_jax.stages import decoder as decoder_stage
from unclip_jax.stages import prior as prior_stage
from unclip_jax.stages import upsampler as upsampler_stage

STAGES = ("prior", "sr2", "sr1", "decoder")
CLIP = {"embed": 768, "width": 768, "tokens": 77}  # ViT-L/14, the paper's CLIP


def _train_step(stage: str, scan: bool, batch: int, remat: bool):
  """(step function, abstract args, param count) for one stage's train step."""
  c = paper.get_config(stage)
  dtype = c.compute_dtype
  sds = lambda shape, dt=jnp.float32: jax.ShapeDtypeStruct(shape, dt)
  schedule = schedules.make_schedule(c.diffusion.schedule, c.diffusion.num_timesteps)
  d, w, n = CLIP["embed"], CLIP["width"], CLIP["tokens"]
  if stage == "prior":
    cfg = prior_lib.PriorConfig(clip_dim=d, text_width=w, num_text_tokens=n,
                                **dict(c.model.to_dict(), scan_layers=scan))
    variables = jax.eval_shape(lambda: prior_lib.init_variables(cfg, jax.random.key(0)))
    params = variables["params"]
    uncond = {"z_t": np.zeros((1, d), np.float32), "tokens": np.zeros((1, n, w), np.float32),
              "mask": np.ones((1, n), bool)}
    stats = {"clip_mean": np.zeros((d,), np.float32), "clip_std": np.ones((d,), np.float32)}
    loss = functools.partial(prior_stage.prior_loss, model=prior_lib.DiffusionPrior(cfg, jnp.dtype(dtype)),
                             stats=stats, schedule=schedule, uncond=uncond)
    data = {"z_t": sds((batch, d)), "tokens": sds((batch, n, w)), "mask": sds((batch, n), jnp.bool_),
            "z_i": sds((batch, d))}
  else:
    model = c.model.to_dict()
    extra_tokens = model.pop("extra_tokens", None)
    model.update(scan_layers=scan, dtype=dtype, remat=remat or model.get("remat", False))
    if stage == "decoder":
      model.update(in_channels=3, out_channels=6,
                   text_proj=unet_lib.TextProjConfig(clip_dim=d, text_dim=w, extra_tokens=extra_tokens))
      cfg = unet_lib.UNetConfig.from_dict(model).validate()
      uncond = {"z_t": np.zeros((1, d), np.float32), "tokens": np.zeros((1, n, w), np.float32),
                "mask": np.ones((1, n), bool)}
      loss = functools.partial(decoder_stage.training_loss, cfg=cfg, schedule=schedule, uncond=uncond)
      r = c.decoder_resolution
      data = {"image": sds((batch, r, r, 3)), "z_i": sds((batch, d)), "z_t": sds((batch, d)),
              "tokens": sds((batch, n, w)), "mask": sds((batch, n), jnp.bool_)}
    else:
      model.update(in_channels=3, low_res_channels=3, out_channels=3)
      cfg = unet_lib.UNetConfig.from_dict(model).validate()
      loss = functools.partial(upsampler_stage.training_loss, cfg=cfg, schedule=schedule,
                               crop_fraction=c.crop_fraction)
      data = {"image": sds((batch, c.resolution, c.resolution, 3)),
              "low_res": sds((batch, c.low_res_resolution, c.low_res_resolution, 3))}
    params = unet_lib.param_shapes(cfg)
  tx = optim.paper_adamw(stage)
  opt_state = jax.eval_shape(tx.init, params)

  def step(params, opt_state, data, rng):
    (value, _), grads = jax.value_and_grad(loss, has_aux=True)(params, data, rng)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, value

  count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
  return step, (params, opt_state, data, jax.ShapeDtypeStruct((), jax.random.key(0).dtype)), count


def measure(stage: str, scan: bool, batch: int, remat: bool) -> dict:
  step, args, count = _train_step(stage, scan, batch, remat)
  t0 = time.perf_counter()
  lowered = jax.jit(step, donate_argnums=(0, 1)).lower(*args)
  t1 = time.perf_counter()
  lines = len(lowered.as_text().splitlines())
  t2, c2 = time.perf_counter(), time.process_time()
  lowered.compile()
  t3, c3 = time.perf_counter(), time.process_time()
  return {"stage": stage, "scan": scan, "params": count, "hlo_lines": lines, "lower_s": t1 - t0,
          "compile_s": t3 - t2, "compile_cpu_s": c3 - c2}


def _run_one(stage, scan, args) -> dict:
  cmd = [sys.executable, "-m", "benchmarks.compile_time", "--one", f"{stage}:{int(scan)}", "--batch", str(args.batch)]
  if args.remat:
    cmd.append("--remat")
  try:
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, check=True,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__)))).stdout
    return json.loads(out.strip().splitlines()[-1])
  except subprocess.TimeoutExpired:
    return {"stage": stage, "scan": scan, "timeout": args.timeout}
  except subprocess.CalledProcessError as e:
    return {"stage": stage, "scan": scan, "error": e.stderr.strip().splitlines()[-1]}


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--stages", default=",".join(STAGES))
  parser.add_argument("--batch", type=int, default=1)
  parser.add_argument("--timeout", type=int, default=600, help="seconds per measurement")
  parser.add_argument("--remat", action="store_true", help="U-Nets with remat=True")
  parser.add_argument("--one", help=argparse.SUPPRESS)  # STAGE:SCAN, run in this process, print JSON
  args = parser.parse_args()
  if args.one:
    stage, scan = args.one.split(":")
    print(json.dumps(measure(stage, bool(int(scan)), args.batch, args.remat)))
    return
  print(f"# jax {jax.__version__}, backend {jax.default_backend()}, batch {args.batch}, remat {args.remat}",
        flush=True)
  print("| stage | params | scan_layers | HLO lines | lower s | compile s | compile CPU s |", flush=True)
  print("|---|---|---|---|---|---|---|", flush=True)
  for stage in args.stages.split(","):
    for scan in (False, True):
      r = _run_one(stage, scan, args)
      if "timeout" in r:
        cells = ["", str(scan), "", "", f"> {r['timeout']}", ""]
      elif "error" in r:
        cells = ["", str(scan), "", "", f"error: {r['error']}", ""]
      else:
        cells = [f"{r['params'] / 1e9:.2f}B", str(scan), str(r["hlo_lines"]), f"{r['lower_s']:.1f}",
                 f"{r['compile_s']:.1f}", f"{r['compile_cpu_s']:.1f}"]
      print(f"| {stage} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
  main()
