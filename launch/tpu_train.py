"""Train with a recipe config: on a TPU pod with a real config, on any laptop with a demo one.

  python launch/tpu_train.py --config configs/mlm_demo.py --workdir runs/demo [--config.total_steps=50]

Rerunning the same command resumes from the workdir's latest checkpoint.
"""
import logging
import os
import sys

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Recipe config file, e.g. configs/moca.py:size=demo.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and TensorBoard logs.")
_DISTRIBUTED = flags.DEFINE_bool("distributed", None,
                                 "Call jax.distributed.initialize() (default: when on a multi-host TPU).")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0, for "
                                   "--distributed off TPU (on TPU it is auto-detected).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes, with --coordinator_address.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index, with "
                                   "--coordinator_address.")


def _parse_flags(argv):
  """absl flag parsing, with a bad --config.* override reported as one error line."""
  try:
    return flags.FLAGS(argv)
  except (AttributeError, KeyError) as e:
    field = str(e).strip("\"'")
    print(f"error: unknown config field '{field}' in a --config.* override", file=sys.stderr)
    sys.exit(2)
  except flags.Error as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)


def main(argv):
  del argv
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
  absl_logging.set_verbosity(absl_logging.WARNING)  # Orbax logs every file it writes at INFO
  logging.getLogger("mmembed_jax").setLevel(logging.INFO)  # the root is at WARNING now; ours is not
  import jax  # pylint: disable=g-import-not-at-top
  distributed = _DISTRIBUTED.value
  if distributed is None:
    distributed = bool(os.environ.get("TPU_WORKER_HOSTNAMES", "").count(","))
  if distributed:
    jax.distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  from mmembed_jax.training.trainer import NonFiniteLossError, train  # pylint: disable=g-import-not-at-top
  try:
    train(_CONFIG.value, _WORKDIR.value)
  except (ValueError, FileNotFoundError) as e:  # bad config or input: nothing was trained
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  except NonFiniteLossError as e:  # diverged: the last good checkpoint is kept
    print(f"error: {e}", file=sys.stderr)
    sys.exit(3)


if __name__ == "__main__":
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(main, flags_parser=_parse_flags)
