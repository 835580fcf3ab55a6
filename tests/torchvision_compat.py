"""torchvision for the video oracles, in the test process only.

transformers' `Qwen2VLVideoProcessor` and qwen-vl-utils (the tests' video oracles) import
torchvision, but only its Python transforms run. The PyPI wheel's C extension is built against
another torch and does not load next to the CPU torch wheel, and an installed torchvision that
cannot load breaks transformers for every process (it then fails to import the Qwen model
classes). So torchvision is not installed into the environment: `install()` (conftest.py, before
anything imports transformers) pip-installs the wheel without dependencies into a cache folder
once, puts that folder on this process's sys.path, and replaces `torchvision._meta_registrations`
(which registers fake kernels for the missing C++ ops, "operator torchvision::nms does not
exist") with an empty module. Subprocesses the tests start never see it.
"""
import importlib.util
import os
import shutil
import subprocess
import sys
import types

TORCHVISION = "torchvision==0.28.0"  # the release that goes with torch 2.13


def _cache_dir() -> str:
  """Where the wheel is unpacked: $MMEMBED_TEST_TORCHVISION, else under ~/.cache."""
  return os.environ.get("MMEMBED_TEST_TORCHVISION") or os.path.join(
      os.path.expanduser("~"), ".cache", "mmembed_jax", TORCHVISION.replace("==", "-"))


def install() -> None:
  """Makes torchvision importable in this process (see the module docstring)."""
  if "torchvision" in sys.modules:
    return
  if importlib.util.find_spec("torchvision") is None:  # the usual case: not installed
    target = _cache_dir()
    if not os.path.isdir(os.path.join(target, "torchvision")):
      staging = f"{target}.tmp-{os.getpid()}"
      subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps",
                      "--target", staging, TORCHVISION], check=True)
      os.makedirs(os.path.dirname(target), exist_ok=True)
      try:
        os.rename(staging, target)  # whole, or not at all (another session may have won)
      except OSError:
        shutil.rmtree(staging, ignore_errors=True)
    sys.path.insert(0, target)
  sys.modules.setdefault("torchvision._meta_registrations",
                         types.ModuleType("torchvision._meta_registrations"))
