"""Declared parameter sharding (Megatron pairs, FSDP) and the device mesh, on 8 fake CPU devices."""

import dataclasses
import re

import jax
import jax.numpy as jnp
import optax
import pytest
from jax.sharding import PartitionSpec as P

from configs import common
from unclip_jax import parallel, training
from unclip_jax.models import prior, unet

FSDP8 = {"fsdp": 8}
TP2_FSDP4 = {"fsdp": 4, "tensor": 2}
PRIOR = prior.PriorConfig(clip_dim=32, num_text_tokens=8, width=64, num_layers=1, num_heads=4)
UNET = unet.karlo_decoder(block_channels=(32, 64), layers_per_block=1, attention_levels=(False, True), head_dim=16,
                          context_dim=64, norm_groups=8, text_proj=unet.TextProjConfig(clip_dim=32, extra_tokens=4))


def _prior_params(cfg=PRIOR):
  return jax.eval_shape(lambda: prior.init_variables(cfg, jax.random.key(0)))["params"]


def _flat(tree) -> dict:
  """{'block_0/ff_in/kernel': leaf} (PartitionSpecs are leaves)."""
  flat = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: isinstance(x, P))[0]
  return {"/".join(str(k.key) for k in path): leaf for path, leaf in flat}


def _flat_specs(tree, mesh, **kwargs) -> dict:
  return _flat(parallel.param_specs(tree, mesh, **kwargs))


# path: (spec under fsdp=8, spec under tensor=2 x fsdp=4). Prior width 64, ff 256, clip_dim 32, 12 tokens.
PRIOR_SPECS = {
    "block_0/attn1/to_q/kernel": (P("fsdp", None), P("fsdp", "tensor")),  # column-parallel [64, 64]
    "block_0/attn1/to_v/bias": (P(None), P("tensor")),
    "block_0/attn1/to_out/kernel": (P(None, "fsdp"), P("tensor", "fsdp")),  # row-parallel
    "block_0/attn1/to_out/bias": (P(None), P(None)),
    "block_0/ff_in/kernel": (P("fsdp", None), P("fsdp", "tensor")),  # [64, 256]
    "block_0/ff_in/bias": (P(None), P("tensor")),
    "block_0/ff_out/kernel": (P(None, "fsdp"), P("tensor", "fsdp")),  # [256, 64]
    "block_0/ff_out/bias": (P(None), P(None)),
    "block_0/norm3/scale": (P(None), P(None)),
    "positional_embedding": (P(None, None, "fsdp"), P(None, None, "fsdp")),  # [1, 12, 64]: width, not sequence
    "prd_embedding": (P(None, None, None), P(None, None, None)),
    "proj_in/kernel": (P("fsdp", None), P("fsdp", None)),  # [32, 64] into the residual stream
    "proj_to_clip_embeddings/kernel": (P("fsdp", None), P("fsdp", None)),  # [64, 32]
    "time_embedding/linear_1/kernel": (P("fsdp", None), P("fsdp", "tensor")),
    "time_embedding/linear_2/kernel": (P(None, "fsdp"), P("tensor", "fsdp")),
}

