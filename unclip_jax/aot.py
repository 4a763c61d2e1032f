"""Compiles a stage's train step (or its sampling loop) ahead of time for a TPU topology,
on a machine without TPUs, and reports memory, FLOPs, collectives and a roofline.

  python -m unclip_jax.aot --config configs/paper.py:decoder --topology v5p:4x4x4 \\
      [--config.mesh.fsdp=...] [--sample] [--fit_batch] [--json OUT]

What compiles is what train.py runs: the stage's loss, train_loop.make_optimizer,
training.make_train_step / jit_train_step, shardings from the config's mesh and
logical_axis_rules; only the inputs are abstract (jax.ShapeDtypeStruct on a mesh
of libtpu's compile-only devices), so nothing is allocated. The stage is built
on a stand-in CLIP with the real CLIP's dimensions (`--clip_dims`), which encodes to
zeros: the train step never calls CLIP (train.py encodes on the host).
"""

import dataclasses
import functools
import hashlib
import importlib.metadata
import json
import math
import os
import sys
import time

import jax
import ml_collections
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from unclip_jax import batch_fit, hlo_stats, parallel, tpu_chips, train_loop, training
from unclip_jax.batch_fit import DoesNotFit
from unclip_jax.models import clip as clip_lib
from unclip_jax.stages import PRIORS, ar_prior, decoder, prior, text, upsampler


def define_flags(flag_values: flags.FlagValues = flags.FLAGS):
  """The CLI's flags, defined only when run as a program: importing the library (tests,
  notebooks) must not claim flag names that sample.py or train.py also define."""
  fv = {"flag_values": flag_values}
  config_flags.DEFINE_config_file("config", None, "Config file and argument, e.g. configs/paper.py:decoder.",
                                  lock_config=True, **fv)
  flags.DEFINE_string("topology", None, "TPU topology, e.g. v5e:4x4, v5p:4x4x4, v4:2x2x2, v6e:8x8.", **fv)
  flags.DEFINE_bool("sample", False, "Compile the stage's sampling loop (one batch) instead of the train step.", **fv)
  flags.DEFINE_bool("fit_batch", False, "Also find the largest global batch that fits: two compiles at per-chip "
                    "batches --fit_points, memory = a + b * batch, then up to 3 check compiles.", **fv)
  flags.DEFINE_list("fit_points", ["4", "8"], "The two per-chip batch sizes --fit_batch compiles at.", **fv)
  flags.DEFINE_integer("fit_checks", 3, "Check compiles of --fit_batch's answer (0: the line through the two "
                       "points only, reported as predicted_batch_size).", lower_bound=0, **fv)
  flags.DEFINE_bool("replicate_params", False, "With --sample: params whole on every chip and the batch split over "
                    "all chips, as sample.py runs (default: the config's mesh and rules, as the train loop's "
                    "sample grids run).", **fv)
  flags.DEFINE_string("clip_dims", "auto", "The CLIP's dims EMBED,WIDTH,TOKENS[,VOCAB], or auto: from "
                      "config.clip_dir's config.json if there is one, else ViT-L/14's (768,768,77,49408).", **fv)
  flags.DEFINE_string("json", None, "Write the report as JSON to this file.", **fv)
  flags.DEFINE_string("cache_dir", None, "Keep each compile's report here (one JSON per config, topology and "
                      "batch) and reuse it: a sizing interrupted between compiles resumes where it stopped.", **fv)


VIT_L_14 = (768, 768, 77)
KEYS = ("params", "chips", "per_chip_bytes", "hbm_bytes_per_chip", "fits", "flops_per_step", "model_flops_per_step",
        "collective_bytes_per_step", "roofline_step_s", "mfu_bound")


@dataclasses.dataclass(frozen=True)
class ClipShapes:
  """A CLIP's dimensions without its weights; encodes anything to zeros of the right shapes.

  The stages read a CLIP for its dims, the empty prompt's encoding (a constant
  in the loss: its values do not change what compiles) and, on the host, the
  batches' encodings, of which only the shapes matter here.
  """
  embed_dim: int = VIT_L_14[0]
  text_width: int = VIT_L_14[1]
  max_length: int = VIT_L_14[2]
  vocab_size: int = 49408  # CLIP's BPE

  def encode_text(self, prompts) -> clip_lib.TextEncoding:
    n = 1 if isinstance(prompts, str) else len(prompts)
    mask = np.zeros((n, self.max_length), bool)
    mask[:, :2] = True  # start and end tokens
    return clip_lib.TextEncoding(np.zeros((n, self.embed_dim), np.float32),
                                 np.zeros((n, self.max_length, self.text_width), np.float32), mask,
                                 np.zeros((n, self.max_length), np.int32))

  def encode_image(self, images, value_range=(0.0, 1.0)):
    del value_range
    return np.zeros((len(images), self.embed_dim), np.float32)


