"""Ahead-of-time compilation for a TPU topology on a machine without TPUs (unclip_jax/aot.py)."""

import glob
import json
import os
import re

import jax
import jax.numpy as jnp
import pytest
from absl import flags

from configs import paper, shapes
from unclip_jax import aot, hlo_stats, tpu_chips

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytestmark = pytest.mark.skipif(not tpu_chips.libtpu_installed(),
                                reason="libtpu is not installed (requirements-dev.txt pins it)")

TOPOLOGY = "v5e:2x2"
# The tiny Shapes CLIP's dims (configs/shapes.py:clip,tiny): embed_dim, text_width, max_length.
TINY_CLIP = aot.ClipShapes(16, 32, 16)


@pytest.fixture(scope="module")
def compiled():
  """The tiny prior's train step for v5e:2x2, data-parallel (fsdp=1) and fully sharded (fsdp=4)."""
  topology = tpu_chips.parse_topology(TOPOLOGY)
  devices = tpu_chips.compile_only_devices(topology)
  out = {}
  for fsdp in (1, 4):
    config = shapes.get_config("prior,tiny")
    config.mesh.update(data=-1, fsdp=fsdp)
    out[fsdp], _ = aot.compile_for(config, topology, devices=devices, clip=TINY_CLIP)
  return out


def test_fsdp_shards_the_state(compiled):
  dp, fsdp = compiled[1], compiled[4]
  assert set(dp) == set(aot.KEYS) and set(fsdp) == set(aot.KEYS)
  assert dp["chips"] == fsdp["chips"] == 4 and dp["params"] == fsdp["params"] > 0
  assert dp["fits"] and fsdp["fits"]
  # Arguments are the state (params, two Adam moments, EMA) and the batch. The batch is split 4 ways in both
  # meshes; with fsdp=4 every weight of >= 512 elements is split too, but the biases and norm scales stay
  # whole and TPU tiling pads small arrays, so the ratio is near, not at, a quarter (measured: 0.31).
  ratio = fsdp["per_chip_bytes"]["arguments"] / dp["per_chip_bytes"]["arguments"]
  assert 0.2 < ratio < 0.4, ratio
  for result in (dp, fsdp):
    pc = result["per_chip_bytes"]
    assert pc["total"] <= pc["arguments"] + pc["outputs"] + pc["temps"]
    assert 0 < result["roofline_step_s"] and 0 < result["mfu_bound"] <= 1
    assert result["model_flops_per_step"] > 0 and result["flops_per_step"] > 0


def test_collectives(compiled):
  dp, fsdp = compiled[1]["collective_bytes_per_step"], compiled[4]["collective_bytes_per_step"]
  assert set(dp) == set(hlo_stats.COLLECTIVES)
  # Data parallel: params are whole on every chip; only the gradients are summed (all-reduce).
  assert dp["all-gather"] == 0 and dp["all-reduce"] > 0
  # FSDP: each chip gathers the weights it lacks before using them (measured: ~8x the f32 params' bytes,
  # forward and backward); at least half of the params' bytes whatever XLA's choices.
  assert fsdp["all-gather"] > 0.5 * 4 * compiled[4]["params"]


def test_fsdp_sampling_gathers_weights_not_activations():
  """The sampling loop with FSDP-split params (the train loop's sample grids) is traced like the train
  step (parallel.activation_sharding): XLA gathers each weight rather than all-reducing activations over
  the whole batch (measured: all-reduce 0.6 MiB vs 15 MiB all-gather; 144 MiB all-reduce untraced)."""
  topology = tpu_chips.parse_topology(TOPOLOGY)
  config = shapes.get_config("prior,tiny")
  config.mesh.update(data=1, fsdp=4)
  result, _ = aot.compile_for(config, topology, sample=True, batch_size=16, clip=TINY_CLIP)
  collectives = result["collective_bytes_per_step"]
  assert collectives["all-gather"] > 0 and collectives["all-reduce"] < 0.2 * collectives["all-gather"], collectives


def test_json_keys(compiled, tmp_path):
  path = tmp_path / "aot.json"
  aot.write_json(compiled[4], str(path))
  result = json.loads(path.read_text())
  assert list(result) == list(aot.KEYS)
  assert set(result["per_chip_bytes"]) == {"arguments", "outputs", "temps", "total"}


