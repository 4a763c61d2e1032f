"""Inference checkpoints: reading one (with clear errors for what is missing or
does not fit) and assembling one from training runs.

  CHECKPOINT/pipeline.json        {"clip": "clip", "prior": "prior", "ar_prior": "ar_prior",
                                   "decoder": "decoder", "sr1": "sr1", "sr2": "sr2",
                                   "options": {"decoder": {"num_steps": 25, ...}, ...}}  (optional)
  CHECKPOINT/clip/                a Hugging Face CLIP folder
  CHECKPOINT/prior/ ...           train.py exports (config.json + params/)

Only the decoder is required. The priors are optional (without one the checkpoint
serves the image applications only): the pipeline runs one of them, the diffusion
"prior" by default or the autoregressive "ar_prior" (PRIORS), in the prior's place.
"options" holds the sampling settings the checkpoint's author recommends
(StageOptions fields per stage, each stage's over the "karlo" preset's; the
"ar_prior" entry is the prior's when the AR prior runs).
"""

import dataclasses
import json
import os

import jax
import numpy as np

from unclip_jax import checkpoints, paths
from unclip_jax.models import clip as clip_lib
from unclip_jax.pipeline.options import STAGES, stage_options
from unclip_jax.stages import contract

PIPELINE_FILE = "pipeline.json"
PRIORS = {"diffusion": "prior", "ar": "ar_prior"}  # Pipeline.load(prior=...) -> the folder's key
FOLDERS = ("clip", "prior", "ar_prior", *STAGES[1:])
DATA_STATS = ("stats", "codebook")  # a prior's data statistics: kept float32 whatever the params' dtype


class CheckpointError(ValueError):
  """An inference checkpoint is missing or does not fit the pipeline."""


def cast_floats(tree, dtype):
  """The tree's floating-point leaves as numpy arrays of dtype (a name numpy or ml_dtypes knows)."""
  return jax.tree.map(lambda x: np.asarray(x, dtype) if np.issubdtype(np.asarray(x).dtype, np.floating) else x, tree)


def cast_params(stage_params: dict, dtype) -> dict:
  """A stage's params in dtype, but a prior's latent stats or codebook (DATA_STATS: they scale or
  decode every z_i it returns) kept float32."""
  return {k: cast_floats(v, np.float32 if k in DATA_STATS else dtype) for k, v in stage_params.items()}


def read_stage(folder: str, stage: str) -> tuple[dict, contract.StageExport]:  # stage: a FOLDERS key
  """One stage's export: float32 params (a checkpoint may store float16, see assemble) and its record."""
  try:
    params, config = checkpoints.load_inference(folder)
  except (FileNotFoundError, checkpoints.ExportError) as e:
    raise CheckpointError(f"{stage}: {e}") from e
  if config.get("stage") != stage:
    raise CheckpointError(f"{folder!r} holds a {config.get('stage')!r} export, expected {stage!r}.")
  try:
    export = contract.read(config)
  except (ValueError, KeyError, TypeError) as e:
    raise CheckpointError(f"{folder!r}: its config.json does not describe a {stage} export: {e}") from e
  return cast_floats(params, np.float32), export


def check_clip_fits(exports: dict, clip, clip_path: str):
  """The prior's and decoder's CLIP widths against the CLIP's: a mismatch is a one-line error here,
  not a shape error deep inside the first sampling call."""
  have = {"embedding width": clip.embed_dim, "token width": clip.text_width, "tokens": clip.max_length}
  wants = {}
  if "prior" in exports:  # the configs' own defaults apply (e.g. a token width of None means clip_dim)
    prior = exports["prior"].model
    wants["prior"] = {"embedding width": prior.clip_dim, "token width": prior.text_width or prior.clip_dim,
                      "tokens": prior.num_text_tokens}
  text_proj = exports["decoder"].model.text_proj
  if text_proj:
    wants["decoder"] = {"embedding width": text_proj.clip_dim, "token width": text_proj.text_dim or text_proj.clip_dim}
  for stage, want in wants.items():
    wrong = [f"{k} {v} (the CLIP has {have[k]})" for k, v in want.items() if v != have[k]]
    if wrong:
      raise CheckpointError(f"The {stage} does not fit the CLIP at {clip_path!r}: it expects {', '.join(wrong)}.")


def _read_clip(clip_path: str):
  """load_clip, with its folder's JSON files checked first: a damaged one is named in one line, not a
  JSON, msgpack or tokenizer error from inside transformers."""
  folder = paths.as_path(clip_path)
  try:
    for json_file in sorted(folder.glob("*.json")) if folder.is_dir() else ():
      checkpoints.read_json(json_file, "CLIP folder")
    return clip_lib.load_clip(clip_path)
  except (FileNotFoundError, checkpoints.ExportError) as e:
    raise CheckpointError(f"CLIP: {e}") from e
  except (ValueError, OSError) as e:  # e.g. a truncated flax_model.msgpack
    raise CheckpointError(f"CLIP: {clip_path!r} does not load ({checkpoints.one_line(e)}); if its files are "
                          "damaged, copy it again.") from e


