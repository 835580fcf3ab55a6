"""Orbax checkpoints of a run: params, optimiser state, RNG and the data iterator, as separate items.

Saves are asynchronous; `keep` last checkpoints are kept plus every `keep_period`-th. A
restore takes the target shardings, so a run can continue on a different mesh. Orbax writes
into a temporary directory and renames it when complete: a crash or kill mid-save leaves the
previous checkpoint as the latest.
"""
from typing import Any, Optional

import jax
import ml_collections
from etils import epath
import orbax.checkpoint as ocp

from mmembed_jax.training.train_step import TrainState


def make_manager(directory: str, ckpt: ml_collections.ConfigDict) -> ocp.CheckpointManager:
  """A CheckpointManager saving every `ckpt.every` steps (and whenever forced)."""
  options = ocp.CheckpointManagerOptions(
      save_interval_steps=ckpt.every, max_to_keep=ckpt.keep,
      keep_period=ckpt.keep_period or None, enable_async_checkpointing=ckpt.use_async,
      cleanup_tmp_directories=True)
  return ocp.CheckpointManager(directory, options=options)


def save(manager: ocp.CheckpointManager, state: TrainState, data_state: Optional[dict],
         force: bool = False) -> bool:
  """Starts saving `state` (and the iterator state) at its step; returns whether a save started."""
  step = int(jax.device_get(state.step))
  items = dict(params=ocp.args.StandardSave(state.params),
               opt_state=ocp.args.StandardSave(state.opt_state),
               rng=ocp.args.StandardSave({"step": state.step, "rng": state.rng}))
  if data_state is not None:
    items["data"] = ocp.args.JsonSave(data_state)
  return manager.save(step, args=ocp.args.Composite(**items), force=force)


def restore(manager: ocp.CheckpointManager, abstract_state: TrainState, step: Optional[int] = None,
            with_data: bool = True) -> tuple[TrainState, Optional[dict]]:
  """Restores onto the shardings carried by `abstract_state` (ShapeDtypeStructs with .sharding)."""
  step = manager.latest_step() if step is None else step
  items = dict(params=ocp.args.StandardRestore(abstract_state.params),
               opt_state=ocp.args.StandardRestore(abstract_state.opt_state),
               rng=ocp.args.StandardRestore({"step": abstract_state.step, "rng": abstract_state.rng}))
  has_data = with_data and (epath.Path(manager.directory) / str(step) / "data").exists()
  if has_data:
    items["data"] = ocp.args.JsonRestore()
  restored = manager.restore(step, args=ocp.args.Composite(**items))
  state = TrainState(step=restored["rng"]["step"], params=restored["params"],
                     opt_state=restored["opt_state"], rng=restored["rng"]["rng"])
  return state, (restored["data"] if has_data else None)


def latest_step(directory: str) -> int:
  """The newest finished checkpoint step in `directory`; FileNotFoundError when there is none."""
  with ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(read_only=True)
                             ) as manager:
    step = manager.latest_step()
  if step is None:
    raise FileNotFoundError(f"{directory}: no checkpoint found")
  return step


def restore_params(directory: str, abstract_params: Any, step: Optional[int] = None) -> Any:
  """Params of another run's checkpoint (for `init_from`), resharded to abstract_params.

  Top-level entries only one side has are left out: the checkpoint's are not read (MoCa's MAE
  decoder when stage 2 starts from stage 1), ours are absent from the result for the caller to
  create (a new objective's parameters, e.g. a learned temperature).
  """
  with ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(read_only=True)
                             ) as manager:
    step = manager.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"init_from={directory}: no checkpoint found")
    saved = ocp.PyTreeCheckpointHandler().metadata(epath.Path(directory) / str(step) / "params")
    wanted = {k: v for k, v in abstract_params.items() if k in saved.tree}
    restored = manager.restore(step, args=ocp.args.Composite(params=ocp.args.PyTreeRestore(
        item=wanted, restore_args=ocp.checkpoint_utils.construct_restore_args(wanted),
        partial_restore=True)))
    return restored["params"]
