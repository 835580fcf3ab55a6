"""Shared helpers for the training-engine tests: runs of launch/tpu_train.py, metrics, checkpoints.

Every run is the masked-LM demo recipe (configs/mlm_demo.py) as a real subprocess on 8 fake CPU
devices. The runs of a session share one persistent compilation cache, and the standard
overrides below keep the update program independent of `total_steps`, so each program (init,
update, Orbax's slicing) is compiled once per mesh however many runs use it. Independent runs
go side by side, one per CPU core.
"""
import concurrent.futures
import itertools
import json
import os
import subprocess
import sys
import time
from typing import Optional, Sequence

import filelock
import jax
import pytest
from session_dirs import session_root

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TRAIN = os.path.join(REPO, "launch", "tpu_train.py")
DEMO = os.path.join(REPO, "configs", "mlm_demo.py")
NUM_DEVICES = 8
# Log every step; a constant learning rate (the program then does not depend on total_steps);
# Adam's eps raised from 1e-8 to 1e-3 so updates are a smooth function of the gradients (see
# test_parallel_equivalence.py: at 1e-8 a gradient component that is ~0 turns fp32 rounding
# noise into update differences of up to 2 x lr).
STANDARD = ("--config.log_every=1", "--config.optimizer.decay=constant",
            "--config.optimizer.warmup_ratio=0.0", "--config.optimizer.eps=0.001")
ONE_DEVICE = ("--config.mesh.num_devices=1",)
# name -> (mesh argument of the demo recipe "DATAxFSDPxTENSOR", extra overrides)
LAYOUTS = {
    "one_device": ("1x1x1", ONE_DEVICE),
    "data_8": ("8x1x1", ()),
    "data_2_fsdp_4": ("2x4x1", ()),
    "data_2_fsdp_2_tensor_2": ("2x2x2", ()),
}
BASE_STEPS = 3
_RUN_IDS = itertools.count()


@pytest.fixture(scope="session")
def cache_dir(compilation_cache) -> str:
  """The compilation cache shared by every subprocess of the session (tests/conftest.py)."""
  return compilation_cache


def train_command(workdir: str, mesh: str = "2x2x2", steps: int = BASE_STEPS,
                  overrides: Sequence[str] = (), standard: bool = True) -> list:
  """launch/tpu_train.py: the demo recipe on `mesh` for `steps` steps, plus --config.* overrides."""
  return [sys.executable, TRAIN, f"--config={DEMO}:mesh={mesh},steps={steps}",
          f"--workdir={workdir}", *(STANDARD if standard else ("--config.log_every=1",)),
          *overrides]


def _env(cache_dir: str, devices: int = NUM_DEVICES) -> dict:
  return dict(os.environ, JAX_PLATFORMS="cpu", JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo",
              XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
              JAX_COMPILATION_CACHE_DIR=cache_dir, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")


class Run:
  """A training subprocess whose stdout and stderr go to its own `<workdir>.<n>.log`."""

  def __init__(self, cache_dir: str, command: list, workdir: str, devices: int = NUM_DEVICES):
    self.command, self.workdir = command, workdir
    self.log_path = f"{workdir.rstrip('/')}.{next(_RUN_IDS)}.log"
    self._log = open(self.log_path, "w")
    self.start_time = time.time()
    self.process = subprocess.Popen(command, env=_env(cache_dir, devices), cwd=REPO, stdout=self._log,
                                    stderr=subprocess.STDOUT, text=True)

  def wait(self, timeout: float = 300) -> int:
    """Waits for the exit; returns the exit status (also kept as `.status`)."""
    if self._log.closed:
      return self.status
    try:
      self.process.wait(timeout)
    finally:
      if self.process.poll() is None:
        self.process.kill()
        self.process.wait()
      self._log.close()
    self.seconds = time.time() - self.start_time
    self.status = self.process.returncode
    return self.status

  def signal(self, signum: int, timeout: float = 120) -> int:
    """Sends `signum`, waits for the exit; returns the exit status."""
    self.process.send_signal(signum)
    return self.wait(timeout)

  def output(self) -> str:
    """Everything the run printed so far."""
    with open(self.log_path) as f:
      return f.read()

  def check(self) -> "Run":
    """Waits, and fails with the run's output unless it exited 0."""
    status = self.wait()
    assert status == 0, f"{' '.join(self.command)} exited {status}:\n{self.output()[-5000:]}"
    return self


def run_side_by_side(cache_dir: str, jobs: Sequence[tuple[list, str]]) -> list:
  """Runs (command, workdir) jobs to their end, one per CPU core at a time; returns the Runs."""
  def run(job):
    result = Run(cache_dir, *job)
    result.wait()
    return result
  workers = max(1, min(len(jobs), os.cpu_count() or 1))
  with concurrent.futures.ThreadPoolExecutor(workers) as pool:
    return list(pool.map(run, jobs))


def run_commands(cache_dir: str, commands: Sequence[list], timeout: float = 180) -> list:
  """Runs commands to the end, one per CPU core at a time; CompletedProcesses with their output."""
  def run(command):
    return subprocess.run(command, env=_env(cache_dir), cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)
  workers = max(1, min(len(commands), os.cpu_count() or 1))
  with concurrent.futures.ThreadPoolExecutor(workers) as pool:
    return list(pool.map(run, commands))


@pytest.fixture(scope="session")
def base_runs(tmp_path_factory, cache_dir) -> dict:
  """{layout: workdir} after the same BASE_STEPS steps of every LAYOUT (also warms the cache);
  run once per session, by the first pytest-xdist worker that asks (tests only read them)."""
  root = session_root(tmp_path_factory) / "base_runs"
  jobs = {name: (train_command(str(root / name), mesh, BASE_STEPS, extra), str(root / name))
          for name, (mesh, extra) in LAYOUTS.items()}
  with filelock.FileLock(f"{root}.lock"):
    if not (root / "done").exists():
      root.mkdir(exist_ok=True)
      for run in run_side_by_side(cache_dir, list(jobs.values())):
        run.check()
      (root / "done").touch()
  return {name: workdir for name, (_, workdir) in jobs.items()}


def metric_lines(workdir: str) -> list:
  """Every line of metrics.jsonl, in order (a step redone after a kill appears twice)."""
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.endswith("\n")]


