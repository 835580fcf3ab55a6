"""Tests of the weighted, capped, process-sharded mixture (mmembed_jax.data.mixture)."""
import collections

import grain
import numpy as np
import pytest

from mmembed_jax.data import mixture


class _ListSource:
  """An in-memory source: record i is {"text": "NAME i", ...}."""

  def __init__(self, name, size):
    self.name, self.size = name, size

  def __len__(self):
    return self.size

  def __getitem__(self, i):
    if not 0 <= i < self.size:
      raise IndexError(i)
    return {"text": f"{self.name} {i}", "images": [], "source": self.name,
            "where": f"{self.name}.jsonl:{i + 1}", "error": None}


def _entries(*specs):
  """MixtureEntry per (name, size, weight, cap)."""
  return [mixture.MixtureEntry(name, _ListSource(name, size), weight, cap)
          for name, size, weight, cap in specs]


def test_integer_weights_keep_ratios():
  assert mixture.integer_weights([1, 1], ["a", "b"]) == [1, 1]
  assert mixture.integer_weights([0.3, 0.7], ["a", "b"]) == [3, 7]
  assert mixture.integer_weights([1, 2, 3.5], ["a", "b", "c"]) == [2, 4, 7]
  assert mixture.integer_weights([500_000, 250_000], ["a", "b"]) == [2, 1]
  with pytest.raises(ValueError, match="source 'b': weight must be a positive number"):
    mixture.integer_weights([1, 0], ["a", "b"])


def test_weights_set_exact_shares_per_block_and_everything_is_deterministic():
  entries = _entries(("a", 1000, 1.0, None), ("b", 1000, 2.0, None), ("c", 1000, 0.5, None))
  mix = mixture.Mixture(entries, seed=3)
  block = len(mix.pattern)  # 2 + 4 + 1 = 7
  assert block == 7
  located = [mix.locate(j) for j in range(block * 50)]
  counts = collections.Counter(i for i, _ in located)
  assert counts == {0: 100, 1: 200, 2: 50}
  assert located == [mixture.Mixture(entries, seed=3).locate(j) for j in range(block * 50)]
  assert located != [mixture.Mixture(entries, seed=4).locate(j) for j in range(block * 50)]
  # Sources are not in a fixed rotation: blocks are shuffled.
  assert len({tuple(i for i, _ in located[b * block:(b + 1) * block]) for b in range(50)}) > 5


def test_records_carry_a_stable_global_example_id():
  entries = _entries(("a", 50, 1.0, None), ("b", 70, 1.0, None))
  mix = mixture.Mixture(entries, seed=0)
  for j in range(100):
    record = mix[j]
    i, r = mix.locate(j)
    assert record["example_id"] == i * mixture.SOURCE_STRIDE + r
    assert mixture.split_example_id(record["example_id"]) == (i, r)
    assert record["text"] == f"{'ab'[i]} {r}" and record["source"] == "ab"[i]
  assert mix[5]["example_id"] == mixture.Mixture(entries, seed=0)[5]["example_id"]
  assert mixture.example_id(mixture.MAX_SOURCES - 1, mixture.SOURCE_STRIDE - 1) < 2**31  # int32


def test_cap_limits_distinct_records_and_each_epoch_covers_the_capped_set_once():
  entries = _entries(("big", 10_000, 1.0, 40), ("small", 25, 1.0, None))
  mix = mixture.Mixture(entries, seed=1)
  by_source = collections.defaultdict(list)
  for j in range(2 * 40 * 3):  # 3 epochs of the capped source
    i, r = mix.locate(j)
    by_source[i].append(r)
  big = by_source[0]
  assert len(big) == 120 and len(set(big)) == 40
  for epoch in range(3):
    assert sorted(big[epoch * 40:(epoch + 1) * 40]) == sorted(set(big))
  assert big[:40] != big[40:80]  # reshuffled per epoch
  small = by_source[1]
  assert sorted(small[:25]) == list(range(25))  # upsampled source repeats whole epochs


def test_processes_read_disjoint_slices_that_cover_the_data():
  entries = _entries(("a", 60, 1.0, None), ("b", 3000, 1.0, 30))
  seen = []
  for process_index in range(3):
    mix = mixture.Mixture(entries, seed=5, process_index=process_index, process_count=3)
    seen.append({mix.locate(j) for j in range(20)})  # 10 of a, 10 of b per process
  assert all(len(s) == 20 for s in seen)
  assert not (seen[0] & seen[1]) and not (seen[0] & seen[2]) and not (seen[1] & seen[2])
  union = set.union(*seen)
  assert {r for i, r in union if i == 0} <= set(range(60))
  assert len({r for i, r in union if i == 1}) == 30  # the whole capped set of b: one epoch


def test_grain_worker_slices_get_a_mix_of_sources():
  entries = _entries(("text", 500, 1.0, None), ("image", 500, 1.0, None))
  dataset = mixture.mixture_dataset(entries, seed=0)
  for worker in range(2):
    sources_seen = collections.Counter(r["source"] for r in dataset[worker::2][:200])
    assert 60 < sources_seen["text"] < 140, sources_seen


def test_mixture_dataset_resumes_from_grain_state():
  dataset = mixture.mixture_dataset(_entries(("a", 30, 1.0, None), ("b", 40, 3.0, None)), seed=2)
  iterator = dataset.to_iter_dataset().__iter__()
  first = [next(iterator)["example_id"] for _ in range(7)]
  state = iterator.get_state()
  rest = [next(iterator)["example_id"] for _ in range(9)]
  resumed = dataset.to_iter_dataset().__iter__()
  resumed.set_state(state)
  assert [next(resumed)["example_id"] for _ in range(9)] == rest
  assert first == [dataset[j]["example_id"] for j in range(7)]


def test_bad_configurations_name_the_source():
  with pytest.raises(ValueError, match="source 'empty' has no records"):
    mixture.Mixture(_entries(("empty", 0, 1.0, None)), seed=0)
  with pytest.raises(ValueError, match="source 'a': cap must be a positive integer"):
    mixture.Mixture(_entries(("a", 5, 1.0, 0)), seed=0)
  with pytest.raises(ValueError, match="at least one source"):
    mixture.Mixture([], seed=0)
  with pytest.raises(ValueError, match="process_index 2"):
    mixture.Mixture(_entries(("a", 5, 1.0, None)), seed=0, process_index=2, process_count=2)
  too_big = mixture.MixtureEntry("huge", _ListSource("huge", mixture.SOURCE_STRIDE + 1))
  with pytest.raises(ValueError, match="source 'huge' has 67108865 records"):
    mixture.Mixture([too_big], seed=0)
  assert isinstance(mixture.mixture_dataset(_entries(("a", 5, 1.0, None)), 0), grain.MapDataset)
  assert np.int32(mixture.example_id(31, 5)) == mixture.example_id(31, 5)