def clip_shapes(config, spec: str = "auto") -> ClipShapes:
  """--clip_dims: explicit dims, or the dims of config.clip_dir's CLIP, or ViT-L/14's."""
  if spec != "auto":
    try:
      dims = tuple(int(x) for x in spec.split(","))
    except ValueError:
      dims = ()
    if len(dims) not in (3, 4) or min(dims) < 1:
      raise ValueError(f"--clip_dims must be auto or EMBED,WIDTH,TOKENS[,VOCAB] (e.g. 768,768,77), got {spec!r}.")
    return ClipShapes(*dims)
  path = os.path.join(config.get("clip_dir") or "", "config.json")
  if config.get("clip_dir") and os.path.isfile(path):
    with open(path) as f:
      cfg = json.load(f)
    text_cfg = cfg.get("text_config", cfg)
    return ClipShapes(int(cfg["projection_dim"]), int(text_cfg["hidden_size"]),
                      int(text_cfg["max_position_embeddings"]), int(text_cfg.get("vocab_size", 49408)))
  return ClipShapes(*VIT_L_14)


def host_batch(config, n: int) -> dict:
  """What a data source yields (zeros): images at config.resolution, captions, stream indices."""
  r = config.resolution
  return {"image": np.zeros((n, r, r, 3), np.uint8), "caption": [""] * n, "index": np.arange(n)}


def build_stage(config, clip: ClipShapes):
  """The stage train.py would build (stages/build.py), on the stand-in CLIP and zero data."""
  if config.stage == "prior":
    return prior.PriorStage(config, clip, [text.encode_batch(clip, host_batch(config, 2))])
  if config.stage == "ar_prior":  # its codebook's PCA wants more rows than it keeps codes
    rows = config.model.num_codes + 1
    return ar_prior.ARPriorStage(config, clip, [text.encode_batch(clip, host_batch(config, rows))])
  if config.stage == "decoder":
    return decoder.DecoderStage(config, clip, host_batch(config, 1))
  if config.stage in ("sr1", "sr2"):
    return upsampler.UpsamplerStage(config, host_batch(config, 1))
  raise ValueError(f"the AOT tool compiles the prior, ar_prior, decoder, sr1 and sr2 stages, not {config.stage!r}.")


def config_rules(config) -> tuple:
  """config.logical_axis_rules as parallel's rules (lists -> tuples), as train_loop.train reads them."""
  return tuple((k, tuple(v) if isinstance(v, list) else v) for k, v in config.logical_axis_rules)


def abstract_batch(stage, config, batch_size: int, sharding) -> dict:
  """The arrays the loss reads (stage.encode_batch's output) as ShapeDtypeStructs of the global batch."""
  example = stage.encode_batch(host_batch(config, 1))
  return {k: jax.ShapeDtypeStruct((batch_size,) + np.shape(v)[1:], np.asarray(v).dtype, sharding=sharding)
          for k, v in example.items()}


@dataclasses.dataclass
class Program:
  """A compiled program and what the report needs besides it."""
  compiled: object
  params: int
  model_flops: float  # per step, all chips together
  lower_s: float
  compile_s: float
  mesh: dict = dataclasses.field(default_factory=dict)  # axis sizes it was compiled for


