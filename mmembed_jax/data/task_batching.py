"""Task-aware batching: which (dataset, row) fills each slot of each global batch; random access.

Global batch b has G = global_batch_size slots. Everything below is a function of (seed, b, slot)
only, so every host computes the same global batches without talking to the others, and host p
of P takes slots [p * G / P, (p + 1) * G / P) of each.

task_batching=True (MoCa stage 2, VLM2Vec-V2 / CoMa same-source batches): every global batch
  is drawn from ONE dataset. Datasets take turns in blocks of S batches: a block holds dataset i
  exactly w_i times (w = the weights as small integers, S = sum w; mixture.py's weight_pattern),
  in a seeded order per block, so the k-th batch of dataset i is found in O(1). Dataset i's
  k-th batch is rows [j * G, (j + 1) * G) of a seeded permutation of its (capped) rows for epoch
  e, where (e, j) = divmod(k, cap_i // G): the epoch remainder is dropped, so a batch never holds
  the same row twice. A dataset with fewer than G rows (after its cap) is an error.
task_batching=False: mixed batches. Slots g = b * G + s of the global stream take turns between
  datasets in the same weighted blocks (now of slots), and dataset i's k-th slot is row k of its
  per-epoch permutations (epoch length cap_i). A small dataset's row may repeat within a batch
  that straddles two of its epochs.

Weights set the share of batches (task_batching) or of slots (mixed), i.e. the share of
examples; caps (a seeded subset of cap rows, fixed for the run) set the distinct rows. Element
j of process p's stream (a Grain MapDataset, endless) is slot p * L + j mod L of global batch
j // L, L = G / P; Grain's iterator state (the next position) therefore resumes exactly.
Batch it as a MapDataset (`.batch(L)` before `to_iter_dataset` / `mp_prefetch`): Grain's worker
processes slice the MapDataset below them, and slicing rows would mix global batches.
"""
import dataclasses
import sys
from typing import Any, Dict, List, Optional, Sequence, Tuple

import grain
import numpy as np

from mmembed_jax.data import mixture



@dataclasses.dataclass(frozen=True)
class DatasetSpec:
  """One named dataset of the sampler: its number of rows, weight and cap (None = all rows)."""
  name: str
  size: int
  weight: float = 1.0
  cap: Optional[int] = None


@dataclasses.dataclass(frozen=True)
class Slot:
  """Where one slot of a global batch reads: the dataset, its row, and that dataset's epoch."""
  dataset_index: int
  record_index: int
  epoch: int


