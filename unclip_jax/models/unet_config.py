"""U-Net configs: the `UNetConfig` dataclass, the named configs (Karlo's and the
paper's) and the plan of which layers `scan_layers` stacks.

Kept apart from unclip_jax/models/unet.py (which re-exports all of it) so the
layout converter and the training configs read them without the modules.
"""

import dataclasses

import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class TextProjConfig:
  """UnCLIPTextProjModel: z_i / z_t width, text-token width and extra tokens."""
  clip_dim: int = 768
  text_dim: int | None = None  # width of the text-token encodings; None: clip_dim
  extra_tokens: int = 4


@dataclasses.dataclass(frozen=True)
class TextEncoderConfig:
  """GLIDE's text transformer (Nichol et al. 2021), trained with the decoder as in the paper's 3.5B
  decoder: token ids (the CLIP tokenizer's) -> every token's output, the attention context, and the
  last token's, added to the time embedding (unclip_jax/models/text_encoder.py)."""
  vocab_size: int = 49408  # CLIP's BPE vocabulary
  num_tokens: int = 77  # CLIP's context (GLIDE: 128)
  width: int = 2048  # = the U-Net's context_dim: attention reads the outputs directly, as GLIDE's
  num_layers: int = 24
  num_heads: int = 32
  mlp_ratio: int = 4
  dropout: float = 0.0
  layer_norm_eps: float = 1e-5
  scan_layers: bool = True  # see PriorConfig: one traced block
  remat: bool = False


@dataclasses.dataclass(frozen=True)
class UNetConfig:
  """Shapes and options of one U-Net (see the named configs at the bottom)."""
  block_channels: tuple[int, ...] = (320, 640, 960, 1280)
  layers_per_block: int = 3
  attention_levels: tuple[bool, ...] = (False, True, True, True)  # per resolution, high to low
  mid_attention: bool = True
  head_dim: int = 64
  in_channels: int = 3  # channels of x (the noisy image)
  low_res_channels: int = 0  # upsamplers: channels of the low-res conditioning image
  out_channels: int = 3  # 6 = eps and variance interpolation ("learned_range")
  context_dim: int | None = None  # width of the attention context (diffusers' cross_attention_dim)
  text_proj: TextProjConfig | None = None  # the decoder's CLIP conditioning
  # The paper's decoder: its own text transformer over the caption's token ids in place of CLIP's
  # token encodings and z_t (None: Karlo's frozen-CLIP path).
  text_encoder: TextEncoderConfig | None = None
  encoder_hid_dim: int | None = None  # diffusers' optional "text_proj" encoder_hid_proj
  time_embed_dim: int | None = None  # None: 4 * block_channels[0]
  scale_shift: bool = True  # resnet_time_scale_shift "scale_shift" (AdaGN) vs "default"
  norm_groups: int = 32
  norm_eps: float = 1e-5
  dropout: float = 0.0
  flip_sin_to_cos: bool = True
  freq_shift: float = 0.0
  dtype: str = "float32"  # compute dtype
  param_dtype: str = "float32"
  remat: bool = False  # rematerialise every resnet and attention block in the backward pass
  scan_layers: bool = False  # nn.scan over each block's runs of identical layers (see layer_runs)
  attention_impl: str | None = None  # "blocked", "xla", "cudnn"; None: blocked on CPU (layers.dot_product_attention)

  @property
  def levels(self) -> int:
    return len(self.block_channels)

  def to_dict(self) -> dict:
    """JSON-ready (inference checkpoints store it)."""
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d: dict) -> "UNetConfig":
    """Inverse of to_dict; unknown keys are an error that names them."""
    d = dict(d)
    unknown = sorted(set(d) - {f.name for f in dataclasses.fields(cls)})
    if unknown:
      raise ValueError(f"Unknown U-Net config keys {unknown}.")
    for key in ("block_channels", "attention_levels"):
      if key in d:
        d[key] = tuple(d[key])
    if d.get("text_proj") is not None and not isinstance(d["text_proj"], TextProjConfig):
      d["text_proj"] = TextProjConfig(**d["text_proj"])
    if d.get("text_encoder") is not None and not isinstance(d["text_encoder"], TextEncoderConfig):
      d["text_encoder"] = TextEncoderConfig(**d["text_encoder"])
    return cls(**d)

  @property
  def temb_dim(self) -> int:
    return self.time_embed_dim or 4 * self.block_channels[0]

  def validate(self) -> "UNetConfig":
    n = self.levels
    if n < 1 or self.layers_per_block < 1:
      raise ValueError("UNetConfig needs at least one level and one layer per block.")
    if len(self.attention_levels) != n:
      raise ValueError(f"attention_levels has {len(self.attention_levels)} entries for {n} levels.")
    for c in self.block_channels:
      if c % self.norm_groups:
        raise ValueError(f"block channel count {c} is not divisible by norm_groups={self.norm_groups}.")
    uses_attention = any(self.attention_levels) or self.mid_attention
    if uses_attention:
      if self.context_dim is None:
        raise ValueError("Attention blocks need context_dim (the width of the text context).")
      for c, a in zip(self.block_channels, self.attention_levels):
        if a and c < self.head_dim:
          raise ValueError(f"head_dim {self.head_dim} is larger than the {c} channels of an attention level.")
    if self.text_proj is not None and not uses_attention:
      raise ValueError("text_proj is set but no level has attention to read the context.")
    if self.text_encoder is not None:
      if self.text_proj is None:
        raise ValueError("text_encoder needs text_proj (the decoder's z_i conditioning).")
      if self.text_encoder.width != (self.encoder_hid_dim or self.context_dim):
        raise ValueError(f"text_encoder width {self.text_encoder.width} must equal the context width "
                         f"{self.encoder_hid_dim or self.context_dim}: attention reads its outputs directly.")
    if self.low_res_channels < 0 or self.in_channels < 1 or self.out_channels < 1:
      raise ValueError("in_channels/out_channels must be positive and low_res_channels non-negative.")
    for name in ("dtype", "param_dtype"):
      jnp.dtype(getattr(self, name))  # raises TypeError on unknown names
    return self


