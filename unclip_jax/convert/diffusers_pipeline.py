"""A whole diffusers unCLIP pipeline folder (Karlo: kakaobrain/karlo-v1-alpha, or
its image-variations variant) -> our inference checkpoint (pipeline.py's layout).

  SRC/prior/ + prior_scheduler/                 -> DST/prior/   (text-to-image only)
  SRC/decoder/ + text_proj/ + decoder_scheduler/ -> DST/decoder/
  SRC/super_res_first/ + super_res_last/ + super_res_scheduler/
                                                 -> DST/sr1/    (ONE 64 -> 256 upsampler: super_res_first
                                                                 runs every step but the last, super_res_last
                                                                 the last, as diffusers' UnCLIPPipeline does)
  SRC/text_encoder/ + tokenizer/ (+ image_encoder/ + feature_extractor/)
                                                 -> DST/clip/   (a Flax CLIP folder load_clip reads)
  DST/pipeline.json: the layout and "options", the sampling settings of the
  diffusers pipeline's defaults and its schedulers (steps, guidance, x_0 clamps).

Only safetensors are read. Every problem found (a missing folder or file, a
missing / unused / mis-shaped tensor, a scheduler setting our samplers do not
implement) is named in one ConversionError.
"""

import dataclasses
import json
import os
import shutil
import tempfile

import numpy as np
import transformers
from safetensors.numpy import save_file

from unclip_jax import checkpoints
from unclip_jax.convert import diffusers_prior, diffusers_unet
from unclip_jax.convert.common import ConversionError, load_safetensors

# diffusers' UnCLIPPipeline / UnCLIPImageVariationPipeline __call__ defaults (Karlo's).
KARLO_DEFAULTS = {"prior_num_inference_steps": 25, "decoder_num_inference_steps": 25,
                  "super_res_num_inference_steps": 7, "prior_guidance_scale": 4.0,
                  "decoder_guidance_scale": 8.0}

_TEXT_TO_IMAGE = ("prior", "prior_scheduler", "decoder", "text_proj", "decoder_scheduler", "super_res_first",
                  "super_res_last", "super_res_scheduler", "text_encoder", "tokenizer")
_VARIATIONS = ("decoder", "text_proj", "decoder_scheduler", "super_res_first", "super_res_last",
               "super_res_scheduler", "text_encoder", "tokenizer", "image_encoder", "feature_extractor")


def _read_json(path: str) -> dict:
  with open(path) as f:
    return json.load(f)


def _scheduler(src: str, name: str) -> dict:
  folder = os.path.join(src, name)
  path = os.path.join(folder, "scheduler_config.json")
  if not os.path.isfile(path):
    raise ConversionError(f"{name}: no scheduler_config.json in {folder!r}.")
  cfg = _read_json(path)
  if cfg.get("_class_name", "UnCLIPScheduler") != "UnCLIPScheduler":
    raise ConversionError(f"{name}: {cfg['_class_name']} is not supported (only UnCLIPScheduler).")
  return cfg


def _diffusion_settings(name: str, cfg: dict, *, prediction: str, variance: str | None) -> tuple[dict, float | None]:
  """Our stage's "diffusion" config and x_0 clamp from an UnCLIPScheduler config; raises if unsupported."""
  problems = []
  schedule = cfg.get("beta_schedule", "squaredcos_cap_v2")
  if schedule != "squaredcos_cap_v2":
    problems.append(f"beta_schedule={schedule!r} (only 'squaredcos_cap_v2', the cosine schedule)")
  if cfg.get("prediction_type", "epsilon") != prediction:
    problems.append(f"prediction_type={cfg.get('prediction_type', 'epsilon')!r} (this stage predicts {prediction!r})")
  var = cfg.get("variance_type", "fixed_small_log")
  if variance is not None and var != variance:
    problems.append(f"variance_type={var!r} (the model's output channels give {variance!r})")
  if problems:
    raise ConversionError(f"{name}: unsupported scheduler settings: " + "; ".join(problems))
  clip_range = float(cfg.get("clip_sample_range", 1.0)) if cfg.get("clip_sample", True) else None
  diffusion = {"schedule": "cosine", "num_timesteps": int(cfg.get("num_train_timesteps", 1000)),
               "prediction_type": "x0" if prediction == "sample" else "eps", "variance_type": var,
               "clip_sample_range": clip_range}
  return diffusion, clip_range


def check_layout(src: str) -> str:
  """'text' or 'variations', from the folders present; raises naming every missing one."""
  if not os.path.isdir(src):
    raise ConversionError(f"{src!r} is not a folder.")
  present = set(os.listdir(src))
  kind = "variations" if "image_encoder" in present and "prior" not in present else "text"
  needed = _VARIATIONS if kind == "variations" else _TEXT_TO_IMAGE
  missing = [name for name in needed if name not in present]
  if missing:
    raise ConversionError(f"{src!r} is not a diffusers unCLIP pipeline folder: missing {missing} "
                          f"(a {'UnCLIPImageVariationPipeline' if kind == 'variations' else 'UnCLIPPipeline'} "
                          f"needs {list(needed)}).")
  return kind


