"""The package as a user without the optional parts meets it."""
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTICE = "PyTorch was not found"


def _import_without_torch(first: str) -> str:
  """stderr of importing `first`, then transformers, in a process where torch cannot be found."""
  code = f"import sys; sys.modules['torch'] = None; import {first}; import transformers"
  env = {k: v for k, v in os.environ.items() if k != "TRANSFORMERS_NO_ADVISORY_WARNINGS"}
  done = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True,
                        text=True, timeout=120, check=True)
  return done.stderr


def test_a_package_only_install_prints_no_pytorch_notice():
  """torch is optional (the `torch` extra): importing the package first silences transformers'
  advisory notice about it, which a plain `import transformers` prints."""
  assert NOTICE in _import_without_torch("json")  # the notice exists where torch is missing
  assert NOTICE not in _import_without_torch("mmembed_jax")