# U-Net channels (32, 64), attention at the second level with 16-channel heads, context 64.
UNET_SPECS = {
    "down_blocks_0/resnets_0/conv1/kernel": (P(None, None, "fsdp", None), P(None, None, "fsdp", "tensor")),
    "down_blocks_0/resnets_0/conv1/bias": (P(None), P("tensor")),
    "down_blocks_1/resnets_0/conv_shortcut/kernel": (P(None, None, "fsdp", None), P(None, None, "fsdp", "tensor")),
    # conv_in [3, 3, 3, 32]: 3 input channels do not divide, so FSDP falls back to the outputs when it can.
    "conv_in/kernel": (P(None, None, None, "fsdp"), P(None, None, None, "tensor")),
    "conv_out/kernel": (P(None, None, "fsdp", None), P(None, None, "fsdp", "tensor")),  # [3, 3, 32, 6]
    "down_blocks_0/resnets_0/norm1/scale": (P(None), P(None)),
    "down_blocks_0/resnets_0/time_emb_proj/kernel": (P("fsdp", None), P("fsdp", None)),
    "mid_block/attentions_0/to_q/kernel": (P("fsdp", None), P("fsdp", "tensor")),
    "mid_block/attentions_0/add_k_proj/kernel": (P("fsdp", None), P("fsdp", "tensor")),
    "mid_block/attentions_0/add_v_proj/bias": (P(None), P("tensor")),
    "mid_block/attentions_0/to_out_0/kernel": (P(None, "fsdp"), P("tensor", "fsdp")),
    "mid_block/attentions_0/to_out_0/bias": (P(None), P(None)),
    "mid_block/attentions_0/group_norm/bias": (P(None), P(None)),
    "text_proj/clip_extra_context_tokens_proj/kernel": (P("fsdp", None), P("fsdp", None)),
    "text_proj/learned_classifier_free_guidance_embeddings": (P(None), P(None)),
    "time_embedding/linear_2/kernel": (P(None, "fsdp"), P("tensor", "fsdp")),
}


@pytest.mark.parametrize("mesh_index", [0, 1], ids=["fsdp8", "tensor2_fsdp4"])
@pytest.mark.parametrize("model", ["prior", "unet"])
def test_declared_parameter_specs(model, mesh_index):
  params, expected = (_prior_params(), PRIOR_SPECS) if model == "prior" else (unet.param_shapes(UNET), UNET_SPECS)
  mesh = parallel.make_mesh((FSDP8, TP2_FSDP4)[mesh_index])
  specs = _flat_specs(params, mesh)
  assert {path: specs[path] for path in expected} == {path: want[mesh_index] for path, want in expected.items()}


def _stack(tree, layers):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct((layers,) + x.shape, x.dtype), tree)


@pytest.mark.parametrize("axes", [FSDP8, TP2_FSDP4], ids=["fsdp8", "tensor2_fsdp4"])
def test_stacked_layers_keep_the_trailing_spec(axes):
  """nn.scan's leading layer axis (prior blocks/..., U-Net layers_a_to_b/...) stays unsplit."""
  mesh = parallel.make_mesh(axes)
  p = _prior_params()
  u = unet.param_shapes(UNET)
  single = {"blocks": p["block_0"], "layers_0_to_1": {"resnets": u["mid_block"]["resnets_0"],
                                                      "attentions": u["mid_block"]["attentions_0"]}}
  flat_single = _flat_specs(single, mesh)
  flat_stacked = _flat_specs(_stack(single, 3), mesh)
  assert flat_stacked == {path: P(None, *spec) for path, spec in flat_single.items()}
  assert flat_stacked["blocks/ff_out/kernel"] == (P(None, None, "fsdp") if axes == FSDP8 else
                                                  P(None, "tensor", "fsdp"))


def test_small_unknown_and_indivisible_parameters():
  mesh = parallel.make_mesh(FSDP8)
  tree = {"tiny/kernel": jax.ShapeDtypeStruct((16, 16), jnp.float32),  # 256 < FSDP_MIN_SIZE elements
          "odd/kernel": jax.ShapeDtypeStruct((36, 44), jnp.float32),  # no dimension divides by 8
          "wide/kernel": jax.ShapeDtypeStruct((36, 64), jnp.float32),  # input does not divide: FSDP on the output
          "mystery": jax.ShapeDtypeStruct((24, 64, 3), jnp.float32),  # no rule: FSDP on the largest dimension
          "count": jax.ShapeDtypeStruct((), jnp.int32)}
  assert _flat_specs(tree, mesh) == {"tiny/kernel": P(None, None), "odd/kernel": P(None, None),
                                     "wide/kernel": P(None, "fsdp"), "mystery": P(None, "fsdp", None),
                                     "count": P()}
  assert parallel.FSDP_MIN_SIZE > 16 * 16
  big = {"w/kernel": jax.ShapeDtypeStruct((64, 64), jnp.float32)}
  assert _flat_specs(big, mesh) == {"w/kernel": P("fsdp", None)}
  assert _flat_specs(big, mesh, min_size=2**14) == {"w/kernel": P(None, None)}


