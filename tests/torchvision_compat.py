"""Makes the PyPI torchvision wheel importable next to the CPU torch wheel (tests only).

The wheel's C extension is built against another torch and does not load; torchvision's
`_meta_registrations` then fails registering fake kernels for its C++ ops ("operator
torchvision::nms does not exist"). The tests use only torchvision's Python transforms (through
transformers' `Qwen2VLVideoProcessor` and qwen-vl-utils, the video oracles), so that module is
replaced by an empty one before torchvision is first imported. Nothing outside tests imports
torchvision.
"""
import importlib.util
import sys
import types


def install() -> None:
  """Stubs `torchvision._meta_registrations` if torchvision is installed and not yet imported."""
  if "torchvision" in sys.modules or importlib.util.find_spec("torchvision") is None:
    return
  sys.modules.setdefault("torchvision._meta_registrations",
                         types.ModuleType("torchvision._meta_registrations"))