def compile_train_step(config, stage, mesh, rules, batch_size: int) -> Program:
  """The train step train_loop.train jits, lowered on abstract state and batch, compiled for the mesh."""
  tx, lr = train_loop.make_optimizer(config)
  rng = jax.random.key(config.seed)
  start = time.perf_counter()
  state = jax.eval_shape(functools.partial(training.init_state, stage.init_params, tx), rng)
  shardings = training.state_shardings(state, mesh, rules)
  state = training.with_shardings(state, shardings)
  batch = abstract_batch(stage, config, batch_size, parallel.batch_sharding(mesh, rules))
  step = training.make_train_step(stage.loss, tx, ema_decay=config.ema_decay, learning_rate=lr,
                                  grad_accum_steps=config.get("grad_accum_steps", 1))
  lowered = training.jit_train_step(step, shardings, mesh, rules).lower(state, batch)
  lower_s = time.perf_counter() - start
  compiled = lowered.compile()
  compile_s = time.perf_counter() - start - lower_s
  # Model FLOPs: the loss's forward matmuls and convolutions (its jaxpr, scans times their length) x 3 for
  # the backward pass (two matmuls per forward one); rematerialisation and the optimizer are not counted.
  forward = hlo_stats.forward_matmul_flops(stage.loss, state.params, batch, jax.random.key(0))
  return Program(compiled, _count(state.params), 3 * forward, lower_s, compile_s)


def _count(params) -> int:
  return int(sum(math.prod(x.shape) for x in jax.tree.leaves(params)))


def sampler_fn(config, stage):
  """(fn(params, inputs, rng), input keys, rows per example): the stage's sampling loop as sample.py
  runs it (the stage's sampler_from_export), with the config's sampling settings (stage.sampling)."""
  if config.stage in PRIORS:
    n = config.get("num_candidates", 2)
    # At the training compute dtype, as the U-Nets' export records carry theirs.
    export = stage.export_config.with_dtype(config.get("compute_dtype", "float32"))
    fn = (prior if config.stage == "prior" else ar_prior).sampler_from_export(export, stage.sampling, num_candidates=n)
    return (lambda p, cond, rng: fn(stage.sampling_variables(p), cond, stage.uncond, rng)), text.KEYS, n
  if config.stage == "decoder":
    fn = decoder.sampler_from_export(stage.export_config, stage.sampling)
    run = lambda p, cond, rng: fn(p, rng=rng, cond=cond, uncond=stage.uncond,
                                  guidance_scale=stage.sampling.guidance_scale)
    return run, decoder.COND_KEYS, 1
  fn = upsampler.sampler_from_export(stage.export_config, stage.sampling)
  return (lambda p, cond, rng: fn(p, rng=rng, low_res=cond["low_res"])), ("low_res",), 1


def compile_sampler(config, stage, mesh, rules, batch_size: int, replicate_params: bool = False) -> Program:
  """One batch through the stage's whole sampling loop (a lax.scan over its steps); params are
  sharded as in training (the train loop's sample grids) or whole on every chip (sample.py's
  pipeline), the batch and its per-example keys split over the batch axes."""
  start = time.perf_counter()
  params = jax.eval_shape(stage.init_params, jax.random.key(0))
  shardings = (jax.tree.map(lambda _: parallel.replicated(mesh), params) if replicate_params
               else parallel.param_shardings(params, mesh, rules))
  params = training.with_shardings(params, shardings)
  split = parallel.batch_sharding(mesh, rules)
  fn, keys, rows = sampler_fn(config, stage)
  batch = abstract_batch(stage, config, batch_size, split)
  inputs = {k: batch[k] for k in keys}
  key_dtype = jax.random.key(0).dtype
  rng = jax.ShapeDtypeStruct((batch_size * rows,), key_dtype, sharding=split)
  with parallel.activation_sharding(mesh, rules):  # as the train step: activations stay batch-split
    lowered = jax.jit(fn, out_shardings=split).lower(params, inputs, rng)
  lower_s = time.perf_counter() - start
  compiled = lowered.compile()
  compile_s = time.perf_counter() - start - lower_s
  # Model FLOPs: the loop's matmuls and convolutions (every step, both halves of guidance).
  flops = hlo_stats.forward_matmul_flops(fn, params, inputs, rng)
  return Program(compiled, _count(params), flops, lower_s, compile_s)


