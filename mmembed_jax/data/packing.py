"""First-fit packing of encoded examples into fixed-shape rows that share patch buffers, as a
checkpointable Grain stage.

An example (one dict from `cpt_pipeline`'s or `coma_pipeline`'s encoder) holds
  input_ids int32 [n], positions int32 [3, n] (from 0), pixel_patches float32 [p, 1176],
  image_grid_thw int32 [k, 3], example_id int, and the budget's per-token fields (int32 [n]:
  MoCa's mlm_mask; CoMa's attention_regions, answer_mask) and per-patch fields (int32 [p]:
  MoCa's mae_mask).
A skipped input is the dict {"bad_record": "FILE:LINE: reason"} instead.

The stage emits units: one patch buffer and the r = `rows_per_buffer` rows it serves, in the
batch contract of `models/inputs.py` plus the masks (batching units and merging the first two
axes gives a batch):
  input_ids        int32 [r, length]            examples back to back, then pad_id
  segment_ids      int32 [r, length]            s on a row's s-th example's tokens (1..k), 0 on pad
  positions        int32 [r, 3, length]         each example's own positions (from 0), 0 on pad
  (token fields)   int32 [r, length]            the examples' values, 0 on padding
  pixel_patches    float32 [1, max_patches, 1176] the rows' patches, row after row, zero padded
  patch_image_ids  int32 [1, max_patches]       1..(images in the buffer), 0 = pad
  (patch fields)   int32 [1, max_patches]       the examples' values, 0 on padding
  image_grid_thw   int32 [1, max_images, 3]     grid of the buffer's i-th image at slot i - 1
  example_ids      int32 [r, max_segments]      example id of a row's segment s at s - 1, -1 unused
  bad_records      int32 [1]                    inputs skipped while this unit's group was read
  bad_messages     str [1]                      their "FILE:LINE: why" lines (bad_records.py)

Packing (like grain's FirstFitPackIterDataset): up to `num_bins` open rows in buffers of r; each
example goes to the first buffer with room for its patches and images and, in it, the first row
with room for its tokens and a segment; so tokens and patches fill jointly and a text-only
example takes no patch slot. The first example that fits in none closes the group: its units
are emitted in order and that example opens the next group. The iterator state is {"group_parent": the parent's state before the
group's first input, "emitted": rows of the group already emitted}: no pixels, a few numbers.
`set_state` restores the parent there and re-reads (re-decodes) the group, so a resumed
iterator emits exactly what an uninterrupted one would. The skipped inputs of a group are
counted on its first row and named there (`bad_messages`), for the consumer to log. A source
whose last `max_consecutive_bad` inputs were all bad stops the stream with a DataError.
"""
import dataclasses
import logging
from typing import Any, Dict, List, Mapping, Optional, Sequence

import grain
import numpy as np

from mmembed_jax.data import bad_records
from mmembed_jax.models import inputs

log = logging.getLogger(__name__)

BAD_RECORD = "bad_record"


@dataclasses.dataclass(frozen=True)
class PackingBudget:
  """Static shape of a packed unit: tokens and examples per row, patches and images per buffer of
  `rows_per_buffer` rows."""
  length: int
  max_patches: int
  max_images: int
  max_segments: int = 64
  pad_id: int = 0
  merge_unit: int = 4  # patches per merged token (2x2)
  token_fields: tuple = ("mlm_mask",)  # per-token int32 fields of the examples
  patch_fields: tuple = ("mae_mask",)  # per-patch int32 fields
  rows_per_buffer: int = 1

  def __post_init__(self):
    for name in ("length", "max_segments", "merge_unit", "rows_per_buffer"):
      if getattr(self, name) < 1:
        raise ValueError(f"packing: {name} must be >= 1, found {getattr(self, name)}")
    for name in ("max_patches", "max_images"):
      if getattr(self, name) < 0:
        raise ValueError(f"packing: {name} must be >= 0, found {getattr(self, name)}")
    if self.max_patches % self.merge_unit:
      raise ValueError(f"packing: max_patches {self.max_patches} must be a multiple of "
                       f"{self.merge_unit} (whole merged tokens)")


def encode_or_skip(encode: Any, record: Mapping[str, Any]) -> Dict[str, Any]:
  """`encode(record)`, or {BAD_RECORD: "FILE:LINE: why"} when it raises anything (one bad
  record skips itself); both carry the record's "source" name."""
  try:
    return encode(record)
  except Exception as e:  # pylint: disable=broad-except  # any failure of one record skips it
    return {BAD_RECORD: bad_records.describe(record.get("where", "?"), e),
            "source": record.get("source", "?")}


