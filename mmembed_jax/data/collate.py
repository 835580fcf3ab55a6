"""Collates encoded rows into the fixed-shape batch dict of `mmembed_jax.models.inputs`.

One example per row (no packing): batch row i holds encoded row i, right padded.

  input_ids        [batch, length]          the row's ids, then pad_id
  segment_ids      [batch, length]          1 on the row's tokens, 0 on padding
  positions        [batch, 3, length]       the row's M-RoPE positions, 0 on padding
  pixel_patches    [batch, max_patches, 1176] the row's images' patches in order, then zeros
  patch_image_ids  [batch, max_patches]     1 for image 1's patches, 2 for image 2's..., 0 on padding
  image_grid_thw   [batch, max_images, 3]   grid of image i at slot i - 1, zeros after

`bucket_sizes` rounds the largest row up to multiples, so batches share a few static shapes and
the model compiles only a few times.
"""
import math
from typing import Dict, Sequence, Tuple

import numpy as np

from mmembed_jax.data import rows as rows_lib
from mmembed_jax.models import inputs


def _round_up(x: int, multiple: int) -> int:
  """Returns the smallest multiple of `multiple` that is >= x."""
  return -(-x // multiple) * multiple


def _check_row(i: int, row: rows_lib.EncodedRow) -> None:
  """Raises ValueError naming the row if its arrays are inconsistent with each other."""
  where = f"batch row {i} ({row.source})"
  n = row.input_ids.shape[0] if row.input_ids.ndim == 1 else -1
  if n < 0:
    raise ValueError(f"{where}: input_ids has shape {row.input_ids.shape}, expected [n]")
  if row.positions.shape != (3, n):
    raise ValueError(f"{where}: positions has shape {row.positions.shape}, expected (3, {n})")
  if row.grid_thw.ndim != 2 or row.grid_thw.shape[1] != 3:
    raise ValueError(f"{where}: grid_thw has shape {row.grid_thw.shape}, expected [num_images, 3]")
  num_patches = int(np.prod(row.grid_thw, axis=-1).sum())
  if row.patches.shape != (num_patches, inputs.PATCH_DIM):
    raise ValueError(f"{where}: patches has shape {row.patches.shape}, expected "
                     f"({num_patches}, {inputs.PATCH_DIM}) for grid_thw {row.grid_thw.tolist()}")


def collate(encoded_rows: Sequence[rows_lib.EncodedRow], pad_id: int, length: int, max_patches: int,
            max_images: int) -> Dict[str, np.ndarray]:
  """Returns the batch dict (numpy, int32/float32) with one right-padded example per encoded row."""
  b = len(encoded_rows)
  if b == 0:
    raise ValueError("collate: expected at least one encoded row, found none")
  batch = {
      "input_ids": np.full((b, length), pad_id, np.int32),
      "segment_ids": np.zeros((b, length), np.int32),
      "positions": np.zeros((b, 3, length), np.int32),
      "pixel_patches": np.zeros((b, max_patches, inputs.PATCH_DIM), np.float32),
      "patch_image_ids": np.zeros((b, max_patches), np.int32),
      "image_grid_thw": np.zeros((b, max_images, 3), np.int32),
  }
  for i, row in enumerate(encoded_rows):
    _check_row(i, row)
    where = f"batch row {i} ({row.source})"
    n, p, k = row.num_tokens, row.num_patches, row.num_images
    if n > length:
      raise ValueError(f"{where} has {n} tokens, more than length {length}")
    if p > max_patches:
      raise ValueError(f"{where} has {p} patches, more than max_patches {max_patches}")
    if k > max_images:
      raise ValueError(f"{where} has {k} images, more than max_images {max_images}")
    batch["input_ids"][i, :n] = row.input_ids
    batch["segment_ids"][i, :n] = 1
    batch["positions"][i, :, :n] = row.positions
    batch["pixel_patches"][i, :p] = row.patches
    patches_per_image = np.prod(row.grid_thw, axis=-1)  # [k]
    batch["patch_image_ids"][i, :p] = np.repeat(np.arange(1, k + 1, dtype=np.int32), patches_per_image)
    batch["image_grid_thw"][i, :k] = row.grid_thw
  inputs.check_batch(batch)
  return batch


def bucket_sizes(encoded_rows: Sequence[rows_lib.EncodedRow], length_multiple: int = 16,
                 patch_multiple: int = 64, image_multiple: int = 1,
                 merge_size: int = 2) -> Tuple[int, int, int]:
  """Returns (length, max_patches, max_images) covering all rows, rounded up to the multiples.

  max_patches is also a multiple of merge_size**2, so padding holds whole merged tokens. length is
  at least length_multiple; max_patches and max_images are 0 when no row has images.
  """
  if not encoded_rows:
    raise ValueError("bucket_sizes: expected at least one encoded row, found none")
  for name, value in (("length_multiple", length_multiple), ("patch_multiple", patch_multiple),
                      ("image_multiple", image_multiple)):
    if value < 1:
      raise ValueError(f"bucket_sizes: {name} must be >= 1, found {value}")
  patch_multiple = math.lcm(patch_multiple, merge_size ** 2)
  length = max(row.num_tokens for row in encoded_rows)
  num_patches = max(row.num_patches for row in encoded_rows)
  num_images = max(row.num_images for row in encoded_rows)
  return (max(_round_up(length, length_multiple), length_multiple),
          _round_up(num_patches, patch_multiple),
          _round_up(num_images, image_multiple))