def report(program: Program, topology: tpu_chips.Topology) -> dict:
  """The JSON report (KEYS); every byte and FLOP figure is per chip, per step, except
  model_flops_per_step (the whole step's, all chips together)."""
  chip = topology.chip
  mem = program.compiled.memory_analysis()
  cost = program.compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  loops = hlo_stats.analyse(program.compiled.as_text())
  # Live bytes a chip holds during the step: its arguments, outputs and temporaries, less the outputs
  # that reuse donated argument buffers (the new state in the old one's place). Code size is left out.
  per_chip = {"arguments": int(mem.argument_size_in_bytes), "outputs": int(mem.output_size_in_bytes),
              "temps": int(mem.temp_size_in_bytes)}
  per_chip["total"] = per_chip["arguments"] + per_chip["outputs"] + per_chip["temps"] - int(mem.alias_size_in_bytes)
  # XLA's counts are for the SPMD-partitioned module, i.e. one chip's share; its cost analysis counts
  # a loop body once, so the bodies' share is scaled by their trip counts (hlo_stats.analyse).
  flops = float(cost.get("flops", 0.0)) + loops["extra_flops"]
  bytes_accessed = float(cost.get("bytes accessed", 0.0)) + loops["extra_bytes"]
  roofline = max(flops / chip.peak_flops, bytes_accessed / chip.hbm_bandwidth)
  mfu_bound = program.model_flops / topology.chips / (roofline * chip.peak_flops) if roofline > 0 else 0.0
  return {"params": program.params, "chips": topology.chips, "per_chip_bytes": per_chip,
          "hbm_bytes_per_chip": chip.hbm_bytes, "fits": per_chip["total"] <= chip.hbm_bytes,
          "flops_per_step": flops, "model_flops_per_step": program.model_flops,
          "collective_bytes_per_step": loops["collective_bytes"], "roofline_step_s": roofline,
          "mfu_bound": mfu_bound}


def compile_for(config, topology: tpu_chips.Topology, *, sample: bool = False, batch_size: int | None = None,
                devices=None, clip: ClipShapes | None = None, replicate_params: bool = False) -> tuple[dict, Program]:
  """Builds the stage and compiles its train step (or sampler) for the topology: (report, program).

  replicate_params (sampling only): params whole on every chip and the batch split over all chips,
  as sample.py's pipeline runs; otherwise the config's mesh and rules.
  """
  devices = tpu_chips.compile_only_devices(topology) if devices is None else devices
  if replicate_params and not sample:
    raise ValueError("replicate_params is for sampling (--sample); the train step uses the config's mesh.")
  mesh = parallel.make_mesh({"data": -1} if replicate_params else dict(config.mesh), devices=devices)
  rules = parallel.DEFAULT_RULES if replicate_params else config_rules(config)
  batch_size = config.batch_size if batch_size is None else batch_size
  unit = parallel.batch_size_divisor(mesh, rules) * (1 if sample else config.get("grad_accum_steps", 1))
  if batch_size % unit:
    raise ValueError(f"batch size {batch_size} must divide by the batch-sharding devices times grad_accum_steps "
                     f"({unit}) on mesh {dict(mesh.shape)}.")
  stage = build_stage(config, clip or clip_shapes(config))
  try:
    if sample:
      program = compile_sampler(config, stage, mesh, rules, batch_size, replicate_params)
    else:
      program = compile_train_step(config, stage, mesh, rules, batch_size)
  except Exception as e:  # XLA reports an over-full HBM as RESOURCE_EXHAUSTED at compile time
    if "RESOURCE_EXHAUSTED" in str(e) or "Ran out of memory" in str(e):
      raise DoesNotFit(str(e).strip().splitlines()[0][:300]) from e
    raise
  program.mesh = {k: v for k, v in mesh.shape.items() if v > 1} or {"data": 1}
  return report(program, topology), program


# Config entries the compiled step never reads (the data pipeline, logging and checkpoint cadence).
HOST_ONLY_KEYS = ("data", "clip_dir", "log_every", "checkpoint_every", "sample_every", "keep_checkpoints",
                  "export_dir", "init_from")

# Settings added after compiles were kept, at the value that compiles the program they had (e.g. no
# min-SNR weighting): left out of the key there, so those compiles stay valid.
NEUTRAL_VALUES = {"min_snr_gamma": 0.0}


def compile_inputs(config, topology, *, batch_size: int, sample: bool, clip: ClipShapes,
                   replicate_params: bool) -> dict:
  """What decides a compile's report: the config at this batch (less what only the host reads), the
  target, and jax's and libtpu's versions. Kept in each cache entry, so entries can be re-keyed."""
  settings = {k: v for k, v in config.to_dict().items()
              if k not in HOST_ONLY_KEYS and not (k in NEUTRAL_VALUES and v == NEUTRAL_VALUES[k])}
  settings["batch_size"] = batch_size
  clip_dims = dataclasses.astuple(clip)[:3]
  if settings.get("model", {}).get("text_encoder"):  # a decoder's own text encoder: the vocabulary matters too
    clip_dims += (clip.vocab_size,)
  return json.loads(json.dumps({"config": settings, "topology": str(topology), "sample": sample,
                                "clip": clip_dims, "replicate_params": replicate_params,
                                "jax": jax.__version__, "libtpu": importlib.metadata.version("libtpu")},
                               default=str))