def example_size(example: Mapping[str, Any]) -> tuple:
  """(tokens, patches, images) of an encoded example."""
  return (int(example["input_ids"].shape[0]), int(example["pixel_patches"].shape[0]),
          int(example["image_grid_thw"].shape[0]))


class _Buffer:
  """One patch buffer being filled: the examples of each of its rows and the budgets they use."""

  def __init__(self, rows: int):
    self.rows: List[List[Mapping[str, Any]]] = [[] for _ in range(rows)]
    self.tokens = [0] * rows
    self.patches = self.images = 0

  def row_for(self, size: tuple, budget: PackingBudget) -> Optional[int]:
    """The first row where an example of `size` fits what is left of every budget, or None."""
    tokens, patches, images = size
    if self.patches + patches > budget.max_patches or self.images + images > budget.max_images:
      return None
    return next((i for i, row in enumerate(self.rows) if self.tokens[i] + tokens <= budget.length
                 and len(row) < budget.max_segments), None)

  def add(self, row: int, example: Mapping[str, Any], size: tuple) -> None:
    self.rows[row].append(example)
    self.tokens[row] += size[0]
    self.patches += size[1]
    self.images += size[2]


def layout_unit(rows: Sequence[Sequence[Mapping[str, Any]]],
                budget: PackingBudget) -> Dict[str, np.ndarray]:
  """The fixed-shape unit of one patch buffer whose row i holds `rows[i]`'s examples back to back
  (see the module docstring; rows past len(rows) are padding)."""
  r, length = budget.rows_per_buffer, budget.length
  max_patches, max_images = budget.max_patches, budget.max_images
  if len(rows) > r:
    raise ValueError(f"packing: {len(rows)} rows for a buffer of {r}")
  unit = {
      "input_ids": np.full((r, length), budget.pad_id, np.int32),
      "segment_ids": np.zeros((r, length), np.int32),
      "positions": np.zeros((r, 3, length), np.int32),
      "pixel_patches": np.zeros((1, max_patches, inputs.PATCH_DIM), np.float32),
      "patch_image_ids": np.zeros((1, max_patches), np.int32),
      "image_grid_thw": np.zeros((1, max_images, 3), np.int32),
      "example_ids": np.full((r, budget.max_segments), -1, np.int32),
  }
  unit.update({key: np.zeros((r, length), np.int32) for key in budget.token_fields})
  unit.update({key: np.zeros((1, max_patches), np.int32) for key in budget.patch_fields})
  p = k = 0  # patches and images placed in the buffer so far
  for i, examples in enumerate(rows):
    t = 0
    for s, example in enumerate(examples, start=1):
      n, num_patches, num_images = example_size(example)
      unit["input_ids"][i, t:t + n] = example["input_ids"]
      unit["segment_ids"][i, t:t + n] = s
      unit["positions"][i, :, t:t + n] = example["positions"]
      for key in budget.token_fields:
        unit[key][i, t:t + n] = example[key]
      unit["pixel_patches"][0, p:p + num_patches] = example["pixel_patches"]
      patches_per_image = np.prod(example["image_grid_thw"], axis=-1)  # [num_images]
      unit["patch_image_ids"][0, p:p + num_patches] = np.repeat(
          np.arange(k + 1, k + num_images + 1, dtype=np.int32), patches_per_image)
      for key in budget.patch_fields:
        unit[key][0, p:p + num_patches] = example[key]
      unit["image_grid_thw"][0, k:k + num_images] = example["image_grid_thw"]
      unit["example_ids"][i, s - 1] = example["example_id"]
      t, p, k = t + n, p + num_patches, k + num_images
  return unit


def merge_units(units: Mapping[str, np.ndarray]) -> Dict[str, np.ndarray]:
  """A batch of units [units, r or 1, ...] -> the batch [rows or buffers, ...]."""
  return {key: np.reshape(value, (np.shape(value)[0] * np.shape(value)[1],) + np.shape(value)[2:])
          for key, value in units.items()}


def packing_efficiency(batch: Mapping[str, np.ndarray]) -> Dict[str, float]:
  """Share of the token and patch slots that hold real data (not padding), and examples per row."""
  patch_ids = np.asarray(batch["patch_image_ids"])
  return {
      "token_fill": float(np.mean(np.asarray(batch["segment_ids"]) > 0)),
      "patch_fill": float(np.mean(patch_ids > 0)) if patch_ids.size else 0.0,
      "examples_per_row": float(np.mean(np.sum(np.asarray(batch["example_ids"]) >= 0, axis=-1))),
  }


