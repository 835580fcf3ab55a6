"""Metrics to TensorBoard event files and a JSONL file in the workdir, plus a console progress bar."""
import json
import math
import os
import sys
from typing import Mapping, Optional

import jax
import numpy as np


class MetricWriter:
  """Writes scalars on process 0 only; every line of metrics.jsonl is flushed as written."""

  def __init__(self, workdir: str, total_steps: int, start_step: int):
    self.active = jax.process_index() == 0
    if not self.active:
      return
    tensorboardx = _import_tensorboardx()
    import tqdm  # pylint: disable=g-import-not-at-top
    os.makedirs(workdir, exist_ok=True)
    self.tensorboard = tensorboardx.SummaryWriter(os.path.join(workdir, "tensorboard"))
    self.jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")
    self.bar = tqdm.tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True)

  def write(self, step: int, scalars: Mapping[str, float]) -> None:
    """Logs one step's scalars (JSONL + TensorBoard) and refreshes the progress bar's postfix."""
    if not self.active:
      return
    clean = {k: float(v) for k, v in scalars.items()}
    self.jsonl.write(json.dumps({"step": step, **clean}) + "\n")
    self.jsonl.flush()
    for key, value in clean.items():
      self.tensorboard.add_scalar(key, value, step)
    shown = {k: f"{clean[k]:.4g}" for k in ("loss", "mlm_loss", "mae_loss", "learning_rate")
             if k in clean}
    self.bar.set_postfix(shown, refresh=False)

  def advance(self, steps: int = 1) -> None:
    """Moves the progress bar (ETA from tqdm)."""
    if self.active:
      self.bar.update(steps)

  def close(self) -> None:
    """Flushes and closes every output."""
    if self.active:
      self.bar.close()
      self.tensorboard.close()
      self.jsonl.close()


def _import_tensorboardx():
  """tensorboardX without the torch it imports when installed (~1 s and ~300 MB a process, for
  types we never log: we write Python floats)."""
  if "torch" in sys.modules:
    import tensorboardX  # pylint: disable=g-import-not-at-top
    return tensorboardX
  sys.modules["torch"] = None  # `import torch` raises ImportError, which tensorboardX allows for
  try:
    import tensorboardX  # pylint: disable=g-import-not-at-top
  finally:
    del sys.modules["torch"]
  return tensorboardX


def host_scalars(metrics: Mapping[str, jax.Array]) -> dict:
  """Device metrics -> Python floats (one transfer)."""
  return {k: float(np.asarray(v)) for k, v in jax.device_get(dict(metrics)).items()}


def first_non_finite(scalars: Mapping[str, float]) -> Optional[str]:
  """Name of the first NaN/Inf among loss-like scalars, else None."""
  for key, value in scalars.items():
    if ("loss" in key or key.endswith("norm")) and not math.isfinite(value):
      return key
  return None