@pytest.mark.parametrize("topology, message", [
    ("v9x:2x2", "error: unknown TPU 'v9x'"),
    ("v5e:2x2x2", "error: a v5e topology has 2 positive sides"),
    ("v5e-16", "error: bad topology 'v5e-16'"),
])
def test_cli_errors_are_one_line(topology, message):
  argv = ["aot", "--config", "configs/shapes.py:prior,tiny", "--topology", topology]
  flag_values = flags.FlagValues()  # the CLI's own flags, apart from the process's (sample.py's, ...)
  aot.define_flags(flag_values)
  aot.parse_flags(argv, flag_values)
  with pytest.raises(SystemExit) as exit_info:
    aot.main(argv[:1], flag_values)
  assert str(exit_info.value).startswith(message) and "\n" not in str(exit_info.value), exit_info.value


def test_parse_topology():
  topology = tpu_chips.parse_topology("v5p:4x4x4")
  assert topology.chips == 64 and topology.libtpu_name == "v5:4x4x4" and topology.wrap == (True,) * 3
  assert tpu_chips.parse_topology("v5e:16x16").wrap == (True, True, False)
  for bad in ("v5e:4x", "v5p:4x4", "tpu:2x2", "v5e:0x2"):
    with pytest.raises(ValueError):
      tpu_chips.parse_topology(bad)


def test_loop_trip_counts_scale_flops_and_collectives():
  """XLA counts a while loop's body once; hlo_stats scales it by the loop's trip count."""
  hlo = """HloModule m, entry_computation_layout={()->f32[8,8]}

%slice (a: f32[12,8,8], b: s32[]) -> f32[1,8,8] {
  %a = f32[12,8,8]{2,1,0} parameter(0)
  %b = s32[] parameter(1)
  %zero = s32[] constant(0)
  ROOT %ds = f32[1,8,8]{2,1,0} dynamic-slice(%a, %b, %zero, %zero), dynamic_slice_sizes={1,8,8}
}

%body (p: (s32[], f32[8,8], f32[12,8,8])) -> (s32[], f32[8,8], f32[12,8,8]) {
  %p = (s32[], f32[8,8]{1,0}, f32[12,8,8]{2,1,0}) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %x = f32[8,8]{1,0} get-tuple-element(%p), index=1
  %stack = f32[12,8,8]{2,1,0} get-tuple-element(%p), index=2
  %w = f32[1,8,8]{2,1,0} fusion(%stack, %i), kind=kLoop, calls=%slice
  %wb = f32[8,8]{1,0} bitcast(%w)
  %ag = f32[8,8]{1,0} all-gather(%x), dimensions={0}
  %d = f32[8,8]{1,0} dot(%ag, %wb), lhs_contracting_dims={1}, rhs_contracting_dims={0}
  %x2 = f32[2,8,8]{2,1,0} broadcast(%x), dimensions={1,2}
  %bd = f32[2,8,8]{2,1,0} convolution(%x2, %x2), dim_labels=0bf_0io->0bf, window={size=2}
  ROOT %t = (s32[], f32[8,8]{1,0}, f32[12,8,8]{2,1,0}) tuple(%i, %d, %stack)
}

%cond (q: (s32[], f32[8,8], f32[12,8,8])) -> pred[] {
  %q = (s32[], f32[8,8]{1,0}, f32[12,8,8]{2,1,0}) parameter(0)
  %n = s32[] constant(12)
  %j = s32[] get-tuple-element(%q), index=0
  ROOT %lt = pred[] compare(%j, %n), direction=LT
}

ENTRY %main () -> f32[8,8] {
  %z = f32[8,8]{1,0} constant({...})
  %s = f32[12,8,8]{2,1,0} constant({...})
  %c = s32[] constant(0)
  %init = (s32[], f32[8,8]{1,0}, f32[12,8,8]{2,1,0}) tuple(%c, %z, %s)
  %w = (s32[], f32[8,8]{1,0}, f32[12,8,8]{2,1,0}) while(%init), condition=%cond, body=%body
  ROOT %r = f32[8,8]{1,0} get-tuple-element(%w), index=1
}
"""
  stats = hlo_stats.analyse(hlo)
  assert stats["collective_bytes"]["all-gather"] == 12 * 8 * 8 * 4
  # The dot (8 x 8 x 8 multiply-adds) and the batched matmul written as a convolution whose window spans
  # its batch dimension (2 x 8 x 8 x 8), 11 more times than XLA counts them.
  assert stats["extra_flops"] == 11 * 2 * (8 * 8 * 8 + 2 * 8 * 8 * 8)
  # The fusion reads one [8, 8] slice of the [12, 8, 8] stack per trip (and the counter), not the whole stack.
  comps, _ = hlo_stats.parse_module(hlo)
  fusion = next(i for i in comps["body"][0] if i.opcode == "fusion")
  assert hlo_stats._moved_bytes(fusion, comps["body"][1], comps) == 8 * 8 * 4 + 4 + 8 * 8 * 4
  assert stats["extra_bytes"] > 0
  assert not stats["unknown_loops"]


