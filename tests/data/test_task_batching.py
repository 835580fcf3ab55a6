"""Tests of task-aware batching (mmembed_jax.data.task_batching): no files, only indices."""
import collections
import json

import numpy as np
import pytest

from mmembed_jax.data import mixture
from mmembed_jax.data import task_batching as tb

DATASETS = [tb.DatasetSpec("vqa", 50, weight=1.0), tb.DatasetSpec("retrieval", 83, weight=2.0),
            tb.DatasetSpec("docs", 31, weight=1.0, cap=20)]


def _sampler(global_batch_size=8, seed=3, task_batching=True, process_index=0, process_count=1,
             datasets=DATASETS):
  return tb.TaskBatchSampler(datasets, global_batch_size, seed, task_batching, process_index,
                             process_count)


def _local_batches(sampler, count, start=0):
  """Process-local batches [(dataset, record)] read through the Grain MapDataset."""
  ds = tb.sampler_dataset(sampler).batch(sampler.local_batch_size, drop_remainder=True)
  out = []
  for b in range(start, start + count):
    batch = ds[b]
    out.append(list(zip(batch["dataset_index"].tolist(), batch["record_index"].tolist())))
  return out


def test_every_global_batch_comes_from_one_dataset_on_every_host():
  whole = _local_batches(_sampler(), 40)
  hosts = [_local_batches(_sampler(process_index=p, process_count=2), 40) for p in range(2)]
  for b in range(40):
    first, second = hosts[0][b], hosts[1][b]
    assert len(first) == len(second) == 4
    assert not set(first) & set(second), b  # the two slices are disjoint
    assert first + second == whole[b], b  # and together the one-process global batch
    assert len({i for i, _ in whole[b]}) == 1, whole[b]  # one dataset per global batch
    assert whole[b] == [(s.dataset_index, s.record_index) for s in _sampler().global_batch(b)]


def test_batches_never_repeat_a_row_and_epochs_drop_the_remainder():
  sampler = _sampler()
  per_dataset = collections.defaultdict(list)  # dataset -> its batches in order
  for b in range(120):
    slots = sampler.global_batch(b)
    rows = [s.record_index for s in slots]
    assert len(set(rows)) == len(rows), (b, rows)
    assert len({s.epoch for s in slots}) == 1
    per_dataset[slots[0].dataset_index].append((slots[0].epoch, rows))
  for i, batches in per_dataset.items():
    per_epoch = sampler.caps[i] // 8
    for e in range(len(batches) // per_epoch):
      epoch_rows = [r for epoch, rows in batches[e * per_epoch:(e + 1) * per_epoch] for r in rows]
      assert {epoch for epoch, _ in batches[e * per_epoch:(e + 1) * per_epoch]} == {e}
      assert len(set(epoch_rows)) == per_epoch * 8  # a permutation, remainder dropped
    assert len({tuple(rows) for _, rows in batches}) > per_epoch  # reshuffled every epoch
  # The capped dataset only ever reads the same 20 of its 31 rows.
  docs = {r for _, rows in per_dataset[2] for r in rows}
  assert len(docs) <= 20 and all(0 <= r < 31 for r in docs)


def test_weights_set_the_share_of_batches():
  sampler = _sampler()
  counts = collections.Counter(sampler.global_slot(b, 0).dataset_index for b in range(400))
  assert counts == {0: 100, 1: 200, 2: 100}  # exact over whole blocks of 4 batches
  skewed = _sampler(datasets=[tb.DatasetSpec("a", 40, 0.7), tb.DatasetSpec("b", 40, 0.3)])
  counts = collections.Counter(skewed.global_slot(b, 0).dataset_index for b in range(95))
  assert abs(counts[0] / 95 - 0.7) < 0.05, counts


def test_dataset_order_is_shuffled_and_seeded():
  order = [_sampler().global_slot(b, 0).dataset_index for b in range(60)]
  assert order == [_sampler().global_slot(b, 0).dataset_index for b in range(60)]
  other = [_sampler(seed=4).global_slot(b, 0).dataset_index for b in range(60)]
  assert order != other
  assert order[:30] != [mixture.weight_pattern([1, 2, 1])[b % 4] for b in range(30)]


def test_mixed_batches_really_mix_and_keep_the_weights():
  sampler = _sampler(task_batching=False)
  batches = [sampler.global_batch(b) for b in range(200)]
  mixed = sum(len({s.dataset_index for s in slots}) > 1 for slots in batches)
  assert mixed > 150
  counts = collections.Counter(s.dataset_index for slots in batches for s in slots)
  assert counts == {0: 400, 1: 800, 2: 400}
  # Two hosts split the same mixed global batches.
  hosts = [_local_batches(_sampler(task_batching=False, process_index=p, process_count=2), 10)
           for p in range(2)]
  whole = _local_batches(sampler, 10)
  assert all(hosts[0][b] + hosts[1][b] == whole[b] for b in range(10))


def test_sampler_elements_carry_example_ids_and_epochs():
  sampler = _sampler(process_index=1, process_count=2)
  element = sampler[5]  # local batch 1, slot 4 + 1
  slot = _sampler().global_slot(1, 5)
  assert element == {"dataset_index": slot.dataset_index, "record_index": slot.record_index,
                     "example_id": mixture.example_id(slot.dataset_index, slot.record_index),
                     "epoch": slot.epoch, "global_batch": 1, "slot": 5}


def test_grain_state_resumes_with_identical_batches():
  sampler = _sampler(process_index=1, process_count=2)
  ds = tb.sampler_dataset(sampler).batch(sampler.local_batch_size).to_iter_dataset()
  iterator = iter(ds)
  states, batches = [], []
  for _ in range(12):
    states.append(iterator.get_state())
    batches.append(next(iterator))
  for k in (3, 9):
    resumed = iter(tb.sampler_dataset(_sampler(process_index=1, process_count=2))
                   .batch(4).to_iter_dataset())
    resumed.set_state(json.loads(json.dumps(states[k])))
    for i in range(k, 12):
      got = next(resumed)
      for key in batches[i]:
        np.testing.assert_array_equal(got[key], batches[i][key], err_msg=f"batch {i} from {k}")


def test_bad_arguments_are_named():
  with pytest.raises(ValueError, match="'docs' has 20 rows .* fewer than global_batch_size 32"):
    _sampler(global_batch_size=32)
  _sampler(global_batch_size=32, task_batching=False)  # mixed batches may be larger than a dataset
  with pytest.raises(ValueError, match="not divisible by 3 processes"):
    _sampler(process_count=3)
  with pytest.raises(ValueError, match="source 'b': weight must be a positive number"):
    _sampler(datasets=[tb.DatasetSpec("a", 10), tb.DatasetSpec("b", 10, weight=0.0)])
  with pytest.raises(ValueError, match="dataset 'a': cap must be a positive integer"):
    _sampler(datasets=[tb.DatasetSpec("a", 10, cap=0)])
  with pytest.raises(ValueError, match="dataset 'a' has no rows"):
    _sampler(datasets=[tb.DatasetSpec("a", 0)])
