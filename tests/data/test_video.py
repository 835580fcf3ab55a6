"""mmembed_jax.data.video against its oracles: qwen-vl-utils (sampling and frame resizing),
transformers' Qwen2VLVideoProcessor (processing) and a plain PyAV decode of every frame."""
import math

import numpy as np
import pytest
import torch

from mmembed_jax.data import images as images_lib
from mmembed_jax.data import video

from tiny_models import video_frames as _frames


def _decode_all(path):
  """Every frame, uint8 [T, H, W, 3], and the average rate, by a plain PyAV decode."""
  import av  # pylint: disable=g-import-not-at-top
  with av.open(path) as container:
    stream = container.streams.video[0]
    frames = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
    return np.stack(frames), float(stream.average_rate)


def test_seek_decode_equals_decoding_every_frame(test_videos):
  for path, n, fps, h, w in test_videos:
    everything, rate = _decode_all(path)
    assert everything.shape == (n, h, w, 3) and math.isclose(rate, fps, rel_tol=1e-3)
    for indices in ([0, n - 1], list(range(0, n, 3)), [n - 1, 2, 2, n // 2],
                    video.frame_indices(n, video.num_frames(n, rate, video.VideoSampling()))):
      frames, got_rate, total = video.decode_frames(path, indices)
      assert total == n and got_rate == rate
      np.testing.assert_array_equal(frames, everything[np.asarray(indices)])


def test_sampling_matches_qwen_vl_utils():
  from qwen_vl_utils import vision_process  # pylint: disable=g-import-not-at-top
  for total in (2, 3, 7, 16, 31, 100, 301, 1000, 4001, 100003):
    for fps_in in (1, 10, 23.976, 30, 60):
      for ele in ({}, {"fps": 1.0, "min_frames": 4, "max_frames": 12}, {"fps": 0.5},
                  {"fps": 4.0, "max_frames": 33, "min_frames": 3}):
        sampling = video.VideoSampling(**ele)
        try:
          expected = vision_process.smart_nframes(ele, total_frames=total, video_fps=fps_in)
        except ValueError:
          with pytest.raises(ValueError):
            video.num_frames(total, fps_in, sampling)
          continue
        n = video.num_frames(total, fps_in, sampling)
        assert n == expected, (total, fps_in, ele)
        np.testing.assert_array_equal(
            video.frame_indices(total, n),
            torch.linspace(0, total - 1, n).round().long().numpy(), err_msg=str((total, n)))


@pytest.mark.parametrize("ele", [{}, {"fps": 1.0, "min_frames": 4, "max_frames": 12,
                                      "max_pixels": 240 * 320, "min_pixels": 64 * 28 * 28},
                                 {"total_pixels": 20 * 28 * 28 * 10, "min_pixels": 16 * 28 * 28}])
def test_read_video_matches_qwen_vl_utils_fetch_video(test_videos, monkeypatch, ele):
  """qwen-vl-utils' fetch_video with its torchvision reader replaced by a decode of every frame
  (torchvision 0.28 has no video reader): same frame count, sample fps and frames; the resize's
  float32 sums may round one value in ~10^5 to the neighbouring level."""
  from qwen_vl_utils import vision_process  # pylint: disable=g-import-not-at-top

  def read_every_frame(element):
    frames, rate = _decode_all(element["video"])
    total = len(frames)
    n = vision_process.smart_nframes(element, total_frames=total, video_fps=rate)
    idx = torch.linspace(0, total - 1, n).round().long()
    return (torch.from_numpy(frames).permute(0, 3, 1, 2)[idx], {"fps": rate},
            n / max(total, 1e-6) * rate)

  monkeypatch.setitem(vision_process.VIDEO_READER_BACKENDS, "torchvision", read_every_frame)
  monkeypatch.setattr(vision_process, "get_video_reader_backend", lambda: "torchvision")
  sampling = video.VideoSampling(**ele)
  for path, *_ in test_videos:
    expected, sample_fps = vision_process.fetch_video({"video": path, **ele},
                                                      return_video_sample_fps=True)
    clip = video.read_video(path, sampling)
    assert clip.frames.shape == tuple(expected.shape) and clip.frames.dtype == np.float32
    assert clip.sample_fps == pytest.approx(sample_fps, rel=1e-12)
    diff = np.abs(clip.frames - expected.numpy())
    assert diff.max() <= 1 and (diff > 0).mean() <= 1e-4, (path, diff.max(), (diff > 0).sum())


@pytest.mark.parametrize("size", [(4, 56, 84), (5, 61, 97), (7, 200, 150), (2, 224, 308),
                                  (3, 30, 500), (10, 480, 640)])
@pytest.mark.parametrize("bounds", [None, (256 * 28 * 28, 16384 * 28 * 28), (3136, 50000)])
def test_processing_matches_qwen2vl_video_processor(size, bounds):
  """pixel_values_videos <= 1e-5 and video_grid_thw equal, over frame counts (odd ones padded),
  sizes that need resizing up or down and processor pixel budgets."""
  from transformers.models.qwen2_vl import video_processing_qwen2_vl  # pylint: disable=g-import-not-at-top
  n, height, width = size
  frames = np.random.default_rng(n * height + width).integers(0, 256, (n, 3, height, width))
  frames = frames.astype(np.float32)
  kwargs = {} if bounds is None else {"min_pixels": bounds[0], "max_pixels": bounds[1]}
  processor = video_processing_qwen2_vl.Qwen2VLVideoProcessor(**kwargs)
  theirs = processor(videos=[torch.from_numpy(frames)], do_sample_frames=False,
                     cap_pixels_per_frame=False, return_tensors="np")
  config = images_lib.ImageProcessingConfig(
      min_pixels=video.VIDEO_MIN_PIXELS if bounds is None else bounds[0],
      max_pixels=video.VIDEO_MAX_PIXELS if bounds is None else bounds[1])
  patches, grid = video.preprocess_video(frames, config)
  np.testing.assert_array_equal(np.asarray(theirs["video_grid_thw"]).reshape(3), grid)
  np.testing.assert_allclose(patches, np.asarray(theirs["pixel_values_videos"]), atol=1e-5, rtol=0)


def test_frame_list_is_a_video(tmp_path):
  """Frame images: resized as images, an odd list repeats its last frame, fps from the row."""
  frames = _frames(3, 100, 150, 7)
  paths = []
  for k, frame in enumerate(frames):
    paths.append(str(tmp_path / f"f{k}.png"))
    images_lib.PIL.Image.fromarray(frame).save(paths[-1])
  clip = video.read_frame_list(paths, video.VideoSampling(min_pixels=4 * 28 * 28), sample_fps=1.5)
  h, w = images_lib.smart_resize(100, 150, 28, 4 * 28 * 28, 16384 * 28 * 28)
  assert clip.frames.shape == (4, 3, h, w) and clip.sample_fps == 1.5
  np.testing.assert_array_equal(clip.frames[3], clip.frames[2])
  expected = np.asarray(images_lib.PIL.Image.fromarray(frames[1]).resize((w, h), resample=3))
  np.testing.assert_array_equal(clip.frames[1], np.moveaxis(expected, -1, 0))
