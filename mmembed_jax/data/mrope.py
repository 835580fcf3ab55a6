"""M-RoPE (multimodal rotary) positions of one sequence, in numpy.

Reproduces `Qwen2VLModel.get_rope_index` / `Qwen2_5_VLModel.get_rope_index` of transformers
(5.x) for text, images and videos:

  * text tokens get the same position p on all three axes (temporal, height, width), one more
    than the previous token's;
  * the merged tokens of an image with patch grid (t, h, w) form a (t, h/m, w/m) grid
    (m = spatial_merge_size) in row-major order; the token at grid cell (i, j, k) gets positions
    (s + i, s + j, s + k), where s is the position the next text token would have had; for
    a video on Qwen2.5-VL the temporal one is s + floor(i * interval), interval =
    tokens_per_second * temporal_patch_size / sample_fps (seconds per temporal patch), computed
    in float32 as torch does;
  * the text after an image or video continues at s + max(h, w) / m (the largest spatial
    position + 1; the temporal extent is not counted, as in transformers 5; transformers < 5.3
    continued after the largest position of any axis).

Vision tokens (`<|image_pad|>` or `<|video_pad|>`) are matched to the grids strictly in order,
item i taking exactly t*h*w / m**2 consecutive tokens, so two images with no token between them
still get their own grids (transformers would merge such a run into one group).
"""
from typing import Optional, Sequence

import numpy as np


def vision_positions(start: int, grid_thw, spatial_merge_size: int = 2,
                     time_interval: Optional[float] = None) -> np.ndarray:
  """Returns int32 [3, t*h*w/m**2] (temporal, height, width) positions of one image's or video's
  merged tokens; `time_interval` (float32) spaces the temporal patches (None: 1 apart)."""
  t, h, w = (int(x) for x in grid_thw)
  m = spatial_merge_size
  steps = np.arange(t)
  if time_interval is not None:
    steps = (steps.astype(np.float32) * np.float32(time_interval)).astype(np.int64)
  tt, hh, ww = np.meshgrid(steps, np.arange(h // m), np.arange(w // m), indexing="ij")
  return (np.stack([tt, hh, ww]).reshape(3, -1) + start).astype(np.int32)  # [3, t * h/m * w/m]


def video_time_interval(tokens_per_second: Optional[int], sample_fps: float,
                        temporal_patch_size: int = 2) -> Optional[float]:
  """float32 M-RoPE steps per temporal patch of a video sampled at `sample_fps`
  (tokens_per_second * temporal_patch_size / sample_fps, as transformers multiplies them); None
  for Qwen2-VL (tokens_per_second None)."""
  if tokens_per_second is None:
    return None
  return float(np.float32(tokens_per_second) * np.float32(temporal_patch_size / sample_fps))


def mrope_positions(input_ids, grid_thw, image_token_id: int, spatial_merge_size: int = 2,
                    attention_mask: Optional[np.ndarray] = None, video_token_id: Optional[int] = None,
                    time_intervals: Optional[Sequence[Optional[float]]] = None) -> np.ndarray:
  """Returns int32 [3, n] M-RoPE positions of input_ids [n] with images and videos of grid_thw
  [k, 3] (in order of appearance); time_intervals [k] (`video_time_interval`, None for images
  and Qwen2-VL videos).

  With attention_mask [n] (nonzero = real token), positions are computed over the real tokens
  only (as if the others were removed) and are 0 at masked tokens, like transformers.
  """
  input_ids = np.asarray(input_ids)
  if input_ids.ndim != 1:
    raise ValueError(f"mrope_positions: input_ids must have shape [n], found {input_ids.shape}")
  grid_thw = np.asarray(grid_thw, dtype=np.int64).reshape(-1, 3)  # [k, 3]
  n = input_ids.shape[0]
  if attention_mask is not None:
    attention_mask = np.asarray(attention_mask)
    if attention_mask.shape != (n,):
      raise ValueError(f"mrope_positions: attention_mask has shape {attention_mask.shape}, "
                       f"expected ({n},) like input_ids")
    keep = attention_mask != 0
    out = np.zeros((3, n), np.int32)
    out[:, keep] = mrope_positions(input_ids[keep], grid_thw, image_token_id, spatial_merge_size,
                                   video_token_id=video_token_id, time_intervals=time_intervals)
    return out

  m = spatial_merge_size
  positions = np.zeros((3, n), np.int32)  # [3, n]
  is_image = input_ids == image_token_id  # [n]: any vision token
  if video_token_id is not None:
    is_image |= input_ids == video_token_id
  if time_intervals is None:
    time_intervals = [None] * len(grid_thw)
  image_index = np.flatnonzero(is_image)
  cur = 0  # position of the next text token
  p = 0  # next token index to place
  q = 0  # image tokens consumed so far (index into image_index)
  for k, grid in enumerate(grid_thw):
    t, h, w = (int(x) for x in grid)
    if min(t, h, w) < 1 or h % m or w % m:
      raise ValueError(f"mrope_positions: grid_thw[{k}] = {[t, h, w]} is invalid; expected positive "
                       f"t, h, w with h and w divisible by spatial_merge_size {m}")
    count = t * h * w // (m * m)
    if q >= len(image_index):
      raise ValueError(f"mrope_positions: grid_thw has {len(grid_thw)} images but input_ids has image "
                       f"tokens (id {image_token_id}) for only {k} of them "
                       f"({int(is_image.sum())} tokens in all)")
    s = int(image_index[q])
    run = is_image[s:s + count]
    if run.shape[0] != count or not run.all():
      found = int(np.argmin(run)) if not run.all() else run.shape[0]
      raise ValueError(f"mrope_positions: image {k} with grid_thw {[t, h, w]} needs {count} "
                       f"consecutive image tokens from index {s}, found {found}")
    positions[:, p:s] = cur + np.arange(s - p, dtype=np.int32)  # text before the image
    cur += s - p
    positions[:, s:s + count] = vision_positions(cur, (t, h, w), m, time_intervals[k])
    cur += max(h, w) // m
    p = s + count
    q += count
  if q != len(image_index):
    raise ValueError(f"mrope_positions: input_ids has {len(image_index)} image tokens "
                     f"(id {image_token_id}) but grid_thw {grid_thw.tolist()} accounts for only {q}")
  positions[:, p:] = cur + np.arange(n - p, dtype=np.int32)  # trailing text
  return positions