# -- CLIP ---------------------------------------------------------------------------------------------


def _clip_state(folder: str, name: str, prefixes: tuple[str, ...]) -> dict:
  state = load_safetensors(folder)
  bad = sorted(k for k in state if not k.startswith(prefixes))
  if bad:
    raise ConversionError(f"{name}: unexpected tensors {bad[:10]}{' ...' if len(bad) > 10 else ''} "
                          f"(expected names under {prefixes}).")
  for p in prefixes:
    if not any(k.startswith(p) for k in state):
      raise ConversionError(f"{name}: no tensor under {p!r} in {folder!r}.")
  return state


def convert_clip(src: str, dst: str, with_vision: bool):
  """text_encoder/ (+ image_encoder/) -> a Flax CLIP folder at dst (plus tokenizer and image settings).

  With a vision tower the two PyTorch models (CLIPTextModelWithProjection,
  CLIPVisionModelWithProjection) are merged into one CLIPModel; without it
  the text model with its projection is written alone (model_type clip_text_model).
  """
  text_dir = os.path.join(src, "text_encoder")
  text_cfg = _read_json(os.path.join(text_dir, "config.json")) if os.path.isfile(
      os.path.join(text_dir, "config.json")) else None
  if text_cfg is None:
    raise ConversionError(f"text_encoder: no config.json in {text_dir!r}.")
  text_state = _clip_state(text_dir, "text_encoder", ("text_model.", "text_projection."))
  with tempfile.TemporaryDirectory() as tmp:
    if with_vision:
      vision_dir = os.path.join(src, "image_encoder")
      if not os.path.isfile(os.path.join(vision_dir, "config.json")):
        raise ConversionError(f"image_encoder: no config.json in {vision_dir!r}.")
      vision_state = _clip_state(vision_dir, "image_encoder", ("vision_model.", "visual_projection."))
      text_config = transformers.CLIPTextConfig.from_pretrained(text_dir)
      vision_config = transformers.CLIPVisionConfig.from_pretrained(vision_dir)
      if text_config.projection_dim != vision_config.projection_dim:
        raise ConversionError(f"text_encoder projects to {text_config.projection_dim}, image_encoder to "
                              f"{vision_config.projection_dim}: not one CLIP.")
      config = transformers.CLIPConfig(text_config=text_config.to_dict(), vision_config=vision_config.to_dict(),
                          projection_dim=text_config.projection_dim)
      state = {**text_state, **vision_state}  # logit_scale (unused here) keeps its initial value
      cls = transformers.FlaxCLIPModel
    else:
      config = transformers.CLIPTextConfig.from_pretrained(text_dir)
      state = text_state
      cls = transformers.FlaxCLIPTextModelWithProjection
    config.save_pretrained(tmp)
    save_file({k: np.ascontiguousarray(v) for k, v in state.items()}, os.path.join(tmp, "model.safetensors"),
              metadata={"format": "pt"})
    source = "text_encoder + image_encoder" if with_vision else "text_encoder"
    _check_clip_state(tmp, with_vision, source)
    try:
      model = cls.from_pretrained(tmp, from_pt=True)
    except Exception as e:
      raise ConversionError(f"CLIP ({source}) does not convert to Flax: {e}") from e
    os.makedirs(dst, exist_ok=True)
    model.save_pretrained(dst)
  tokenizer_dir = os.path.join(src, "tokenizer")
  for name in os.listdir(tokenizer_dir):
    shutil.copy(os.path.join(tokenizer_dir, name), os.path.join(dst, name))
  if with_vision:
    shutil.copy(os.path.join(src, "feature_extractor", "preprocessor_config.json"),
                os.path.join(dst, "preprocessor_config.json"))


def _check_clip_state(tmp: str, with_vision: bool, source: str):
  """Loads the merged PyTorch weights with transformers' loading report: names every missing,
  unused or mis-shaped tensor (Flax's from_pt would silently initialise what it cannot fill)."""
  cls = transformers.CLIPModel if with_vision else transformers.CLIPTextModelWithProjection
  try:
    _, info = cls.from_pretrained(tmp, output_loading_info=True, ignore_mismatched_sizes=True)
  except Exception as e:
    raise ConversionError(f"CLIP ({source}) does not load: {e}") from e
  problems = [f"missing tensor {k!r}" for k in info.get("missing_keys", []) if k != "logit_scale"]
  problems += [f"unused tensor {k!r}" for k in info.get("unexpected_keys", [])]
  problems += [f"{m[0]}: checkpoint shape {tuple(m[1])}, model expects {tuple(m[2])}" if len(m) >= 3
               else f"mis-shaped tensor {m}" for m in info.get("mismatched_keys", [])]
  if problems:
    raise ConversionError(f"CLIP ({source}) does not match its config:\n  " + "\n  ".join(problems))


