"""Multi-process training for real: 2 processes x 4 CPU devices on localhost (jax.distributed, gloo).

One run is preempted (SIGTERM to both processes), then resumed as 2 processes on
another mesh and as 1 process x 8 devices; both must end where a single-process
8-device run of the same steps ends, and every host must have read only its own
rows of every global batch. Sample grids and the export are written by process 0.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
import multiprocess_toy
import numpy as np
import pytest

from unclip_jax import checkpoints

TESTS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TESTS)
SCRIPT = os.path.join(TESTS, "multiprocess_toy.py")
BATCH_SIZE, TOTAL_STEPS = 16, 8  # as in multiprocess_toy.py


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _launch(workdir, mesh: str, sleep: float = 0.0) -> list[subprocess.Popen]:
  """Two processes x 4 devices."""
  env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, TESTS]), JAX_PLATFORMS="cpu",  # conftest.py's compiles
             XLA_FLAGS="--xla_force_host_platform_device_count=4 --xla_backend_optimization_level=0")
  command = [sys.executable, SCRIPT, str(workdir), str(TOTAL_STEPS), "--mesh", mesh, "--sleep", str(sleep),
             f"--coordinator_address=127.0.0.1:{_free_port()}", "--num_processes=2"]
  return [subprocess.Popen(command + [f"--process_id={i}"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
          for i in range(2)]


def _finish(procs, timeout=300):
  for proc in procs:
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err.decode()[-3000:]
    assert b"finished" in out


def _checkpoint_steps(workdir) -> list[int]:
  folder = workdir / "checkpoints"
  return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit()) if folder.exists() else []


def _positions(workdir) -> dict[int, list[list[int]]]:
  """Per process: the global positions it read, one list per step."""
  out = {}
  for path in sorted(workdir.glob("positions.*.jsonl")):
    out[int(path.name.split(".")[1])] = [json.loads(line) for line in path.read_text().splitlines()]
  return out


def _assert_each_position_read_once(workdir):
  every = sorted(p for lines in _positions(workdir).values() for line in lines for p in line)
  assert every == list(range(TOTAL_STEPS * BATCH_SIZE))


@pytest.mark.slow
def test_two_processes_stop_resume_on_any_process_count_and_export(tmp_path):
  reference, run = tmp_path / "reference", tmp_path / "run"
  # Two processes x 4 devices; data split over the processes, FSDP within each.
  procs = _launch(run, "data=2,fsdp=4", sleep=0.4)
  deadline = time.time() + 240
  while time.time() < deadline and not [s for s in _checkpoint_steps(run) if s >= 2]:
    time.sleep(0.2)
  for proc in procs:
    proc.send_signal(signal.SIGTERM)
  _finish(procs)
  stopped = _checkpoint_steps(run)[-1]
  assert 2 <= stopped < TOTAL_STEPS, f"the run was not stopped mid-way (last checkpoint {stopped})"
  assert not (run / "export").exists()
  # Each host read only its own rows: 8 of the 16 of every global batch, the two hosts disjoint.
  hosts = _positions(run)
  assert sorted(hosts) == [0, 1] and len(hosts[0]) == len(hosts[1]) == stopped
  for step, (mine, theirs) in enumerate(zip(hosts[0], hosts[1])):
    assert len(mine) == len(theirs) == BATCH_SIZE // 2
    assert sorted(mine + theirs) == list(range(step * BATCH_SIZE, (step + 1) * BATCH_SIZE))

  # Resume as 2 processes with FSDP across them, and as 1 process x 8 devices; the uninterrupted
  # single-process reference runs alongside. The single-process runs are this process (8 devices,
  # conftest.py): the same training as multiprocess_toy.py's, without starting two more Pythons.
  as_two, as_one = tmp_path / "as_two", tmp_path / "as_one"
  shutil.copytree(run, as_two)
  shutil.copytree(run, as_one)
  resumed = _launch(as_two, "data=1,fsdp=8")
  assert jax.process_count() == 1 and jax.device_count() == 8
  multiprocess_toy.run(str(as_one), TOTAL_STEPS, "data=4,fsdp=2")
  multiprocess_toy.run(str(reference), TOTAL_STEPS, "data=2,fsdp=4")
  _finish(resumed)

  want = checkpoints.load_inference(str(reference / "export"))[0]
  for workdir in (as_two, as_one):
    _assert_each_position_read_once(workdir)
    got = checkpoints.load_inference(str(workdir / "export"))[0]
    assert (workdir / "samples" / f"step_{TOTAL_STEPS:08d}.png").exists()
    # Not bitwise: the gradient all-reduce sums per-device float32 parts in another order on another
    # mesh, and gloo's cross-process reduction orders them unlike XLA's in-process one. Reading any
    # wrong batch or step moves these parameters by ~1e-2.
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=2e-6), got, want)
