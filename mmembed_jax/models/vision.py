"""The Qwen2-VL / Qwen2.5-VL vision tower over a fixed-size padded buffer of patches.

Patches of every image of a row sit in one buffer `[batch, patches, 1176]`; which image a
patch belongs to (`patch_image_ids`) and each image's grid (`image_grid_thw`) are enough to
recompute, inside jit, every patch's 2-D rotary position, frame and attention window. Attention
is within a segment (an image frame, or a window of a frame on Qwen2.5-VL's windowed blocks)
instead of transformers' per-image Python loop, in one of three ways:
- TPU: the splash kernel with segment ids (it skips the blocks the segments empty);
- XLA, by blocks planned ahead (models/block_attention.py): the patches are sorted window by
  window, as transformers does, so that every segment is a contiguous run, and each block of
  queries meets only the key blocks its segments reach. Windows hold at most `window_patches`;
  frames at most `ModelConfig.max_frame_patches`, which the data must promise (0 = unknown).
  Taken where the plan computes at most STATIC_SHARE of the [patches, patches] scores;
- XLA, by blocks met at run time (models/packed_attention.py, `attention_impl="auto"`): where
  segments may be large (full layers over big frames, or no frame bound), the blocks each
  frame actually spans, found from the segment ids in the step;
- XLA, masked: a [patches, patches] mask (`attention_impl="xla"` where blocks would not be
  cheaper, and buffers under packed_attention.MIN_LENGTH with no frame bound).
"""
from typing import Any, NamedTuple, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from mmembed_jax.models import block_attention, packed_attention, remat, splash
from mmembed_jax.models.config import ModelConfig, VisionConfig
from mmembed_jax.models.layers import (LayerNorm, Linear, RMSNorm, activation, apply_rotary,
                                       dot_product_attention, dtype_of, inverse_frequencies)


class PatchLayout(NamedTuple):
  """Per-patch geometry, each int32 [batch, patches]."""
  image: jax.Array  # 1-based image id, 0 = padding
  frame: jax.Array  # temporal index within the image
  row: jax.Array  # patch row (h) within the frame
  col: jax.Array  # patch column (w) within the frame
  window_row: jax.Array  # attention window row (Qwen2.5-VL)
  window_col: jax.Array
  frame_segment: jax.Array  # one id per image frame (its first patch's index + 1), 0 = padding
  window_segment: jax.Array  # one id per window of a frame (Qwen2.5-VL), 0 = padding


