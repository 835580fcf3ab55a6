"""Checkpoints of launch/tpu_train.py: SIGKILL and resume, SIGTERM, another mesh, NaN, init_from.

Every run is a real subprocess on 8 fake CPU devices writing real Orbax checkpoints.
"""
import math
import shutil
import signal

import numpy as np
import pytest

from engine_runs import (BASE_STEPS, ONE_DEVICE, Run, checkpoint_steps, flat, kill_past_checkpoint,
                         losses, metric_lines,
                      read_metrics, restore_saved_params, run_side_by_side, train_command,
                      wait_until)

LONG_STEPS = 20  # long enough to stop a run well before its end
EVERY = 8
EVERY_FLAG = (f"--config.checkpoint.every={EVERY}",)
TIMING_KEYS = ("tokens_per_second", "step_time", "tflops_per_device", "mfu")
RTOL = 1e-5  # fp32 summation-order tolerance, justified in test_parallel_equivalence.py


@pytest.fixture(scope="module", autouse=True)
def warm_cache(base_runs):
  """The base runs go first: they compile (into the session's cache) every program reused here."""
  return base_runs


def _deterministic(entry: dict) -> dict:
  """A metrics line without its wall-clock measurements."""
  return {k: v for k, v in entry.items() if k not in TIMING_KEYS}


def test_sigkilled_run_resumes_from_its_checkpoint_and_matches_an_uninterrupted_run(
    tmp_path, cache_dir):
  reference_dir, workdir = str(tmp_path / "uninterrupted"), str(tmp_path / "killed")
  reference = Run(cache_dir, train_command(reference_dir, "2x2x2", LONG_STEPS, EVERY_FLAG),
                  reference_dir)
  command = train_command(workdir, "2x2x2", LONG_STEPS, EVERY_FLAG)
  run = Run(cache_dir, command, workdir)
  first = kill_past_checkpoint(run, workdir, EVERY, steps_past=2)
  killed_at = max(read_metrics(workdir))
  resume_from = max(checkpoint_steps(workdir))
  assert first <= resume_from < killed_at < LONG_STEPS, (resume_from, killed_at)

  resumed = Run(cache_dir, command, workdir).check()  # the same command again
  assert f"resumed from step {resume_from}" in resumed.output()
  reference.check()
  expected = read_metrics(reference_dir)
  got = read_metrics(workdir)
  assert sorted(got) == sorted(expected) == list(range(1, LONG_STEPS + 1))
  for step in range(resume_from + 1, LONG_STEPS + 1):
    assert _deterministic(got[step]) == _deterministic(expected[step]), step  # bit-identical
  # Steps the killed run logged after its last checkpoint were redone and logged again.
  logged = [entry["step"] for entry in metric_lines(workdir)]
  assert all(logged.count(step) == 2 for step in range(resume_from + 1, killed_at + 1))
  assert checkpoint_steps(workdir)[-1] == LONG_STEPS


def test_sigterm_saves_the_current_step_and_exits_with_status_zero(tmp_path, cache_dir):
  workdir = str(tmp_path / "preempted")
  run = Run(cache_dir, train_command(workdir, "2x2x2", LONG_STEPS, EVERY_FLAG), workdir)
  wait_until(run, lambda: [s for s in checkpoint_steps(workdir) if s >= EVERY],
             "a periodic checkpoint")
  periodic = max(checkpoint_steps(workdir))
  assert run.signal(signal.SIGTERM) == 0, run.output()[-5000:]
  saved = max(checkpoint_steps(workdir))
  last_logged = max(read_metrics(workdir))
  assert periodic < saved == last_logged < LONG_STEPS
  assert f"SIGTERM: saved step {saved}, exiting" in run.output()


@pytest.fixture(scope="module")
def side_runs(tmp_path_factory, cache_dir, base_runs) -> dict:
  """The runs that need no signals, side by side: {name: finished Run}."""
  root = tmp_path_factory.mktemp("side_runs")
  base = base_runs["data_2_fsdp_2_tensor_2"]
  jobs = {}
  # The base run (BASE_STEPS steps on 2x2x2) continued for 3 more steps on its own and another mesh.
  for name, mesh in (("continued_on_2x2x2", "2x2x2"), ("continued_on_8x1x1", "8x1x1")):
    shutil.copytree(base, root / name)
    jobs[name] = (train_command(str(root / name), mesh, BASE_STEPS + 3), str(root / name))
  # lr 1e30 after a warm-up step at lr 0 (so step 1 is good and checkpointed); step 2 overflows.
  jobs["diverged"] = (train_command(str(root / "diverged"), "1x1x1", 10, ONE_DEVICE + (
      "--config.optimizer.lr=1e30", "--config.optimizer.warmup_ratio=0.1",
      "--config.checkpoint.every=1"), standard=False), str(root / "diverged"))
  # lr 0: the one step leaves the loaded params as they were, so its checkpoint shows them.
  jobs["fine_tuned"] = (train_command(str(root / "fine_tuned"), "1x1x1", 1, ONE_DEVICE + (
      f"--config.init_from={base}", "--config.optimizer.lr=0.0")), str(root / "fine_tuned"))
  return dict(zip(jobs, run_side_by_side(cache_dir, list(jobs.values()))))


