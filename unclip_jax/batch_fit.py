"""The largest batch that fits a chip's memory, from as few compiles as possible.

Per-chip memory is affine in the per-chip batch (params and optimizer state fixed, activations
proportional), so two compiles place the line memory = a + b * batch and a third checks where it
crosses the chip's HBM. What compiles is passed in (`compile_at`), so the search is a pure function
of the compiler's answers; unclip_jax.aot wires it to real TPU compiles (`--fit_batch`).
"""

import re
from collections.abc import Callable


class DoesNotFit(RuntimeError):
  """XLA refused to compile: the program needs more HBM than the chip has."""


def required_bytes(error: DoesNotFit, fixed: float) -> float | None:
  """XLA's "memory required for HLO temporaries (12.3G)" (GiB) plus the non-temporary bytes."""
  m = re.search(r"required for HLO temporaries \(([\d.]+)([KMGT])\)", str(error))
  return float(m.group(1)) * 2 ** (10 * "KMGT".index(m.group(2)) + 10) + fixed if m else None


def largest_batch(compile_at: Callable[[int], dict], per_chip: list[int], *, divisor: int, hbm: float,
                  unit: int = 1, max_checks: int = 3, known: dict | None = None) -> dict:
  """Fits the line through two per-chip batches and checks its answer by compiling there.

  compile_at(global batch) -> report (with per_chip_bytes), raising DoesNotFit when XLA refuses;
  divisor: global batch per per-chip batch (the batch-sharding devices); unit: per-chip batches are
  multiples of it (gradient accumulation); known: {global batch: per_chip_bytes} compiled already.
  Padding makes small batches cost more than the line says, so a check that misses refits through
  its own point (a secant step); a batch XLA refuses although the table's HBM holds its bytes (XLA's
  usable HBM differs) is bisected against the largest that fit. At most max_checks checks.
  """
  if len(per_chip) != 2 or not 0 < per_chip[0] < per_chip[1] or any(p % unit for p in per_chip):
    raise ValueError(f"--fit_points takes two increasing per-chip batch sizes, multiples of {unit}, got {per_chip}.")
  # fitting: the largest per-chip batch that compiled within HBM; refused: the smallest XLA refused;
  # bisect: XLA refused a batch whose bytes the table's HBM holds, so the line cannot place it.
  measured, fixed, fitting, refused, bisect = [], None, 0, None, False
  for b in per_chip:
    try:
      pc = (known or {}).get(b * divisor) or compile_at(b * divisor)["per_chip_bytes"]
    except DoesNotFit as e:  # XLA says how much it needed: still a point on the line
      required = None if fixed is None else required_bytes(e, fixed)
      if required is None:
        raise
      measured.append((b, max(required, hbm + 1)))
      refused, bisect = b, required <= hbm
      continue
    measured.append((b, pc["total"]))
    fixed = pc["total"] - pc["temps"]
    fitting = b if pc["total"] <= hbm else fitting
  (x0, y0), (x1, y1) = measured
  slope = (y1 - y0) / (x1 - x0)
  # The line's own answer, before any check: what two compiles say (checks may move it).
  predicted = int((hbm - (y1 - slope * x1)) // slope) // unit * unit if slope > 0 else None
  out = {"per_chip_batches": per_chip, "per_chip_totals": [y0, y1], "bytes_fixed": y0 - slope * x0,
         "bytes_per_example": slope, "checks": [], "per_chip_batch": fitting, "batch_size": fitting * divisor,
         "verified": fitting > 0, "predicted_batch_size": None if predicted is None else predicted * divisor}
  for _ in range(max_checks):
    (x0, y0), (x1, y1) = measured[-2:]
    slope = (y1 - y0) / (x1 - x0)
    if bisect:
      guess = (fitting + refused) // 2
    elif slope > 0:
      guess = int((hbm - (y1 - slope * x1)) // slope)
    else:
      break
    guess = min(guess, refused - 1) if refused is not None else guess
    guess -= guess % unit
    if guess <= fitting or guess in (x0, x1):
      break
    try:
      checked = compile_at(guess * divisor)
      total = checked["per_chip_bytes"]["total"]
    except DoesNotFit as e:  # XLA's own limit decides; its count may land under the table's HBM
      checked, total = None, required_bytes(e, fixed)
      bisect = total is None or total <= hbm
      total = None if bisect else total
    out["checks"].append([guess, total])
    if checked is not None and total <= hbm:
      fitting = guess
      out.update(per_chip_batch=guess, batch_size=guess * divisor, verified=True, report=checked)
      if total > 0.95 * hbm:
        break
    else:
      refused = guess if refused is None else min(refused, guess)
    if total is not None:
      measured.append((guess, total))
  return out
