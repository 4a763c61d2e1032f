"""Counting what a compiled step does: collectives, loop-aware FLOPs and bytes from the
compiled HLO text, and the model's matmul FLOPs from its jaxpr.

XLA's cost analysis counts a while loop's body once, whatever its trip count,
so a model whose layers run under nn.scan (or a sampler's loop over steps)
looks a layer's (a step's) worth cheap. The walker here finds each loop's
trip count and scales what happens inside by it.
"""

import collections
import math
import re

import jax
import jax.extend.core as jex

COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")

_DTYPE_BYTES = {"pred": 1, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2,
                "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16}
_ARRAY = re.compile(r"\b(pred|[suf]\d+|bf16|c64|c128|f8e\w+)\[([\d,]*)\]")
# "%name = SHAPE opcode(operands), attributes"; SHAPE may be a tuple, and TPU layouts hold parentheses
# (":T(8,128)(2,1)") but never a space before them, so the opcode is the first " word(".
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+) = (.*?) ([a-z][\w\-]*)\((.*)$")
_HEADER = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+) \((.*)\) -> .* \{\s*$")
_PARAM = re.compile(r"([\w.\-]+): ((?:\([^)]*\))|[^,]+)")


def arrays(shape: str) -> list[tuple[str, tuple[int, ...]]]:
  """(dtype, dims) of every array in an HLO shape string (a tuple's elements in order)."""
  return [(d, tuple(int(x) for x in dims.split(",") if x)) for d, dims in _ARRAY.findall(shape)]


def async_results(shape: str) -> list[tuple[str, tuple[int, ...]]]:
  """The arrays an async X-start produces: its shape is (operands, results[, contexts]), the results
  the second half of the data arrays (contexts are scalars)."""
  data = [(d, dims) for d, dims in arrays(shape) if dims]
  return data[len(data) // 2:]


def shape_bytes(shape: str) -> float:
  return sum(_DTYPE_BYTES.get(d, 1) * math.prod(dims) for d, dims in arrays(shape))


class _Instr:
  __slots__ = ("name", "opcode", "rest", "shape")

  def __init__(self, name, shape, opcode, rest):
    self.name, self.shape, self.opcode, self.rest = name, shape, opcode, rest

  def operands(self) -> list[str]:
    head = self.rest.split("), ")[0] if "), " in self.rest else self.rest.rstrip(")")
    return re.findall(r"%([\w.\-]+)", head)

  def attr(self, key: str) -> str | None:
    m = re.search(rf"\b{key}=(%?[\w.\-]+|\{{[^}}]*\}})", self.rest)
    return m.group(1).lstrip("%") if m else None


def parse_module(text: str) -> tuple[dict, str]:
  """{computation: (instructions, {value name: shape})} and the entry computation's name. Each
  computation's ROOT instruction is the last of its list."""
  comps, entry, current, root = {}, None, None, None
  for line in text.splitlines():
    header = _HEADER.match(line)
    if header:
      current = header.group(2)
      if header.group(1):
        entry = current
      comps[current] = ([], {n: s for n, s in _PARAM.findall(header.group(3))})
      continue
    if current is None:
      continue
    if line.startswith("}"):
      if root is not None:
        comps[current][0].remove(root)
        comps[current][0].append(root)
      current = root = None
      continue
    m = _INSTR.match(line)
    if m:
      instr = _Instr(*m.groups())
      comps[current][0].append(instr)
      comps[current][1][instr.name] = instr.shape
      if line.lstrip().startswith("ROOT "):
        root = instr
  return comps, entry


def _largest_constant(comps: dict, condition: str) -> int | None:
  """The largest integer scalar constant in a loop's condition (or what it calls): the trip count of
  a loop that counts 0, 1, 2, ... up to it, when the counter cannot be read off directly."""
  seen, todo, best = set(), [condition], None
  while todo:
    name = todo.pop()
    if name in seen or name not in comps:
      continue
    seen.add(name)
    for instr in comps[name][0]:
      value = _constant(instr)
      if value is not None:
        best = max(best or 0, value)
      todo += [c for c in (instr.attr("calls"), instr.attr("to_apply")) if c]
  return best


def _constant(instr: _Instr | None) -> int | None:
  if instr is None or instr.opcode != "constant" or not re.match(r"[su]\d+\[\]", instr.shape):
    return None
  value = re.match(r"\s*(-?\d+)\)", instr.rest)
  return int(value.group(1)) if value else None


def _tuple_index(instr: _Instr | None, defs: dict) -> int | None:
  """k if instr is element k of its computation's parameter tuple."""
  if instr is None or instr.opcode != "get-tuple-element":
    return None
  source = defs.get(instr.operands()[0])
  if source is None or source.opcode != "parameter":
    return None
  return int(instr.attr("index"))


def _unwrapped(instr: _Instr, comps: dict) -> tuple[_Instr, list[str]]:
  """(op, its operands' names where instr stands): a fusion that only wraps one op of its parameters
  (as the CPU backend wraps a loop's add and compare) gives that op; any other instruction itself."""
  if instr.opcode == "fusion" and instr.attr("calls") in comps and comps[instr.attr("calls")][0]:
    body = comps[instr.attr("calls")][0]
    position = {name: k for k, name in _param_names(body).items()}
    root = body[-1]
    if root.opcode != "parameter" and all(o in position for o in root.operands()):
      return root, [instr.operands()[position[o]] for o in root.operands()]
  return instr, instr.operands()


def _counted_trips(comps: dict, loop: _Instr, caller_defs: dict) -> int | None:
  """Trips of a loop whose condition compares a tuple element with a constant and whose body adds a
  constant to it: ceil((limit - start) / step). XLA's windowed einsums count 0, 2, 4, ... (two ring
  steps per trip), where the limit alone would double their count. XLA's own count where it states
  one (the CPU backend does: known_trip_count). None if the loop is not of that form."""
  known = re.search(r'"known_trip_count":\{"n":"(\d+)"\}', loop.rest)
  if known:
    return int(known.group(1))
  cond, body = comps.get(loop.attr("condition")), comps.get(loop.attr("body"))
  if not cond or not body or not cond[0] or not body[0]:
    return None
  cond_defs = {i.name: i for i in cond[0]}
  root, root_operands = _unwrapped(cond[0][-1], comps)
  if root.opcode != "compare" or len(root_operands) != 2:
    return None
  direction = root.attr("direction")
  lhs, rhs = (cond_defs.get(o) for o in root_operands)
  if _tuple_index(rhs, cond_defs) is not None and _constant(lhs) is not None:  # limit > counter
    lhs, rhs = rhs, lhs
    direction = {"GT": "LT", "GE": "LE"}.get(direction)
  k, limit = _tuple_index(lhs, cond_defs), _constant(rhs)
  if k is None or limit is None or direction not in ("LT", "LE"):
    return None
  body_defs = {i.name: i for i in body[0]}
  out = body[0][-1]
  if out.opcode != "tuple" or k >= len(out.operands()):
    return None
  if out.operands()[k] not in body_defs:
    return None
  update, update_operands = _unwrapped(body_defs[out.operands()[k]], comps)
  if update.opcode != "add":
    return None
  terms = [body_defs.get(o) for o in update_operands]
  counter = [t for t in terms if _tuple_index(t, body_defs) == k]
  steps = [_constant(t) for t in terms if _tuple_index(t, body_defs) != k]
  if len(counter) != 1 or len(steps) != 1 or not steps[0] or steps[0] < 0:
    return None
  init = caller_defs.get(loop.operands()[0]) if loop.operands() else None
  start = None
  if init is not None and init.opcode == "tuple" and k < len(init.operands()):
    first = caller_defs.get(init.operands()[k])
    while first is not None and first.opcode == "copy":
      first = caller_defs.get(first.operands()[0])
    start = _constant(first)
  span = limit - (start or 0) + (1 if direction == "LE" else 0)
  return max(0, -(-span // steps[0]))


def multipliers(comps: dict, entry: str) -> tuple[dict, set, list]:
  """How many times each computation runs per call of the entry; the computations that are
  fusion bodies (their instructions are not memory traffic); loops whose trip count is unknown."""
  mult, fused, unknown = {entry: 1}, set(), []
  todo = [entry]
  while todo:
    name = todo.pop()
    instrs = comps.get(name, ([], {}))[0]
    defs = {i.name: i for i in instrs} if any(i.opcode == "while" for i in instrs) else {}
    for instr in instrs:
      children = []
      if instr.opcode == "while":
        trips = _counted_trips(comps, instr, defs)
        if trips is None:
          trips = _largest_constant(comps, instr.attr("condition"))
        if trips is None:
          unknown.append(instr.name)
        children = [(instr.attr("body"), trips or 1), (instr.attr("condition"), (trips or 1) + 1)]
      else:
        for key in ("calls", "to_apply", "true_computation", "false_computation"):
          if instr.attr(key):
            children.append((instr.attr(key), 1))
            if instr.opcode == "fusion" and key == "calls":
              fused.add(instr.attr(key))
        branches = instr.attr("branch_computations")
        if branches:
          children += [(b.strip().lstrip("%"), 1) for b in branches.strip("{}").split(",")]
      for child, times in children:
        if child in comps and child not in mult:
          mult[child] = mult[name] * times
          todo.append(child)
  return mult, fused, unknown


def _dot_flops(instr: _Instr, symbols: dict) -> float:
  """2 x multiply-adds of a dot or convolution (TPU HLO writes matmuls as convolutions)."""
  out = arrays(instr.shape)
  if not out:
    return 0.0
  out_elems = math.prod(out[0][1])
  ops = [arrays(symbols.get(o, "")) for o in instr.operands()]
  if len(ops) < 2 or not ops[0] or not ops[1]:
    return 0.0
  lhs, rhs = ops[0][0][1], ops[1][0][1]
  if instr.opcode == "dot":
    contracting = instr.attr("lhs_contracting_dims") or "{}"
    dims = [int(d) for d in contracting.strip("{}").split(",") if d]
    return 2.0 * out_elems * math.prod(lhs[d] for d in dims)
  labels = re.search(r"dim_labels=(\w+)_(\w+)->(\w+)", instr.rest)
  if not labels:
    return 0.0
  _, rhs_labels, out_labels = labels.groups()
  out_shape = out[0][1]
  per_output = 1
  for size, label in zip(rhs, rhs_labels):
    if label == "i":
      per_output *= size
    elif label.isdigit():
      # A window as large as the output's side is a dot's batch dimension in disguise (the TPU writes batched
      # matmuls as convolutions padded so that each output sees one window position): no reduction.
      out_size = out_shape[out_labels.index(label)] if label in out_labels else 1
      per_output *= 1 if size == out_size and size > 1 else size
  return 2.0 * out_elems * per_output


_FREE = {"parameter", "get-tuple-element", "tuple", "constant", "bitcast", "after-all", "partition-id",
         "replica-id", "opt-barrier",
         # a loop, call or branch moves nothing itself: its computations are counted on their own
         "while", "call", "conditional"}


def _param_names(body: list) -> dict:
  names = {}
  for instr in body:
    if instr.opcode == "parameter":
      index = re.match(r"\s*(\d+)\)", instr.rest)
      if index:
        names[int(index.group(1))] = instr.name
  return names


def _sliced(comps: dict, name: str, value: str) -> float | None:
  """Bytes computation `name` touches of its value `value` if it only slices it (dynamic-slice reads,
  dynamic-update-slice writes in place, as scan bodies do to stacked layers, possibly inside nested
  fusions); None if it uses it whole."""
  instrs, symbols = comps[name]
  total, used = 0.0, False
  for instr in instrs:
    ops = instr.operands()
    if value not in ops:
      continue
    used = True
    if instr.opcode == "dynamic-slice" and ops[0] == value:
      total += shape_bytes(instr.shape)
    elif instr.opcode == "dynamic-update-slice" and ops[0] == value and value not in ops[1:]:
      total += shape_bytes(symbols.get(ops[1], ""))
    elif instr.opcode == "bitcast":  # the same bytes under another shape
      part = _sliced(comps, name, instr.name)
      if part is None:
        return None
      total += part
    elif instr.opcode == "fusion" and instr.attr("calls") in comps:
      inner = _param_names(comps[instr.attr("calls")][0])
      for k in (k for k, o in enumerate(ops) if o == value):
        part = _sliced(comps, instr.attr("calls"), inner[k]) if k in inner else None
        if part is None:
          return None
        total += part
    else:
      return None
  return total if used else None


def _moved_bytes(instr: _Instr, symbols: dict, comps: dict) -> float:
  """HBM bytes an unfused instruction reads and writes: its operands and result, except that slicing
  a big buffer (directly or inside a fusion) moves only the slice, as XLA's cost analysis counts it."""
  ops = instr.operands()
  if instr.opcode.endswith("-done"):  # an async pair's traffic is counted at its start
    return 0.0
  if instr.opcode.endswith("-start"):
    # A copy, slice or collective writes its results and reads as much (a gather reads less); its
    # whole tuple would count the source buffer too.
    return 2.0 * sum(_DTYPE_BYTES.get(d, 1) * math.prod(dims) for d, dims in async_results(instr.shape))
  if instr.opcode == "dynamic-slice":
    return 2 * shape_bytes(instr.shape)
  if instr.opcode == "dynamic-update-slice" and len(ops) > 1:
    return 2 * shape_bytes(symbols.get(ops[1], ""))
  out = shape_bytes(instr.shape)
  name = instr.attr("calls") if instr.opcode == "fusion" else None
  if name not in comps:
    return out + sum(shape_bytes(symbols.get(o, "")) for o in ops)
  body, inner = comps[name]
  params = _param_names(body)
  total = 0.0
  for k, operand in enumerate(ops):
    sliced = _sliced(comps, name, params[k]) if k in params else None
    total += shape_bytes(symbols.get(operand, "")) if sliced is None else sliced
  producers = {i.name: i for i in body}

  def written(value: str) -> float:  # an in-place update writes only its update
    p = producers.get(value)
    while p is not None and p.opcode == "bitcast":
      p = producers.get(p.operands()[0])
    if p is not None and p.opcode == "dynamic-update-slice":
      return shape_bytes(inner.get(p.operands()[1], ""))
    return shape_bytes(inner.get(value, ""))

  if body and body[-1].opcode == "tuple":
    out = sum(written(v) for v in body[-1].operands())
  elif body:
    out = written(body[-1].name)
  return total + out


def analyse(text: str) -> dict:
  """Loop-aware counts for one compiled (per-device) HLO module.

  collective_bytes: result bytes of each kind of collective, per device, times
    the trips of the loops around it;
  extra_flops, extra_bytes: what XLA's cost analysis leaves out by counting
    each loop body once: (trips - 1) x the body's dot/convolution FLOPs, and
    (trips - 1) x the bytes its unfused instructions read and write (slices of
    stacked buffers counted as the slice, see _moved_bytes);
  unknown_loops: loops whose trip count was not found (counted once).
  """
  comps, entry = parse_module(text)
  mult, fused, unknown = multipliers(comps, entry)
  collective = collections.Counter({kind: 0.0 for kind in COLLECTIVES})
  # The TPU compiler splits some collectives over several fusions (an async collective fusion: the
  # start, compute fusions that carry it on, the done), each holding a copy of the op under the same
  # channel_id: one collective, counted once.
  split_collectives = {}
  extra_flops = extra_bytes = 0.0
  for name, times in mult.items():
    instrs, symbols = comps[name]
    for instr in instrs:
      kind = instr.opcode.removesuffix("-start")
      if kind in COLLECTIVES and not instr.opcode.endswith("-done"):
        shapes = arrays(instr.shape)
        if instr.opcode.endswith("-start") and kind in ("all-gather", "collective-permute"):
          shapes = async_results(instr.shape)
        moved = times * sum(_DTYPE_BYTES.get(d, 1) * math.prod(s) for d, s in shapes)
        channel = instr.attr("channel_id")
        if name in fused and channel is not None:
          split_collectives[(kind, channel)] = max(split_collectives.get((kind, channel), 0.0), moved)
        else:
          collective[kind] += moved
      if times > 1:
        if instr.opcode in ("dot", "convolution"):
          extra_flops += (times - 1) * _dot_flops(instr, symbols)
        if name not in fused and instr.opcode not in _FREE:
          extra_bytes += (times - 1) * _moved_bytes(instr, symbols, comps)
  for (kind, _), moved in split_collectives.items():
    collective[kind] += moved
  return {"collective_bytes": dict(collective), "extra_flops": extra_flops, "extra_bytes": extra_bytes,
          "unknown_loops": unknown}


def matmul_flops(closed_jaxpr) -> float:
  """2 x multiply-adds of every dot_general and convolution in a jaxpr: scan bodies count
  their length times, a cond its costliest branch, a while loop's body once."""
  return _jaxpr_flops(closed_jaxpr.jaxpr if isinstance(closed_jaxpr, jex.ClosedJaxpr) else closed_jaxpr)


def _jaxpr_flops(jaxpr) -> float:
  total = 0.0
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name == "dot_general":
      (lhs_contract, _), _ = eqn.params["dimension_numbers"]
      lhs = eqn.invars[0].aval.shape
      total += 2.0 * math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs[d] for d in lhs_contract)
    elif name == "conv_general_dilated":
      rhs = eqn.invars[1].aval.shape
      rhs_spec = eqn.params["dimension_numbers"].rhs_spec  # (out features, in features, *window)
      per_output = math.prod(rhs[d] for d in rhs_spec[1:])
      total += 2.0 * math.prod(eqn.outvars[0].aval.shape) * per_output
    if name == "while":  # the body once: its trip count is not static here
      total += _jaxpr_flops(eqn.params["body_jaxpr"].jaxpr)
      continue
    subs = [j.jaxpr if isinstance(j, jex.ClosedJaxpr) else j for j in jex.jaxprs_in_params(eqn.params)]
    if not subs:
      continue
    counts = [_jaxpr_flops(j) for j in subs]
    if name == "cond":
      total += max(counts)
    elif name == "scan":
      total += eqn.params["length"] * sum(counts)
    else:
      total += sum(counts)
  return total


def forward_matmul_flops(fn, *args) -> float:
  """matmul_flops of fn traced on abstract args (jax.ShapeDtypeStruct); nothing is computed."""
  return matmul_flops(jax.make_jaxpr(fn)(*args))
