"""Text to image, our Pipeline against diffusers' UnCLIPPipeline, on the same random model.

A random UnCLIPPipeline with Karlo's component types (tests/random_karlo.py;
--size tiny: the parity tests' model, bench: Karlo's block structure with fewer channels
and layers, 64 px decoder and 64 -> 256 upsampler) is saved as safetensors and converted
by our converter; then both pipelines, in this one process, draw the same prompts with
UnCLIPPipeline's defaults: 25 / 25 / 7 DDPM steps (prior / decoder / upsampler), guidance
4 and 8, one prior sample per image, float images back on the host.

- ours: Pipeline.text_to_image, one compiled loop per stage. "compile s" is its first
  call minus the steady call (tracing and XLA compilation of CLIP and the three loops).
- diffusers: under torch.inference_mode, torch.manual_seed per call, torch's default
  thread count; its first call is the warm-up (lazy initialisation, allocator, kernels).
- steady s/call: the median of --repeats timed calls after the first.
- peak RSS: the process's resident-set high-water mark (getrusage ru_maxrss) over that
  pipeline's calls, the first included, reset before them through /proc/self/clear_refs where the
  kernel allows it (else it is the process's peak so far, which the header says). Host memory only, with both
  pipelines' weights loaded throughout; on a GPU the device peak is its own column (JAX's
  allocator peak since start; torch.cuda.max_memory_allocated).

--dtype bfloat16 casts parameters and compute of the prior, decoder and upsampler on
both sides (our CLIP text encoder stays float32). The default is bfloat16 on a GPU and
float32 on CPU, where diffusers cannot run bfloat16 (torch has no CPU bfloat16 kernel
for its antialiased bicubic upsampling). The last line is `ratio ours/diffusers: X`
(steady seconds, ours over theirs).

GFLOP/s divides the work of one call, counted in diffusers' pipeline (--flops), by each
pipeline's steady seconds; the line under the table compares that work with the fastest
square matmul either library runs here, which bounds how fast any pipeline can be.
--cpu_devices N splits the host into N JAX CPU devices and batch-splits ours over them:
XLA runs a convolution with few channels on one thread, so one device per core is
faster on CPU.

  python benchmarks/vs_diffusers.py --size tiny --repeats 1
  python benchmarks/vs_diffusers.py --size bench --batch 2 --repeats 3 [--json out.json]
  python benchmarks/vs_diffusers.py --size bench --repeats 3 --cpu_devices 2  # on a 2-core CPU
"""

import json
import os
import resource
import statistics
import sys
import tempfile
import time

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # share a GPU with torch
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from absl import (
  app,  # noqa: E402
  flags,  # noqa: E402
  logging,  # noqa: E402
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # run as a script from anywhere
sys.path.insert(1, os.path.join(ROOT, "tests"))  # random_karlo.py: the tests' random Karlo builder

_SIZE = flags.DEFINE_enum("size", "bench", ["tiny", "bench"], "Model size (tests/random_karlo.py).")
_BATCH = flags.DEFINE_integer("batch", 2, "Prompts per call.", lower_bound=1)
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed calls per pipeline after the first (median reported).",
                                lower_bound=1)
_DTYPE = flags.DEFINE_enum("dtype", None, ["float32", "bfloat16"], "Default: bfloat16 on a GPU, else float32.")
_JSON = flags.DEFINE_string("json", None, "Also write the settings and results as JSON here.")
_FLOPS = flags.DEFINE_bool(
    "flops", True, "Also count one diffusers call's floating-point operations (torch's FlopCounterMode; both "
    "pipelines run the same networks on the same batches) and time a dense matmul, for GFLOP/s and the fastest "
    "call this device's matmul peak allows.")
_CPU_DEVICES = flags.DEFINE_integer(
    "cpu_devices", 1, "On CPU, split the host into this many JAX devices (one per core is fastest) and run ours "
    "data-parallel over them; XLA runs a convolution with few channels on one thread.", lower_bound=1)

PROMPTS = ["a red circle above a blue square", "a blue circle", "a red square", "a blue square above a red circle"]


def reset_peak_rss() -> bool:
  """Resets the process's RSS high-water mark (Linux: writing 5 to /proc/self/clear_refs)."""
  try:
    with open("/proc/self/clear_refs", "w") as f:
      f.write("5")
    return True
  except OSError:
    return False


def peak_rss_mib() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def rss_mib() -> float | None:
  """The process's resident set now (Linux), None elsewhere."""
  try:
    with open("/proc/self/statm") as f:
      return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
  except (OSError, ValueError):
    return None


def timed_calls(call, repeats: int) -> dict:
  """First call's seconds, then the median of `repeats` more; call(i) runs call number i."""
  start = time.perf_counter()
  call(0)
  first = time.perf_counter() - start
  times = []
  for i in range(1, repeats + 1):
    start = time.perf_counter()
    call(i)
    times.append(time.perf_counter() - start)
  return {"first_s": first, "steady_s": statistics.median(times), "times_s": times}


