"""Videos for Qwen2-VL style vision towers: decoded with PyAV, sampled as qwen-vl-utils samples
them, processed as transformers' `Qwen2VLVideoProcessor` processes them (numpy, no torch).

  clip = read_video("cat.mp4", VideoSampling())           # frames float32 [n, 3, h, w]
  patches, grid_thw = preprocess_video(clip.frames, video_config)

Sampling (qwen-vl-utils `fetch_video`, v0.0.10 and later):

  1. n = the video's frame count T over its duration at `fps` (default 2), clipped to
     [min_frames, min(max_frames, T)] and floored to an even number (`num_frames`);
  2. frame indices round(linspace(0, T - 1, n)) (`frame_indices`, float32 as torch computes them);
  3. only those frames are decoded: packets are demuxed (cheap) to learn every frame's
     timestamp and the keyframes, and the decoder seeks to the keyframe before a sampled frame
     whenever one lies between the last decoded frame and it (`read_video`);
  4. each frame is resized to a multiple of 28 within a per-frame pixel budget
     max(min(max_frames_pixels, total_pixels / n * 2), 1.05 * min_pixels), capped by
     `max_pixels`, with antialiased bicubic interpolation in float32 and rounded back to uint8,
     as torchvision's `resize` on a uint8 tensor does (`resize_frames`).

A list of frame images is a video too (`read_frame_list`): each is read and resized as an image
(PIL bicubic within the image bounds, qwen-vl-utils' `fetch_image`) and an odd list repeats its
last frame. Its `sample_fps` is the row's `fps` (default 2.0).

Processing (`preprocess_video`, transformers' `Qwen2VLVideoProcessor` given float frames): a
`smart_resize` within the video processor's [min_pixels, max_pixels] (a no-op for frames
sampled above unless the processor's bounds are tighter, as in UNITE), rescale and normalise,
an odd frame count padded with the last frame, and patches of `temporal_patch_size` (2)
consecutive frames in the image patch order: [t * h * w, 3 * 2 * 14 * 14].

The antialiased resize reproduces torch's `interpolate(mode="bicubic", antialias=True)`: its
float32 weights exactly and its horizontal pass bit for bit; the vertical pass agrees within
2e-4 on the 0-255 scale (torch's kernel orders the float32 sums differently), so after
rounding to uint8 about 1 value in 10^5 differs by one level.
"""
import dataclasses
import math
from typing import Any, Callable, List, Mapping, Optional, Sequence, Union

import numpy as np

from mmembed_jax.data import images as images_lib

FRAME_FACTOR = 2  # sampled frame counts are even: one temporal patch holds 2 frames
FACTOR = 28  # patch_size * merge_size of the Qwen-VL vision towers
VIDEO_MIN_PIXELS = 128 * FACTOR * FACTOR  # transformers' video processor size bounds
VIDEO_MAX_PIXELS = 768 * FACTOR * FACTOR


@dataclasses.dataclass(frozen=True)
class VideoSampling:
  """How frames are taken from a video (qwen-vl-utils' `fetch_video` defaults; UNITE's released
  code uses fps=1, min_frames=4, max_frames=12, max_pixels=240 * 320)."""
  fps: float = 2.0  # frames sampled per second of video
  min_frames: int = 4
  max_frames: int = 768
  min_pixels: int = VIDEO_MIN_PIXELS  # per frame
  max_pixels: Optional[int] = None  # per frame, caps the budget below (a row's "max_pixels")
  frame_max_pixels: int = 768 * FACTOR * FACTOR  # VIDEO_MAX_TOKEN_NUM * 28**2
  total_pixels: float = 128000 * FACTOR * FACTOR * 0.9  # shared by all frames of a video

  def __post_init__(self):
    if not self.fps > 0:
      raise ValueError(f"VideoSampling.fps must be positive, got {self.fps}")
    if not 0 < self.min_frames <= self.max_frames:
      raise ValueError(f"VideoSampling needs 0 < min_frames <= max_frames, got "
                       f"{self.min_frames}, {self.max_frames}")

  def frame_pixels(self, num_frames: int) -> float:
    """The per-frame pixel budget of a video of `num_frames` sampled frames."""
    budget = max(min(self.frame_max_pixels, self.total_pixels / num_frames * FRAME_FACTOR),
                 int(self.min_pixels * 1.05))
    return budget if self.max_pixels is None else min(self.max_pixels, budget)