def compile_key(inputs: dict) -> str:
  return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:20]


def cached_compile(cache_dir: str, config, topology, *, sample: bool = False, batch_size: int | None = None,
                   devices=None, clip: ClipShapes | None = None, replicate_params: bool = False):
  """compile_for's (report, program), or (report, None) from cache_dir when this compile ran before. A
  refusal (DoesNotFit) is kept too. Paper U-Nets take 30-55 minutes per compile on a small CPU, so a
  sizing of several compiles must not lose the ones it finished."""
  batch_size = config.batch_size if batch_size is None else batch_size
  clip = clip or clip_shapes(config)
  inputs = compile_inputs(config, topology, batch_size=batch_size, sample=sample, clip=clip,
                          replicate_params=replicate_params)
  path = os.path.join(cache_dir, compile_key(inputs) + ".json")
  if os.path.exists(path):
    with open(path) as f:
      entry = json.load(f)
    if "does_not_fit" in entry:
      raise DoesNotFit(entry["does_not_fit"])
    return entry["report"], None
  about = {"stage": config.stage, "topology": str(topology), "batch_size": batch_size, "sample": sample}
  try:
    result, program = compile_for(config, topology, sample=sample, batch_size=batch_size, devices=devices, clip=clip,
                                  replicate_params=replicate_params)
  except DoesNotFit as e:
    write_json(dict(about, does_not_fit=str(e), inputs=inputs), path)
    raise
  timing = {"lower_s": program.lower_s, "compile_s": program.compile_s} if program is not None else {}
  write_json(dict(about, **timing, report=result, inputs=inputs), path)
  return result, program


def fit_batch(config, topology, points, *, sample=False, clip=None, replicate_params=False, max_checks: int = 3,
              known: dict | None = None, cache_dir: str | None = None) -> dict:
  """batch_fit.largest_batch over this config's compiles for the topology (points: two per-chip
  batches). known: {global batch: per_chip_bytes} already compiled (e.g. the config's batch), reused
  where it is a fit point. cache_dir: see cached_compile."""
  devices = tpu_chips.compile_only_devices(topology)
  if replicate_params:
    divisor = len(devices)
  else:
    divisor = parallel.batch_size_divisor(parallel.make_mesh(dict(config.mesh), devices=devices), config_rules(config))
  compiler = functools.partial(cached_compile, cache_dir) if cache_dir else compile_for

  def compile_at(batch_size: int) -> dict:
    return compiler(config, topology, sample=sample, batch_size=batch_size, devices=devices, clip=clip,
                    replicate_params=replicate_params)[0]

  return batch_fit.largest_batch(compile_at, [int(p) for p in points], divisor=divisor, hbm=topology.chip.hbm_bytes,
                                 unit=1 if sample else config.get("grad_accum_steps", 1), max_checks=max_checks,
                                 known=known)


