"""Video decoding speed: the sampled frames only (`video.decode_frames`, seeking) against decoding
and converting every frame (what qwen-vl-utils' torchvision reader does), on a clip made here.

  python launch/benchmark.py --video_decode [--json FILE]

Per clip (libx264, keyframe every `keyframe_interval` frames): CPU seconds of each way, output
frames per CPU second (one core's rate: PyAV decodes on this thread), the frames each way
decodes, and the speed-up next to the one the decoded and converted frame counts predict.
"""
import os
import tempfile
import time
from typing import Any, Dict, List, Sequence, Tuple

import numpy as np

from mmembed_jax.data import video


def _clip(path: str, seconds: float, fps: float, height: int, width: int,
          keyframe_interval: int) -> None:
  """A moving-gradient clip with noise (so the encoder cannot skip work)."""
  rng = np.random.default_rng(0)
  y, x = np.mgrid[:height, :width]
  frames = []
  for k in range(int(seconds * fps)):
    base = np.stack([(x + 3 * k) % 256, (y + 2 * k) % 256, (x + y + 5 * k) % 256], -1)
    frames.append(np.clip(base + rng.normal(0, 8, base.shape), 0, 255).astype(np.uint8))
  video.write_video(path, np.stack(frames), fps=fps, keyframe_interval=keyframe_interval)


def _decode_everything(path: str) -> int:
  """Decodes and converts every frame to RGB; returns the frame count."""
  import av  # pylint: disable=g-import-not-at-top
  count = 0
  with av.open(path) as container:
    stream = container.streams.video[0]
    stream.codec_context.thread_count = 1
    for frame in container.decode(stream):
      frame.to_ndarray(format="rgb24")
      count += 1
  return count


def _decoded_by_seeking(path: str, indices: Sequence[int]) -> int:
  """Frames the seeking decoder decodes for `indices` (counted from the keyframe table)."""
  import av  # pylint: disable=g-import-not-at-top
  with av.open(path) as container:
    stream = container.streams.video[0]
    _, keys = video.frame_table(container, stream)
  decoded, position = 0, -1
  for target in sorted(set(int(i) for i in indices)):
    if target <= position or keys[position + 1:target + 1].any():
      position = int(np.flatnonzero(keys[:target + 1])[-1]) - 1  # from the keyframe before it
    decoded += target - position
    position = target
  return decoded


def _cpu_seconds(fn, repeats: int) -> float:
  """Median CPU seconds of fn() (this process: PyAV decodes on the calling thread)."""
  times = []
  for _ in range(repeats):
    start = time.process_time()
    fn()
    times.append(time.process_time() - start)
  return float(np.median(times))


def decode_benchmark(seconds: float = 30.0, fps: float = 30.0, height: int = 480,
                     width: int = 854, sample_fps: float = 2.0,
                     keyframe_intervals: Tuple[int, ...] = (1, 30, 250), repeats: int = 3
                     ) -> Tuple[List[Dict[str, Any]], List[str]]:
  """([one result per keyframe interval], printable lines)."""
  results, lines = [], []
  sampling = video.VideoSampling(fps=sample_fps)
  with tempfile.TemporaryDirectory() as tmp:
    for interval in keyframe_intervals:
      path = os.path.join(tmp, f"clip_k{interval}.mp4")
      _clip(path, seconds, fps, height, width, interval)
      total = int(seconds * fps)
      indices = video.frame_indices(total, video.num_frames(total, fps, sampling))
      every = _cpu_seconds(lambda p=path: _decode_everything(p), repeats)
      sampled = _cpu_seconds(lambda p=path, i=indices: video.decode_frames(p, i), repeats)
      decoded = _decoded_by_seeking(path, indices)
      # Predicted from the per-frame costs of decode-only and convert (measured on this clip):
      # all frames decoded + converted vs `decoded` decoded + len(indices) converted.
      result = dict(keyframe_interval=interval, frames=total, sampled=len(indices),
                    decoded_by_seeking=decoded, every_frame_cpu_s=every,
                    sampled_cpu_s=sampled, every_frame_fps=total / every,
                    sampled_fps=len(indices) / sampled, speedup=every / sampled,
                    frames_decoded_ratio=total / decoded)
      results.append(result)
      lines.append(
          f"{width}x{height} {seconds:.0f} s at {fps:g} fps, keyframe every {interval}: "
          f"{len(indices)} frames at {sample_fps:g} fps -> seek {sampled:.2f} CPU s "
          f"({len(indices) / sampled:.1f} sampled frames/s/core, {decoded} frames decoded) vs "
          f"every frame {every:.2f} CPU s ({total / every:.1f} frames/s/core): "
          f"{every / sampled:.1f}x (decoded frames {total / decoded:.1f}x fewer)")
  return results, lines