SETTING_FIELDS = ("fps", "min_frames", "max_frames", "min_pixels", "max_pixels",
                  "frame_max_pixels", "total_pixels", "processor_min_pixels",
                  "processor_max_pixels")


@dataclasses.dataclass(frozen=True)
class VideoSettings:
  """How a pipeline turns videos into model input: frame sampling, the video processor's pixel
  bounds, and the model's M-RoPE time scale."""
  sampling: VideoSampling = VideoSampling()
  processor_min_pixels: int = VIDEO_MIN_PIXELS  # transformers' video processor bounds
  processor_max_pixels: int = VIDEO_MAX_PIXELS
  tokens_per_second: Optional[int] = None  # ModelConfig.video_tokens_per_second (None: Qwen2-VL)

  @classmethod
  def from_spec(cls, spec: Optional[Mapping[str, Any]], tokens_per_second: Optional[int] = None,
                where: str = "input.video") -> "VideoSettings":
    """Settings from a config's `video` dict (SETTING_FIELDS; None: the defaults)."""
    spec = dict(spec or {})
    unknown = set(spec) - set(SETTING_FIELDS)
    if unknown:
      raise ValueError(f"{where}: unknown fields {sorted(unknown)}; expected some of "
                       f"{list(SETTING_FIELDS)}")
    processor = {k: spec.pop(k) for k in ("processor_min_pixels", "processor_max_pixels")
                 if k in spec}
    return cls(VideoSampling(**spec), **processor, tokens_per_second=tokens_per_second)

  def to_record(self) -> dict:
    """The SETTING_FIELDS as a JSON-able dict (mmembed.json's "video"; `from_spec` reads it)."""
    return dict(dataclasses.asdict(self.sampling), processor_min_pixels=self.processor_min_pixels,
                processor_max_pixels=self.processor_max_pixels)

  def processor_config(self, image_config: images_lib.ImageProcessingConfig
                       ) -> images_lib.ImageProcessingConfig:
    """The video processor: the image processor's patches and normalisation, video bounds."""
    return dataclasses.replace(image_config, min_pixels=self.processor_min_pixels,
                               max_pixels=self.processor_max_pixels)


@dataclasses.dataclass(frozen=True)
class Clip:
  """Sampled frames of one video and the rate they were taken at."""
  frames: np.ndarray  # float32 [n, 3, h, w], integer values 0..255
  sample_fps: float  # sampled frames per second of video (Qwen2.5-VL's time axis uses it)


def _floor_even(x: float) -> int:
  return int(math.floor(x / FRAME_FACTOR) * FRAME_FACTOR)


def num_frames(total_frames: int, video_fps: float, sampling: VideoSampling) -> int:
  """Frames to sample from a video of `total_frames` at `video_fps` (qwen-vl-utils'
  `smart_nframes`); ValueError if fewer than 2 remain."""
  min_frames = int(math.ceil(sampling.min_frames / FRAME_FACTOR) * FRAME_FACTOR)
  max_frames = _floor_even(min(sampling.max_frames, total_frames))
  n = total_frames / video_fps * sampling.fps
  n = _floor_even(min(min(max(n, min_frames), max_frames), total_frames))
  if not FRAME_FACTOR <= n <= total_frames:
    raise ValueError(f"a video of {total_frames} frames is too short to sample {FRAME_FACTOR}")
  return n