def test_optimizer_state_follows_its_parameters():
  mesh = parallel.make_mesh(TP2_FSDP4)
  params = _prior_params()
  opt_state = jax.eval_shape(optax.adamw(1e-3).init, params)
  shardings = parallel.param_shardings(opt_state, mesh)
  param_shardings = parallel.param_shardings(params, mesh)
  assert shardings[0].count.spec == P()
  for moments in (shardings[0].mu, shardings[0].nu):
    assert moments == param_shardings
  assert moments["block_0"]["ff_in"]["kernel"].spec == P("fsdp", "tensor")


def test_config_references_the_default_rules_and_mesh():
  config = common.base_config("prior")
  rules = tuple((k, tuple(v) if isinstance(v, list) else v) for k, v in config.logical_axis_rules)  # as train_loop
  assert rules == parallel.DEFAULT_RULES
  mesh = parallel.make_mesh(dict(config.mesh))
  assert dict(mesh.shape) == {"data": 8, "fsdp": 1, "tensor": 1}


def test_make_mesh_shapes_and_errors():
  mesh = parallel.make_mesh({"data": -1, "tensor": 2})
  assert mesh.axis_names == parallel.MESH_AXES and dict(mesh.shape) == {"data": 4, "fsdp": 1, "tensor": 2}
  assert sorted(d.id for d in mesh.devices.flat) == list(range(8))
  with pytest.raises(ValueError, match="Unknown mesh axes"):
    parallel.make_mesh({"dcn_model": 2})
  with pytest.raises(ValueError, match="need 2 slices; the devices form 1 processes"):
    parallel.make_mesh({"data": -1, "dcn_data": 2})  # one process, no slices


@dataclasses.dataclass(frozen=True)
class _FakeDevice:
  id: int
  process_index: int
  slice_index: int | None = None
  platform: str = "cpu"
  device_kind: str = "cpu"


