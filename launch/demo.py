r"""The demo, end to end on a laptop CPU: build a tiny random model and rows, embed them.

  python launch/demo.py [--out runs/demo] [--family qwen2_5_vl|qwen2_vl]

Writes OUT/model (an HF directory), OUT/data/rows.jsonl with its images, and OUT/embeddings.npy;
prints the shape, a cosine-similarity summary and timings. A finished build in OUT is reused.
"""
import sys

from absl import app
from absl import flags

from mmembed_jax.demo import build

_OUT = flags.DEFINE_string("out", "runs/demo", "Directory to build the demo into and write "
                           "embeddings.npy to.")
_FAMILY = flags.DEFINE_enum("family", "qwen2_5_vl", ["qwen2_5_vl", "qwen2_vl"],
                            "Architecture of the tiny random model.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the random weights.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", build.DEMO_BATCH_SIZE, "Rows per batch.",
                                   lower_bound=1)
_PROGRESS = flags.DEFINE_bool("progress", False, "Show a progress bar on stderr.")


def main(argv):
  """Runs the demo; returns the exit status."""
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  try:
    result = build.run_demo(_OUT.value, family=_FAMILY.value, seed=_SEED.value,
                            batch_size=_BATCH_SIZE.value, progress=_PROGRESS.value)
  except (ValueError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(f"model: {result['model']}\nrows: {result['rows']}")
  print(f"wrote {result['output']}: shape {result['shape']}")
  print("\n".join(result["summary"]))
  build_note = "reused" if result["reused_build"] else "built"
  print(f"time: {build_note} in {result['build_seconds']:.1f}s, model load "
        f"{result['load_seconds']:.1f}s, embed {result['embed_seconds']:.1f}s "
        f"({len(result['batch_shapes'])} batch shape(s)), total {result['total_seconds']:.1f}s")
  return 0


if __name__ == "__main__":
  app.run(main)
