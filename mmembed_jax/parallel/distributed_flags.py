"""The multi-process flags shared by the launch scripts, and `initialize()` that acts on them.

  from mmembed_jax.parallel import distributed_flags   # defines --distributed and friends
  ...
  distributed_flags.initialize()                       # in main(), before any other JAX call

On a multi-host TPU slice the coordinator is found by JAX itself; off TPU (several processes on
one machine or on CPU hosts) pass --coordinator_address, --num_processes and --process_id.
"""
import os

from absl import flags

DISTRIBUTED = flags.DEFINE_bool("distributed", None, "Call jax.distributed.initialize() "
                                "(default: when on a multi-host TPU).")
COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0, for "
                                  "--distributed off TPU (on TPU it is auto-detected).")
NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes, with "
                                     "--coordinator_address.")
PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index, with "
                                  "--coordinator_address.")


def initialize() -> bool:
  """Joins the multi-process job when --distributed (or a multi-host TPU) says so; True if so."""
  distributed = DISTRIBUTED.value
  if distributed is None:
    distributed = bool(os.environ.get("TPU_WORKER_HOSTNAMES", "").count(","))
  if distributed:
    import jax  # pylint: disable=g-import-not-at-top
    jax.distributed.initialize(COORDINATOR.value, NUM_PROCESSES.value, PROCESS_ID.value)
  return distributed