@pytest.mark.parametrize("start,step,limit", [(0, 1, 7), (3, 2, 11), (0, 2, 4), (5, 3, 12)])
def test_loop_trips_come_from_the_counter_not_only_the_limit(start, step, limit):
  """A loop counting start, start + step, ... below limit runs len(range(start, limit, step)) times:
  the CPU backend states that count (known_trip_count); without it (TPU HLO: XLA's windowed einsums
  count 0, 2, 4, ...) hlo_stats reads start, step and limit off the loop, not just the limit."""
  w = jnp.ones((16, 16))

  def loop(x):
    def body(carry):
      i, y = carry
      return i + step, jnp.tanh(y @ w)
    return jax.lax.while_loop(lambda carry: carry[0] < limit, body, (start, x))[1]

  hlo = jax.jit(loop).lower(jnp.ones((16, 16))).compile().as_text()
  unstated = re.sub(r', backend_config=\{"dynamic_variables".*', "", hlo)
  assert "known_trip_count" in hlo and "known_trip_count" not in unstated
  trips = len(range(start, limit, step))
  for text in (hlo, unstated):
    assert hlo_stats.analyse(text)["extra_flops"] == (trips - 1) * 2 * 16**3


def test_async_pairs_and_nested_loops_move_their_data_once():
  """An async copy or slice (TPU HLO: X-start returns (source, result, context), X-done the result)
  moves its result once, read and written, not the whole source buffer twice; a while inside a
  loop moves nothing itself (its body is counted on its own)."""
  hlo = """HloModule m, entry_computation_layout={()->f32[8,8]}

%inner_body (a: (s32[], f32[8,8])) -> (s32[], f32[8,8]) {
  %a = (s32[], f32[8,8]{1,0}) parameter(0)
  %k = s32[] get-tuple-element(%a), index=0
  %y = f32[8,8]{1,0} get-tuple-element(%a), index=1
  %one = s32[] constant(1)
  %k1 = s32[] add(%k, %one)
  ROOT %r = (s32[], f32[8,8]{1,0}) tuple(%k1, %y)
}

%inner_cond (b: (s32[], f32[8,8])) -> pred[] {
  %b = (s32[], f32[8,8]{1,0}) parameter(0)
  %kk = s32[] get-tuple-element(%b), index=0
  %three = s32[] constant(3)
  ROOT %c = pred[] compare(%kk, %three), direction=LT
}

%body (p: (s32[], f32[64,8])) -> (s32[], f32[64,8]) {
  %p = (s32[], f32[64,8]{1,0}) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %big = f32[64,8]{1,0} get-tuple-element(%p), index=1
  %ss = ((f32[64,8]{1,0}), f32[8,8]{1,0}, s32[]) slice-start(%big), slice={[0:8], [0:8]}
  %sd = f32[8,8]{1,0} slice-done(%ss)
  %cs = (f32[8,8]{1,0}, f32[8,8]{1,0}, u32[]) copy-start(%sd)
  %cd = f32[8,8]{1,0} copy-done(%cs)
  %zero = s32[] constant(0)
  %init = (s32[], f32[8,8]{1,0}) tuple(%zero, %cd)
  %w = (s32[], f32[8,8]{1,0}) while(%init), condition=%inner_cond, body=%inner_body
  %two = s32[] constant(2)
  %i2 = s32[] add(%i, %two)
  ROOT %t = (s32[], f32[64,8]{1,0}) tuple(%i2, %big)
}

%cond (q: (s32[], f32[64,8])) -> pred[] {
  %q = (s32[], f32[64,8]{1,0}) parameter(0)
  %n = s32[] constant(12)
  %j = s32[] get-tuple-element(%q), index=0
  ROOT %lt = pred[] compare(%j, %n), direction=LT
}

ENTRY %main () -> f32[64,8] {
  %s = f32[64,8]{1,0} constant({...})
  %c = s32[] constant(0)
  %init = (s32[], f32[64,8]{1,0}) tuple(%c, %s)
  %w = (s32[], f32[64,8]{1,0}) while(%init), condition=%cond, body=%body
  ROOT %r = f32[64,8]{1,0} get-tuple-element(%w), index=1
}
"""
  # The outer loop counts 0, 2, ..., 10: 6 trips (its condition runs 7 times); the inner loop 3 trips
  # per outer trip (18 in all; its condition 24 times). XLA counts each once, so the extra bytes are
  # (runs - 1) x the bytes of: per outer trip, the slice and the copy each reading and writing one
  # 8 x 8 tile and the counter's add (two s32 read, one written); the inner add; the compares (two
  # s32 read, one pred written). The inner while and the -done halves add nothing.
  tile, add, compare = 8 * 8 * 4, 3 * 4, 2 * 4 + 1
  expected = 5 * (2 * (2 * tile) + add) + 17 * add + 23 * compare + 6 * compare
  assert hlo_stats.analyse(hlo)["extra_bytes"] == expected


