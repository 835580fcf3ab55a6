r"""MoCa's ablation in miniature on the demo: CL only (bidirectional, causal), CPT -> CL, CPT
without MAE -> CL, over several seeds; prints held-out Precision@1 per dataset, mean ± std.
CoMa's pair of arms: `--arms coma_cl,coma_compression_cl` (stage 2 alone, stage 1 -> 2).

  python launch/ablate.py --workdir runs/ablation [--seeds 0,1,2] [--arms cl_causal,cpt_cl] \
      [--extra=--config.total_steps=100]

Each run is a launch/tpu_train.py subprocess under WORKDIR/SEED/ARM; rerunning reuses finished
runs. Writes WORKDIR/ablation.md (the table) and WORKDIR/ablation.json (every run's scores).
"""
import os
import sys

from absl import app
from absl import flags

from mmembed_jax.demo import ablation

_WORKDIR = flags.DEFINE_string("workdir", "runs/ablation", "Directory of the ablation's runs.")
_SEEDS = flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds (config.seed) of every arm.")
_ARMS = flags.DEFINE_list("arms", list(ablation.DEFAULT_ARMS),
                          "Arms to run: " + ", ".join(ablation.ARMS))
_EXTRA = flags.DEFINE_multi_string("extra", [], "A --config.* flag given to every run "
                                   "(repeatable), e.g. --extra=--config.total_steps=100.")


def main(argv):
  """Runs the ablation and prints its table; returns the exit status."""
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  try:
    seeds = [int(s) for s in _SEEDS.value]
    print(ablation.ablate(_WORKDIR.value, seeds, _ARMS.value, root, _EXTRA.value))
  except (ValueError, RuntimeError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  app.run(main)
