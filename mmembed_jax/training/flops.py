"""Analytic training FLOPs (vision tower and attention included) and MFU against chip peaks.

Compiler FLOP counts are wrong under `nn.scan` (a loop body is counted once, see
shared/TPU_NOTES.md), so the count is analytic, MaxText style: 2 FLOPs per multiply-add,
backward = 2x forward.
"""
import math
from typing import Any, Mapping, Optional

import jax
import numpy as np

from mmembed_jax.models.config import ModelConfig

# Dense bf16 peak FLOP/s per chip.
PEAK_FLOPS = {"v4": 275e12, "v5e": 197e12, "v5p": 459e12, "v6e": 918e12}


def chip_name(device: jax.Device) -> Optional[str]:
  """'v4' / 'v5e' / 'v5p' / 'v6e' from a TPU's device_kind; None elsewhere."""
  kind = device.device_kind.lower()
  if device.platform != "tpu":
    return None
  if "v6" in kind:
    return "v6e"
  if "v5" in kind:
    return "v5e" if ("lite" in kind or "v5e" in kind) else "v5p"
  if "v4" in kind:
    return "v4"
  return None


def peak_flops_per_device(device: jax.Device) -> Optional[float]:
  """The chip's peak bf16 FLOP/s, or None when unknown (e.g. CPU: no MFU is reported)."""
  return PEAK_FLOPS.get(chip_name(device) or "")


def llm_forward_flops(config: ModelConfig, tokens: int, length: int, with_lm_head: bool) -> float:
  """Forward FLOPs of the LLM on `tokens` tokens in rows of `length` (attention over the row)."""
  t = config.text
  kv = t.num_kv_heads * t.head_dim
  per_token = 2 * t.hidden_size * (t.hidden_size + 2 * kv)  # q, k, v
  per_token += 2 * t.hidden_size * t.hidden_size  # o
  per_token += 2 * 3 * t.hidden_size * t.intermediate_size  # gate, up, down
  per_token += 2 * 2 * length * t.hidden_size  # scores and weighted sum
  total = tokens * per_token * t.num_layers
  if with_lm_head:
    total += tokens * 2 * t.hidden_size * t.vocab_size
  return float(total)


def vision_forward_flops(config: ModelConfig, patches: int, span: int) -> float:
  """Forward FLOPs of the vision tower on `patches` patches, each attending to `span` patches."""
  v = config.vision
  mlp = 3 if config.family == "qwen2_5_vl" else 2
  per_patch = 2 * v.patch_dim * v.hidden_size
  block = 2 * 4 * v.hidden_size**2 + 2 * mlp * v.hidden_size * v.intermediate_size
  block += 2 * 2 * span * v.hidden_size
  per_patch += v.depth * block
  merged = v.hidden_size * v.spatial_merge_size**2
  per_patch += 2 * (merged * merged + merged * v.out_hidden_size) / v.spatial_merge_size**2
  return float(patches * per_patch)


def train_flops(config: ModelConfig, batch: int, length: int, buffers: int,
                patches_per_buffer: int, with_lm_head: bool = True) -> float:
  """FLOPs of one training step (forward + backward) over a padded batch (models/inputs.py); a
  patch attends to its buffer, or to the largest frame when `config.max_frame_patches` bounds
  it (the splash kernel and the blocks skip the rest)."""
  forward = llm_forward_flops(config, batch * length, length, with_lm_head)
  span = min(patches_per_buffer, config.max_frame_patches or patches_per_buffer)
  forward += vision_forward_flops(config, buffers * patches_per_buffer, span)
  return 3.0 * forward


def sequence_groups(batch: Any) -> list[tuple[int, int, int, int]]:
  """(rows, length, patch buffers, patches per buffer) of every sequence sub-batch in a
  (possibly nested) batch.

  A CPT batch is one group; a contrastive batch has query, positive and negative groups
  (negatives [batch, K, length] count batch x K rows).
  """
  groups = []
  if isinstance(batch, Mapping):
    if "input_ids" in batch:
      shape, patch_shape = batch["input_ids"].shape, batch["pixel_patches"].shape
      groups.append((math.prod(shape[:-1]), shape[-1], math.prod(patch_shape[:-2]),
                     patch_shape[-2]))
    for value in batch.values():
      if isinstance(value, Mapping):
        groups += sequence_groups(value)
  return groups