def test_a_collective_split_over_fusions_counts_once():
  """The TPU compiler can split one all-gather over an async collective fusion's start, the compute
  fusions that carry it on and its done, each holding the op under the same channel_id: one
  gather of the weight, however many pieces; two gathers with their own channels count twice."""
  pieces = "\n".join(f"""
%piece{k} (w{k}: bf16[2,8]) -> bf16[16,8] {{
  %w{k} = bf16[2,8]{{1,0}} parameter(0)
  ROOT %ag{k} = bf16[16,8]{{1,0}} all-gather(%w{k}), channel_id=7, replica_groups={{}}, dimensions={{0}}
}}""" for k in range(3))
  hlo = f"""HloModule m, entry_computation_layout={{()->bf16[16,8]}}
{pieces}

ENTRY %main () -> bf16[16,8] {{
  %w = bf16[2,8]{{1,0}} constant({{...}})
  %start = bf16[16,8]{{1,0}} fusion(%w), kind=kCustom, calls=%piece0
  %carry = bf16[16,8]{{1,0}} fusion(%w), kind=kCustom, calls=%piece1
  %done = bf16[16,8]{{1,0}} fusion(%w), kind=kCustom, calls=%piece2
  %a = bf16[16,8]{{1,0}} all-gather(%w), channel_id=8, replica_groups={{}}, dimensions={{0}}
  ROOT %b = bf16[16,8]{{1,0}} all-gather(%w), channel_id=9, replica_groups={{}}, dimensions={{0}}
}}
"""
  assert hlo_stats.analyse(hlo)["collective_bytes"]["all-gather"] == 3 * 16 * 8 * 2