# ---------------------------------------------------------------------------
# Scan plan: which layers of a block are structurally identical.


def layer_signatures(cfg: UNetConfig) -> dict[str, list[tuple]]:
  """Per down/up block name, each layer's (input width, skip width, output width, attention).

  Down block i: layer 0 reads the previous level's width, the others their own.
  Up block i (level l = levels - 1 - i) has layers_per_block + 1 layers; layer j
  concatenates its input h with the skip popped j-th: level l's own outputs
  first, the level below's downsampler (or conv_in) last.
  """
  ch, n = cfg.block_channels, cfg.layers_per_block
  out = {}
  for i, c in enumerate(ch):
    c_in = ch[max(i - 1, 0)]
    out[f"down_blocks_{i}"] = [(c_in if j == 0 else c, 0, c, cfg.attention_levels[i]) for j in range(n)]
  for i in range(cfg.levels):
    level = cfg.levels - 1 - i
    c, below, above = ch[level], ch[max(level - 1, 0)], ch[min(level + 1, cfg.levels - 1)]
    out[f"up_blocks_{i}"] = [(above if j == 0 else c, c if j < n else below, c, cfg.attention_levels[level])
                             for j in range(n + 1)]
  return out


def runs(signatures: list) -> list[tuple[int, int]]:
  """Maximal runs [start, stop) of equal consecutive entries, in order."""
  out, start = [], 0
  for j in range(1, len(signatures) + 1):
    if j == len(signatures) or signatures[j] != signatures[start]:
      out.append((start, j))
      start = j
  return out


def layer_runs(cfg: UNetConfig) -> dict[str, list[tuple[int, int]]]:
  """Per block, its layers as [start, stop) segments: runs of >= 2 identical layers are scanned
  (named `layers_{start}_to_{stop - 1}`), the others stay single (`resnets_j`, `attentions_j`)."""
  plan = {}
  for block, sigs in layer_signatures(cfg).items():
    segments = []
    for a, b in runs(sigs):
      segments += [(a, b)] if b - a >= 2 else [(j, j + 1) for j in range(a, b)]
    plan[block] = segments
  return plan