class TaskBatchSampler:
  """Global batch b -> its G slots (dataset, row, epoch); process p's stream of its slices."""

  def __init__(self, datasets: Sequence[DatasetSpec], global_batch_size: int, seed: int,
               task_batching: bool = True, process_index: int = 0, process_count: int = 1):
    if not datasets:
      raise ValueError("task batching: expected at least one dataset, found none")
    if len(datasets) > mixture.MAX_SOURCES:
      raise ValueError(f"task batching: {len(datasets)} datasets, but int32 example ids allow at "
                       f"most {mixture.MAX_SOURCES}")
    if global_batch_size < 1:
      raise ValueError(f"task batching: global_batch_size must be >= 1, found {global_batch_size}")
    if not 0 <= process_index < process_count:
      raise ValueError(f"task batching: process_index {process_index} not in [0, {process_count})")
    if global_batch_size % process_count:
      raise ValueError(f"global_batch_size {global_batch_size} is not divisible by "
                       f"{process_count} processes")
    self.datasets = list(datasets)
    self.global_batch_size, self.task_batching = int(global_batch_size), bool(task_batching)
    self.process_index, self.process_count = int(process_index), int(process_count)
    self.local_batch_size = self.global_batch_size // self.process_count
    self.caps = []
    for dataset in self.datasets:
      if dataset.size < 1:
        raise ValueError(f"dataset '{dataset.name}' has no rows")
      if dataset.size > mixture.SOURCE_STRIDE:
        raise ValueError(f"dataset '{dataset.name}' has {dataset.size} rows; example ids allow "
                         f"at most {mixture.SOURCE_STRIDE} per dataset: split it")
      if dataset.cap is not None and (isinstance(dataset.cap, bool) or int(dataset.cap) < 1):
        raise ValueError(f"dataset '{dataset.name}': cap must be a positive integer or None, "
                         f"found {dataset.cap!r}")
      cap = dataset.size if dataset.cap is None else min(dataset.size, int(dataset.cap))
      if self.task_batching and cap < self.global_batch_size:
        raise ValueError(f"dataset '{dataset.name}' has {cap} rows (size {dataset.size}, cap "
                         f"{dataset.cap}), fewer than global_batch_size {self.global_batch_size}: "
                         f"task-aware batching draws whole batches from one dataset")
      self.caps.append(cap)
    # Rows per epoch: whole batches only with task batching, all capped rows otherwise.
    g = self.global_batch_size
    self.epoch_rows = [cap // g * g if self.task_batching else cap for cap in self.caps]
    self.proportions = mixture.integer_weights([d.weight for d in self.datasets],
                                               [d.name for d in self.datasets])
    self.pattern = mixture.weight_pattern(self.proportions)  # [S] dataset of each slot of a block
    self.rank = np.zeros_like(self.pattern)  # [S] earlier slots of the block with that dataset
    seen = [0] * len(self.datasets)
    for slot, i in enumerate(self.pattern):
      self.rank[slot], seen[i] = seen[i], seen[i] + 1
    self._permute = mixture.SeededPermutations(seed)

  def _turn(self, t: int) -> Tuple[int, int]:
    """(dataset i, k): turn t of the weighted blocks is the k-th turn of dataset i."""
    block, slot = divmod(t, len(self.pattern))
    slot = self._permute(slot, len(self.pattern), 0, block)
    i = int(self.pattern[slot])
    return i, block * self.proportions[i] + int(self.rank[slot])

  def _row(self, i: int, position: int) -> Slot:
    """Row `position` of dataset i's endless stream of per-epoch permutations of its capped rows."""
    epoch, index = divmod(position, self.epoch_rows[i])
    picked = self._permute(index, self.caps[i], 1, i, epoch)
    if self.caps[i] < self.datasets[i].size:  # the capped subset: a fixed permutation's prefix
      picked = self._permute(picked, self.datasets[i].size, 2, i)
    return Slot(i, picked, epoch)

  def global_slot(self, batch: int, slot: int) -> Slot:
    """Where slot `slot` of global batch `batch` reads."""
    if batch < 0 or not 0 <= slot < self.global_batch_size:
      raise IndexError(f"task batching: batch {batch}, slot {slot} out of range "
                       f"(batch >= 0, slot in [0, {self.global_batch_size}))")
    if self.task_batching:
      i, k = self._turn(batch)
      return self._row(i, k * self.global_batch_size + slot)
    i, k = self._turn(batch * self.global_batch_size + slot)
    return self._row(i, k)

  def global_batch(self, batch: int) -> List[Slot]:
    """The G slots of global batch `batch` (every host computes the same)."""
    return [self.global_slot(batch, s) for s in range(self.global_batch_size)]

  def __len__(self) -> int:
    return sys.maxsize  # endless; Grain reads positions in order from the one it resumes at

  def __getitem__(self, position: int) -> Dict[str, Any]:
    """Element `position` of this process's stream: its slot of a global batch."""
    if position < 0:
      raise IndexError(f"task batching: position must be >= 0, found {position}")
    batch, local = divmod(int(position), self.local_batch_size)
    slot = self.process_index * self.local_batch_size + local
    found = self.global_slot(batch, slot)
    return {"dataset_index": found.dataset_index, "record_index": found.record_index,
            "example_id": mixture.example_id(found.dataset_index, found.record_index),
            "epoch": found.epoch, "global_batch": batch, "slot": slot}


def sampler_dataset(sampler: TaskBatchSampler) -> grain.MapDataset:
  """This process's endless stream of slots as a Grain MapDataset; `.batch(local_batch_size)` it."""
  return grain.MapDataset.source(sampler)
