"""Tests of collating encoded rows into the model's batch dict (mmembed_jax.data.collate)."""
import numpy as np
import pytest

from mmembed_jax.data import collate as collate_lib
from mmembed_jax.data import mrope
from mmembed_jax.data import rows
from mmembed_jax.models import inputs

IMAGE = 9  # image token id of the hand-built rows
PAD = 0


def _row(text_before, grids, text_after=2, source="row"):
  """Returns an EncodedRow with the given images (patch values encode image and patch index)."""
  ids = [1] * text_before
  patches = []
  for k, (t, h, w) in enumerate(grids):
    ids += [2] + [IMAGE] * (t * h * w // 4) + [3]
    p = np.arange(t * h * w, dtype=np.float32)[:, None] + 1000 * (k + 1)
    patches.append(np.broadcast_to(p, (t * h * w, inputs.PATCH_DIM)))
  ids += [4] * text_after
  ids = np.array(ids, np.int32)
  grid_thw = np.array(grids, np.int32).reshape(-1, 3)
  return rows.EncodedRow(
      input_ids=ids,
      patches=(np.concatenate(patches) if patches else np.zeros((0, inputs.PATCH_DIM), np.float32)),
      grid_thw=grid_thw,
      positions=mrope.mrope_positions(ids, grid_thw, IMAGE),
      source=source)


def test_collate_shapes_and_padding():
  encoded = [_row(3, [[1, 4, 6], [1, 2, 2]], source="r0"), _row(1, [], 5, source="r1"),
             _row(0, [[1, 2, 4]], 0, source="r2")]
  batch = collate_lib.collate(encoded, pad_id=PAD, length=24, max_patches=40, max_images=3)
  inputs.check_batch(batch)
  assert batch["input_ids"].shape == (3, 24) and batch["input_ids"].dtype == np.int32
  assert batch["segment_ids"].dtype == np.int32 and batch["positions"].shape == (3, 3, 24)
  assert batch["pixel_patches"].shape == (3, 40, inputs.PATCH_DIM)
  assert batch["pixel_patches"].dtype == np.float32
  assert batch["patch_image_ids"].shape == (3, 40) and batch["image_grid_thw"].shape == (3, 3, 3)
  for i, row in enumerate(encoded):
    n, p = row.num_tokens, row.num_patches
    np.testing.assert_array_equal(batch["input_ids"][i, :n], row.input_ids)
    assert (batch["input_ids"][i, n:] == PAD).all()
    np.testing.assert_array_equal(batch["segment_ids"][i], [1] * n + [0] * (24 - n))
    np.testing.assert_array_equal(batch["positions"][i, :, :n], row.positions)
    assert (batch["positions"][i, :, n:] == 0).all()
    np.testing.assert_array_equal(batch["pixel_patches"][i, :p], row.patches)
    assert (batch["pixel_patches"][i, p:] == 0).all()
  # Patch ownership and grid slots.
  np.testing.assert_array_equal(batch["patch_image_ids"][0], [1] * 24 + [2] * 4 + [0] * 12)
  np.testing.assert_array_equal(batch["patch_image_ids"][1], [0] * 40)
  np.testing.assert_array_equal(batch["patch_image_ids"][2], [1] * 8 + [0] * 32)
  np.testing.assert_array_equal(batch["image_grid_thw"][0], [[1, 4, 6], [1, 2, 2], [0, 0, 0]])
  np.testing.assert_array_equal(batch["image_grid_thw"][1], np.zeros((3, 3)))
  np.testing.assert_array_equal(batch["image_grid_thw"][2], [[1, 2, 4], [0, 0, 0], [0, 0, 0]])
  # The k-th image token of a row belongs to the k-th merged group of its patches.
  num_image_tokens = (batch["input_ids"] == IMAGE).sum(-1)
  num_patches = (batch["patch_image_ids"] > 0).sum(-1)
  np.testing.assert_array_equal(num_image_tokens * 4, num_patches)


def test_text_only_batch_has_no_patches():
  batch = collate_lib.collate([_row(4, []), _row(2, [])], PAD, length=8, max_patches=0, max_images=0)
  assert batch["pixel_patches"].shape == (2, 0, inputs.PATCH_DIM)
  assert batch["patch_image_ids"].shape == (2, 0) and batch["image_grid_thw"].shape == (2, 0, 3)


def test_collate_errors_name_the_row():
  encoded = [_row(1, []), _row(1, [[1, 4, 4], [1, 2, 2]], source="row 2 (line 5) of d.jsonl")]
  with pytest.raises(ValueError, match=r"batch row 1 \(row 2 \(line 5\) of d\.jsonl\) has 20 patches, "
                                       r"more than max_patches 16"):
    collate_lib.collate(encoded, PAD, length=32, max_patches=16, max_images=2)
  with pytest.raises(ValueError, match=r"batch row 1 \(.*\) has 2 images, more than max_images 1"):
    collate_lib.collate(encoded, PAD, length=32, max_patches=32, max_images=1)
  with pytest.raises(ValueError, match=r"batch row 1 \(.*\) has 12 tokens, more than length 8"):
    collate_lib.collate(encoded, PAD, length=8, max_patches=32, max_images=2)
  with pytest.raises(ValueError, match="expected at least one encoded row"):
    collate_lib.collate([], PAD, length=8, max_patches=0, max_images=0)


def test_collate_rejects_inconsistent_row():
  row = _row(1, [[1, 4, 4]])
  bad = rows.EncodedRow(row.input_ids, row.patches[:-4], row.grid_thw, row.positions, "bad row")
  with pytest.raises(ValueError, match=r"batch row 0 \(bad row\): patches has shape \(12, 1176\), "
                                       r"expected \(16, 1176\)"):
    collate_lib.collate([bad], PAD, length=16, max_patches=16, max_images=1)


def test_bucket_sizes():
  encoded = [_row(3, [[1, 4, 6], [1, 2, 2]]), _row(1, [], 5), _row(0, [[1, 2, 4]], 0)]
  assert max(r.num_tokens for r in encoded) == 16 and max(r.num_patches for r in encoded) == 28
  assert collate_lib.bucket_sizes(encoded) == (16, 64, 2)
  assert collate_lib.bucket_sizes(encoded, length_multiple=5, patch_multiple=6, image_multiple=4) == (
      20, 36, 4)  # patches: a multiple of lcm(6, 4) = 12
  assert collate_lib.bucket_sizes([_row(1, [], 1)], length_multiple=8) == (8, 0, 0)
  length, max_patches, max_images = collate_lib.bucket_sizes(encoded, length_multiple=8)
  collate_lib.collate(encoded, PAD, length, max_patches, max_images)


def test_collate_encoded_text_rows(tokenizer):
  encoded = [rows.encode_row({"text": t}, tokenizer, None, max_length=64)
             for t in ("A red circle.", "The invoice total is 12 dollars.")]
  pad_id = tokenizer.pad_token_id
  length, max_patches, max_images = collate_lib.bucket_sizes(encoded, length_multiple=8)
  batch = collate_lib.collate(encoded, pad_id, length, max_patches, max_images)
  assert batch["input_ids"].shape == (2, length) and length % 8 == 0
  assert batch["pixel_patches"].shape == (2, 0, inputs.PATCH_DIM)
  for i, e in enumerate(encoded):
    assert tokenizer.decode(batch["input_ids"][i, :e.num_tokens].tolist()) == ["A red circle.",
        "The invoice total is 12 dollars."][i]
