"""notebooks/unclip_colab.ipynb runs top to bottom on the CPU with its small settings.

The kernel inherits this process's environment with the settings below: 2 fake CPU devices
(the pipeline's batch split and the FSDP training run are sharded; fewer than conftest.py's 8,
which only cost compile time here), XLA's backend optimisation level 0 (the kernel's time goes
into compiling; nothing checked depends on how fast the generated code runs) and the notebook's
fast mode. It samples from the shipped demo (assets/shapes_demo; UNCLIP_DEMO_CHECKPOINT may point
elsewhere) and trains the tiny decoder for 3 steps.
"""

import os

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(ROOT, "notebooks", "unclip_colab.ipynb")
CHECKPOINT = os.path.abspath(os.environ.get("UNCLIP_DEMO_CHECKPOINT", os.path.join(ROOT, "assets", "shapes_demo")))


def test_committed_notebook_has_no_outputs():
  nb = nbformat.read(NOTEBOOK, as_version=4)
  nbformat.validate(nb)
  code = [c for c in nb.cells if c.cell_type == "code"]
  assert "parameters" in code[0].metadata.get("tags", [])
  assert all(not c.outputs and c.execution_count is None for c in code)


@pytest.mark.slow
def test_notebook_runs_top_to_bottom_on_cpu(tmp_path, monkeypatch):
  for name, value in {"UNCLIP_NOTEBOOK_FAST": "1", "UNCLIP_DEMO_CHECKPOINT": CHECKPOINT,
                      "UNCLIP_NOTEBOOK_WORKDIR": str(tmp_path / "runs"), "UNCLIP_COMPILATION_CACHE": "",
                      "UNCLIP_NOTEBOOK_KARLO": "0", "JAX_PLATFORMS": "cpu",
                      "XLA_FLAGS": "--xla_force_host_platform_device_count=2 "
                                   "--xla_backend_optimization_level=0"}.items():
    monkeypatch.setenv(name, value)
  nb = nbformat.read(NOTEBOOK, as_version=4)
  # From the notebook's own folder, as Jupyter opens it: the install cell finds the repository above.
  # startup_timeout: a busy CI machine starts kernels slowly.
  NotebookClient(nb, timeout=1800, startup_timeout=600, kernel_name="python3",
                 resources={"metadata": {"path": os.path.dirname(NOTEBOOK)}}).execute()

  outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
  assert not [o for o in outputs if o.output_type == "error"]
  pngs = [o for o in outputs if o.output_type in ("display_data", "execute_result") and "image/png" in o.data]
  assert len(pngs) >= 4  # samples, more seeds, the cascade, the training grid
  text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream" and o.name == "stdout")
  assert "skipping the install" in text
  assert "mesh: {'data': 2" in text
  assert "trained to step 3" in text
  assert "    3 " in text  # the loss table's last row
  assert "Karlo skipped" in text
