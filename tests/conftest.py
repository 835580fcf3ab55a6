"""Shared test setup: 8 fake CPU devices (set before jax is imported) and tiny local HF models.

The tiny models are transformers' own Qwen2-VL / Qwen2.5-VL classes with random weights,
norms and biases (so a swapped or missing scale/bias shows), saved as sharded safetensors
next to a tokenizer trained on the spot. Nothing is downloaded.
"""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # pylint: disable=g-import-not-at-top,wrong-import-position

import torchvision_compat  # noqa: E402  pylint: disable=wrong-import-position

torchvision_compat.install()  # before transformers imports torchvision (video oracle)

from session_dirs import session_root  # noqa: E402  pylint: disable=wrong-import-position
from tiny_models import FAMILIES, build_tiny_hf_model  # noqa: E402  pylint: disable=wrong-import-position

import jax  # noqa: E402,F401  pylint: disable=wrong-import-position,unused-import  # before the cache below


TESTS = os.path.dirname(os.path.abspath(__file__))
# The files that run recipes in subprocesses for a minute or more, costliest first: they start
# first, so that pytest-xdist's two workers end together on the short tests.
FIRST = ("recipes/test_contrastive_demos.py", "evaluation/test_round_trip.py",
         "training/test_multihost.py", "recipes/test_fault_injection.py",
         "training/test_adapter_runs.py", "recipes/test_coma_demo.py",
         "training/test_checkpoint_resume.py", "recipes/test_moca_demo.py",
         "convert/test_profiles.py", "convert/test_torch_embed.py")


def pytest_configure(config):
  """Keeps the order below under `--dist loadfile` (xdist would sort files by test count)."""
  config.option.loadscopereorder = False


def pytest_collection_modifyitems(items):
  """Each file is one unit of work for `--dist loadfile`; FIRST go first."""
  def rank(item):
    file = os.path.relpath(str(item.path), TESTS)
    return FIRST.index(file) if file in FIRST else len(FIRST)
  items.sort(key=rank)


@pytest.fixture(scope="session", autouse=True)
def compilation_cache(tmp_path_factory):
  """One JAX compilation cache for every subprocess of the session, across workers (a rerun,
  resume or second recipe launch of a program compiles it once); this process imported jax
  before it was set."""
  # Cold in every session, unless MMEMBED_TEST_COMPILATION_CACHE names a directory to keep.
  path = os.environ.get("MMEMBED_TEST_COMPILATION_CACHE") or str(
      session_root(tmp_path_factory) / "jax_compilation_cache")
  os.makedirs(path, exist_ok=True)
  os.environ["JAX_COMPILATION_CACHE_DIR"] = path
  os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
  os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
  # A size bound turns on JAX's file lock, so concurrent processes never read a half-written entry.
  os.environ["JAX_COMPILATION_CACHE_MAX_SIZE"] = str(16 << 30)
  return path


@pytest.fixture(scope="session")
def demo_cache(tmp_path_factory):
  """One demo cache (MMEMBED_DEMO_CACHE: data and tokenizer, built by the first run that needs
  them) shared by the tests that run the demos in subprocesses."""
  return tmp_path_factory.mktemp("demo_cache")


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory):
  """The demo tokenizer (vocab <= 512), trained once per session."""
  from mmembed_jax.demo import tokenizer as tokenizer_lib
  return tokenizer_lib.build_tokenizer(str(tmp_path_factory.mktemp("tokenizer")), vocab_size=512)


@pytest.fixture(scope="session")
def tokenizer(tokenizer_dir):
  """The demo tokenizer loaded with transformers.AutoTokenizer."""
  import transformers
  return transformers.AutoTokenizer.from_pretrained(tokenizer_dir)


@pytest.fixture(scope="session")
def tiny_hf_dirs(tmp_path_factory, tokenizer_dir):
  """{family: directory} of the tiny transformers models, built once per session."""
  return {family: build_tiny_hf_model(str(tmp_path_factory.mktemp(family)), family, tokenizer_dir)
          for family in FAMILIES}


@pytest.fixture(scope="session")
def image_dir(tmp_path_factory):
  """PNG images of odd sizes and aspect ratios, with relative names for JSONL rows."""
  import numpy as np
  from PIL import Image
  root = tmp_path_factory.mktemp("images")
  rng = np.random.default_rng(0)
  for name, (height, width) in {"wide.png": (90, 230), "tall.png": (301, 97),
                                "square.png": (150, 150), "small.png": (33, 47)}.items():
    pixels = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(root / name)
  return str(root)


@pytest.fixture(scope="session")
def test_videos(tmp_path_factory):
  """[(path, frames, fps, height, width)] of five short libx264 clips made here (tiny_models)."""
  from tiny_models import write_test_videos
  return write_test_videos(str(tmp_path_factory.mktemp("videos")))


@pytest.fixture(scope="session")
def video_row_dir(tmp_path_factory, image_dir, test_videos):
  """One directory with the images, the clips and three frame images (links)."""
  import os  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top
  from tiny_models import video_frames  # pylint: disable=g-import-not-at-top
  root = tmp_path_factory.mktemp("video_rows")
  for name in os.listdir(image_dir):
    os.symlink(os.path.join(image_dir, name), root / name)
  for path, *_ in test_videos:
    os.symlink(path, root / os.path.basename(path))
  for k, frame in enumerate(video_frames(3, 70, 110, 9)):
    Image.fromarray(frame).save(root / f"f{k}.png")
  return str(root)