def batch_train_flops(config: ModelConfig, batch: Any, forwards: int = 1,
                      with_lm_head: bool = True) -> float:
  """Training FLOPs of a batch (every sequence group); `forwards` = 2 adds GradCache's re-encode."""
  total = 0.0
  for group in sequence_groups(batch):
    total += train_flops(config, *group, with_lm_head=with_lm_head)
  return total * (2.0 + forwards) / 3.0


def batch_tokens(batch: Any) -> int:
  """Non-pad tokens over every `segment_ids` in a (possibly nested) batch."""
  if not isinstance(batch, Mapping):
    return 0
  own = int((np.asarray(batch["segment_ids"]) > 0).sum()) if "segment_ids" in batch else 0
  return own + sum(batch_tokens(v) for v in batch.values() if isinstance(v, Mapping))


def _runs(ids: np.ndarray) -> np.ndarray:
  """Lengths of the runs of equal nonzero ids in a 1-D array."""
  edges = np.flatnonzero(np.diff(np.concatenate([[0], ids, [0]])) != 0)
  starts, ends = edges[:-1], edges[1:]
  keep = ids[starts] > 0
  return (ends - starts)[keep]


def _window_sizes(config: ModelConfig, t: int, h: int, w: int) -> list[int]:
  """Patches in each attention window of an image of grid (t, h, w) (Qwen2.5-VL)."""
  merge, side = config.vision.spatial_merge_size, config.vision.window_merged_tokens
  rows, cols = h // merge, w // merge
  sizes = [min(side, rows - r) * min(side, cols - c) * merge * merge
           for r in range(0, rows, side) for c in range(0, cols, side)]
  return sizes * t


def useful_train_flops(config: ModelConfig, batch: Any, forwards: int = 1,
                       with_lm_head: bool = True) -> float:
  """Training FLOPs of the real work in a batch, what an unpadded per-sequence implementation
  (transformers') does: real tokens and patches only, attention within each packed sequence,
  image frame and window. The same count for JAX and PyTorch makes their shares comparable."""
  total = 0.0
  if isinstance(batch, Mapping) and "input_ids" in batch:
    t, v = config.text, config.vision
    segments = np.asarray(batch["segment_ids"]).reshape(-1, np.shape(batch["segment_ids"])[-1])
    lengths = np.concatenate([_runs(row) for row in segments]).astype(np.float64)
    tokens = lengths.sum()
    linear = llm_forward_flops(config, 1, 0, with_lm_head=False) / t.num_layers
    forward = t.num_layers * (tokens * linear + 2 * 2 * t.hidden_size * (lengths**2).sum())
    if with_lm_head:
      forward += tokens * 2 * t.hidden_size * t.vocab_size
    grids = np.asarray(batch["image_grid_thw"]).reshape(-1, 3)
    grids = grids[grids.prod(axis=1) > 0]
    if len(grids):
      windowed = config.windowed_vision
      full_layers = len(v.fullatt_block_indexes) if windowed else v.depth
      frames = np.concatenate([[h * w] * t for t, h, w in grids]).astype(np.float64)
      spans = full_layers * (frames**2).sum()
      if windowed:
        windows = np.concatenate([_window_sizes(config, *g) for g in grids]).astype(np.float64)
        spans += (v.depth - full_layers) * (windows**2).sum()
      patches = frames.sum()
      linear = vision_forward_flops(config, 1, 0)
      forward += patches * linear + 2 * 2 * v.hidden_size * spans
    total += 3.0 * forward
  if isinstance(batch, Mapping):
    total += sum(useful_train_flops(config, value, 1, with_lm_head) for value in batch.values()
                 if isinstance(value, Mapping))
  return total * (2.0 + forwards) / 3.0
