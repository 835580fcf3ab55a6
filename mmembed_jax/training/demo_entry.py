"""The package's one door into `mmembed_jax.demo`, opened only when a config asks for the demo:
`sources="demo"` (the synthetic data, its held-out split and the demo tokenizer), a demo input
(`synthetic_tokens`) or a demo architecture (`tiny_*`, `small_*`). Deleting `demo/` loses the
demo and nothing else: every other path in models/, objectives/, parallel/ and training/ works
without it.
"""
import types


def demo() -> types.ModuleType:
  """The `mmembed_jax.demo` package (imported on first use)."""
  import mmembed_jax.demo  # pylint: disable=g-import-not-at-top
  return mmembed_jax.demo
