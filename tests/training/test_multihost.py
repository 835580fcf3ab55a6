"""Multi-host training: 2 processes on localhost (jax.distributed with Gloo CPU collectives, 4 fake
devices each) train MoCa stage 1 and stage 2 like 1 process on 8 devices.

Both runs use the same (data 2, fsdp 4) mesh over 8 devices, so parameters and optimizer state
are split across the two processes and every step all-gathers and reduce-scatters between them.
Each process reads only its own share of the input:
- stage 1 packs per stream, so the batch depends on how the records are split; the reference
  runs with `input.data_shards=2` (two streams in one process), which makes exactly the batch
  the two processes make, each packing data shard = its process index. Had a process read the
  other's records, or all of them, its rows (and the loss) would differ;
- stage 2 takes each global batch from one dataset chosen by (seed, batch number) and each
  process keeps its slice, so the reference is the plain 1-process run.
The 2-process stage-1 run stops at step 2 (a checkpoint both processes write, each its own
shards) and a second 2-process launch resumes it to step 4.

Tolerance: losses agree to 1e-5 relative; only the order of floating-point sums differs
(cross-process all-reduces), as in test_parallel_equivalence.py, whose Adam eps = 1e-3 (STANDARD)
keeps that noise from being amplified by the update.
"""
import os
import socket
import sys

import pytest

from engine_runs import REPO, STANDARD, TRAIN, Run, checkpoint_steps, losses, run_side_by_side

MOCA = os.path.join(REPO, "configs", "moca.py")
MESH = ("--config.mesh.ici.data=2", "--config.mesh.ici.fsdp=4")
RTOL = 1e-5


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _command(config: str, workdir: str, steps: int, *overrides: str) -> list:
  return [sys.executable, TRAIN, f"--config={config}", f"--workdir={workdir}",
          f"--config.total_steps={steps}", *STANDARD, *MESH, *overrides]


def _two_processes(cache_dir: str, command: list, workdir: str) -> None:
  """Runs `command` as processes 0 and 1 of a 2-process job (4 CPU devices each) to the end."""
  port = _free_port()
  runs = [Run(cache_dir, command + ["--distributed", f"--coordinator_address=localhost:{port}",
                                    "--num_processes=2", f"--process_id={i}"], workdir, devices=4)
          for i in range(2)]
  for run in runs:
    run.check()


def _assert_same_losses(got: dict, expected: dict) -> None:
  assert sorted(got) == sorted(expected)
  assert len(set(expected.values())) == len(expected)  # the loss moves
  for step, loss in expected.items():
    assert got[step] == pytest.approx(loss, rel=RTOL), step


# Stage 1: one row per device, so its patch buffer holds one row's worst case (256 slots).
STAGES = {"stage1": (MOCA, 4, ("--config.input.data_shards=2", "--config.checkpoint.every=2",
                               "--config.input.max_patches=256")),
          "stage2": (f"{MOCA}:stage=cl", 3, ("--config.eval.every=0",))}


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, cache_dir) -> dict:
  """{stage: workdir} of the 1-process references, run side by side (one compile per core)."""
  root = tmp_path_factory.mktemp("one_process")
  jobs = [(_command(config, str(root / stage), steps, *extra), str(root / stage))
          for stage, (config, steps, extra) in STAGES.items()]
  for run in run_side_by_side(cache_dir, jobs):
    run.check()
  return {stage: str(root / stage) for stage in STAGES}


def test_two_process_moca_stage1_matches_one_process_and_resumes(tmp_path, cache_dir, one_process):
  config, steps, extra = STAGES["stage1"]
  two = str(tmp_path / "two_processes")
  _two_processes(cache_dir, _command(config, two, 2, *extra), two)
  assert checkpoint_steps(two)[-1] == 2
  # Orbax's OCDBT layout: each process writes its own shards into its own sub-store.
  for item in ("params", "opt_state"):
    written = set(os.listdir(os.path.join(two, "checkpoints", "2", item)))
    assert {"ocdbt.process_0", "ocdbt.process_1"} <= written, item
  _two_processes(cache_dir, _command(config, two, steps, *extra), two)  # resumes from step 2
  _assert_same_losses(losses(two), losses(one_process["stage1"]))


def test_two_process_moca_stage2_matches_one_process(tmp_path, cache_dir, one_process):
  config, steps, extra = STAGES["stage2"]
  two = str(tmp_path / "two_processes")
  _two_processes(cache_dir, _command(config, two, steps, *extra), two)
  _assert_same_losses(losses(two), losses(one_process["stage2"]))
