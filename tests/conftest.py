"""Test setup: 8 fake CPU devices and XLA's quick CPU compiles (set before jax is imported).

`--xla_backend_optimization_level=0` skips LLVM's optimisations of the CPU code XLA generates: on
the CPU most of the suite's time is compiling, and no test checks how fast the generated code runs
(the results are the same programs'; compiles for TPU topologies, tests/test_aot.py, ignore it).
Subprocesses that set XLA_FLAGS themselves pass it on too.
"""

import collections
import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import pytest  # noqa: E402


def pytest_configure(config):
  if hasattr(config.option, "loadscopereorder"):  # pytest-xdist's (--no-loadscope-reorder)
    config.option.loadscopereorder = False  # hand files out in the order below, not by their test counts


def pytest_collection_modifyitems(config, items):
  """Files with the most slow-marked tests first (the order within a file kept). CI hands whole files
  to its two workers (`-n 2 --dist loadfile`) in this order (pytest_configure); a long file handed out
  last keeps one worker busy while the other has finished."""
  slow = collections.Counter(item.path for item in items if item.get_closest_marker("slow"))
  items.sort(key=lambda item: -slow[item.path])


@pytest.fixture(scope="session")
def shapes_clip_dir(tmp_path_factory):
  """A randomly initialised tiny CLIP with the Shapes vocabulary, as a Hugging Face folder."""
  import jax

  from configs import shapes
  from unclip_jax.stages import clip as clip_stage

  workdir = tmp_path_factory.mktemp("shapes_clip")
  config = shapes.get_config("clip,tiny")
  # Untrained, Flax's small init (std 0.01) keeps its embeddings near zero; with PyTorch's init the
  # random prior/decoder stacks built on it amplify batch-size rounding past test_pipeline's tolerances.
  config.model.init = "flax"
  stage = clip_stage.ClipStage(config, str(workdir))
  stage.export(stage.init_params(jax.random.key(0)), str(workdir / "export"))
  return str(workdir / "export")


@pytest.fixture(scope="session")
def stack_dir(tmp_path_factory, shapes_clip_dir):
  """The tiny random stack as an inference checkpoint (tests/tiny_stack.py)."""
  import tiny_stack

  return tiny_stack.build_stack(tmp_path_factory.mktemp("stack"), shapes_clip_dir)


@pytest.fixture(scope="session")
def pipe(stack_dir):
  """The tiny stack loaded: one per test process, so its compiled loops serve every test that samples."""
  from unclip_jax import pipeline

  return pipeline.Pipeline.load(stack_dir)


@pytest.fixture(scope="session", autouse=True)
def compilation_cache(tmp_path_factory):
  """A persistent compilation cache, fresh for each test session (under pytest's temp dir) and shared
  with the subprocesses the tests start: a program compiled twice in the session compiles once."""
  import jax

  path = str(tmp_path_factory.mktemp("jax_compilation_cache"))
  jax.config.update("jax_compilation_cache_dir", path)
  os.environ["JAX_COMPILATION_CACHE_DIR"] = path
  yield path


@pytest.fixture
def fixed_unclip_noise(monkeypatch):
  """UnCLIPScheduler.step takes its noise from a unclip_oracle.FixedNoise generator."""
  import unclip_oracle
  unclip_oracle.patch_noise(monkeypatch)