def read_checkpoint(path: str, clip_dir: str | None = None, prior: str = "diffusion"):
  """(clip, params, exports, options) of CHECKPOINT: its CLIP, each stage's params and export record,
  and its recommended options ({stage: StageOptions}); clear errors if any is missing. prior
  (diffusion | ar): which prior folder fills the "prior" place, with its options.

  path (and clip_dir) may be a URI: gs://, file://."""
  if prior not in PRIORS:
    raise ValueError(f"prior must be one of {', '.join(PRIORS)}, got {prior!r}.")
  root = paths.as_path(path)
  layout_file = root / PIPELINE_FILE
  if not layout_file.is_file():
    raise CheckpointError(f"{path!r} is not an unCLIP checkpoint: no {PIPELINE_FILE} (expected "
                          f"{{\"clip\": ..., \"prior\": ..., \"decoder\": ..., \"sr1\": ...}} naming stage folders).")
  try:
    layout = checkpoints.read_json(layout_file, "checkpoint")
  except checkpoints.ExportError as e:
    raise CheckpointError(str(e)) from e
  missing = [k for k in ("decoder",) if k not in layout]
  if missing:
    raise CheckpointError(f"{layout_file} names no {missing} folder.")
  named = {k: v for k, v in layout.items() if k in FOLDERS}
  if not all(isinstance(v, str) and v for v in named.values()):
    raise CheckpointError(f"{layout_file}: the folders must be names of subfolders, got {named}.")
  prior_key = PRIORS[prior]
  if prior == "ar" and prior_key not in layout:
    raise CheckpointError(f"{layout_file} names no {prior_key!r} folder: this checkpoint has no autoregressive "
                          "prior (use the diffusion prior).")
  try:
    options = {stage: stage_options(_options_stage(stage), fields)
               for stage, fields in layout.get("options", {}).items()}
  except (ValueError, TypeError, AttributeError) as e:
    raise CheckpointError(f"{layout_file}: bad \"options\": {e}") from e
  ar_options = options.pop("ar_prior", None)
  if prior == "ar":  # the AR prior runs with its own recommended options, or none
    options.pop("prior", None)
    if ar_options is not None:
      options["prior"] = ar_options
  clip_path = clip_dir or os.fspath(root / layout.get("clip", "clip"))
  clip = _read_clip(clip_path)
  params, exports = {}, {}
  for stage in STAGES:
    key = prior_key if stage == "prior" else stage
    if key in layout:
      params[stage], exports[stage] = read_stage(os.fspath(root / layout[key]), key)
  check_clip_fits(exports, clip, clip_path)
  return clip, params, exports, options


def _options_stage(key: str) -> str:
  """The stage whose StageOptions a pipeline.json options key holds (the AR prior's are a prior's)."""
  return "prior" if key == "ar_prior" else key


def assemble(path: str, options: dict | None = None, param_dtype: str | None = None, **folders: str) -> str:
  """Copies a CLIP folder and stage exports (clip=, prior=, ar_prior=, decoder=, sr1=, sr2=) into one
  checkpoint.

  Any of the folders may be a URI (gs://, file://).

  options: the recommended sampling settings, {stage: StageOptions or dict of
  its fields}, written to pipeline.json (Pipeline.load reads them back as
  default_options). param_dtype (e.g. "float16") stores the stages' float
  params in that dtype, to halve a checkpoint that ships in a repository;
  Pipeline.load computes in float32 whatever the stored dtype.
  """
  unknown = set(folders) - set(FOLDERS)
  if unknown:
    raise ValueError(f"Unknown stage folders {sorted(unknown)}.")
  layout = {name: name for name in folders}
  if options:
    for stage, fields in options.items():
      stage_options(_options_stage(stage), fields)  # fail here, not at load time
    # A dict keeps only its own fields, so the others follow Karlo's defaults when loaded.
    layout["options"] = {stage: dict(fields) if isinstance(fields, dict) else dataclasses.asdict(fields)
                         for stage, fields in options.items()}
  root = paths.as_path(path)
  root.mkdir(parents=True, exist_ok=True)
  for name, folder in folders.items():
    if name == "clip" or param_dtype is None:
      paths.copy_tree(folder, root / name)
    else:
      params, config = checkpoints.load_inference(folder)
      checkpoints.export_inference(root / name, cast_params(params, param_dtype), config)
  (root / PIPELINE_FILE).write_text(json.dumps(layout, indent=2))
  return path