# -- the diffusion stages -----------------------------------------------------------------------------


def convert(src: str, dst: str, overwrite: bool = False) -> dict:
  """Converts the pipeline folder at src into an inference checkpoint at dst; returns its pipeline.json."""
  kind = check_layout(src)
  if os.path.exists(dst) and os.listdir(dst) and not overwrite:
    raise ConversionError(f"{dst!r} exists and is not empty (pass overwrite / --overwrite).")
  layout = {"clip": "clip", "decoder": "decoder", "sr1": "sr1", "source": "diffusers", "kind": kind}
  options = {}
  problems = []

  def attempt(fn):
    try:
      return fn()
    except ConversionError as e:
      problems.append(str(e))
      return None

  # Read and check everything before writing anything.
  prior = None
  if kind == "text":
    def read_prior():
      cfg, variables = diffusers_prior.load_diffusers_prior(os.path.join(src, "prior"))
      diffusion, clip_range = _diffusion_settings("prior_scheduler", _scheduler(src, "prior_scheduler"),
                                                  prediction="sample", variance="fixed_small_log")
      return cfg, variables, diffusion, clip_range
    prior = attempt(read_prior)

  def read_decoder():
    cfg, params = diffusers_unet.load_diffusers_unet(os.path.join(src, "decoder"), os.path.join(src, "text_proj"))
    learned = cfg.out_channels == 2 * cfg.in_channels
    diffusion, clip_range = _diffusion_settings(
        "decoder_scheduler", _scheduler(src, "decoder_scheduler"), prediction="epsilon",
        variance="learned_range" if learned else "fixed_small_log")
    resolution = diffusers_unet.read_config(os.path.join(src, "decoder")).get("sample_size")
    return cfg, params, diffusion, clip_range, resolution
  decoder = attempt(read_decoder)

  def read_sr():
    cfg, first = diffusers_unet.load_diffusers_unet(os.path.join(src, "super_res_first"))
    cfg_last, last = diffusers_unet.load_diffusers_unet(os.path.join(src, "super_res_last"))
    if cfg_last != cfg:
      raise ConversionError(f"super_res_last's architecture differs from super_res_first's "
                            f"({cfg_last} vs {cfg}); diffusers runs them as one chain.")
    if cfg.out_channels != cfg.in_channels:
      raise ConversionError("super_res_first: a learned variance in an upsampler is not supported.")
    diffusion, clip_range = _diffusion_settings("super_res_scheduler", _scheduler(src, "super_res_scheduler"),
                                                prediction="epsilon", variance="fixed_small_log")
    resolution = diffusers_unet.read_config(os.path.join(src, "super_res_first")).get("sample_size")
    return cfg, {"first": first, "last": last}, diffusion, clip_range, resolution
  sr = attempt(read_sr)
  if problems:
    raise ConversionError(f"Cannot convert {src!r}:\n" + "\n".join(problems))

  os.makedirs(dst, exist_ok=True)
  convert_clip(src, os.path.join(dst, "clip"), with_vision=kind == "variations")
  if prior is not None:
    cfg, variables, diffusion, clip_range = prior
    checkpoints.export_inference(os.path.join(dst, "prior"), variables,
                                 {"stage": "prior", "model": dataclasses.asdict(cfg), "diffusion": diffusion})
    options["prior"] = {"num_steps": KARLO_DEFAULTS["prior_num_inference_steps"], "sampler": "ddpm",
                        "guidance_scale": KARLO_DEFAULTS["prior_guidance_scale"], "clip_range": clip_range}
    layout["prior"] = "prior"
  cfg, params, diffusion, clip_range, resolution = decoder
  checkpoints.export_inference(os.path.join(dst, "decoder"), params,
                               {"stage": "decoder", "model": cfg.to_dict(), "resolution": resolution,
                                "diffusion": diffusion})
  options["decoder"] = {"num_steps": KARLO_DEFAULTS["decoder_num_inference_steps"], "sampler": "ddpm",
                        "guidance_scale": KARLO_DEFAULTS["decoder_guidance_scale"], "clip_range": clip_range}
  sr_cfg, sr_params, sr_diffusion, sr_clip, sr_resolution = sr
  checkpoints.export_inference(os.path.join(dst, "sr1"), sr_params,
                               {"stage": "sr1", "model": sr_cfg.to_dict(), "resolution": sr_resolution,
                                "low_res_resolution": resolution, "augmentation": None,
                                "diffusion": sr_diffusion, "params_last": True})
  options["sr1"] = {"num_steps": KARLO_DEFAULTS["super_res_num_inference_steps"], "sampler": "ddpm",
                    "clip_range": sr_clip}
  layout["options"] = options
  with open(os.path.join(dst, "pipeline.json"), "w") as f:
    json.dump(layout, f, indent=2)
  return layout