def read_metrics(workdir: str) -> dict:
  """{step: metrics}; a step logged more than once keeps its last line."""
  return {entry["step"]: entry for entry in metric_lines(workdir)}


def losses(workdir: str) -> dict:
  """{step: loss} (last occurrence of each step)."""
  return {step: entry["loss"] for step, entry in read_metrics(workdir).items()}


def checkpoint_steps(workdir: str) -> list:
  """Steps of the finished checkpoints (Orbax renames a step's tmp directory once complete)."""
  directory = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(directory):
    return []
  return sorted(int(name) for name in os.listdir(directory) if name.isdigit())


def wait_until(run: Run, condition, what: str, timeout: float = 300):
  """Polls `condition()` every 20 ms until it is truthy (returned); fails if the run exits first."""
  deadline = time.time() + timeout
  while time.time() < deadline:
    value = condition()
    if value:
      return value
    if run.process.poll() is not None:
      raise AssertionError(f"the run exited ({run.process.returncode}) before {what}:\n"
                           f"{run.output()[-5000:]}")
    time.sleep(0.02)
  run.signal(9)
  raise AssertionError(f"no {what} within {timeout}s")


def kill_past_checkpoint(run: Run, workdir: str, every: int, steps_past: int) -> int:
  """SIGKILLs `run` once it has a periodic checkpoint (a step >= `every`) and has logged
  `steps_past` steps beyond it; returns that checkpoint's step."""
  import signal  # pylint: disable=g-import-not-at-top
  first = wait_until(run, lambda: [s for s in checkpoint_steps(workdir) if s >= every],
                     "a periodic checkpoint")[0]
  wait_until(run, lambda: max(read_metrics(workdir), default=0) >= first + steps_past,
             f"{steps_past} logged steps past the checkpoint")
  assert run.signal(signal.SIGKILL) == -signal.SIGKILL
  return first


def restore_saved_params(workdir: str, step: Optional[int] = None) -> dict:
  """A run's checkpointed params (latest unless `step`), on the shardings they were saved with."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  directory = os.path.join(os.path.abspath(workdir), "checkpoints")
  with ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(read_only=True),
                             item_handlers={"params": ocp.StandardCheckpointHandler()}) as manager:
    step = manager.latest_step() if step is None else step
    return manager.restore(step, args=ocp.args.Composite(params=ocp.args.StandardRestore())
                           )["params"]


def flat(tree) -> dict:
  """{'a/b/c': leaf} for a nested dict."""
  from mmembed_jax.training.optimizer import path_name  # pylint: disable=g-import-not-at-top
  return {path_name(path): leaf for path, leaf in jax.tree.leaves_with_path(tree)}


def relative_error(actual, expected) -> float:
  """max |actual - expected| / max |expected|: the error on the tensor's own scale."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
  return float(np.max(np.abs(actual - expected)) / max(np.max(np.abs(expected)), 1e-30))