def frame_indices(total_frames: int, n: int) -> np.ndarray:
  """int64 [n]: round(linspace(0, total_frames - 1, n)) computed as torch does (float32, the
  second half counted back from the end; ties to even)."""
  end = np.float32(total_frames - 1)
  if n == 1:
    return np.zeros(1, np.int64)
  step = np.float32(end / np.float32(n - 1))
  i = np.arange(n)
  values = np.where(i < n // 2, np.float32(i) * step, end - np.float32(n - 1 - i) * step)
  return np.round(values.astype(np.float32)).astype(np.int64)


# Antialiased bicubic resize (torch `interpolate(..., antialias=True)`, float32).


def _cubic(x: np.ndarray) -> np.ndarray:
  """Keys' cubic kernel (a = -0.5) in float32, as torch's `aa_filter`."""
  f32 = np.float32
  x = np.abs(x).astype(f32)
  a = f32(-0.5)
  near = ((a + f32(2)) * x - (a + f32(3))) * x * x + f32(1)
  far = ((a * x - f32(5) * a) * x + f32(8) * a) * x - f32(4) * a
  return np.where(x < 1, near, np.where(x < 2, far, f32(0))).astype(f32)


def _aa_weights(in_size: int, out_size: int):
  """(source indices int64 [out, taps], weights float32 [out, taps]) of torch's antialiased
  bicubic weights, with its float32 / double promotions."""
  f32 = np.float32
  scale = f32(f32(in_size) / f32(out_size))
  support = f32(2.0 * float(scale)) if scale >= 1 else f32(2.0)
  taps = int(math.ceil(support)) * 2 + 1
  invscale = f32(1.0 / float(scale)) if scale >= 1 else f32(1.0)
  center = (float(scale) * (np.arange(out_size) + 0.5)).astype(f32)  # [out]
  xmin = np.maximum(((center - support).astype(f32).astype(np.float64) + 0.5).astype(np.int64), 0)
  xmax = np.minimum(((center + support).astype(f32).astype(np.float64) + 0.5).astype(np.int64),
                    in_size)
  size = np.clip(xmax - xmin, 0, taps)
  j = np.arange(taps)
  offset = ((j[None] + xmin[:, None]).astype(f32) - center[:, None]).astype(f32)
  weights = _cubic(((offset.astype(np.float64) + 0.5) * float(invscale)).astype(f32))
  weights = np.where(j[None] < size[:, None], weights, f32(0)).astype(f32)  # [out, taps]
  total = np.zeros(out_size, f32)
  for k in range(taps):
    total = (total + weights[:, k]).astype(f32)
  weights = np.where(total[:, None] != 0, weights / total[:, None], weights).astype(f32)
  return np.minimum(xmin[:, None] + j[None], in_size - 1), weights


def _resize_axis(x: np.ndarray, out_size: int, axis: int) -> np.ndarray:
  """Resizes float32 `x` along `axis`: a float32 sum of products, fused as torch's kernel is."""
  x = np.moveaxis(x, axis, -1)
  index, weights = _aa_weights(x.shape[-1], out_size)
  out = (x[..., index[:, 0]] * weights[:, 0]).astype(np.float32)
  for k in range(1, index.shape[1]):
    out = (out.astype(np.float64) + x[..., index[:, k]].astype(np.float64) * weights[:, k]
           ).astype(np.float32)
  return np.moveaxis(out, -1, axis)


def resize_bicubic_aa(frames: np.ndarray, height: int, width: int) -> np.ndarray:
  """float32 [..., height, width] from [..., H, W]: width first, then height, as torch does."""
  out = np.asarray(frames, np.float32)
  if out.shape[-1] != width:
    out = _resize_axis(out, width, -1)
  if out.shape[-2] != height:
    out = _resize_axis(out, height, -2)
  return out


def resize_frames(frames: np.ndarray, sampling: VideoSampling, factor: int = FACTOR) -> np.ndarray:
  """float32 [n, 3, h, w] of uint8 frames [n, H, W, 3] resized within the per-frame budget and
  rounded to integers (qwen-vl-utils' resize of a uint8 tensor)."""
  n, height, width = frames.shape[:3]
  new_h, new_w = images_lib.smart_resize(height, width, factor=factor,
                                         min_pixels=sampling.min_pixels,
                                         max_pixels=sampling.frame_pixels(n))
  chw = np.moveaxis(np.asarray(frames), -1, 1)  # [n, 3, H, W]
  if (new_h, new_w) == (height, width):
    return chw.astype(np.float32)
  resized = resize_bicubic_aa(chw, new_h, new_w)
  return np.round(np.clip(resized, 0, 255)).astype(np.float32)


# Decoding.


def _open(path: str):
  """An open PyAV container of a local or gs:// file."""
  import av  # pylint: disable=g-import-not-at-top
  if "://" in path:
    from etils import epath  # pylint: disable=g-import-not-at-top
    return av.open(epath.Path(path).open("rb"))
  return av.open(path)


def frame_table(container: Any, stream: Any):
  """(timestamps int64 [T] in presentation order, keyframe flags bool [T]) from the packets."""
  stamps, keys = [], []
  for packet in container.demux(stream):
    if packet.size == 0 or packet.pts is None:
      continue  # flush packets
    stamps.append(packet.pts)
    keys.append(packet.is_keyframe)
  order = np.argsort(np.asarray(stamps, np.int64), kind="stable")
  return np.asarray(stamps, np.int64)[order], np.asarray(keys, bool)[order]


def decode_frames(path: str,
                  indices: Union[None, Sequence[int], Callable[[int, float], Any]] = None):
  """(frames uint8 [n, H, W, 3], video fps, total frames): the frames at `indices` (every frame
  if None; a function of (total frames, fps) to choose them once those are known), decoding
  from the keyframe before each one only when a keyframe lies between the last decoded frame
  and it. ValueError for a file with no video stream, no frames or no rate."""
  with _open(path) as container:
    if not container.streams.video:
      raise ValueError("no video stream")
    stream = container.streams.video[0]
    rate = float(stream.average_rate or stream.guessed_rate or 0)
    stamps, keys = frame_table(container, stream)
    total = len(stamps)
    if total == 0 or rate <= 0:
      raise ValueError("no frames" if total == 0 else "the video stream has no frame rate")
    if callable(indices):
      indices = indices(total, rate)
    wanted = np.arange(total) if indices is None else np.asarray(indices, np.int64)
    if wanted.size and (wanted.min() < 0 or wanted.max() >= total):
      raise ValueError(f"frame indices {wanted.tolist()} outside a video of {total} frames")
    out: List[Optional[np.ndarray]] = [None] * len(wanted)
    container.seek(int(stamps[0]), stream=stream, backward=True)
    frames = container.decode(stream)
    position = -1  # index of the last decoded frame
    for slot, target in enumerate(wanted):
      if slot and target == wanted[slot - 1]:
        out[slot] = out[slot - 1]
        continue
      if target <= position or keys[position + 1:target + 1].any():
        container.seek(int(stamps[target]), stream=stream, backward=True)
        frames = container.decode(stream)
        position = None  # unknown until the next frame's timestamp is read
      for frame in frames:
        position = int(np.searchsorted(stamps, frame.pts))
        if position >= target:
          break
      if position != target:
        raise ValueError(f"frame {target} of {total} could not be decoded (the stream ends or "
                         f"its timestamps are inconsistent)")
      out[slot] = frame.to_ndarray(format="rgb24")
    return np.stack(out), rate, total


def read_video(path: str, sampling: VideoSampling = VideoSampling(),
               factor: int = FACTOR) -> Clip:
  """The sampled, resized frames of a video file (see the module docstring); a 1-frame video
  gives its frame twice; ValueError naming the file and the cause for one that cannot be read."""
  import av  # pylint: disable=g-import-not-at-top

  def sample(total: int, rate: float) -> np.ndarray:
    if total < FRAME_FACTOR:
      return np.zeros(FRAME_FACTOR, np.int64)
    return frame_indices(total, num_frames(total, rate, sampling))

  try:
    frames, rate, total = decode_frames(path, sample)
  except (av.FFmpegError, OSError, ValueError) as e:
    raise ValueError(f"cannot read video {path}: {type(e).__name__}: {e}") from None
  return Clip(resize_frames(frames, sampling, factor), len(frames) / total * rate)


def read_frame_list(frames: Sequence[Any], sampling: VideoSampling = VideoSampling(),
                    sample_fps: float = 2.0, factor: int = FACTOR) -> Clip:
  """A video given as frame images (paths, bytes, PIL images or arrays): each resized as an image
  (PIL bicubic within sampling's min_pixels and 16384 * 28**2), an odd list padded with its last
  frame (qwen-vl-utils' list branch)."""
  if not frames:
    raise ValueError("a frame list video has no frames")
  loaded = []
  for frame in frames:
    if isinstance(frame, str):
      frame = images_lib.load_image(frame)
    elif isinstance(frame, bytes):
      frame = images_lib.decode_image(frame)
    elif isinstance(frame, np.ndarray):
      frame = images_lib.PIL.Image.fromarray(np.asarray(frame, np.uint8))
    frame = frame.convert("RGB")
    max_pixels = 16384 * factor * factor if sampling.max_pixels is None else sampling.max_pixels
    h, w = images_lib.smart_resize(frame.height, frame.width, factor=factor,
                                   min_pixels=sampling.min_pixels, max_pixels=max_pixels)
    loaded.append(np.asarray(frame.resize((w, h), resample=images_lib.BICUBIC)))
  if len({f.shape for f in loaded}) != 1:
    raise ValueError(f"frames of a video must share one size, got "
                     f"{sorted({f.shape[:2] for f in loaded})}")
  loaded += loaded[-1:] * (-len(loaded) % FRAME_FACTOR)
  stacked = np.moveaxis(np.stack(loaded), -1, 1).astype(np.float32)  # [n, 3, h, w]
  return Clip(stacked, float(sample_fps))


# Processing (transformers' Qwen2VLVideoProcessor on float frames).


def patchify_video(frames: np.ndarray, patch_size: int = 14, temporal_patch_size: int = 2,
                   merge_size: int = 2):
  """(patches float32 [t * h * w, 3 * temporal_patch_size * patch_size**2], t, h, w) of frames
  [n, 3, H, W], an odd count padded with the last frame."""
  frames = np.asarray(frames, np.float32)
  pad = -frames.shape[0] % temporal_patch_size
  if pad:
    frames = np.concatenate([frames, np.repeat(frames[-1:], pad, axis=0)])
  n, channels, height, width = frames.shape
  m, p = merge_size, patch_size
  t, h, w = n // temporal_patch_size, height // p, width // p
  patches = frames.reshape(t, temporal_patch_size, channels, h // m, m, p, w // m, m, p)
  # [t, h/m, w/m, m, m, C, T, p, p]
  patches = patches.transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)
  return (np.ascontiguousarray(patches.reshape(t * h * w, channels * temporal_patch_size * p * p)),
          t, h, w)


def preprocess_video(frames: np.ndarray, config: images_lib.ImageProcessingConfig
                     ) -> tuple[np.ndarray, np.ndarray]:
  """(patches float32 [t * h * w, patch_dim], grid_thw int32 [3]) of float frames
  [n, 3, H, W] (0..255), as `Qwen2VLVideoProcessor` computes them."""
  frames = np.asarray(frames, np.float32)
  if frames.ndim != 4 or frames.shape[1] != 3 or frames.shape[0] == 0:
    raise ValueError(f"video frames must be [frames, 3, height, width], got {frames.shape}")
  height, width = frames.shape[-2:]
  new_h, new_w = images_lib.smart_resize(height, width, factor=config.factor,
                                         min_pixels=config.min_pixels,
                                         max_pixels=config.max_pixels)
  frames = resize_bicubic_aa(frames, new_h, new_w)
  scale = np.float32(1 / images_lib.RESCALE_FACTOR)
  mean = (np.asarray(config.image_mean, np.float32) * scale)[:, None, None]
  std = (np.asarray(config.image_std, np.float32) * scale)[:, None, None]
  frames = (frames - mean) / std  # rescale and normalise fused, as transformers does
  patches, t, h, w = patchify_video(frames, config.patch_size, config.temporal_patch_size,
                                    config.merge_size)
  return patches, np.array([t, h, w], np.int32)


def write_video(path: str, frames: np.ndarray, fps: float = 24.0, keyframe_interval: int = 12,
                codec: str = "libx264") -> None:
  """Encodes uint8 frames [n, H, W, 3] (even H and W) to `path` with PyAV (the demo's and the
  tests' videos); a keyframe every `keyframe_interval` frames."""
  import av  # pylint: disable=g-import-not-at-top
  from fractions import Fraction  # pylint: disable=g-import-not-at-top
  frames = np.asarray(frames, np.uint8)
  with av.open(path, mode="w") as container:
    stream = container.add_stream(codec, rate=Fraction(fps).limit_denominator(1001))
    stream.width, stream.height = frames.shape[2], frames.shape[1]
    stream.pix_fmt = "yuv420p"
    stream.codec_context.gop_size = keyframe_interval
    if codec == "libx264":
      stream.options = {"crf": "18", "preset": "veryfast", "bf": "0",
                        "x264-params": f"keyint={keyframe_interval}:min-keyint={keyframe_interval}"
                                       ":scenecut=0"}
    container.start_encoding()  # the header, even for no frames (a frameless test video)
    for frame in frames:
      container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
    container.mux(stream.encode())