def test_run_continues_on_another_mesh_like_on_its_own(side_runs):
  same, other = side_runs["continued_on_2x2x2"], side_runs["continued_on_8x1x1"]
  for run in (same, other):
    run.check()
    assert f"resumed from step {BASE_STEPS}" in run.output()
  expected, got = losses(same.workdir), losses(other.workdir)
  steps = BASE_STEPS + 3
  assert sorted(got) == sorted(expected) == list(range(1, steps + 1))
  for step in range(BASE_STEPS + 1, steps + 1):
    assert got[step] == pytest.approx(expected[step], rel=RTOL), step
  # The continuation really ran on the other mesh: its checkpoint holds data-parallel arrays.
  kernel = flat(restore_saved_params(other.workdir))[
      "language_model/layers_0/self_attn/q_proj/kernel"]
  assert dict(kernel.sharding.mesh.shape) == {"data": 8, "fsdp": 1, "tensor": 1}
  assert kernel.sharding.is_fully_replicated


def test_non_finite_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(side_runs):
  run = side_runs["diverged"]
  output = run.output()
  assert run.status == 3, output[-5000:]
  error = [line for line in output.splitlines() if line.startswith("error: ")]
  assert len(error) == 1 and error[0].startswith("error: step 2: "), output[-3000:]
  assert "last good checkpoint (step 1)" in error[0]
  assert "Traceback" not in output
  assert sorted(read_metrics(run.workdir)) == [1]
  assert checkpoint_steps(run.workdir) == [1]
  kept = flat(restore_saved_params(run.workdir))
  assert all(np.isfinite(np.asarray(value)).all() for value in kept.values())


def test_init_from_another_run_loads_its_params_and_starts_at_step_zero(side_runs, base_runs):
  source = base_runs["data_2_fsdp_2_tensor_2"]
  workdir = side_runs["fine_tuned"].check().workdir
  assert sorted(read_metrics(workdir)) == [1]
  assert read_metrics(workdir)[1]["update_norm"] == 0.0
  assert checkpoint_steps(workdir) == [1]
  assert checkpoint_steps(source) == [1, BASE_STEPS]  # the source run is only read
  loaded, expected = flat(restore_saved_params(workdir)), flat(restore_saved_params(source))
  assert sorted(loaded) == sorted(expected)
  for name, value in expected.items():
    assert np.array_equal(np.asarray(loaded[name]), np.asarray(value)), name
  # Its first loss is the loaded params' loss, not the random initialisation's.
  assert not math.isclose(read_metrics(workdir)[1]["loss"], losses(source)[1], rel_tol=1e-6)


def test_a_second_run_on_a_busy_workdir_exits_2_at_once_and_writes_nothing(tmp_path, cache_dir):
  """Process 0 locks its workdir before writing anything. Before: a second run raced the first
  (a misleading `No such file ..._METADATA`, or duplicate steps appended to metrics.jsonl)."""
  import os
  import socket
  workdir = str(tmp_path / "busy")
  first = Run(cache_dir, train_command(workdir, "1x1x1", 100_000, ONE_DEVICE + (
      "--config.checkpoint.every=1000",)), workdir)
  try:
    wait_until(first, lambda: len(metric_lines(workdir)) >= 2, "two logged steps")
    with open(os.path.join(workdir, "config.json")) as f:
      config = f.read()
    second = Run(cache_dir, train_command(workdir, "1x1x1", 5, ONE_DEVICE + (
        "--config.seed=7",)), workdir)
    assert second.wait(120) == 2, second.output()[-3000:]
    output = second.output()
    errors = [line for line in output.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in output, output[-3000:]
    assert f"workdir {workdir} is in use by another run (host {socket.gethostname()}, pid " \
           f"{first.process.pid}, since " in errors[0]
    with open(os.path.join(workdir, "config.json")) as f:
      assert f.read() == config  # the second run (seed 7) wrote nothing
    steps = [entry["step"] for entry in metric_lines(workdir)]
    assert steps == sorted(set(steps))  # only the first run's lines, each step once
    assert first.process.poll() is None  # the first run goes on
  finally:
    first.signal(signal.SIGKILL)
