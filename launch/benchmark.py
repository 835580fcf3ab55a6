r"""Train-step speed of a recipe on this machine, next to the same MoCa CPT step in PyTorch; or
video decoding speed.

  python launch/benchmark.py --config configs/moca.py [--config.model.preset=small_qwen2_5_vl]
      [--steps 10] [--warmup 2] [--torch] [--json FILE]
  python launch/benchmark.py --video_decode [--json FILE]

What is measured and how: mmembed_jax/training/benchmark.py, mmembed_jax/data/decode_benchmark.py.
"""
import json

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Recipe config file, e.g. configs/moca.py.",
                                          lock_config=True)
_STEPS = flags.DEFINE_integer("steps", 10, "Timed rounds; each runs a JAX step, a PyTorch step and "
                              "both matmul yardsticks in turn.")
_WARMUP = flags.DEFINE_integer("warmup", 2, "Untimed rounds first, the first step included "
                               "(compilation, allocator warm-up).")
_TORCH = flags.DEFINE_bool("torch", True, "Also time the PyTorch step (MoCa CPT recipes).")
_MATMUL = flags.DEFINE_integer("matmul_size", 2048, "Side of the square matmul used as yardstick.")
_JSON = flags.DEFINE_string("json", None, "Write the figures to this JSON file.")
_VIDEO = flags.DEFINE_bool("video_decode", False, "Time video decoding (sampled frames vs every "
                           "frame of a 30 s 480p clip) instead of a train step.")


def main(argv):
  """Runs the benchmark; prints a summary (and writes --json)."""
  del argv
  if _VIDEO.value:
    from mmembed_jax.data.decode_benchmark import decode_benchmark  # pylint: disable=g-import-not-at-top
    result, lines = decode_benchmark()
  elif _CONFIG.value is None:
    raise app.UsageError("--config is required (or --video_decode)")
  else:
    from mmembed_jax.training.benchmark import benchmark  # pylint: disable=g-import-not-at-top
    result, lines = benchmark(_CONFIG.value, _STEPS.value, _WARMUP.value, _TORCH.value,
                              _MATMUL.value)
  print("\n".join(lines))
  if _JSON.value:
    with open(_JSON.value, "w") as f:
      json.dump(result, f, indent=2)
  return 0


if __name__ == "__main__":
  app.run(main)
