"""A weighted, capped, shuffled mixture of record sources, sharded by process; random access.

Position j of process p's endless stream is computed, never stored, so Grain can read any
position (in threads, in worker processes) and a checkpoint only needs the next position:

  1. weights: every block of S positions holds source i exactly w_i times (w = the weights as
     small integers, S = sum w), in a seeded random order per block (so Grain worker slices
     j = w mod W also get a random mix); the k-th use of source i by this process is its
     k-th record;
  2. process sharding: process p owns positions g = k * process_count + p of each source's
     stream, so processes read disjoint records;
  3. cap and epochs: a source's stream cycles over `cap` records picked by a seeded permutation
     of all its records (MoCa: 500K per source), reshuffled every epoch. Sources used up before
     the others are repeated: weights set the share of examples, caps the distinct records.

Every record carries `example_id = source_index * SOURCE_STRIDE + record_index`: stable for a
source list, unique, and int32 (at most 32 sources of at most 2**26 records each).
"""
import dataclasses
import fractions as fractions_lib
import functools
import math
import sys
from typing import Any, Dict, List, Optional, Sequence, Tuple

import grain
import numpy as np

SOURCE_STRIDE = 2**26  # record indices per source in an example id
MAX_SOURCES = 2**31 // SOURCE_STRIDE  # example ids stay below 2**31 (int32)


def example_id(source_index: int, record_index: int) -> int:
  """The global id of record `record_index` of source `source_index`."""
  return source_index * SOURCE_STRIDE + record_index


def split_example_id(global_id: int) -> Tuple[int, int]:
  """(source index, record index) of a global example id."""
  return divmod(int(global_id), SOURCE_STRIDE)


@dataclasses.dataclass(frozen=True)
class MixtureEntry:
  """One named source in the mixture: its records, weight and cap (None = all records)."""
  name: str
  source: Any  # random access: len() and source[i] -> record dict
  weight: float = 1.0
  cap: Optional[int] = None