class PackIterDataset(grain.IterDataset):
  """Packs the parent's encoded examples into units of `budget`'s fixed shape, first fit;
  `num_bins` rows are open at once (at least one buffer)."""

  def __init__(self, parent: grain.IterDataset, budget: PackingBudget, num_bins: int,
               max_consecutive_bad: int = bad_records.MAX_CONSECUTIVE):
    super().__init__(parent)
    if num_bins < 1:
      raise ValueError(f"packing: num_bins must be >= 1, found {num_bins}")
    self._budget, self._num_bins = budget, num_bins
    self._max_consecutive_bad = max_consecutive_bad

  def __iter__(self) -> "PackIterator":
    return PackIterator(self._parent.__iter__(), self._budget, self._num_bins,
                        self._max_consecutive_bad)

  def __str__(self) -> str:
    return f"PackIterDataset(budget={self._budget}, num_bins={self._num_bins})"


class PackIterator(grain.DatasetIterator):
  """Iterator of PackIterDataset; its state replays the current group (see the module docstring)."""

  def __init__(self, parent: grain.DatasetIterator, budget: PackingBudget, num_bins: int,
               max_consecutive_bad: int):
    super().__init__(parent)
    self._budget, self._num_bins = budget, num_bins
    self._bad_check = bad_records.ConsecutiveBadCheck(max_consecutive_bad)
    self._restart(self._parent.get_state(), skip=0)

  def _restart(self, group_parent: Any, skip: int) -> None:
    """Forgets everything read; the next group starts at the parent state `group_parent`."""
    self._group_parent = group_parent  # parent state before the current group's first input
    self._emitted = 0  # units of the current group already emitted
    self._skip = skip  # units to drop after re-packing a group (restored mid-group)
    self._units: List[Dict[str, np.ndarray]] = []  # packed units not yet emitted
    self._bad: List[str] = []  # skipped inputs of the group, reported with its first row
    self._carry: Optional[tuple] = None  # (example, size) that opens the next group
    self._next_group_parent: Any = None

  def get_state(self) -> Dict[str, Any]:
    return {"group_parent": self._group_parent, "emitted": self._emitted}

  def set_state(self, state: Dict[str, Any]) -> None:
    self._parent.set_state(state["group_parent"])
    self._restart(state["group_parent"], skip=int(state["emitted"]))

  def _read_group(self) -> None:
    """Reads inputs until a group is complete; fills self._units (StopIteration at the end)."""
    budget = self._budget
    max_buffers = max(1, self._num_bins // budget.rows_per_buffer)
    bins: List[_Buffer] = []
    pending = [self._carry] if self._carry is not None else []
    self._carry = None
    while True:
      if pending:
        example, size = pending.pop()
      else:
        state_before = self._parent.get_state()
        try:
          element = next(self._parent)
        except StopIteration:
          if not bins:
            for message in self._bad:  # nothing left to carry the count: log it at least
              log.warning("skipped bad record %s", message)
            self._bad = []
            raise
          self._next_group_parent = state_before
          break
        source = element.get("source", "?")
        if BAD_RECORD in element:
          self._bad.append(element[BAD_RECORD])
          self._bad_check.bad(source, element[BAD_RECORD])
          continue
        self._bad_check.good(source)
        example, size = element, example_size(element)
      target = next(((b, row) for b in bins
                     for row in [b.row_for(size, budget)] if row is not None), None)
      if target is None and len(bins) < max_buffers:
        fresh = _Buffer(budget.rows_per_buffer)
        if fresh.row_for(size, budget) is None:
          raise ValueError(f"packing: example {example.get('example_id')} of (tokens, patches, "
                           f"images) {size} exceeds an empty buffer's budget {budget}")
        bins.append(fresh)
        target = (fresh, 0)
      if target is None:
        self._carry = (example, size)
        self._next_group_parent = state_before
        break
      target[0].add(target[1], example, size)
    self._units = [layout_unit(b.rows, budget) for b in bins]
    for i, unit in enumerate(self._units):
      unit["bad_records"] = np.full((1,), len(self._bad) if i == 0 else 0, np.int32)
      unit[bad_records.MESSAGES] = np.array(
          [bad_records.join_messages(self._bad if i == 0 else ())])
    self._bad = []

  def __next__(self) -> Dict[str, np.ndarray]:
    while not self._units:
      self._read_group()
      while self._skip and self._units:  # restored mid-group: these units were emitted before
        self._units.pop(0)
        self._skip -= 1
        self._emitted += 1
      if not self._units:
        self._advance_group()
    unit = self._units.pop(0)
    self._emitted += 1
    if not self._units:
      self._advance_group()
    return unit

  def _advance_group(self) -> None:
    """The current group is fully emitted: the state now points at the next group."""
    self._group_parent = self._next_group_parent
    self._emitted = 0

  def __str__(self) -> str:
    return f"PackIterator(budget={self._budget}, num_bins={self._num_bins})"