def build(size: str, tmp: str):
  """The random diffusers pipeline (in memory, as saved) and our checkpoint converted from its folder."""
  import random_karlo
  from diffusers import UnCLIPPipeline

  from unclip_jax.convert import diffusers_pipeline

  pipe = UnCLIPPipeline(**random_karlo.components(tmp, size))
  src, dst = os.path.join(tmp, "diffusers"), os.path.join(tmp, "converted")
  pipe.save_pretrained(src, safe_serialization=True)
  diffusers_pipeline.convert(src, dst)
  return pipe, dst


def load_ours(dst: str, dtype: str):
  """Pipeline.load, batch-split over all local devices when there are several; for bfloat16 the prior, decoder
  and upsampler compute in it with cast parameters (as diffusers' pipe.to(dtype) does); done before the first
  call, which builds the compiled loops."""
  import jax
  import jax.numpy as jnp

  from unclip_jax import parallel, pipeline

  mesh = parallel.sampling_mesh()
  pipe = pipeline.Pipeline.load(dst, mesh=mesh)
  if dtype != "float32":
    cast = lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x
    pipe.params = jax.tree.map(cast, pipe.params)
    pipe.exports = {s: export.with_dtype(dtype) for s, export in pipe.exports.items()}
  return pipe


def karlo_settings():
  """UnCLIPPipeline's defaults (steps, guidance) as its kwargs and as our stage options (DDPM)."""
  from unclip_jax.convert.diffusers_pipeline import KARLO_DEFAULTS as d

  ours = {"prior": {"num_steps": d["prior_num_inference_steps"], "sampler": "ddpm",
                    "guidance_scale": d["prior_guidance_scale"]},
          "decoder": {"num_steps": d["decoder_num_inference_steps"], "sampler": "ddpm",
                      "guidance_scale": d["decoder_guidance_scale"]},
          "sr1": {"num_steps": d["super_res_num_inference_steps"], "sampler": "ddpm"}}
  return dict(d), ours


def run_ours(pipe, prompts, options, repeats: int) -> dict:
  """Our text_to_image (one prior sample per image, as UnCLIPPipeline), timed; seeds differ per call."""
  import jax

  n = len(prompts)
  shapes = []
  call = lambda i: shapes.append(pipe.text_to_image(prompts, list(range(i * n, (i + 1) * n)), options,
                                                    num_candidates=1, as_float=True).shape)
  device = jax.devices()[0]
  reset = reset_peak_rss()
  out = timed_calls(call, repeats)
  out.update(compile_s=out["first_s"] - out["steady_s"], peak_rss_mib=peak_rss_mib(), rss_reset=reset,
             image_shape=shapes[-1])
  stats = device.memory_stats() if device.platform == "gpu" else None
  out["device_peak_mib"] = stats["peak_bytes_in_use"] / 2**20 if stats else None
  return out


def run_diffusers(pipe, prompts, kwargs, repeats: int) -> dict:
  """diffusers' UnCLIPPipeline call, timed; the generator is seeded per call."""
  import torch

  cuda = pipe.device.type == "cuda"
  shapes = []

  def call(i):
    with torch.inference_mode():
      shapes.append(pipe(prompts, generator=torch.manual_seed(i), output_type="np", **kwargs).images.shape)

  if cuda:
    torch.cuda.reset_peak_memory_stats()
  reset = reset_peak_rss()
  out = timed_calls(call, repeats)
  out.update(peak_rss_mib=peak_rss_mib(), rss_reset=reset, image_shape=shapes[-1],
             device_peak_mib=torch.cuda.max_memory_allocated() / 2**20 if cuda else None)
  return out


def count_flops(pipe, prompts, kwargs) -> float:
  """Floating-point operations of one diffusers call (matmuls, convolutions, attention; the elementwise rest is
  not counted and is small next to them)."""
  import torch
  from torch.utils.flop_counter import FlopCounterMode

  with torch.inference_mode(), FlopCounterMode(display=False) as counter:
    pipe(prompts, generator=torch.manual_seed(0), output_type="np", **kwargs)
  return float(counter.get_total_flops())


def matmul_peak(dtype: str, torch_device: str) -> float:
  """FLOP/s of the faster of jax's and torch's square matmul in `dtype`: what dense work reaches here."""
  import jax
  import jax.numpy as jnp
  import torch

  n = 2048 if torch_device == "cpu" else 8192
  a = jnp.ones((n, n), dtype)
  jax_matmul = jax.jit(jnp.matmul)
  b = torch.ones((n, n), dtype=getattr(torch, dtype), device=torch_device)
  sync = torch.cuda.synchronize if torch_device == "cuda" else (lambda: None)

  def torch_matmul():
    b @ b
    sync()

  best = 0.0
  for fn in (lambda: jax_matmul(a, a).block_until_ready(), torch_matmul):
    fn()
    seconds = timed_calls(lambda i, fn=fn: fn(), 5)["steady_s"]
    best = max(best, 2 * n**3 / seconds)
  return best


def fmt(x, spec: str) -> str:
  return "n/a" if x is None else format(x, spec)


