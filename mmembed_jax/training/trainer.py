"""The trainer, top to bottom: the run (training/run.py: config, lineage, mesh, model, objective,
input, sharded state), the workdir lock, checkpoints, the update, held-out evaluation, the loop.

The same code runs on one CPU and on a multi-slice TPU pod; only the config's mesh changes.
Rerunning the same command with the same workdir resumes from its latest checkpoint.
"""
import json
import logging
import os
import signal
import time
from typing import Optional

import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from mmembed_jax.data import bad_records
from mmembed_jax.parallel import sharding as sharding_lib
from mmembed_jax.training import checkpoint, flops, lineage, metrics as metrics_lib
from mmembed_jax.training import trainable
from mmembed_jax.training import workdir as workdir_lib
from mmembed_jax.training.run import HOST_ONLY, RunSetup, build_run

log = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
  """A NaN or Inf loss: the run stops, its last good checkpoint is kept."""


class _StopRequest:
  """Set by SIGTERM (TPU maintenance, preemption): the loop saves and exits cleanly."""

  def __init__(self):
    self.requested = False
    self._previous = signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):  # pylint: disable=unused-argument
    self.requested = True

  def restore(self):
    signal.signal(signal.SIGTERM, self._previous)


def train(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Runs (or resumes) training to `config.total_steps`; returns the last logged metrics."""
  # ----- The run: config checked, lineage resolved, mesh, model, objective, input, state layout
  # (training/run.py). Nothing is compiled or written yet.
  run = build_run(config, jax.devices())
  # ----- The workdir: locked (one run at a time) before anything is written into it.
  lock = workdir_lib.lock(workdir)
  try:
    return _train(run, workdir)
  finally:
    if lock is not None:
      lock.release()


def _train(run: RunSetup, workdir: str) -> dict:
  """`train` once the run is built and the workdir is its own."""
  config, layout, mesh = run.config, run.layout, run.mesh
  if jax.process_index() == 0:
    record = json.loads(config.to_json_best_effort())
    record[lineage.RESOLVED] = run.resolved.to_json()  # read back by embedding, export, evaluation
    with open(os.path.join(workdir, "config.json"), "w") as f:
      json.dump(record, f, indent=2)
  log.info("mesh %s on %d processes", dict(mesh.shape), jax.process_count())
  trained, total = trainable.count(layout.abstract_state.params, layout.trainable)
  log.info("trainable parameters: %d of %d (%.2f%%)", trained, total, 100 * trained / total)
  batch_sharding = sharding_lib.batch_sharding(mesh)
  in_context = layout.context  # mesh and logical rules, for tracing
  data_iter = iter(run.dataset())

  # ----- Checkpoints: resume, else initial weights (random, HF directory or another run).
  checkpoints = checkpoint.checkpoint_dir(workdir)
  manager = checkpoint.make_manager(os.path.abspath(checkpoints), config.checkpoint)
  bad_before = 0  # bad records the run skipped before this launch (from the checkpoint)
  if manager.latest_step() is not None:
    state, data_item = checkpoint.restore(manager, layout.abstract_state)
    data_state, bad_before = checkpoint.split_input_item(data_item)
    if data_state is not None:
      data_iter.set_state(data_state)
    log.info("resumed from step %d", int(state.step))
  else:
    state = run.initial_state()

  # ----- The update step: one jit, explicit shardings, donated state (jitted for the first
  # batch's keys).
  train_step = None

  # ----- Held-out evaluation (contrastive runs): before training and every `eval.every` steps.
  evaluator = run.evaluator()

  def evaluate(step):
    with in_context():
      scalars = evaluator(state.params)
    writer.write(step, scalars)
    log.info("step %d held-out: %s", step, {k: round(v, 4) for k, v in scalars.items()
                                            if "/" not in k})
    return scalars

  # ----- Loop.
  start_step = int(jax.device_get(state.step))
  writer = metrics_lib.MetricWriter(workdir, config.total_steps, start_step)
  if evaluator is not None and start_step == 0:
    evaluate(0)
  stop = _StopRequest()
  peak = flops.peak_flops_per_device(jax.devices()[0])
  last_scalars: dict = {}
  bad_here = 0  # skipped by this process's input pipeline since this launch started
  window_start, window_steps, window_tokens = time.time(), 0, 0
  try:
    for step in range(start_step + 1, config.total_steps + 1):
      local = next(data_iter)
      bad_here += int(np.sum(local.get("bad_records", 0)))
      for message in bad_records.split_messages(local.get(bad_records.MESSAGES)):
        log.warning("skipped bad record %s", message)  # named once, when its batch is used
      local = {k: v for k, v in local.items() if k not in HOST_ONLY}
      if train_step is None:
        train_step = run.jit_step(local)
      batch = jax.tree.map(
          lambda v: jax.make_array_from_process_local_data(batch_sharding, np.asarray(v)), local)
      with in_context():
        state, step_metrics = train_step(state, batch)
      window_steps += 1
      window_tokens += flops.batch_tokens(local) * jax.process_count()
      writer.advance()

      stopping = stop.requested  # read once: a SIGTERM arriving later waits for the next step
      will_save = step == config.total_steps or stopping or manager.should_save(step)
      if step % config.log_every == 0 or will_save:
        bad_total = bad_before + _sum_over_processes(bad_here)
        scalars = metrics_lib.host_scalars(step_metrics)
        bad = metrics_lib.first_non_finite(scalars)
        if bad:
          raise NonFiniteLossError(
              f"step {step}: {bad} is {scalars[bad]}; stopping. The last good checkpoint "
              f"(step {manager.latest_step()}) is kept in {checkpoints}")
        elapsed = time.time() - window_start
        scalars["bad_records"] = bad_total
        scalars.update(_throughput(run.step_flops(local) * jax.process_count(), window_steps,
                                   window_tokens, elapsed, peak, mesh.size))
        writer.write(step, scalars)
        last_scalars = dict(scalars, step=step)
        window_start, window_steps, window_tokens = time.time(), 0, 0
      if evaluator is not None and (step % config.eval.every == 0 or step == config.total_steps):
        eval_start = time.time()
        last_scalars.update(evaluate(step))
        window_start += time.time() - eval_start  # throughput counts training time only
      if will_save:
        checkpoint.save(manager, state, checkpoint.input_item(data_iter.get_state(), bad_total),
                        force=step == config.total_steps or stopping)
      if stopping:
        log.warning("SIGTERM: saved step %d, exiting", step)
        break
  finally:
    manager.wait_until_finished()
    manager.close()
    if hasattr(data_iter, "close"):
      data_iter.close()  # worker processes and their shared memory
    writer.close()
    stop.restore()
  return last_scalars


def _sum_over_processes(count: int) -> int:
  """`count` summed over every process of the run."""
  if jax.process_count() == 1:
    return count
  return int(np.sum(multihost_utils.process_allgather(np.int64(count))))


def _throughput(step_flops: float, steps: int, tokens: int, elapsed: float,
                peak: Optional[float], num_devices: int) -> dict:
  """tokens/s, step time, analytic TFLOP/s per device and (on TPU) MFU over the last window."""
  step_time = elapsed / max(steps, 1)
  tflops = step_flops / step_time / num_devices / 1e12
  out = {"tokens_per_second": tokens / max(elapsed, 1e-9), "step_time": step_time,
         "tflops_per_device": tflops}
  if peak:
    out["mfu"] = tflops * 1e12 / peak
  return out
