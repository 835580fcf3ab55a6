"""The trainer, top to bottom: config, mesh, model, input, sharded state, checkpoints, update, loop.

The same code runs on one CPU and on a multi-slice TPU pod; only the config's mesh changes.
Rerunning the same command with the same workdir resumes from its latest checkpoint.
"""
import logging
import os
import signal
import time
from typing import Optional

import flax.linen as nn
import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from mmembed_jax.data import bad_records
from mmembed_jax.models.embedder import dummy_batch
from mmembed_jax.models.vlm import VisionLanguageModel
from mmembed_jax.parallel import sharding as sharding_lib
from mmembed_jax.parallel.mesh import make_mesh
from mmembed_jax.training import builders, checkpoint, flops, metrics as metrics_lib
from mmembed_jax.training import workdir as workdir_lib
from mmembed_jax.training.config import mesh_devices, validate
from mmembed_jax.training.sharded_state import StateLayout, state_layout
from mmembed_jax.training.train_step import TrainState, create_state, make_update_fn

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
  # ----- Config, checked before anything compiles; the workdir, locked before anything is written.
  validate(config, jax.devices())
  lock = workdir_lib.lock(workdir)
  try:
    return _train(config, workdir)
  finally:
    if lock is not None:
      lock.release()


def _train(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """`train` once the config is valid and the workdir is this run's."""
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config.to_json_best_effort(indent=2))

  # ----- Mesh and sharding rules.
  mesh = make_mesh(config.mesh.ici, config.mesh.dcn, devices=mesh_devices(config, jax.devices()))
  rules = sharding_lib.config_rules(config.sharding.rules)
  batch_sharding = sharding_lib.batch_sharding(mesh)
  log.info("mesh %s on %d processes", dict(mesh.shape), jax.process_count())

  # ----- Model, objective, input.
  model_config = builders.build_model_config(config)
  objective = builders.build_objective(config, model_config)
  dataset = builders.build_input(config, model_config)
  data_iter = iter(dataset)

  # ----- Sharded state: shapes from eval_shape, shardings from the logical axis names.
  layout = state_layout(config, model_config, objective, mesh, rules)
  in_context = layout.context  # mesh and logical rules, for tracing

  # ----- Checkpoints: resume, else initial weights (random, HF directory or another run).
  manager = checkpoint.make_manager(os.path.abspath(builders.checkpoint_dir(workdir)),
                                    config.checkpoint)
  bad_before = 0  # bad records the run skipped before this launch (from the checkpoint)
  if manager.latest_step() is not None:
    state, data_item = checkpoint.restore(manager, layout.abstract_state)
    data_state, bad_before = checkpoint.split_input_item(data_item)
    if data_state is not None:
      data_iter.set_state(data_state)
    log.info("resumed from step %d", int(state.step))
  else:
    state = initial_state(config, model_config, objective, layout)

  # ----- The update step: one jit, explicit shardings, donated state.
  update = make_update_fn(objective, layout.tx, layout.schedule, config.grad_accum_steps)
  train_step = None  # jitted for the first batch's keys

  # ----- Held-out evaluation (contrastive runs): before training and every `eval.every` steps.
  evaluator = builders.build_eval(config, objective, mesh)

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
      local = {k: v for k, v in local.items() if k not in builders.HOST_ONLY}
      if train_step is None:
        train_step = layout.jit_step(update, local)
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
              f"(step {manager.latest_step()}) is kept in {builders.checkpoint_dir(workdir)}")
        elapsed = time.time() - window_start
        scalars["bad_records"] = bad_total
        scalars.update(_throughput(model_config, local, window_steps, window_tokens, elapsed,
                                   peak, mesh.size, objective))
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


def initial_state(config: ml_collections.ConfigDict, model_config, objective,
                  layout: StateLayout) -> TrainState:
  """State at step 0 (random, from an HF directory or from another run), created sharded:
  parameters never sit whole on one host."""
  # Objective-owned parameters (MoCa's MAE decoder) are made from the backbone's, unless the
  # source (another run of the same objective) already has them.
  init_extra = getattr(objective, "init_extra", None)
  extra_keys = list(objective.boxed_extra_shapes()) if init_extra is not None else []
  extra_key = jax.random.fold_in(jax.random.key(config.seed), 1)

  def with_extra(params):
    if all(k in params for k in extra_keys):
      return params
    return dict(init_extra(extra_key, params), **params)

  tx, state_shardings, in_context = layout.tx, layout.state_shardings, layout.context
  backbone_shardings = {k: v for k, v in layout.param_shardings.items() if k not in extra_keys}
  make = jax.jit(lambda params: create_state(with_extra(params), tx, config.seed),
                 out_shardings=state_shardings)
  if builders.is_hf_dir(config.init_from):
    from mmembed_jax.convert.hf_import import import_hf  # pylint: disable=g-import-not-at-top
    _, params = import_hf(config.init_from, param_dtype=config.model.param_dtype,
                          scan_layers=config.model.scan_layers,
                          put=sharding_lib.put_by_path(backbone_shardings))
    with in_context():
      return make(params)
  if config.init_from:
    params = checkpoint.restore_params(
        os.path.abspath(builders.checkpoint_dir(config.init_from)), layout.abstract_state.params)
    missing = sorted(set(layout.abstract_state.params) - set(params) - set(extra_keys))
    if missing:
      raise ValueError(f"init_from={config.init_from}: its checkpoint has no {missing}; "
                       f"expected a run of the same model")
    with in_context():
      return make(params)

  def init(key):
    params = nn.meta.unbox(VisionLanguageModel(model_config).init(
        key, dummy_batch(model_config))["params"])
    return create_state(with_extra(params), tx, config.seed)

  with in_context():
    return jax.jit(init, out_shardings=state_shardings)(jax.random.key(config.seed))


def _sum_over_processes(count: int) -> int:
  """`count` summed over every process of the run."""
  if jax.process_count() == 1:
    return count
  return int(np.sum(multihost_utils.process_allgather(np.int64(count))))


def _throughput(model_config, local_batch, steps: int, tokens: int, elapsed: float,
                peak: Optional[float], num_devices: int, objective) -> dict:
  """tokens/s, step time, analytic TFLOP/s per device and (on TPU) MFU over the last window."""
  step_flops = flops.batch_train_flops(
      model_config, local_batch, getattr(objective, "forwards_per_step", 1),
      getattr(objective, "uses_lm_head", True)) * jax.process_count()
  step_time = elapsed / max(steps, 1)
  tflops = step_flops / step_time / num_devices / 1e12
  out = {"tokens_per_second": tokens / max(elapsed, 1e-9), "step_time": step_time,
         "tflops_per_device": tflops}
  if peak:
    out["mfu"] = tflops * 1e12 / peak
  return out