def test_fit_batch_solves_the_affine_memory_line(monkeypatch, tmp_path):
  """fit_batch on a stand-in compiler whose per-chip memory is exactly a + b * per-chip batch: the
  answer is the largest batch under HBM, from the two fit points and one check; a known point is
  not compiled again; a point over HBM still counts through XLA's "required" bytes; with a cache
  directory, every compile (a refusal too) is kept and the same fit again compiles nothing."""
  topology = tpu_chips.parse_topology(TOPOLOGY)
  hbm, chips = topology.chip.hbm_bytes, topology.chips
  fixed, per_example = 2.0 * 2**30, 0.5 * 2**30  # largest per-chip batch: (hbm - fixed) // per_example
  compiled, xla_limit = [], [hbm]

  def fake_compile(config, topology, *, batch_size, **kw):
    per_chip = batch_size // chips
    compiled.append(per_chip)
    temps = per_example * per_chip
    if fixed + temps > xla_limit[0]:
      raise aot.DoesNotFit(f"RESOURCE_EXHAUSTED: memory required for HLO temporaries ({temps / 2**30:.4f}G) "
                           "exceeds available HBM")
    return {"per_chip_bytes": {"arguments": fixed, "outputs": 0, "temps": temps, "total": fixed + temps}}, None

  monkeypatch.setattr(aot, "compile_for", fake_compile)
  config = shapes.get_config("prior,tiny")
  config.mesh.update(data=-1, fsdp=1)
  want = int((hbm - fixed) // per_example)

  fit = aot.fit_batch(config, topology, ["4", "8"])
  assert compiled == [4, 8, want] and fit["verified"] and fit["per_chip_batch"] == want
  assert fit["batch_size"] == want * chips and fit["report"]["per_chip_bytes"]["total"] <= hbm
  assert fit["bytes_fixed"] == pytest.approx(fixed) and fit["bytes_per_example"] == pytest.approx(per_example)
  assert fit["predicted_batch_size"] == want * chips  # the line's own answer, before the check

  compiled.clear()  # max_checks=0 (--fit_checks 0): the two points only; the line's answer is reported
  fit = aot.fit_batch(config, topology, ["4", "8"], max_checks=0)
  assert compiled == [4, 8] and fit["checks"] == [] and fit["per_chip_batch"] == 8
  assert fit["predicted_batch_size"] == want * chips

  compiled.clear()  # the config's own batch (8 per chip) was compiled already
  known = {8 * chips: {"arguments": fixed, "outputs": 0, "temps": 8 * per_example, "total": fixed + 8 * per_example}}
  assert aot.fit_batch(config, topology, ["4", "8"], known=known)["per_chip_batch"] == want
  assert compiled == [4, want]

  compiled.clear()  # the second point is over HBM: its required bytes still place it on the line
  fit = aot.fit_batch(config, topology, ["4", str(2 * want)])
  assert fit["per_chip_batch"] == want and compiled == [4, 2 * want, want]

  # XLA refuses below the table's HBM (its usable HBM differs): the refusal is bisected against the
  # largest batch that fit, and a refused batch is never the answer.
  compiled.clear()
  xla_limit[0] = fixed + (want - 3) * per_example
  fit = aot.fit_batch(config, topology, ["4", "8"])
  assert compiled[:3] == [4, 8, want] and len(compiled) == 5
  assert fit["verified"] and 8 < fit["per_chip_batch"] <= want - 3, (fit, compiled)

  compiled.clear()
  xla_limit[0] = hbm
  first = aot.fit_batch(config, topology, ["4", str(2 * want)], cache_dir=str(tmp_path))
  assert first["per_chip_batch"] == want and len(os.listdir(tmp_path)) == len(compiled) == 3
  compiled.clear()
  assert aot.fit_batch(config, topology, ["4", str(2 * want)], cache_dir=str(tmp_path)) == first
  assert compiled == []
  config.model.width *= 2  # another program: compiled again
  aot.fit_batch(config, topology, ["4", "8"], cache_dir=str(tmp_path))
  assert compiled[:2] == [4, 8]


def test_the_kept_paper_compiles_still_match_the_configs():
  """benchmarks/results/tpu_sizing/compiles holds paper-size TPU compiles of 30-55 CPU-minutes each
  (docs/scaling.md's numbers). Each entry's key must still be the key of today's configs/paper.py at its
  settings: a config change that alters the program makes them stale (rerun benchmarks/tpu_sizing.py);
  a new host-only key (aot.HOST_ONLY_KEYS) must not."""
  entries = sorted(glob.glob(os.path.join(ROOT, "benchmarks", "results", "tpu_sizing", "compiles", "*.json")))
  assert entries
  for path in entries:
    with open(path) as f:
      inputs = json.load(f)["inputs"]
    stage = inputs["config"]["stage"]
    # A decoder compiled without a text encoder is configs/paper.py's CLIP-token decoder (2.25B).
    glide_off = stage == "decoder" and not inputs["config"]["model"].get("text_encoder")
    config = paper.get_config(f"{stage},text_encoder=false" if glide_off else stage)
    config.model.remat = inputs["config"]["model"]["remat"]
    config.mesh.update(inputs["config"]["mesh"])  # (benchmarks/tpu_sizing.py picks data x fsdp per case)
    mine = aot.compile_inputs(config, inputs["topology"], batch_size=inputs["config"]["batch_size"],
                              sample=inputs["sample"], clip=aot.ClipShapes(*inputs["clip"]),
                              replicate_params=inputs["replicate_params"])
    if mine["libtpu"] != inputs["libtpu"] or mine["jax"] != inputs["jax"]:
      pytest.skip("another jax or libtpu than the kept compiles' (their keys include the versions)")
    assert mine == inputs, os.path.basename(path)
    assert aot.compile_key(mine) == os.path.basename(path)[:-len(".json")]