def integer_weights(weights: Sequence[float], names: Sequence[str],
                    resolution: int = 10_000) -> List[int]:
  """Weights as small integers with the same ratios (exact for simple fractions, else to 1e-4)."""
  for name, weight in zip(names, weights):
    if not weight > 0 or not math.isfinite(weight):
      raise ValueError(f"source '{name}': weight must be a positive number, found {weight!r}")
  fractions = [fractions_lib.Fraction(w).limit_denominator(1000) for w in weights]
  scale = functools.reduce(math.lcm, [f.denominator for f in fractions])
  ints = [int(f * scale) for f in fractions]
  divisor = functools.reduce(math.gcd, ints)
  ints = [v // divisor for v in ints]
  exact = all(abs(v / sum(ints) - w / sum(weights)) < 1e-9 for v, w in zip(ints, weights))
  if exact and sum(ints) <= resolution:
    return ints
  total = float(sum(weights))
  ints = [round(w / total * resolution) for w in weights]
  for name, weight, value in zip(names, weights, ints):
    if value == 0:
      raise ValueError(f"source '{name}': weight {weight} is below 1/{resolution} of the total "
                       f"{total}; raise it or drop the source")
  divisor = functools.reduce(math.gcd, ints)
  return [v // divisor for v in ints]


def weight_pattern(proportions: Sequence[int]) -> np.ndarray:
  """int32 [sum(proportions)]: the source of each slot, spread out by smooth weighted round robin."""
  total = sum(proportions)
  current = np.zeros(len(proportions), np.int64)
  pattern = np.zeros(total, np.int32)
  for slot in range(total):
    current += proportions
    best = int(np.argmax(current))
    pattern[slot] = best
    current[best] -= total
  return pattern


SMALL_PERMUTATION = 1 << 14  # below this, a cached numpy permutation beats index_shuffle


def _seed32(*keys: int) -> int:
  """A 32-bit seed derived from integer keys (for grain's index_shuffle)."""
  return int(np.random.SeedSequence([int(k) for k in keys]).generate_state(1)[0])


class SeededPermutations:
  """fn(index, size, *keys): position of `index` in the permutation of range(size) seeded by
  (seed, *keys); small permutations are cached (a bounded cache, dropped when pickled)."""

  def __init__(self, seed: int):
    self.seed = int(seed)
    self._cache: Dict[Tuple[int, int], np.ndarray] = {}

  def __call__(self, index: int, size: int, *keys: int) -> int:
    seed = _seed32(self.seed, *keys)
    if size > SMALL_PERMUTATION:  # grain's index_shuffle is fast for large ranges only
      return grain.experimental.index_shuffle(index, max_index=size - 1, seed=seed, rounds=4)
    permutation = self._cache.get((size, seed))
    if permutation is None:
      if len(self._cache) >= 64:
        self._cache.clear()
      permutation = self._cache[(size, seed)] = np.random.default_rng(seed).permutation(size)
    return int(permutation[index])

  def __getstate__(self):
    return {"seed": self.seed}

  def __setstate__(self, state):
    self.__init__(state["seed"])


class Mixture:
  """Process `process_index`'s endless mixed stream: mixture[j] -> record with example_id."""

  def __init__(self, entries: Sequence[MixtureEntry], seed: int, process_index: int = 0,
               process_count: int = 1):
    if not entries:
      raise ValueError("mixture: expected at least one source, found none")
    if len(entries) > MAX_SOURCES:
      raise ValueError(f"mixture: {len(entries)} sources, but int32 example ids allow at most "
                       f"{MAX_SOURCES}")
    if not 0 <= process_index < process_count:
      raise ValueError(f"mixture: process_index {process_index} not in [0, {process_count})")
    self.entries = list(entries)
    self.seed, self.process_index, self.process_count = int(seed), process_index, process_count
    self.sizes = [len(e.source) for e in entries]
    self.caps = []
    for entry, size in zip(entries, self.sizes):
      if size == 0:
        raise ValueError(f"source '{entry.name}' has no records")
      if size > SOURCE_STRIDE:
        raise ValueError(f"source '{entry.name}' has {size} records; example ids allow at most "
                         f"{SOURCE_STRIDE} per source: split it into several sources")
      if entry.cap is not None and entry.cap < 1:
        raise ValueError(f"source '{entry.name}': cap must be a positive integer or None, "
                         f"found {entry.cap!r}")
      self.caps.append(size if entry.cap is None else min(size, int(entry.cap)))
    self.proportions = integer_weights([e.weight for e in entries], [e.name for e in entries])
    self.pattern = weight_pattern(self.proportions)  # [S]
    # rank[s]: how many earlier slots of the block use the same source as slot s.
    self.rank = np.zeros_like(self.pattern)
    seen = [0] * len(entries)
    for slot, i in enumerate(self.pattern):
      self.rank[slot], seen[i] = seen[i], seen[i] + 1
    self._shuffled = SeededPermutations(self.seed)

  def __len__(self) -> int:
    return sys.maxsize  # endless; Grain reads positions in order from the one it resumes at

  def locate(self, position: int) -> Tuple[int, int]:
    """(source index, record index) at `position` of this process's stream."""
    if position < 0:
      raise IndexError(f"mixture: position must be >= 0, found {position}")
    block, slot = divmod(position, len(self.pattern))
    slot = self._shuffled(slot, len(self.pattern), 0, block)
    i = int(self.pattern[slot])
    key = block * self.proportions[i] + int(self.rank[slot])  # use of source i by this process
    stream = key * self.process_count + self.process_index  # position in source i's stream
    epoch, index_in_epoch = divmod(stream, self.caps[i])
    picked = self._shuffled(index_in_epoch, self.caps[i], 1, i, epoch)
    if self.caps[i] == self.sizes[i]:
      return i, picked
    # The capped subset: the first `cap` entries of a fixed permutation of all records.
    return i, self._shuffled(picked, self.sizes[i], 2, i)

  def __getitem__(self, position: int) -> Dict[str, Any]:
    i, record_index = self.locate(int(position))
    record = dict(self.entries[i].source[record_index])
    record["example_id"] = example_id(i, record_index)
    return record


def mixture_dataset(entries: Sequence[MixtureEntry], seed: int, process_index: int = 0,
                    process_count: int = 1) -> grain.MapDataset:
  """The mixture as an endless Grain MapDataset of records (this process's slice only)."""
  return grain.MapDataset.source(Mixture(entries, seed, process_index, process_count))