def scan_name(start: int, stop: int) -> str:
  """The stacked module of layers start .. stop - 1."""
  return f"layers_{start}_to_{stop - 1}"


# ---------------------------------------------------------------------------
# Named configs.


def karlo_decoder(**overrides) -> UNetConfig:
  """Karlo's 64 px decoder as diffusers builds it (DECODER_CONFIG + UnCLIPTextProjModel).
  Dropout is 0 as in diffusers' config; Karlo trained with 0.1 (pass dropout=0.1 to fine-tune)."""
  cfg = UNetConfig(block_channels=(320, 640, 960, 1280), layers_per_block=3,
                   attention_levels=(False, True, True, True), mid_attention=True, head_dim=64,
                   in_channels=3, out_channels=6, context_dim=1536, scale_shift=True,
                   text_proj=TextProjConfig(clip_dim=768, extra_tokens=4))
  return dataclasses.replace(cfg, **overrides)


def karlo_super_res(**overrides) -> UNetConfig:
  """Karlo's 64 -> 256 upsampler (super_res_first and super_res_last share it):
  a UNet2DModel with default (additive) time conditioning and no attention."""
  cfg = UNetConfig(block_channels=(320, 640, 960, 1280), layers_per_block=3,
                   attention_levels=(False,) * 4, mid_attention=False, in_channels=3, low_res_channels=3,
                   out_channels=3, scale_shift=False)
  return dataclasses.replace(cfg, **overrides)


def paper_decoder(**overrides) -> UNetConfig:
  """The paper's 3.5B decoder (Table 3): 512 ch x (1, 2, 3, 4), 3 res blocks,
  attention at 32/16/8 with 64-channel heads, dropout 0.1, learned variance,
  and GLIDE's text transformer (24 blocks of width 2048, ~1.2B parameters) whose
  outputs are the attention context (beside z_i's 4 tokens); 2.3B without it
  (text_encoder=None: CLIP's token encodings, as Karlo).
  Unscanned, as the upsamplers: with runs of only 2-3 identical layers, scan_layers=True did not
  make the CPU compile cheaper (docs/scaling.md)."""
  cfg = UNetConfig(block_channels=(512, 1024, 1536, 2048), layers_per_block=3,
                   attention_levels=(False, True, True, True), mid_attention=True, head_dim=64,
                   in_channels=3, out_channels=6, context_dim=2048, scale_shift=True, dropout=0.1,
                   text_proj=TextProjConfig(clip_dim=768, extra_tokens=4), text_encoder=TextEncoderConfig())
  return dataclasses.replace(cfg, **overrides)


def paper_sr_64_256(**overrides) -> UNetConfig:
  """The paper's 64 -> 256 upsampler: 320 ch x (1, 2, 3, 4), 3 res blocks, no attention, dropout 0.1."""
  cfg = UNetConfig(block_channels=(320, 640, 960, 1280), layers_per_block=3,
                   attention_levels=(False,) * 4, mid_attention=False, in_channels=3, low_res_channels=3,
                   out_channels=3, scale_shift=True, dropout=0.1)
  return dataclasses.replace(cfg, **overrides)


def paper_sr_256_1024(**overrides) -> UNetConfig:
  """The paper's 256 -> 1024 upsampler: 192 ch x (1, 1, 2, 2, 4, 4), 2 res blocks, no attention."""
  cfg = UNetConfig(block_channels=(192, 192, 384, 384, 768, 768), layers_per_block=2,
                   attention_levels=(False,) * 6, mid_attention=False, in_channels=3, low_res_channels=3,
                   out_channels=3, scale_shift=True)
  return dataclasses.replace(cfg, **overrides)


CONFIGS = {
    "karlo_decoder": karlo_decoder,
    "karlo_super_res": karlo_super_res,
    "paper_decoder": paper_decoder,
    "paper_sr_64_256": paper_sr_64_256,
    "paper_sr_256_1024": paper_sr_256_1024,
}
