"""A tqdm bar driven from inside a compiled sampling loop by a host callback."""

import jax
import tqdm.auto


class StepProgress:
  """Host-side bar; lives as long as the compiled loop that calls it.

  Calls may repeat (one per device) or arrive out of order, so the bar only
  moves forward to the highest step seen, and a new bar starts on the next call
  after it completes.
  """

  def __init__(self, total: int, desc: str):
    self.total = total
    self.desc = desc
    self._bar = None

  def __call__(self, step):
    done = int(step) + 1
    if self._bar is None:
      self._bar = tqdm.auto.tqdm(total=self.total, desc=self.desc)
    if done > self._bar.n:
      self._bar.update(done - self._bar.n)
    if self._bar.n >= self.total:
      self._bar.close()
      self._bar = None


def report_step(step, total: int, desc: str | None):
  """Inside jit: advance a progress bar to `step` (0-based); no-op if desc is None."""
  if desc is not None:
    jax.debug.callback(StepProgress(total, desc), step)
