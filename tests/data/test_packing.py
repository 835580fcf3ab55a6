"""Tests of first-fit packing into fixed-shape rows (mmembed_jax.data.packing)."""
import dataclasses
import json
import logging

import grain
import numpy as np
import pytest

from mmembed_jax.data import bad_records, mrope, packing
from mmembed_jax.models import inputs

IMAGE, PAD = 9, 0


def _example(example_id, text_tokens, grids=()):
  """An encoded example: text, then images of the given grids; values encode (id, patch)."""
  ids = [100 + example_id % 50] * text_tokens
  patches = []
  for t, h, w in grids:
    ids += [2] + [IMAGE] * (t * h * w // 4) + [3]
    values = example_id * 1000 + np.arange(t * h * w, dtype=np.float32) + len(patches) * 100
    patches.append(np.broadcast_to(values[:, None], (t * h * w, inputs.PATCH_DIM)))
  ids = np.asarray(ids, np.int32)
  grid_thw = np.asarray(grids, np.int32).reshape(-1, 3)
  pixel_patches = (np.concatenate(patches).astype(np.float32) if patches
                   else np.zeros((0, inputs.PATCH_DIM), np.float32))
  return {"input_ids": ids, "positions": mrope.mrope_positions(ids, grid_thw, IMAGE),
          "mlm_mask": (np.arange(ids.shape[0]) % 3 == 0).astype(np.int32),
          "pixel_patches": pixel_patches,
          "mae_mask": np.repeat(np.arange(pixel_patches.shape[0] // 4) % 2, 4).astype(np.int32),
          "image_grid_thw": grid_thw, "example_id": example_id}


def _stream(n, seed=0, bad_every=0):
  """n examples of mixed sizes (text-only and 1-2 images), with a bad marker every bad_every."""
  rng = np.random.default_rng(seed)
  elements = []
  for i in range(n):
    if bad_every and i % bad_every == bad_every - 1:
      elements.append({packing.BAD_RECORD: f"data.jsonl:{i + 1}: broken"})
      continue
    kind = rng.integers(3)
    grids = [] if kind == 0 else [(1, 2 * int(rng.integers(1, 3)), 2 * int(rng.integers(1, 3)))
                                  for _ in range(kind)]
    elements.append(_example(i, int(rng.integers(1, 30)), grids))
  return elements


def _one_row(unit):
  """The row of a unit of one row per buffer, without the unit's leading axis."""
  return {key: value[0] for key, value in unit.items()}


def _packed(elements, budget, num_bins):
  """The PackIterDataset over a list of elements, as rows (budget of one row per buffer)."""
  parent = grain.MapDataset.source(elements).to_iter_dataset()
  return packing.PackIterDataset(parent, budget, num_bins).map(_one_row)


BUDGET = packing.PackingBudget(length=64, max_patches=48, max_images=3, max_segments=6, pad_id=PAD)


def test_rows_have_fixed_shapes_and_the_batch_contract():
  rows = list(_packed(_stream(60), BUDGET, num_bins=4))
  for row in rows:
    assert row["input_ids"].shape == (64,) and row["positions"].shape == (3, 64)
    assert row["pixel_patches"].shape == (48, inputs.PATCH_DIM)
    assert row["patch_image_ids"].shape == (48,) and row["mae_mask"].shape == (48,)
    assert row["image_grid_thw"].shape == (3, 3) and row["example_ids"].shape == (6,)
    assert row["bad_records"].shape == () and row["bad_records"].dtype == np.int32
  batch = {k: np.stack([r[k] for r in rows[:4]]) for k in rows[0]}
  inputs.check_batch(batch)


def test_segment_position_and_patch_layout():
  examples = [_example(1, 5, [(1, 2, 4)]), _example(2, 3), _example(3, 2, [(1, 2, 2), (1, 4, 2)])]
  row = _one_row(packing.layout_unit([examples], BUDGET))
  n = [e["input_ids"].shape[0] for e in examples]  # 5 + 4 = 9 (8 patches), 3, 2 + 3 + 4 = 9
  starts = np.cumsum([0] + n)
  for s, example in enumerate(examples, start=1):
    span = slice(starts[s - 1], starts[s])
    assert (row["segment_ids"][span] == s).all()
    np.testing.assert_array_equal(row["input_ids"][span], example["input_ids"])
    np.testing.assert_array_equal(row["positions"][:, span], example["positions"])
    assert (row["positions"][:, starts[s - 1]] == 0).all()  # positions restart per segment
    np.testing.assert_array_equal(row["mlm_mask"][span], example["mlm_mask"])
  assert (row["segment_ids"][starts[-1]:] == 0).all() and (row["input_ids"][starts[-1]:] == PAD).all()
  assert (row["positions"][:, starts[-1]:] == 0).all()
  # Patches: example 1's image is image 1, example 3's images are images 2 and 3 of the row.
  np.testing.assert_array_equal(row["patch_image_ids"], [1] * 8 + [2] * 4 + [3] * 8 + [0] * 28)
  np.testing.assert_array_equal(row["image_grid_thw"], [[1, 2, 4], [1, 2, 2], [1, 4, 2]])
  np.testing.assert_array_equal(row["pixel_patches"][:8], examples[0]["pixel_patches"])
  np.testing.assert_array_equal(row["pixel_patches"][8:20], examples[2]["pixel_patches"])
  assert not row["pixel_patches"][20:].any()
  np.testing.assert_array_equal(row["mae_mask"][8:20], examples[2]["mae_mask"])
  np.testing.assert_array_equal(row["example_ids"], [1, 2, 3, -1, -1, -1])
  # The k-th image token of the row belongs to the k-th merged group of its patches.
  assert (row["input_ids"] == IMAGE).sum() == (row["patch_image_ids"] > 0).sum() // 4


def test_budgets_hold_and_no_example_is_lost_or_duplicated():
  elements = _stream(200, seed=1)
  rows = list(_packed(elements, BUDGET, num_bins=3))
  for row in rows:
    assert (row["segment_ids"] > 0).sum() <= BUDGET.length
    assert (row["patch_image_ids"] > 0).sum() <= BUDGET.max_patches
    assert (row["image_grid_thw"].sum(-1) > 0).sum() <= BUDGET.max_images
    assert row["segment_ids"].max() == (row["example_ids"] >= 0).sum() <= BUDGET.max_segments
  packed_ids = [int(i) for row in rows for i in row["example_ids"] if i >= 0]
  assert sorted(packed_ids) == sorted(e["example_id"] for e in elements)
  assert len(packed_ids) == len(set(packed_ids))


def test_packing_efficiency_reports_fill_of_tokens_and_patches():
  rows = list(_packed(_stream(300, seed=2), BUDGET, num_bins=8))
  batch = {k: np.stack([r[k] for r in rows[:-8]]) for k in rows[0]}  # full groups only
  efficiency = packing.packing_efficiency(batch)
  assert efficiency["token_fill"] == pytest.approx((batch["segment_ids"] > 0).mean())
  assert efficiency["patch_fill"] == pytest.approx((batch["patch_image_ids"] > 0).mean())
  assert efficiency["token_fill"] > 0.6 and efficiency["examples_per_row"] > 2
  one_per_row = list(_packed(_stream(300, seed=2), BUDGET, num_bins=1))
  single = {k: np.stack([r[k] for r in one_per_row]) for k in rows[0]}
  assert packing.packing_efficiency(single)["token_fill"] < efficiency["token_fill"]


def test_resume_from_state_replays_exactly():
  elements = _stream(150, seed=3, bad_every=7)
  dataset = _packed(elements, BUDGET, num_bins=3)
  iterator = iter(dataset)
  states, rows = [], []
  for row in iterator:
    states.append(iterator.get_state())
    rows.append(row)
  for k in [0, 1, 2, 4, 7, len(rows) - 2]:
    json.dumps(states[k])  # small and JSON-able: no pixels
    resumed = iter(dataset)
    resumed.set_state(states[k])
    rest = list(resumed)
    assert len(rest) == len(rows) - k - 1
    for expected, got in zip(rows[k + 1:], rest):
      assert expected.keys() == got.keys()
      for key in expected:
        np.testing.assert_array_equal(expected[key], got[key], err_msg=f"{key} after row {k}")


def test_bad_records_are_counted_once_and_named_in_the_rows(caplog):
  """Each skipped input is counted once and named once, in the row that carries its count (the
  trainer logs the names when it takes the batch); the packer itself logs nothing."""
  elements = _stream(120, seed=4, bad_every=10)
  with caplog.at_level(logging.WARNING, logger="mmembed_jax.data.packing"):
    rows = list(_packed(elements, BUDGET, num_bins=2))
  assert sum(int(r["bad_records"]) for r in rows) == 12
  named = bad_records.split_messages(np.array([r[bad_records.MESSAGES] for r in rows]))
  assert named == [f"data.jsonl:{i}: broken" for i in range(10, 121, 10)]
  assert all(len(bad_records.split_messages(r[bad_records.MESSAGES])) == r["bad_records"]
             for r in rows)
  assert not caplog.records


def test_a_source_whose_every_record_is_bad_stops_the_pipeline_naming_it():
  """An all-bad source stops the stream with one DataError line naming it, even when a good
  source's records come between its bad ones."""
  elements = []
  for i in range(40):
    elements.append(dict(_example(i, 3), source="good"))
    elements.append({packing.BAD_RECORD: f"/data/broken.jsonl:{i + 1}: missing field 'text'",
                     "source": "broken"})
  dataset = packing.PackIterDataset(grain.MapDataset.source(elements).to_iter_dataset(), BUDGET, 2,
                                    max_consecutive_bad=10)
  with pytest.raises(bad_records.DataError) as error:
    list(dataset)
  message = str(error.value)
  assert message.startswith("source 'broken': the last 10 records read from it were all bad")
  assert "/data/broken.jsonl:10: missing field 'text'" in message and "\n" not in message


def test_an_example_larger_than_a_row_is_an_error():
  dataset = _packed([_example(0, 100)], BUDGET, num_bins=2)
  with pytest.raises(ValueError, match=r"exceeds an empty buffer's budget"):
    next(iter(dataset))
  with pytest.raises(ValueError, match="multiple of 4"):
    packing.PackingBudget(length=8, max_patches=6, max_images=1)


# Four rows share one buffer of 128 patch slots and 12 image slots: 32 patches a row on average.
SHARED = dataclasses.replace(BUDGET, max_patches=128, max_images=12, rows_per_buffer=4)


def test_rows_of_a_buffer_share_its_patch_slots_row_after_row():
  rows = [[_example(1, 5, [(1, 2, 4)]), _example(2, 3)], [],
          [_example(3, 2, [(1, 2, 2), (1, 4, 2)])], [_example(4, 7)]]
  unit = packing.layout_unit(rows, SHARED)
  assert unit["input_ids"].shape == (4, 64) and unit["mlm_mask"].shape == (4, 64)
  assert unit["pixel_patches"].shape == (1, 128, inputs.PATCH_DIM)
  assert unit["patch_image_ids"].shape == unit["mae_mask"].shape == (1, 128)
  assert unit["image_grid_thw"].shape == (1, 12, 3) and unit["example_ids"].shape == (4, 6)
  # Row 0's image is the buffer's image 1; row 2's images are images 2 and 3; row 1 is padding.
  np.testing.assert_array_equal(unit["patch_image_ids"][0], [1] * 8 + [2] * 4 + [3] * 8 + [0] * 108)
  np.testing.assert_array_equal(unit["image_grid_thw"][0, :3], [[1, 2, 4], [1, 2, 2], [1, 4, 2]])
  np.testing.assert_array_equal(unit["pixel_patches"][0, 8:20], rows[2][0]["pixel_patches"])
  np.testing.assert_array_equal(unit["mae_mask"][0, 8:20], rows[2][0]["mae_mask"])
  np.testing.assert_array_equal(unit["example_ids"][:, :2], [[1, 2], [-1, -1], [3, -1], [4, -1]])
  assert not unit["segment_ids"][1].any() and (unit["segment_ids"][3, :7] == 1).all()
  batch = packing.merge_units({key: value[None] for key, value in unit.items()})
  inputs.check_batch(batch)  # 4 rows, 1 buffer
  # The k-th image token of the buffer's rows, row after row, is its k-th merged patch group.
  assert (batch["input_ids"] == IMAGE).sum() == (batch["patch_image_ids"] > 0).sum() // 4


def test_shared_buffers_hold_their_budgets_and_fill_patch_slots_that_rows_alone_leave_empty():
  elements = _stream(400, seed=5)
  parent = grain.MapDataset.source(elements).to_iter_dataset()
  units = list(packing.PackIterDataset(parent, SHARED, num_bins=8))
  for unit in units:
    assert ((unit["segment_ids"] > 0).sum(-1) <= SHARED.length).all()
    assert (unit["segment_ids"].max(-1) == (unit["example_ids"] >= 0).sum(-1)).all()
    assert (unit["patch_image_ids"] > 0).sum() <= SHARED.max_patches
    assert (unit["image_grid_thw"].sum(-1) > 0).sum() <= SHARED.max_images
  packed_ids = [int(i) for unit in units for i in unit["example_ids"].reshape(-1) if i >= 0]
  assert sorted(packed_ids) == sorted(e["example_id"] for e in elements)
  def fill(budget):
    packed = list(packing.PackIterDataset(grain.MapDataset.source(elements).to_iter_dataset(),
                                          budget, num_bins=8))
    return packing.packing_efficiency(packing.merge_units(
        {k: np.stack([u[k] for u in packed]) for k in packed[0]}))

  shared = fill(SHARED)
  worst_case = fill(BUDGET)  # 48 patch slots in every row (what its largest example may need)
  average = fill(dataclasses.replace(BUDGET, max_patches=32))  # each row its 32 slots alone
  assert shared["patch_fill"] > 1.5 * worst_case["patch_fill"], (shared, worst_case)
  assert shared["token_fill"] > worst_case["token_fill"], (shared, worst_case)
  assert shared["patch_fill"] > average["patch_fill"] + 0.05, (shared, average)
  assert shared["token_fill"] > average["token_fill"] + 0.05, (shared, average)
