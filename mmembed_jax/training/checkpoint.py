"""Orbax checkpoints of a run: params, optimiser state, RNG and the input's state, as separate items.

Saves are asynchronous; `keep` last checkpoints are kept plus every `keep_period`-th. A
restore takes the target shardings, so a run can continue on a different mesh. Orbax writes
into a temporary directory and renames it when complete: a crash or kill mid-save leaves the
previous checkpoint as the latest.

The `data` item (JSON, written by process 0) is `input_item(...)`: every process's Grain
iterator state (gathered from all processes, since each reads its own share of the input) and
the run's count of bad records so far, so a resumed run continues both.
"""
import json
import logging
import os
from typing import Any, Optional

import jax
import ml_collections
import numpy as np
from etils import epath
from jax.experimental import multihost_utils
import orbax.checkpoint as ocp

from mmembed_jax.training.train_step import TrainState

log = logging.getLogger(__name__)


def checkpoint_dir(workdir: str) -> str:
  """Where a run's checkpoints live."""
  return os.path.join(workdir, "checkpoints")


def make_manager(directory: str, ckpt: ml_collections.ConfigDict) -> ocp.CheckpointManager:
  """A CheckpointManager saving every `ckpt.every` steps (and whenever forced)."""
  options = ocp.CheckpointManagerOptions(
      save_interval_steps=ckpt.every, max_to_keep=ckpt.keep,
      keep_period=ckpt.keep_period or None, enable_async_checkpointing=ckpt.use_async,
      cleanup_tmp_directories=True)
  return ocp.CheckpointManager(directory, options=options)


def _gather_json(value: Any) -> list:
  """[value of process 0, value of process 1, ...]: a JSON-able value from every process."""
  if jax.process_count() == 1:
    return [value]
  encoded = np.frombuffer(json.dumps(value).encode(), np.uint8)
  sizes = multihost_utils.process_allgather(np.int32(encoded.size))  # [processes]
  padded = np.zeros(int(np.max(sizes)), np.uint8)
  padded[:encoded.size] = encoded
  gathered = multihost_utils.process_allgather(padded)  # [processes, longest]
  return [json.loads(row[:size].tobytes()) for row, size in zip(gathered, sizes)]


def input_item(iterator_state: Any, bad_records: int) -> dict:
  """The `data` item: every process's iterator state and the run's bad-record count (all
  processes must call this together)."""
  return {"iterators": _gather_json(iterator_state), "bad_records": int(bad_records)}


def split_input_item(item: Optional[dict]) -> tuple[Any, int]:
  """(this process's iterator state or None, bad records so far) of a restored `data` item."""
  if item is None:
    return None, 0
  if "iterators" not in item:  # written before the item held all processes' states
    return item, 0
  states = item["iterators"]
  if len(states) != jax.process_count():
    log.warning("the checkpoint holds the input state of %d processes, this run has %d: every "
                "process resumes from process 0's", len(states), jax.process_count())
    return states[0], int(item.get("bad_records", 0))
  return states[jax.process_index()], int(item.get("bad_records", 0))


def save(manager: ocp.CheckpointManager, state: TrainState, data_item: Optional[dict],
         force: bool = False) -> bool:
  """Starts saving `state` (and the `input_item`) at its step; returns whether a save started."""
  step = int(jax.device_get(state.step))
  items = dict(params=ocp.args.StandardSave(state.params),
               opt_state=ocp.args.StandardSave(state.opt_state),
               rng=ocp.args.StandardSave({"step": state.step, "rng": state.rng}))
  if data_item is not None:
    items["data"] = ocp.args.JsonSave(data_item)
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