def test_hybrid_mesh_puts_slices_or_processes_on_the_dcn_axis():
  # Two slices of 4 devices, listed interleaved: the mesh must not mix them within a slice's block.
  sliced = [_FakeDevice(i, i // 2, slice_index=i % 2) for i in range(8)]
  grid = parallel.device_array([1, 2, 2], [2, 1, 1], sliced)  # data = 1 x 2 slices, fsdp 2, tensor 2
  assert grid.shape == (2, 2, 2)
  assert [{d.slice_index for d in grid[i].flat} for i in range(2)] == [{0}, {1}]
  # Without slice_index (GPU/CPU clusters) processes are the granules.
  procs = [_FakeDevice(i, i // 4) for i in range(8)]
  grid = parallel.device_array([2, 2, 1], [1, 2, 1], procs)  # fsdp = 2 within x 2 across processes
  assert grid.shape == (2, 4, 1)
  assert [{d.process_index for d in grid[:, j].flat} for j in range(4)] == [{0}, {0}, {1}, {1}]
  with pytest.raises(ValueError, match="span 2 slices"):
    parallel.device_array([2, 2, 2], [1, 1, 1], sliced)


def _ff_all_gathers(hlo: str, shapes: set) -> list:
  """Result shapes of all-gathers in compiled HLO that are one of `shapes`."""
  found = []
  for line in hlo.splitlines():
    m = re.search(r"=\s*(.*?)\s+all-gather(?:-start)?\(", line)
    if m:
      results = [tuple(int(d) for d in dims.split(",") if d) for dims in re.findall(r"\w+\[([\d,]*)\]", m.group(1))]
      found += [s for s in results if s in shapes]
  return found


def _compiled_prior_step(mesh, rules, constrain_activations=True) -> str:
  model = prior.DiffusionPrior(PRIOR)
  stats = {"clip_mean": jnp.zeros(PRIOR.clip_dim), "clip_std": jnp.ones(PRIOR.clip_dim)}

  def loss_fn(params, batch, rng):
    x0 = batch["z_i"]  # [B, D]
    x_t = x0 + jax.random.normal(rng, x0.shape)
    pred = model.apply({"params": params, "stats": stats}, x_t, jnp.zeros(x0.shape[:1], jnp.int32), batch["z_t"],
                       batch["tokens"], batch["mask"])
    loss = jnp.mean((pred - x0) ** 2)
    return loss, {}

  tx = optax.sgd(1e-3)
  init = lambda rng: prior.init_variables(PRIOR, rng)["params"]
  abstract = jax.eval_shape(lambda r: training.init_state(init, tx, r), jax.random.key(0))
  shardings = training.state_shardings(abstract, mesh, rules)
  step_fn = training.make_train_step(loss_fn, tx, ema_decay=0.9)
  if constrain_activations:
    step = training.jit_train_step(step_fn, shardings, mesh, rules)
  else:  # what jit_train_step did before parallel.activation_sharding
    step = jax.jit(step_fn, in_shardings=(shardings, parallel.batch_sharding(mesh, rules)),
                   out_shardings=(shardings, parallel.replicated(mesh)), donate_argnums=0)
  state = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), abstract, shardings)
  b, d, t = 8, PRIOR.clip_dim, PRIOR.num_text_tokens
  sharding = parallel.batch_sharding(mesh, rules)
  batch = {"z_i": jax.ShapeDtypeStruct((b, d), jnp.float32, sharding=sharding),
           "z_t": jax.ShapeDtypeStruct((b, d), jnp.float32, sharding=sharding),
           "tokens": jax.ShapeDtypeStruct((b, t, d), jnp.float32, sharding=sharding),
           "mask": jax.ShapeDtypeStruct((b, t), jnp.bool_, sharding=sharding)}
  # Only SPMD partitioning matters here; skipping LLVM's optimisations halves the compile.
  options = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
  return step.lower(state, batch).compile(compiler_options=options).as_text()


def test_tensor_parallel_prior_step_never_gathers_a_whole_ff_weight():
  mesh = parallel.make_mesh(TP2_FSDP4)
  ff = [x.shape for path, x in _flat(_prior_params()).items() if re.search(r"ff_(in|out)/kernel$", path)]
  whole = set(ff) | {s[-2:] for s in ff}  # stacked or per layer
  hlo = _compiled_prior_step(mesh, parallel.DEFAULT_RULES)
  assert not _ff_all_gathers(hlo, whole)
  # FSDP still gathers each weight's tensor shard: [64, 256/2] and [256/2, 64].
  assert _ff_all_gathers(hlo, {(64, 128), (128, 64)})
  # The check can fail: without the tensor rules the same step gathers the whole weights.
  no_tensor = tuple(rule for rule in parallel.DEFAULT_RULES if rule[1] != "tensor")
  assert set(_ff_all_gathers(_compiled_prior_step(mesh, no_tensor), whole)) == {(64, 256), (256, 64)}


def _collectives_of_global_activations(hlo: str, batch: int) -> list:
  """all-gather / all-reduce results shaped like a whole-batch activation [B, L, W]."""
  found = []
  for line in hlo.splitlines():
    m = re.search(r"=\s*(.*?)\s+(all-gather|all-reduce)(?:-start)?\(", line)
    if m:
      for dims in re.findall(r"\w+\[([\d,]*)\]", m.group(1)):
        shape = tuple(int(x) for x in dims.split(",") if x)
        if len(shape) >= 3 and shape[0] == batch:
          found.append((m.group(2), shape))
  return found


def test_fsdp_prior_step_gathers_weights_not_activations():
  """Pure FSDP over 8 devices: activations stay split over the batch (parallel.constrain_batch).

  Unconstrained, XLA's partitioner meets the FSDP-split weights by gathering the
  activations to the whole batch of 8 and all-reducing them, so per-device
  memory grows with the device count (found compiling the paper prior for TPU pods).
  """
  mesh = parallel.make_mesh({"data": 1, "fsdp": 8})
  assert not _collectives_of_global_activations(_compiled_prior_step(mesh, parallel.DEFAULT_RULES), 8)
  unconstrained = _compiled_prior_step(mesh, parallel.DEFAULT_RULES, constrain_activations=False)
  assert _collectives_of_global_activations(unconstrained, 8)
