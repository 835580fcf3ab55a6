"""Train with a recipe config: on a TPU pod with a real config, on any laptop with a demo one.

  python launch/tpu_train.py --config configs/moca.py --workdir runs/demo [--config.total_steps=50]

Rerunning the same command resumes from the workdir's latest checkpoint. At the end it prints
what the run did (losses first -> last), where its checkpoints and logs are, and what to run next.
"""
import logging
import os
import sys

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

from mmembed_jax.data.bad_records import printable
from mmembed_jax.parallel import distributed_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Recipe config file, e.g. configs/moca.py:size=demo.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and TensorBoard logs.")


def _fail(message: str) -> None:
  """Prints one `error:` line (the last line of a message holding a traceback) and exits 2."""
  lines = [line.strip() for line in str(message).splitlines() if line.strip()]
  if any(line.startswith("Traceback") for line in lines):
    lines = lines[-1:]  # the exception itself, e.g. "ValueError: configs/moca.py: size must be ..."
  print(f"error: {printable(' '.join(lines))}", file=sys.stderr)
  sys.exit(2)


def _parse_flags(argv):
  """absl flag parsing; a missing config file, a config that raises or a bad --config.* override
  is reported as one error line (exit 2)."""
  for arg in argv[1:]:
    if arg.startswith("--config="):
      path = arg.split("=", 1)[1].split(":", 1)[0]
      if not os.path.isfile(path):
        _fail(f"config file {path} does not exist")
  try:
    return flags.FLAGS(argv)
  except (AttributeError, KeyError) as e:  # an unknown field in a --config.* override
    while e.args and isinstance(e.args[0], Exception):  # ml_collections nests its KeyErrors
      e = e.args[0]
    field, *hint = str(e.args[0] if e.args else e).splitlines()
    override = next((a for a in argv if a.startswith("--config.") and field.strip("'\"") in a), "")
    _fail(f"unknown config field {field} in {override or 'a --config.* override'}"
          + (f"; {' '.join(hint)}" if hint else ""))
  except flags.Error as e:
    _fail(str(e))
  except Exception as e:  # pylint: disable=broad-except  # the config file itself failed
    _fail(f"{type(e).__name__}: {e}")


def main(argv):
  del argv
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
  absl_logging.set_verbosity(absl_logging.WARNING)  # Orbax logs every file it writes at INFO
  logging.getLogger("mmembed_jax").setLevel(logging.INFO)  # the root is at WARNING now; ours is not
  import jax  # pylint: disable=g-import-not-at-top
  distributed_flags.initialize()
  from mmembed_jax.training.summary import run_summary  # pylint: disable=g-import-not-at-top
  from mmembed_jax.training.trainer import NonFiniteLossError, train  # pylint: disable=g-import-not-at-top
  try:
    train(_CONFIG.value, _WORKDIR.value)
  except (ValueError, FileNotFoundError) as e:  # bad config or input: nothing was trained
    print(f"error: {printable(e)}", file=sys.stderr)
    sys.exit(2)
  except NonFiniteLossError as e:  # diverged: the last good checkpoint is kept
    print(f"error: {printable(e)}", file=sys.stderr)
    sys.exit(3)
  if jax.process_index() == 0:
    print(run_summary(_WORKDIR.value, config_flags.get_config_filename(flags.FLAGS["config"])))


if __name__ == "__main__":
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(main, flags_parser=_parse_flags)
