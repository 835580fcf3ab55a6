r"""Wall time and peak host memory of launch/export_to_pytorch.py on a random run of a real size.

  python launch/benchmark_export.py --preset qwen2_vl_2b [--workdir /tmp/bench_run] [--keep]

What is measured and how: mmembed_jax/training/export_benchmark.py.
"""
from absl import app
from absl import flags

_PRESET = flags.DEFINE_string("preset", "qwen2_vl_2b", "Model preset (mmembed_jax.models.presets).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory to build (default: a temporary "
                               "one); an existing build there is reused.")
_KEEP = flags.DEFINE_bool("keep", False, "Keep the run and the export afterwards.")
_DTYPE = flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float32"],
                           "Parameter dtype of the random run.")


def main(argv):
  """Runs the benchmark; returns the exit status."""
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  from mmembed_jax.training import export_benchmark  # pylint: disable=g-import-not-at-top
  return export_benchmark.run(_PRESET.value, _WORKDIR.value, _KEEP.value, _DTYPE.value)


if __name__ == "__main__":
  app.run(main)