def table(rows: dict, batch: int, dtype: str, flops: float | None) -> str:
  lines = ["| pipeline | dtype | batch | steady s/call | images/s | GFLOP/s | first call s | compile s "
           "| peak RSS MiB | device peak MiB |", "|" + "---|" * 10]
  for name, r in rows.items():
    gflops = flops / r["steady_s"] / 1e9 if flops else None
    lines.append(f"| {name} | {dtype} | {batch} | {r['steady_s']:.3f} | {batch / r['steady_s']:.2f} | "
                 f"{fmt(gflops, ',.1f')} | "
                 f"{r['first_s']:.2f} | {fmt(r.get('compile_s'), '.2f')} | {r['peak_rss_mib']:,.0f} | "
                 f"{fmt(r['device_peak_mib'], ',.0f')} |")
  return "\n".join(lines)


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # checkpoint loading logs at INFO; keep the table readable
  if _CPU_DEVICES.value > 1:  # before jax starts; it only affects the CPU backend
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_force_host_platform_device_count={_CPU_DEVICES.value}")
  import diffusers
  import jax
  import torch

  on_gpu = jax.default_backend() == "gpu"
  dtype = _DTYPE.value or ("bfloat16" if on_gpu else "float32")
  torch_device = "cuda" if torch.cuda.is_available() else "cpu"
  if dtype == "bfloat16" and torch_device == "cpu":  # F.interpolate(mode="bicubic", antialias=True)
    sys.exit("error: diffusers' UnCLIPPipeline cannot run in bfloat16 on CPU: torch has no CPU bfloat16 "
             "kernel for the antialiased bicubic upsampling before super-resolution.")
  prompts = [PROMPTS[i % len(PROMPTS)] for i in range(_BATCH.value)]
  kwargs, options = karlo_settings()
  with tempfile.TemporaryDirectory() as tmp:
    ref, dst = build(_SIZE.value, tmp)
    ref = ref.to(torch_device, getattr(torch, dtype))
    ref.set_progress_bar_config(disable=True)
    ours = load_ours(dst, dtype)
    rss_loaded = rss_mib()
    rows = {"ours (JAX)": run_ours(ours, prompts, options, _REPEATS.value),
            "diffusers (torch)": run_diffusers(ref, prompts, kwargs, _REPEATS.value)}
    flops = count_flops(ref, prompts, kwargs) if _FLOPS.value else None
  peak = matmul_peak(dtype, torch_device) if _FLOPS.value else None
  shapes = {r["image_shape"] for r in rows.values()}
  if len(shapes) != 1:
    raise SystemExit(f"error: the pipelines made images of different shapes {shapes}")
  ratio = rows["ours (JAX)"]["steady_s"] / rows["diffusers (torch)"]["steady_s"]
  print(f"size {_SIZE.value}: ours on {jax.local_device_count()} x {jax.devices()[0].device_kind} "
        f"({jax.default_backend()}), diffusers on "
        f"{torch_device} ({torch.get_num_threads()} torch threads); jax {jax.__version__}, torch "
        f"{torch.__version__}, diffusers {diffusers.__version__}")
  if on_gpu != (torch_device == "cuda"):
    print("warning: the two pipelines run on different kinds of device")
  print(f"{kwargs['prior_num_inference_steps']} / {kwargs['decoder_num_inference_steps']} / "
        f"{kwargs['super_res_num_inference_steps']} DDPM steps, guidance {kwargs['prior_guidance_scale']} / "
        f"{kwargs['decoder_guidance_scale']}, images {'x'.join(map(str, shapes.pop()[1:]))}, median of "
        f"{_REPEATS.value} call(s); peak RSS per pipeline"
        f"{'' if all(r['rss_reset'] for r in rows.values()) else ' (NOT reset between them: cumulative)'}, "
        f"{fmt(rss_loaded, ',.0f')} MiB resident before them (both pipelines loaded)\n")
  print(table(rows, _BATCH.value, dtype, flops))
  if flops:
    floor = flops / peak / rows["diffusers (torch)"]["steady_s"]
    print(f"\nwork per call: {flops / 1e9:,.1f} GFLOP; {dtype} matmul peak here {peak / 1e9:,.1f} GFLOP/s "
          f"(square matmul, the faster of jax and torch): a call at that rate takes {flops / peak:.2f} s, "
          f"{floor:.2f} of diffusers'")
  if _JSON.value:
    with open(_JSON.value, "w") as f:
      json.dump({"size": _SIZE.value, "batch": _BATCH.value, "repeats": _REPEATS.value, "dtype": dtype,
                 "jax_backend": jax.default_backend(), "jax_devices": jax.local_device_count(),
                 "torch_device": torch_device, "rss_loaded_mib": rss_loaded, "results": rows, "ratio": ratio,
                 "flops_per_call": flops, "matmul_peak_flops": peak}, f, indent=2)
  print(f"\nratio ours/diffusers: {ratio:.2f}")


if __name__ == "__main__":
  app.run(main)
