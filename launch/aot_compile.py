r"""Compiles a recipe's train step for a TPU topology on this (CPU) host: does it fit, and how fast?

  python launch/aot_compile.py --config configs/moca.py:size=7b --topology v5p-64 [--num_slices 2] \
      [--json out.json] [--config.input.global_batch_size=256]

Needs libtpu (`pip install -e '.[tpu]'`). Prints per-chip HBM (arguments, temporaries, outputs,
total against the chip's capacity), FLOPs (analytic and the compiler's), the collectives in the
program and the step time at 100% MFU; exits 1 on an out-of-memory, printing the compiler's
message, and 2 on a bad config. --json writes the figures (hbm_bytes_per_chip,
hbm_capacity_bytes, flops, analytic_flops, ...).
"""
import json
import os
import sys

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Recipe config, e.g. configs/moca.py:size=7b.",
                                          lock_config=False)
_TOPOLOGY = flags.DEFINE_string("topology", None, "TPU slice: v5p-64 (TensorCores, as gcloud "
                                "names v4/v5p), v5e-64 (chips), or a shape such as v5p:4x4x4.")
_NUM_SLICES = flags.DEFINE_integer("num_slices", 1, "Slices joined over DCN (multi-slice).",
                                   lower_bound=1)
_JSON = flags.DEFINE_string("json", None, "Write the figures as JSON to this file.")


def main(argv):
  """Compiles and reports; returns the exit status."""
  del argv
  absl_logging.set_verbosity(absl_logging.ERROR)
  os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
  # Compile-only devices touch no chip: let several compiles (or a training job) load libtpu.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  from mmembed_jax.training import aot  # pylint: disable=g-import-not-at-top
  try:
    devices = aot.topology_devices(_TOPOLOGY.value, _NUM_SLICES.value)
    report = aot.compile_train_step(_CONFIG.value, devices)
  except aot.CompileOOM as e:
    print(f"out of memory on {_TOPOLOGY.value}: {e}", file=sys.stderr)
    report, status = {"oom": str(e)}, 1
  except (ValueError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  else:
    print(aot.format_report(report, config_flags.get_config_filename(flags.FLAGS["config"])))
    status = 0
  if _JSON.value:
    with open(_JSON.value, "w") as f:
      json.dump(dict(report, topology=_TOPOLOGY.value, num_slices=_NUM_SLICES.value), f, indent=2)
  return status


if __name__ == "__main__":
  flags.mark_flags_as_required(["config", "topology"])
  app.run(main)