def patch_layout(patch_image_ids: jax.Array, image_grid_thw: jax.Array,
                 config: VisionConfig) -> PatchLayout:
  """Recovers each patch's position from its image id and the image grids, in the processor's order.

  The processor emits an image frame by frame; within a frame, blocks of merge x merge patches
  (one merged token each) in row-major block order, and the patches of a block row-major.
  """
  merge = config.spatial_merge_size
  grid = image_grid_thw.astype(jnp.int32)  # [batch, images, 3]
  sizes = grid[..., 0] * grid[..., 1] * grid[..., 2]  # [batch, images]
  starts = jnp.cumsum(sizes, axis=-1) - sizes  # [batch, images]
  slot = jnp.maximum(patch_image_ids - 1, 0)  # [batch, patches]
  start = jnp.take_along_axis(starts, slot, axis=1)
  height = jnp.take_along_axis(grid[..., 1], slot, axis=1)
  width = jnp.take_along_axis(grid[..., 2], slot, axis=1)
  index = jnp.arange(patch_image_ids.shape[1], dtype=jnp.int32)[None, :] - start
  frame_size = jnp.maximum(height * width, 1)
  frame, in_frame = index // frame_size, index % frame_size
  block, in_block = in_frame // (merge * merge), in_frame % (merge * merge)
  blocks_per_row = jnp.maximum(width // merge, 1)
  block_row, block_col = block // blocks_per_row, block % blocks_per_row
  window = max(config.window_merged_tokens, 1)
  valid = patch_image_ids > 0
  zero = jnp.zeros_like(index)
  # Frames occupy disjoint index ranges [frame_start, frame_start + frame_size), and a frame has
  # fewer windows than patches, so frame_start + window index is unique per window.
  frame_start = start + frame * frame_size
  windows_per_row = (blocks_per_row + window - 1) // window
  window_index = (block_row // window) * windows_per_row + block_col // window
  return PatchLayout(
      image=patch_image_ids,
      frame=jnp.where(valid, frame, zero),
      row=jnp.where(valid, block_row * merge + in_block // merge, zero),
      col=jnp.where(valid, block_col * merge + in_block % merge, zero),
      window_row=jnp.where(valid, block_row // window, zero),
      window_col=jnp.where(valid, block_col // window, zero),
      frame_segment=jnp.where(valid, frame_start + 1, zero),
      window_segment=jnp.where(valid, frame_start + window_index + 1, zero),
  )


SPLASH = -1  # how a kind of layer attends: the splash kernel on segment ids
PACKED = -2  # XLA by blocks met at run time (packed_attention), on segment ids
MASKED = 0  # XLA over a [patches, patches] mask; a positive value: by blocks, segments <= it
STATIC_SHARE = 0.25  # blocks planned ahead up to this share of the scores; beyond, met at run time


def window_order(layout: PatchLayout) -> jax.Array:
  """int32 [batch, patches]: the patches sorted window by window (windows in frame order, a
  window's patches in processor order), padding last; frames stay contiguous."""
  last = jnp.iinfo(jnp.int32).max
  key = jnp.where(layout.window_segment > 0, layout.window_segment, last)
  return jnp.argsort(key, axis=1, stable=True).astype(jnp.int32)


def attention_inputs(layout: PatchLayout, config: ModelConfig, path: str
                     ) -> tuple[tuple[int, int], Any, Any, Optional[jax.Array]]:
  """((full kind, window kind), full, window, order): how full and windowed layers attend, what
  each needs (segment ids, a mask or a block plan), and the patch order they run in (None = the
  processor's)."""
  if path != "xla":
    return (SPLASH, SPLASH), layout.frame_segment, layout.window_segment, None
  vision, patches = config.vision, layout.image.shape[1]
  windowed = config.windowed_vision
  order = window_order(layout) if windowed else None

  run_time = config.attention_impl == "auto" and patches >= packed_attention.MIN_LENGTH

  def inputs(segment_ids, max_segment):
    if order is not None:
      segment_ids = jnp.take_along_axis(segment_ids, order, axis=1)
    share = block_attention.score_share(patches, max_segment) if max_segment else 1.0
    if run_time and share > STATIC_SHARE:
      return PACKED, segment_ids
    if share < 1.0:
      return max_segment, block_attention.plan(segment_ids, max_segment)
    return MASKED, segment_ids[:, :, None] == segment_ids[:, None, :]

  full_kind, full = inputs(layout.frame_segment, config.max_frame_patches)
  window_kind, window = (inputs(layout.window_segment, vision.window_patches) if windowed
                         else (full_kind, full))
  return (full_kind, window_kind), full, window, order


def rotary_tables(layout: PatchLayout, config: VisionConfig) -> tuple[jax.Array, jax.Array]:
  """2-D rotary cos/sin [batch, patches, head_dim]: half the frequencies for rows, half for columns."""
  inv_freq = jnp.asarray(inverse_frequencies(config.head_dim // 2, config.rope_theta))
  freqs_row = layout.row.astype(jnp.float32)[..., None] * inv_freq
  freqs_col = layout.col.astype(jnp.float32)[..., None] * inv_freq
  angles = jnp.concatenate([freqs_row, freqs_col], axis=-1)
  angles = jnp.concatenate([angles, angles], axis=-1)
  return jnp.cos(angles), jnp.sin(angles)


class VisionAttention(nn.Module):
  """Multi-head self-attention with fused qkv and 2-D rotary."""
  config: ModelConfig

  # (full layers, windowed layers): SPLASH, PACKED, MASKED or a segment bound
  kinds: tuple[int, int] = (MASKED, MASKED)

  @nn.compact
  def __call__(self, x, cos, sin, full, window, use_full_attention):
    vision = self.config.vision
    kw = dict(dtype=dtype_of(self.config.dtype), param_dtype=dtype_of(self.config.param_dtype),
              adapter=self.config.adapter)
    batch, patches, _ = x.shape
    qkv = Linear((3, vision.hidden_size), ("embed", None, "heads"), name="qkv",
                 **kw)(x)  # [batch, patches, 3, width]
    qkv = qkv.reshape(batch, patches, 3, vision.num_heads, vision.head_dim)
    query, key, value = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    query, key = apply_rotary(query, cos, sin), apply_rotary(key, cos, sin)

    def attend(kind, where):
      if kind == SPLASH:
        return splash.attend(query, key, value, None, where, False, kw["dtype"],
                             self.config.attention_impl)
      if kind == MASKED:
        return dot_product_attention(query, key, value, where, kw["dtype"])
      if kind == PACKED:
        return packed_attention.attend(query, key, value, where, False, kw["dtype"])
      return block_attention.attend(query, key, value, where, kind, kw["dtype"])

    full_kind, window_kind = self.kinds
    if isinstance(use_full_attention, bool):  # unrolled layers
      out = attend(full_kind, full) if use_full_attention else attend(window_kind, window)
    elif full_kind == window_kind and full_kind <= MASKED:  # same shapes: pick the input
      out = attend(full_kind, jnp.where(use_full_attention, full, window))
    else:  # scanned layers that attend in different ways
      out = jax.lax.cond(use_full_attention, lambda: attend(full_kind, full),
                         lambda: attend(window_kind, window))
    out = out.reshape(batch, patches, vision.hidden_size)
    return Linear((vision.hidden_size,), ("heads", "embed"), name="proj", **kw)(out)


class VisionMLP(nn.Module):
  """SwiGLU with biases (Qwen2.5-VL) or fc1 -> act -> fc2 (Qwen2-VL)."""
  config: ModelConfig

  @nn.compact
  def __call__(self, x):
    vision = self.config.vision
    kw = dict(dtype=dtype_of(self.config.dtype), param_dtype=dtype_of(self.config.param_dtype),
              adapter=self.config.adapter)
    if self.config.family == "qwen2_5_vl":
      gate = Linear((vision.intermediate_size,), ("embed", "mlp"), name="gate_proj", **kw)(x)
      up = Linear((vision.intermediate_size,), ("embed", "mlp"), name="up_proj", **kw)(x)
      hidden = activation(vision.hidden_act, gate) * up
      return Linear((vision.hidden_size,), ("mlp", "embed"), name="down_proj", **kw)(hidden)
    hidden = Linear((vision.intermediate_size,), ("embed", "mlp"), name="fc1", **kw)(x)
    hidden = activation(vision.hidden_act, hidden)
    return Linear((vision.hidden_size,), ("mlp", "embed"), name="fc2", **kw)(hidden)


def _norm(config: ModelConfig, name: str) -> nn.Module:
  kw = dict(eps=config.vision.norm_eps, dtype=dtype_of(config.dtype),
            param_dtype=dtype_of(config.param_dtype), name=name)
  return RMSNorm(**kw) if config.family == "qwen2_5_vl" else LayerNorm(**kw)


class VisionBlock(nn.Module):
  """Pre-norm block; `use_full_attention` (a traced bool under scan) picks per-frame or per-window
  attention; `full` and `window` are what each needs (see `attention_inputs`)."""
  config: ModelConfig
  kinds: tuple[int, int] = (MASKED, MASKED)

  @nn.compact
  def __call__(self, x, cos, sin, full, window, use_full_attention):
    x = x + VisionAttention(self.config, self.kinds, name="attn")(
        _norm(self.config, "norm1")(x), cos, sin, full, window, use_full_attention)
    x = x + VisionMLP(self.config, name="mlp")(_norm(self.config, "norm2")(x))
    x = nn.with_logical_constraint(x, ("batch", "patches", "act_embed"))
    return checkpoint_name(x, "block_out"), None


class PatchMerger(nn.Module):
  """Norm, then groups of merge**2 consecutive patches -> one LLM token through a GELU MLP."""
  config: ModelConfig

  @nn.compact
  def __call__(self, x):
    vision = self.config.vision
    kw = dict(dtype=dtype_of(self.config.dtype), param_dtype=dtype_of(self.config.param_dtype),
              adapter=self.config.adapter)
    batch, patches, width = x.shape
    unit = vision.spatial_merge_size**2
    x = _norm(self.config, "ln_q")(x).reshape(batch, patches // unit, unit * width)
    x = Linear((unit * width,), ("mlp", "mlp_out"), name="mlp_0", **kw)(x)
    x = activation("gelu", x)
    return Linear((vision.out_hidden_size,), ("mlp", "embed"), name="mlp_2", **kw)(x)


class VisionTower(nn.Module):
  """Patches [batch, patches, 1176] -> merged visual tokens [batch, patches // 4, llm_width]."""
  config: ModelConfig

  @nn.compact
  def __call__(self, pixel_patches, patch_image_ids, image_grid_thw):
    config, vision = self.config, self.config.vision
    batch, patches, _ = pixel_patches.shape
    if patches % (vision.spatial_merge_size**2):
      raise ValueError(f"pixel_patches holds {patches} patches per row, not a multiple of "
                       f"{vision.spatial_merge_size**2}")
    kw = dict(dtype=dtype_of(config.dtype), param_dtype=dtype_of(config.param_dtype),
              adapter=config.adapter)
    layout = patch_layout(patch_image_ids, image_grid_thw, vision)
    kinds, full, window, order = attention_inputs(
        layout, config, splash.resolve(config.attention_impl, patches))
    cos, sin = rotary_tables(layout, vision)
    if order is not None:  # run the blocks window by window
      pixel_patches = jnp.take_along_axis(pixel_patches, order[..., None], axis=1)
      cos, sin = (jnp.take_along_axis(t, order[..., None], axis=1) for t in (cos, sin))
    # Patch embedding: a Conv3d whose stride equals its kernel is a linear map of the patch vector.
    x = Linear((vision.hidden_size,), ("patch", "embed"), use_bias=False, name="patch_embed",
               **kw)(pixel_patches)
    x = nn.with_logical_constraint(x, ("batch", "patches", "act_embed"))
    windowed = config.windowed_vision
    use_full = [not windowed or i in vision.fullatt_block_indexes for i in range(vision.depth)]
    block = remat.wrap(VisionBlock, config.remat_policy, config.scan_layers)
    if config.scan_layers:
      stack = nn.scan(block, variable_axes={"params": 0},
                      split_rngs={"params": True, "dropout": True}, in_axes=(nn.broadcast,) * 4 + (0,),
                      length=vision.depth,
                      metadata_params={nn.PARTITION_NAME: "layers"})
      x, _ = stack(config, kinds, name="blocks")(x, cos, sin, full, window, jnp.asarray(use_full))
    else:
      for i in range(vision.depth):
        x, _ = block(config, kinds, name=f"blocks_{i}")(x, cos, sin, full, window, use_full[i])
    if order is not None:  # back to the processor's order, which the merger groups by 4
      restore = jnp.argsort(order, axis=1)
      x = jnp.take_along_axis(x, restore[..., None], axis=1)
    merged = PatchMerger(config, name="merger")(x)
    return nn.with_logical_constraint(merged, ("batch", "length", "act_embed"))
