r"""Wall time and peak host memory of `import_hf` on a random ~1.2B-parameter Qwen2.5-VL checkpoint.

  python launch/benchmark_import.py [--out /tmp/bench_ckpt] [--keep]

What is measured and how: mmembed_jax/convert/import_benchmark.py.
"""
from absl import app
from absl import flags

_OUT = flags.DEFINE_string("out", None, "Directory for the random checkpoint (default: a new "
                           "temporary directory). An existing checkpoint there is reused.")
_KEEP = flags.DEFINE_bool("keep", False, "Keep the checkpoint after the benchmark (always kept "
                          "when --out names a directory that already held it).")
_TEXT_LAYERS = flags.DEFINE_integer("text_layers", 6, "Decoder layers (width 2048, MLP 11008).",
                                    lower_bound=1)
_VISION_DEPTH = flags.DEFINE_integer("vision_depth", 4, "Vision blocks (width 1280, MLP 3420, "
                                     "like Qwen2.5-VL's 32-block tower).", lower_bound=1)
_SHARD_GB = flags.DEFINE_float("shard_gb", 2.0, "Largest shard size in GB (1e9 bytes).")
_MODES = flags.DEFINE_list("modes", "bf16,fp32,bf16_put,fp32_put,bf16_drop,bf16_drop_scan",
                           "Settings to measure: bf16|fp32 (param_dtype), then optionally _put "
                           "(put=jax.device_put per tensor) or _drop (put keeps only the shape, "
                           "as if each parameter left the host for an accelerator), then "
                           "optionally _scan (scan_layers=True).")


def main(argv):
  """Runs the benchmark (prints its table)."""
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  from mmembed_jax.convert import import_benchmark  # pylint: disable=g-import-not-at-top
  import_benchmark.run(_OUT.value, _KEEP.value, _TEXT_LAYERS.value, _VISION_DEPTH.value,
                       _SHARD_GB.value, _MODES.value)
  return 0


if __name__ == "__main__":
  app.run(main)