def format_table(result: dict, topology, config, sample: bool, program: Program | None = None) -> str:
  def size(b):
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
      if b >= scale:
        return f"{b / scale:.3f} {unit}"
    return f"{int(b)} B"

  pc = result["per_chip_bytes"]
  rows = [("program", f"{config.stage} {'sampling loop' if sample else 'train step'}, batch {config.batch_size}"),
          ("topology", f"{topology} ({result['chips']} chips, mesh {program.mesh if program else dict(config.mesh)})"),
          ("params", f"{result['params']:,}"),
          ("per chip: arguments", size(pc["arguments"])), ("per chip: outputs", size(pc["outputs"])),
          ("per chip: temps", size(pc["temps"])), ("per chip: total", size(pc["total"])),
          ("HBM per chip", size(result["hbm_bytes_per_chip"])), ("fits", str(result["fits"])),
          ("FLOPs per chip (XLA)", f"{result['flops_per_step']:.4g}"),
          ("model FLOPs (all chips)", f"{result['model_flops_per_step']:.4g}")]
  rows += [(f"{kind} per chip", size(b)) for kind, b in result["collective_bytes_per_step"].items() if b]
  rows += [("roofline step", f"{result['roofline_step_s'] * 1e3:.3f} ms"), ("MFU bound", f"{result['mfu_bound']:.1%}")]
  if program is not None:
    rows.append(("lower / compile", f"{program.lower_s:.1f} s / {program.compile_s:.1f} s"))
  width = max(len(k) for k, _ in rows)
  return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def write_json(result: dict, path: str):
  """The report (KEYS, and fit_batch with --fit_batch) as indented JSON."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w") as f:
    json.dump(result, f, indent=2)
    f.write("\n")


def parse_flags(argv, flag_values: flags.FlagValues = flags.FLAGS):
  """Flag errors (an unknown config key, a bad override) as one line, as train.py does."""
  try:
    return flag_values(argv)
  except (flags.Error, AttributeError, KeyError, TypeError, ValueError) as e:
    message = str(e).strip("'\"")
    if isinstance(e, (AttributeError, KeyError)):
      message = f"the config has no key {message!r} (check --config.* overrides)"
    sys.exit(f"error: {message}")


def main(argv, flag_values: flags.FlagValues = flags.FLAGS):
  FLAGS = flag_values
  if len(argv) > 1:
    sys.exit(f"error: unexpected arguments {' '.join(argv[1:])}")
  if FLAGS.config is None or not FLAGS.topology:
    sys.exit("error: --config and --topology are required, e.g. "
             "python -m unclip_jax.aot --config configs/paper.py:decoder --topology v5p:4x4x4")
  if not os.environ.get("JAX_PLATFORMS"):
    jax.config.update("jax_platforms", "cpu")  # the TPUs are a compile target only
  config: ml_collections.ConfigDict = FLAGS.config
  try:
    topology = tpu_chips.parse_topology(FLAGS.topology)
    if not tpu_chips.libtpu_installed():
      raise RuntimeError("libtpu is not installed; pip install -r requirements-dev.txt (it pins libtpu).")
    clip = clip_shapes(config, FLAGS.clip_dims)
    train_loop.make_optimizer(config)
    try:
      compiler = functools.partial(cached_compile, FLAGS.cache_dir) if FLAGS.cache_dir else compile_for
      result, program = compiler(config, topology, sample=FLAGS.sample, clip=clip,
                                 replicate_params=FLAGS.replicate_params)
    except DoesNotFit as e:
      if not FLAGS.fit_batch:
        raise
      result, program = None, None
      print(f"batch {config.batch_size} does not fit {FLAGS.topology}: {e}")
    if result is not None:
      print(format_table(result, topology, config, FLAGS.sample, program))
    fit = None
    if FLAGS.fit_batch:
      fit = fit_batch(config, topology, FLAGS.fit_points, sample=FLAGS.sample, clip=clip,
                      replicate_params=FLAGS.replicate_params, cache_dir=FLAGS.cache_dir, max_checks=FLAGS.fit_checks,
                      known={config.batch_size: result["per_chip_bytes"]} if result else None)
      print(f"fit: memory = {fit['bytes_fixed'] / 2**30:.3f} GiB + {fit['bytes_per_example'] / 2**20:.3f} MiB "
            f"x per-chip batch (compiled at {fit['per_chip_batches']}); checked per-chip batches "
            f"{[c[0] for c in fit['checks']]}")
      print(f"fit: largest batch that compiled and fits: {fit['batch_size']} ({fit['per_chip_batch']} per chip)"
            if fit["verified"] else "fit: no checked batch fits")
      print(f"fit: the line's largest batch (unchecked): {fit['predicted_batch_size']}")
  except DoesNotFit as e:
    if FLAGS.json:  # a refusal is a result too (benchmarks/tpu_sizing.py tabulates it)
      write_json({"fits": False, "batch_size": config.batch_size, "does_not_fit": str(e)}, FLAGS.json)
    sys.exit(f"error: does not fit {FLAGS.topology}'s HBM at batch {config.batch_size} (try --fit_batch or a "
             f"smaller --config.batch_size): {e}")
  except (ValueError, RuntimeError, FileNotFoundError) as e:
    sys.exit(f"error: {str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}")
  if FLAGS.json:
    if result is None:  # the config's batch did not fit; the fit's largest batch is reported in fit_batch
      result = {"fits": False, "batch_size": config.batch_size}
    write_json(dict(result, fit_batch=fit) if fit is not None else result, FLAGS.json)


if __name__ == "__main__":
  define_flags()
  app.run(main, flags_parser=parse_flags)
