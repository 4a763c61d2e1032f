"""The unCLIP U-Nets: the 64 px decoder and the two upsamplers, in one module.

One `UNet`, configured by a frozen `UNetConfig`, expresses both diffusers
models Karlo ships:

* the decoder, diffusers' `UNet2DConditionModel` with ResnetDownsampleBlock2D /
  SimpleCrossAttn{Down,Up}Block2D / UNetMidBlock2DSimpleCrossAttn: resnet
  blocks that resample themselves, scale-shift (AdaGN) time conditioning,
  "added KV" attention (projected text tokens concatenated in front of the
  self-attention keys and values), an identity class embedding that adds the
  CLIP time term, and 6 output channels (eps + learned variance range).
  `UnCLIPTextProjModel` lives here too (`TextProj`): it turns z_i, z_t and
  the CLIP text tokens into the attention context and the time addition.
* the upsamplers, diffusers' `UNet2DModel` with ResnetDownsampleBlock2D /
  ResnetUpsampleBlock2D and no attention; the low-res image is resized to the
  output size and concatenated on channels.

Parameter names follow diffusers' module names with "." before an index
replaced by "_" (down_blocks_0/resnets_1/conv1), so the converter in
unclip_jax/convert/diffusers_unet.py is a renaming plus transposes.
Layout is NHWC throughout. With config.scan_layers, each block's runs of
identical layers (unet_config.layer_runs) run as one nn.scan with stacked
params (`layers_{a}_to_{b}/resnets/...`): a smaller program that compiles
faster; unclip_jax/convert/scan_layout.py converts between the layouts.
The configs live in unet_config.py (re-exported here).
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from unclip_jax import parallel
from unclip_jax.models.layers import GroupNorm, TimestepMLP, dot_product_attention, timestep_embedding
from unclip_jax.models.text_encoder import TextEncoder
from unclip_jax.models.unet_config import (  # noqa: F401 (re-exported: callers keep using unet_lib.UNetConfig etc.)
  CONFIGS,
  TextEncoderConfig,
  TextProjConfig,
  UNetConfig,
  karlo_decoder,
  karlo_super_res,
  layer_runs,
  paper_decoder,
  paper_sr_64_256,
  paper_sr_256_1024,
  scan_name,
)

# diffusers' Attention builds its GroupNorm with this eps whatever the resnets use.
ATTENTION_NORM_EPS = 1e-5


def _group_norm(groups, eps, dtype, param_dtype, name):
  return GroupNorm(num_groups=groups, epsilon=eps, dtype=dtype, param_dtype=param_dtype, name=name)


def _conv(features, kernel, dtype, param_dtype, name):
  pad = (kernel - 1) // 2
  return nn.Conv(features, (kernel, kernel), padding=((pad, pad), (pad, pad)), dtype=dtype,
                 param_dtype=param_dtype, name=name)


class ResBlock(nn.Module):
  """diffusers' ResnetBlock2D: GN-SiLU-(resample)-conv, time via scale-shift or add,
  GN-SiLU-dropout-conv, 1x1 shortcut when the width changes."""
  out_channels: int
  scale_shift: bool
  groups: int
  eps: float
  dropout: float = 0.0
  deterministic: bool = True
  resample: str | None = None  # "up" (nearest x2) | "down" (2x2 average) | None
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, temb):  # x [B, H, W, Cin], temb [B, E]
    dense = functools.partial(nn.Dense, dtype=self.dtype, param_dtype=self.param_dtype)
    h = nn.silu(_group_norm(self.groups, self.eps, self.dtype, self.param_dtype, "norm1")(x))
    if self.resample == "up":
      x, h = _upsample_nearest(x), _upsample_nearest(h)
    elif self.resample == "down":
      x, h = _avg_pool(x), _avg_pool(h)
    h = _conv(self.out_channels, 3, self.dtype, self.param_dtype, "conv1")(h)  # [B, H, W, C]
    t = dense(self.out_channels * (2 if self.scale_shift else 1), name="time_emb_proj")(nn.silu(temb))
    t = t[:, None, None, :]
    norm2 = _group_norm(self.groups, self.eps, self.dtype, self.param_dtype, "norm2")
    if self.scale_shift:
      scale, shift = jnp.split(t, 2, axis=-1)
      h = norm2(h) * (1 + scale) + shift
    else:
      h = norm2(h + t)
    h = nn.silu(h)
    if self.dropout > 0:
      h = nn.Dropout(self.dropout)(h, deterministic=self.deterministic)
    h = _conv(self.out_channels, 3, self.dtype, self.param_dtype, "conv2")(h)
    if x.shape[-1] != self.out_channels:
      x = _conv(self.out_channels, 1, self.dtype, self.param_dtype, "conv_shortcut")(x)
    return parallel.constrain_batch(x.astype(h.dtype) + h)  # split over the batch between blocks (FSDP)


def _upsample_nearest(x):  # [B, H, W, C] -> [B, 2H, 2W, C]
  return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


def _avg_pool(x):  # [B, H, W, C] -> [B, H/2, W/2, C]
  return nn.avg_pool(x, (2, 2), strides=(2, 2), padding="VALID")


class AddedKVAttention(nn.Module):
  """diffusers' Attention with AttnAddedKVProcessor: self-attention over the
  pixels whose keys/values are prefixed by projections of the text context."""
  heads: int
  head_dim: int
  groups: int
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32
  implementation: str | None = None

  @nn.compact
  def __call__(self, x, context, context_mask):  # x [B, H, W, C], context [B, L, Dc], mask [B, L] bool
    b, hgt, wid, c = x.shape
    n, d = self.heads, self.head_dim
    dense = functools.partial(nn.Dense, dtype=self.dtype, param_dtype=self.param_dtype)
    h = _group_norm(self.groups, ATTENTION_NORM_EPS, self.dtype, self.param_dtype, "group_norm")(x)
    h = h.reshape(b, hgt * wid, c)  # [B, T, C]
    heads = lambda y: y.reshape(y.shape[0], y.shape[1], n, d)  # [B, S, N, D]
    q = heads(dense(n * d, name="to_q")(h))
    k = jnp.concatenate([heads(dense(n * d, name="add_k_proj")(context)), heads(dense(n * d, name="to_k")(h))], 1)
    v = jnp.concatenate([heads(dense(n * d, name="add_v_proj")(context)), heads(dense(n * d, name="to_v")(h))], 1)
    mask = None
    if context_mask is not None:
      mask = jnp.concatenate([context_mask.astype(bool), jnp.ones((b, hgt * wid), bool)], axis=1)
      mask = mask[:, None, None, :]  # [B, 1, 1, L + T]
    dtype = jnp.dtype(self.dtype) if self.dtype is not None else q.dtype
    q, k, v = (y.astype(dtype) for y in (q, k, v))
    o = dot_product_attention(q, k, v, mask=mask, implementation=self.implementation)  # [B, T, N, D]
    o = dense(c, name="to_out_0")(o.reshape(b, hgt * wid, n * d))
    return parallel.constrain_batch(x.astype(o.dtype) + o.reshape(b, hgt, wid, c))


class TextProj(nn.Module):
  """diffusers' UnCLIPTextProjModel: z_i -> 4 extra context tokens, z_t and z_i
  -> the time-embedding addition, text tokens -> Linear + LayerNorm; z_i may be
  swapped for the learned null embedding per example (classifier-free guidance).

  own_text (the paper's decoder): text_embed and text_tokens are the U-Net's own
  text transformer's last output and outputs (models/text_encoder.py): the last
  is projected into the time embedding ("transformer_proj", GLIDE's), the
  outputs are the context as they are.
  """
  config: TextProjConfig
  context_dim: int
  time_embed_dim: int
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32
  own_text: bool = False

  @nn.compact
  def __call__(self, image_embed, text_embed, text_tokens, text_mask=None, drop_image=None):
    # image_embed, text_embed [B, D]; text_tokens [B, L, W]; text_mask [B, L]; drop_image [B] bool
    cfg = self.config
    dense = functools.partial(nn.Dense, dtype=self.dtype, param_dtype=self.param_dtype)
    null = self.param("learned_classifier_free_guidance_embeddings", nn.initializers.zeros,
                      (cfg.clip_dim,), self.param_dtype)
    if drop_image is not None:
      image_embed = jnp.where(jnp.asarray(drop_image, bool)[:, None], null[None, :].astype(image_embed.dtype),
                              image_embed)
    b = image_embed.shape[0]
    text_time = dense(self.time_embed_dim, name="transformer_proj" if self.own_text else "embedding_proj")
    time_add = (text_time(text_embed) +
                dense(self.time_embed_dim, name="clip_image_embeddings_project_to_time_embeddings")(image_embed))
    # diffusers reshapes the projection to [B, Dc, K] and transposes: channel c of
    # token k is output c * K + k.
    extra = dense(cfg.extra_tokens * self.context_dim, name="clip_extra_context_tokens_proj")(image_embed)
    extra = extra.reshape(b, self.context_dim, cfg.extra_tokens).transpose(0, 2, 1)  # [B, K, Dc]
    if self.own_text:
      tokens = text_tokens.astype(self.dtype)  # [B, L, Dc]
    else:
      tokens = dense(self.context_dim, name="encoder_hidden_states_proj")(text_tokens)
      tokens = nn.LayerNorm(epsilon=1e-5, dtype=self.dtype, param_dtype=self.param_dtype,
                            name="text_encoder_hidden_states_norm")(tokens)  # [B, L, Dc]
    context = jnp.concatenate([extra.astype(tokens.dtype), tokens], axis=1)  # [B, K + L, Dc]
    if text_mask is None:
      text_mask = jnp.ones(text_tokens.shape[:2], bool)
    mask = jnp.concatenate([jnp.ones((b, cfg.extra_tokens), bool), text_mask.astype(bool)], axis=1)
    return context, mask, time_add


class DownBlock(nn.Module):
  """ResnetDownsampleBlock2D or SimpleCrossAttnDownBlock2D."""
  out_channels: int
  num_layers: int
  attention: bool
  downsample: bool
  config: UNetConfig
  deterministic: bool = True
  segments: tuple | None = None  # [start, stop) layer segments, multi-layer ones scanned; None: no scan

  @nn.compact
  def __call__(self, h, temb, context, context_mask):
    res, attn = _block_classes(self.config, self.deterministic)
    skips = []
    for a, b in self.segments or [(j, j + 1) for j in range(self.num_layers)]:
      if b - a > 1:
        h, ys = _scanned_layers(self, a, b, emit=True)(h, None, temb, context, context_mask)  # ys [b - a, B, H, W, C]
        skips += list(ys)
        continue
      h = res(self.out_channels, name=f"resnets_{a}")(h, temb)
      if self.attention:
        h = attn(self.out_channels, name=f"attentions_{a}")(h, context, context_mask)
      skips.append(h)
    if self.downsample:
      h = res(self.out_channels, resample="down", name="downsamplers_0")(h, temb)
      skips.append(h)
    return h, skips


class MidBlock(nn.Module):
  """UNetMidBlock2DSimpleCrossAttn (or UNetMidBlock2D without attention): res, attn, res."""
  channels: int
  attention: bool
  config: UNetConfig
  deterministic: bool = True

  @nn.compact
  def __call__(self, h, temb, context, context_mask):
    res, attn = _block_classes(self.config, self.deterministic)
    h = res(self.channels, name="resnets_0")(h, temb)
    if self.attention:
      h = attn(self.channels, name="attentions_0")(h, context, context_mask)
    return res(self.channels, name="resnets_1")(h, temb)


class UpBlock(nn.Module):
  """ResnetUpsampleBlock2D or SimpleCrossAttnUpBlock2D; each layer eats one skip."""
  out_channels: int
  num_layers: int
  attention: bool
  upsample: bool
  config: UNetConfig
  deterministic: bool = True
  segments: tuple | None = None  # as DownBlock's

  @nn.compact
  def __call__(self, h, skips, temb, context, context_mask):
    res, attn = _block_classes(self.config, self.deterministic)
    if len(skips) != self.num_layers:
      raise ValueError(f"UpBlock with {self.num_layers} layers got {len(skips)} skips.")
    for a, b in self.segments or [(j, j + 1) for j in range(self.num_layers)]:
      if b - a > 1:
        stacked = jnp.stack([skips[-1 - j] for j in range(a, b)])  # [b - a, B, H, W, Cskip], in eating order
        h, _ = _scanned_layers(self, a, b, emit=False)(h, stacked, temb, context, context_mask)
        continue
      h = jnp.concatenate([h, skips[-1 - a].astype(h.dtype)], axis=-1)
      h = res(self.out_channels, name=f"resnets_{a}")(h, temb)
      if self.attention:
        h = attn(self.out_channels, name=f"attentions_{a}")(h, context, context_mask)
    if self.upsample:
      h = res(self.out_channels, resample="up", name="upsamplers_0")(h, temb)
    return h


class ScanLayer(nn.Module):
  """One resnet (+ attention) layer as an nn.scan step: carry h, optional skip to concatenate
  first (up blocks), output emitted as ys when `emit` (down blocks keep it as a skip)."""
  out_channels: int
  attention: bool
  config: UNetConfig
  deterministic: bool = True
  emit: bool = False

  @nn.compact
  def __call__(self, h, skip, temb, context, context_mask):
    res, attn = _block_classes(self.config, self.deterministic)
    x = h if skip is None else jnp.concatenate([h, skip.astype(h.dtype)], axis=-1)
    x = res(self.out_channels, name="resnets")(x, temb)
    if self.attention:
      x = attn(self.out_channels, name="attentions")(x, context, context_mask)
    x = x.astype(h.dtype)  # the carry keeps its dtype
    return x, (x if self.emit else None)


def _scanned_layers(block, start: int, stop: int, emit: bool):
  """Layers start .. stop - 1 of `block` as one scanned ScanLayer: params stacked on a leading
  [stop - start] axis, one dropout key per layer; remat (if configured) applies inside each step."""
  scan = nn.scan(ScanLayer, variable_axes={"params": 0}, split_rngs={"params": True, "dropout": True},
                 in_axes=(nn.broadcast if emit else 0, nn.broadcast, nn.broadcast, nn.broadcast),
                 length=stop - start)
  return scan(block.out_channels, block.attention, block.config, block.deterministic, emit,
              name=scan_name(start, stop))


def _block_classes(cfg: UNetConfig, deterministic: bool):
  """Constructors for resnet and attention blocks, rematerialised if asked."""
  res_cls = nn.remat(ResBlock) if cfg.remat else ResBlock
  attn_cls = nn.remat(AddedKVAttention) if cfg.remat else AddedKVAttention
  dtype, param_dtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)

  def res(out_channels, resample=None, name=None):
    return res_cls(out_channels, cfg.scale_shift, cfg.norm_groups, cfg.norm_eps, cfg.dropout, deterministic,
                   resample, dtype, param_dtype, name=name)

  def attn(channels, name=None):
    return attn_cls(channels // cfg.head_dim, cfg.head_dim, cfg.norm_groups, dtype, param_dtype,
                    cfg.attention_impl, name=name)

  return res, attn


def resize_low_res(low_res, size: tuple[int, int]):
  """Upsamples the conditioning image as Karlo's pipeline does.

  diffusers' UnCLIPPipeline calls F.interpolate(mode="bicubic",
  align_corners=False, antialias=True); torch's antialiased bicubic is the
  Keys kernel with a = -0.5 and renormalised edge weights, which is what
  jax.image.resize(method="bicubic") computes (tests check it against torch).
  """
  b, _, _, c = low_res.shape
  if tuple(low_res.shape[1:3]) == tuple(size):
    return low_res
  return jax.image.resize(low_res.astype(jnp.float32), (b, size[0], size[1], c), method="bicubic")


class UNet(nn.Module):
  """The decoder or an upsampler, depending on the config.

  Decoder (config.text_proj set):
    apply(params, x [B,H,W,3], t [B], image_embed=[B,D], text_embed=[B,D],
          text_tokens=[B,L,W], text_mask=[B,L], drop_image=[B] bool) -> [B,H,W,out]
    drop_image swaps z_i for the learned null embedding (CFG training and the
    unconditional half of guided sampling). With config.text_encoder (the
    paper's decoder) text_ids=[B,L] int and text_mask replace text_embed and
    text_tokens: the U-Net encodes the caption itself (GLIDE's transformer).
  Upsampler (config.low_res_channels > 0):
    apply(params, x [B,H,W,3], t [B], low_res=[B,h,w,3]) -> [B,H,W,3]
    low_res is resized to H x W inside (see resize_low_res).
  A config with attention but no text_proj takes context [B,L,Dc],
  context_mask [B,L] and time_cond [B,E] directly.
  Pass train=True with a "dropout" rng to use dropout. Output is float32.
  """
  config: UNetConfig

  @nn.compact
  def __call__(self, x, t, *, image_embed=None, text_embed=None, text_tokens=None, text_mask=None,
               text_ids=None, drop_image=None, low_res=None, context=None, context_mask=None, time_cond=None,
               train: bool = False):
    cfg = self.config.validate()
    dtype, param_dtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
    if x.ndim != 4 or x.shape[-1] != cfg.in_channels:
      raise ValueError(f"x must be [B, H, W, {cfg.in_channels}] (NHWC), got shape {x.shape}.")
    b, hgt, wid, _ = x.shape
    factor = 2 ** (cfg.levels - 1)
    if hgt % factor or wid % factor:
      raise ValueError(f"Image size {hgt}x{wid} must be divisible by {factor} for {cfg.levels} levels.")
    t = jnp.broadcast_to(jnp.asarray(t), (b,))

    temb = timestep_embedding(t, cfg.block_channels[0], flip_sin_to_cos=cfg.flip_sin_to_cos,
                              downscale_freq_shift=cfg.freq_shift)  # [B, C0]
    temb = TimestepMLP(cfg.temb_dim, dtype=dtype, name="time_embedding")(temb.astype(dtype))  # [B, E]

    if cfg.text_encoder is not None:  # the paper's decoder: its own text transformer over the token ids
      if text_ids is None or text_mask is None:
        raise ValueError("This decoder encodes the caption itself: it needs text_ids and text_mask (the CLIP "
                         "tokenizer's; the conditioning's \"ids\" and \"mask\").")
      text_tokens, text_embed = TextEncoder(cfg.text_encoder, dtype, param_dtype, name="text_encoder")(
          text_ids, text_mask, deterministic=not train)
    if cfg.text_proj is not None:
      for name, value in (("image_embed", image_embed), ("text_embed", text_embed), ("text_tokens", text_tokens)):
        if value is None:
          raise ValueError(f"The decoder needs {name}.")
      if image_embed.shape[-1] != cfg.text_proj.clip_dim:
        raise ValueError(f"image_embed must have width {cfg.text_proj.clip_dim}, got {image_embed.shape}.")
      if cfg.text_encoder is None and text_embed.shape[-1] != cfg.text_proj.clip_dim:
        raise ValueError(f"text_embed must have width {cfg.text_proj.clip_dim}, got {text_embed.shape}.")
      if text_tokens.ndim != 3 or text_tokens.shape[0] != b:
        raise ValueError(f"text_tokens must be [B={b}, L, W], got {text_tokens.shape}.")
      # With encoder_hid_dim, diffusers' text proj emits that width and encoder_hid_proj maps it to context_dim.
      context, context_mask, time_cond = TextProj(cfg.text_proj, cfg.encoder_hid_dim or cfg.context_dim,
                                                  cfg.temb_dim, dtype, param_dtype,
                                                  own_text=cfg.text_encoder is not None, name="text_proj")(
          image_embed, text_embed, text_tokens, text_mask, drop_image)
    elif drop_image is not None or image_embed is not None:
      raise ValueError("image_embed/drop_image given but this U-Net has no text_proj.")
    if time_cond is not None:
      temb = temb + time_cond.astype(temb.dtype)  # class_embed_type "identity"
    if cfg.encoder_hid_dim is not None and context is not None:
      context = nn.Dense(cfg.context_dim, dtype=dtype, param_dtype=param_dtype, name="encoder_hid_proj")(context)
    if (any(cfg.attention_levels) or cfg.mid_attention) and context is None:
      raise ValueError("This U-Net has attention and needs a text context.")
    if context is not None:
      context = context.astype(dtype)

    h = x.astype(dtype)
    if cfg.low_res_channels:
      if low_res is None or low_res.ndim != 4 or low_res.shape[-1] != cfg.low_res_channels:
        raise ValueError(f"The upsampler needs low_res [B, h, w, {cfg.low_res_channels}], got "
                         f"{None if low_res is None else low_res.shape}.")
      h = jnp.concatenate([h, resize_low_res(low_res, (hgt, wid)).astype(dtype)], axis=-1)
    elif low_res is not None:
      raise ValueError("low_res given but this U-Net has low_res_channels = 0.")

    h = _conv(cfg.block_channels[0], 3, dtype, param_dtype, "conv_in")(h)  # [B, H, W, C0]
    skips = [h]
    det = not train
    plan = {k: tuple(v) for k, v in layer_runs(cfg).items()} if cfg.scan_layers else {}
    for i, ch in enumerate(cfg.block_channels):
      h, s = DownBlock(ch, cfg.layers_per_block, cfg.attention_levels[i], i < cfg.levels - 1, cfg, det,
                       plan.get(f"down_blocks_{i}"), name=f"down_blocks_{i}")(h, temb, context, context_mask)
      skips += s
    h = MidBlock(cfg.block_channels[-1], cfg.mid_attention, cfg, det, name="mid_block")(
        h, temb, context, context_mask)
    for i, ch in enumerate(reversed(cfg.block_channels)):
      level = cfg.levels - 1 - i
      n_skip = cfg.layers_per_block + 1
      h = UpBlock(ch, n_skip, cfg.attention_levels[level], level > 0, cfg, det, plan.get(f"up_blocks_{i}"),
                  name=f"up_blocks_{i}")(h, tuple(skips[-n_skip:]), temb, context, context_mask)
      skips = skips[:-n_skip]
    h = nn.silu(_group_norm(cfg.norm_groups, cfg.norm_eps, dtype, param_dtype, "conv_norm_out")(h))
    h = _conv(cfg.out_channels, 3, dtype, param_dtype, "conv_out")(h)  # [B, H, W, out]
    return h.astype(jnp.float32)


def dummy_inputs(cfg: UNetConfig, batch: int = 1, size: int | None = None, text_len: int = 1):
  """Smallest inputs that trace the model (for init and eval_shape)."""
  size = size or 2 ** (cfg.levels - 1)
  x = jnp.zeros((batch, size, size, cfg.in_channels), jnp.float32)
  t = jnp.zeros((batch,), jnp.int32)
  kw = {}
  if cfg.text_encoder is not None:
    kw = dict(image_embed=jnp.zeros((batch, cfg.text_proj.clip_dim)),
              text_ids=jnp.zeros((batch, cfg.text_encoder.num_tokens), jnp.int32),
              text_mask=jnp.ones((batch, cfg.text_encoder.num_tokens), bool))
  elif cfg.text_proj is not None:
    d = cfg.text_proj.clip_dim
    kw = dict(image_embed=jnp.zeros((batch, d)), text_embed=jnp.zeros((batch, d)),
              text_tokens=jnp.zeros((batch, text_len, cfg.text_proj.text_dim or d)),
              text_mask=jnp.ones((batch, text_len), bool))
  elif any(cfg.attention_levels) or cfg.mid_attention:
    kw = dict(context=jnp.zeros((batch, text_len, cfg.encoder_hid_dim or cfg.context_dim)))
  if cfg.low_res_channels:
    kw["low_res"] = jnp.zeros((batch, size, size, cfg.low_res_channels))
  return x, t, kw


def init_params(cfg: UNetConfig, rng):
  """Fresh parameters for `cfg` (the "params" collection)."""
  x, t, kw = dummy_inputs(cfg)
  # One jitted program: eager init would compile a kernel per parameter shape.
  return jax.jit(lambda r: UNet(cfg).init(r, x, t, **kw)["params"])(rng)


def param_shapes(cfg: UNetConfig):
  """The parameter tree as ShapeDtypeStructs, without allocating."""
  x, t, kw = dummy_inputs(cfg)
  return jax.eval_shape(lambda: UNet(cfg).init(jax.random.PRNGKey(0), x, t, **kw))["params"]

