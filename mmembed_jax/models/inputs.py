"""The model's input contract: one dict of fixed-shape arrays per batch.

Every producer (the row collator, the packer, the training pipelines) builds this dict and
every consumer (the Flax model, the PyTorch embedder) reads it. Shapes are static so one
compiled program serves every batch.

  input_ids        int32 [batch, length]       token ids; image tokens are `<|image_pad|>`.
  segment_ids      int32 [batch, length]       0 = padding, k >= 1 = k-th sequence packed in
                                               the row. Attention never crosses segments.
  positions        int32 [batch, 3, length]    M-RoPE positions (temporal, height, width),
                                               restarting at 0 in every segment; 0 at padding.
  pixel_patches    float [buffers, patches, 1176] normalised patch vectors of the images of
                                               the rows a buffer serves, concatenated in order of
                                               appearance, each image in the image processor's
                                               patch order; zero padded. `patches` may be 0
                                               (text-only batch).
  patch_image_ids  int32 [buffers, patches]    1-based index of the image a patch belongs to
                                               within its buffer; 0 = padding.
  image_grid_thw   int32 [buffers, images, 3]  (t, h, w) patch grid of image i at slot i - 1;
                                               zeros for unused slots.

Patch buffers: `buffers` divides `batch`; buffer g serves rows g * r .. g * r + r - 1 (r = batch /
buffers), so rows share patch slots where their images fall (a text-only row takes none).
buffers == batch is one buffer per row.

Optional: attention_regions int32 [batch, length], region ids that `config.region_mask` (CoMa's
compression mask, models/region_mask.py) turns into depth-dependent attention.

The k-th `<|image_pad|>` token of a buffer's rows, read row after row, receives the k-th merged
visual token of that buffer (merged tokens are groups of merge_size**2 consecutive patches).
"""
from typing import Mapping

import numpy as np

PATCH_DIM = 3 * 2 * 14 * 14  # channels * temporal_patch * patch * patch = 1176

TEXT_KEYS = ("input_ids", "segment_ids", "positions")
IMAGE_KEYS = ("pixel_patches", "patch_image_ids", "image_grid_thw")


def check_batch(batch: Mapping[str, "np.ndarray"], patch_dim: int = PATCH_DIM) -> None:
  """Raises ValueError naming the first tensor whose presence, rank or shape breaks the contract."""
  for key in TEXT_KEYS + IMAGE_KEYS:
    if key not in batch:
      raise ValueError(f"batch is missing tensor '{key}' (has {sorted(batch)})")
  b, length = np.shape(batch["input_ids"])
  expected = {
      "segment_ids": (b, length),
      "positions": (b, 3, length),
  }
  buffers, num_patches = (np.shape(batch["pixel_patches"])[:2]
                          if np.ndim(batch["pixel_patches"]) == 3 else (b, -1))
  if buffers < 1 or b % buffers:
    raise ValueError(f"tensor 'pixel_patches' has {buffers} patch buffers, which does not divide "
                     f"the batch of {b} rows")
  expected["pixel_patches"] = (buffers, num_patches, patch_dim)
  expected["patch_image_ids"] = (buffers, num_patches)
  num_images = np.shape(batch["image_grid_thw"])[1] if np.ndim(batch["image_grid_thw"]) == 3 else -1
  expected["image_grid_thw"] = (buffers, num_images, 3)
  for key, shape in expected.items():
    if tuple(np.shape(batch[key])) != shape:
      raise ValueError(f"tensor '{key}' has shape {tuple(np.shape(batch[key]))}, expected {shape}")


def rows_by_buffer(x, buffers: int):
  """[batch, length, ...] -> [buffers, batch // buffers * length, ...]: the rows each patch buffer
  serves, back to back (numpy or jax arrays)."""
  return x.reshape((buffers, x.shape[0] // buffers * x.shape[1]) + tuple(x.shape[2:]))
