"""mmembed_jax.data.images must match transformers' Qwen2VLImageProcessorPil exactly."""
import functools
import json
import re
import warnings

import numpy as np
import PIL.Image
import pytest

from mmembed_jax.data import images

from transformers import AutoImageProcessor  # pylint: disable=g-import-not-at-top
from transformers.models.qwen2_vl import image_processing_pil_qwen2_vl as hf_qwen

TOL = 1e-5
DEFAULT = images.ImageProcessingConfig()


@functools.lru_cache(maxsize=None)
def _hf_processor(config: images.ImageProcessingConfig):
  """transformers' PIL-backend processor loaded from `config.to_preprocessor_config()`."""
  return hf_qwen.Qwen2VLImageProcessorPil(**config.to_preprocessor_config())


def _hf_preprocess(image, config=DEFAULT, processor=None):
  """Returns transformers' (pixel_values, image_grid_thw[0]) for one image."""
  processor = processor or _hf_processor(config)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    out = processor(image, return_tensors="np")
  return out["pixel_values"], out["image_grid_thw"][0]


def _assert_matches_hf(image, config=DEFAULT, processor=None):
  """Checks shape, dtype, grid and values of preprocess_image against transformers."""
  patches, grid = images.preprocess_image(image, config)
  hf_patches, hf_grid = _hf_preprocess(image, config, processor)
  assert patches.dtype == np.float32 and grid.dtype == np.int32
  assert grid.shape == (3,)
  np.testing.assert_array_equal(grid, hf_grid)
  assert patches.shape == hf_patches.shape == (int(np.prod(grid)), config.patch_dim)
  diff = float(np.abs(patches - hf_patches).max())
  assert diff <= TOL, f"max abs diff {diff}"
  return patches, grid


def _noise(shape, seed):
  """Deterministic uint8 noise image array of `shape`."""
  return np.random.RandomState(seed).randint(0, 256, shape, dtype=np.uint8)


def _smooth(height, width, seed):
  """Deterministic smooth RGB image (gradients + a little noise) so resampling is non-trivial."""
  y, x = np.mgrid[0:height, 0:width].astype(np.float64)
  base = np.stack([255 * x / max(width - 1, 1), 255 * y / max(height - 1, 1),
                   127.5 + 127.5 * np.sin((x + y) / 7.0)], axis=-1)
  noisy = base + np.random.RandomState(seed).normal(0, 8, base.shape)
  return np.clip(np.round(noisy), 0, 255).astype(np.uint8)


# ---------------------------------------------------------------------------- smart_resize


def test_smart_resize_matches_transformers_on_a_grid():
  sides = [1, 2, 3, 13, 14, 27, 28, 29, 41, 55, 56, 57, 100, 111, 224, 333, 500, 768, 1000, 1023,
           2048, 4001]
  settings = [(56 * 56, 28 * 28 * 1280), (3136, 12845056), (100, 5000), (28 * 28 * 4, 28 * 28 * 16)]
  for min_pixels, max_pixels in settings:
    for factor in (28, 32):
      for h in sides:
        for w in sides:
          if max(h, w) / min(h, w) > 200:
            continue
          expected = hf_qwen.smart_resize(h, w, factor=factor, min_pixels=min_pixels, max_pixels=max_pixels)
          got = images.smart_resize(h, w, factor=factor, min_pixels=min_pixels, max_pixels=max_pixels)
          assert got == expected, (h, w, factor, min_pixels, max_pixels)
          assert got[0] % factor == 0 and got[1] % factor == 0


@pytest.mark.parametrize("min_pixels,max_pixels", [(16 * 784, 48 * 784), (256 * 784, 1024 * 784),
                                                  (4 * 784, 16 * 784), (1000 * 784, 1024 * 784)])
def test_max_resized_pixels_bounds_every_resize(min_pixels, max_pixels):
  """The bound the vision tower's blocks rely on: no image of any size or aspect ratio (up to
  200) comes out larger, and the extreme cases come close to it."""
  rng = np.random.default_rng(min_pixels)
  bound = images.max_resized_pixels(min_pixels, max_pixels)
  sizes = [(int(h), int(w)) for h, w in rng.integers(1, 4000, size=(20000, 2))]
  sizes += [(h, h * 200) for h in range(1, 60)] + [(h * 200, h) for h in range(1, 60)]
  largest = 0
  for height, width in sizes:
    if max(height, width) > 200 * min(height, width):
      continue
    h, w = images.smart_resize(height, width, min_pixels=min_pixels, max_pixels=max_pixels)
    largest = max(largest, h * w)
  assert max_pixels <= largest <= bound and largest >= 0.6 * bound, (largest, bound)


def test_smart_resize_defaults_match_transformers():
  assert images.smart_resize(480, 640) == hf_qwen.smart_resize(480, 640)
  assert images.smart_resize(4000, 3000) == hf_qwen.smart_resize(4000, 3000)


@pytest.mark.parametrize("height,width", [(1, 201), (201, 1), (10, 2500)])
def test_smart_resize_rejects_extreme_aspect_ratio(height, width):
  with pytest.raises(ValueError) as hf_error:
    hf_qwen.smart_resize(height, width)
  with pytest.raises(ValueError, match="absolute aspect ratio must be smaller than 200") as error:
    images.smart_resize(height, width)
  assert str(error.value) == str(hf_error.value)


def test_smart_resize_accepts_aspect_ratio_of_exactly_200():
  assert images.smart_resize(1, 200) == hf_qwen.smart_resize(1, 200)


# ------------------------------------------------------------------------- preprocess_image


@pytest.mark.parametrize("height,width", [
    (31, 57), (57, 31), (500, 333), (333, 500), (224, 224), (28, 28), (56, 56), (480, 640),
    (1, 150), (150, 1), (2, 300), (300, 2), (1, 199), (7, 1111),  # thin, aspect within 200
    (1, 1), (3, 3), (10, 17), (40, 40),  # below min_pixels
    (1100, 1500), (2000, 1200),  # above max_pixels
])
def test_matches_transformers_over_sizes(height, width):
  seed = height * 10007 + width
  _assert_matches_hf(PIL.Image.fromarray(_noise((height, width, 3), seed)))
  if height >= 3 and width >= 3 and height * width < 10**6:
    _assert_matches_hf(PIL.Image.fromarray(_smooth(height, width, seed)))


@pytest.mark.parametrize("min_pixels,max_pixels", [
    (56 * 56, 28 * 28 * 1280), (3136, 12845056), (100, 5000), (28 * 28 * 4, 28 * 28 * 16),
    (256 * 28 * 28, 256 * 28 * 28), (28 * 28, 28 * 28),
])
def test_matches_transformers_over_pixel_budgets(min_pixels, max_pixels):
  config = images.ImageProcessingConfig(min_pixels=min_pixels, max_pixels=max_pixels)
  for i, (h, w) in enumerate([(500, 333), (31, 57), (1200, 900), (2, 350)]):
    _assert_matches_hf(PIL.Image.fromarray(_noise((h, w, 3), i)), config)


def test_matches_transformers_with_other_patch_settings():
  config = images.ImageProcessingConfig(patch_size=16, temporal_patch_size=3, merge_size=2,
                                        image_mean=(0.5, 0.5, 0.5), image_std=(0.5, 0.5, 0.5))
  patches, _ = _assert_matches_hf(PIL.Image.fromarray(_noise((100, 90, 3), 3)), config)
  assert patches.shape[1] == 3 * 3 * 16 * 16


def _rgba(seed, height=45, width=70):
  """RGBA image with random colours and alpha covering 0, 255 and everything between."""
  a = _noise((height, width, 4), seed)
  a[:5, :, 3] = 0
  a[5:10, :, 3] = 255
  return PIL.Image.fromarray(a)


@pytest.mark.parametrize("mode", ["RGBA", "LA", "PA", "L", "P", "1", "I", "F", "CMYK", "YCbCr", "RGBa"])
def test_matches_transformers_over_pil_modes(mode):
  image = _rgba(seed=len(mode)).convert(mode)
  assert image.mode == mode
  _assert_matches_hf(image)


def test_matches_transformers_on_16_bit_grayscale():
  a = (_noise((50, 60), 4).astype(np.uint16) * 257)
  _assert_matches_hf(PIL.Image.fromarray(a))


def test_palette_transparency_is_composited_onto_white():
  image = PIL.Image.fromarray(_noise((40, 70, 3), 5)).convert("P")
  image.info["transparency"] = int(np.asarray(image)[0, 0])
  patches, _ = _assert_matches_hf(image)
  opaque = image.copy()
  opaque.info.pop("transparency")
  assert not np.array_equal(patches, images.preprocess_image(opaque, DEFAULT)[0])


def test_transparent_pixels_become_white():
  a = np.zeros((56, 56, 4), np.uint8)  # fully transparent black
  patches, _ = _assert_matches_hf(PIL.Image.fromarray(a))
  white = (1.0 - np.array(images.OPENAI_CLIP_MEAN)) / np.array(images.OPENAI_CLIP_STD)
  first_values = patches.reshape(-1, 3, 2 * 14 * 14)[:, :, 0]  # [num_patches, 3]
  np.testing.assert_allclose(first_values, np.broadcast_to(white, first_values.shape), atol=1e-6)


@pytest.mark.parametrize("shape", [
    (40, 70, 3), (3, 40, 70), (40, 70, 4), (4, 40, 70), (40, 70, 1), (1, 40, 70),
    (3, 40, 3),  # ambiguous: transformers assumes channels-first
])
def test_matches_transformers_on_uint8_arrays(shape):
  _assert_matches_hf(_noise(shape, sum(shape)))


def test_matches_transformers_on_float_and_int_arrays():
  rng = np.random.RandomState(6)
  _assert_matches_hf(rng.rand(40, 70, 3))  # floats in [0, 1]: scaled to uint8 for PIL and back
  _assert_matches_hf(rng.rand(40, 70, 3).astype(np.float32))
  _assert_matches_hf(rng.rand(40, 70, 4).astype(np.float32))
  _assert_matches_hf(rng.randint(0, 256, (40, 70, 3)).astype(np.float64))  # integral floats
  _assert_matches_hf(rng.randint(0, 256, (40, 70, 3)).astype(np.int64))


def test_pil_and_array_inputs_agree():
  a = _noise((61, 83, 3), 7)
  np.testing.assert_array_equal(images.preprocess_image(a, DEFAULT)[0],
                                images.preprocess_image(PIL.Image.fromarray(a), DEFAULT)[0])


def test_2d_array_is_grayscale():
  a = _noise((50, 60), 8)
  np.testing.assert_array_equal(images.preprocess_image(a, DEFAULT)[0],
                                images.preprocess_image(PIL.Image.fromarray(a), DEFAULT)[0])


def test_patch_order_groups_merge_blocks():
  """Each 2x2 merge block is 4 consecutive patches; each patch is (C, T, 14, 14) with T repeated."""
  a = _noise((112, 168, 3), 9)  # already a multiple of 28: no resampling
  patches, grid = images.preprocess_image(a, DEFAULT)
  np.testing.assert_array_equal(grid, [1, 8, 12])
  image = (a.astype(np.float64) / 255 - images.OPENAI_CLIP_MEAN) / images.OPENAI_CLIP_STD  # [H, W, 3]
  p = patches.reshape(4, 6, 2, 2, 3, 2, 14, 14)  # [gh/2, gw/2, 2, 2, C, T, 14, 14]
  np.testing.assert_array_equal(p[..., 0, :, :], p[..., 1, :, :])
  for bh, bw, mh, mw in [(0, 0, 0, 0), (0, 0, 1, 0), (0, 0, 0, 1), (2, 5, 1, 1), (3, 4, 0, 1)]:
    row, col = (2 * bh + mh) * 14, (2 * bw + mw) * 14
    want = image[row:row + 14, col:col + 14].transpose(2, 0, 1)
    np.testing.assert_allclose(p[bh, bw, mh, mw, :, 0], want, atol=1e-5)


def test_rejects_unsupported_inputs():
  with pytest.raises(TypeError, match="PIL.Image.Image or np.ndarray, got list"):
    images.preprocess_image([[0, 1]], DEFAULT)
  with pytest.raises(ValueError, match=r"got shape \(2, 4, 5, 3\)"):
    images.preprocess_image(np.zeros((2, 4, 5, 3), np.uint8), DEFAULT)
  with pytest.raises(ValueError, match=r"\(40, 70, 2\): expected 1, 3 or 4 channels"):
    images.preprocess_image(np.zeros((40, 70, 2), np.uint8), DEFAULT)
  with pytest.raises(ValueError, match="aspect ratio"):
    images.preprocess_image(PIL.Image.new("RGB", (300, 1)), DEFAULT)


def test_num_merged_tokens():
  assert images.num_merged_tokens([1, 4, 6]) == 6
  assert images.num_merged_tokens(np.array([2, 8, 12], np.int32)) == 48
  assert images.num_merged_tokens((1, 6, 9), merge_size=3) == 6
  patches, grid = images.preprocess_image(_noise((500, 333, 3), 10), DEFAULT)
  assert images.num_merged_tokens(grid) * 4 == patches.shape[0]
  with pytest.raises(ValueError, match=r"shape \(3,\).*got shape \(2,\)"):
    images.num_merged_tokens([4, 6])
  with pytest.raises(ValueError, match="multiples of merge_size=2"):
    images.num_merged_tokens([1, 3, 4])


# --------------------------------------------------------------------------------- config


def test_config_defaults_are_transformers_defaults():
  hf = hf_qwen.Qwen2VLImageProcessorPil()
  assert DEFAULT.min_pixels == hf.size.shortest_edge == 56 * 56
  assert DEFAULT.max_pixels == hf.size.longest_edge == 28 * 28 * 1280
  assert (DEFAULT.patch_size, DEFAULT.temporal_patch_size, DEFAULT.merge_size) == (
      hf.patch_size, hf.temporal_patch_size, hf.merge_size)
  assert DEFAULT.image_mean == tuple(hf.image_mean) and DEFAULT.image_std == tuple(hf.image_std)
  assert images.RESCALE_FACTOR == hf.rescale_factor and images.BICUBIC == hf.resample
  assert DEFAULT.patch_dim == 1176 and DEFAULT.factor == 28


def test_config_round_trip_through_transformers(tmp_path):
  config = images.ImageProcessingConfig(min_pixels=128 * 28 * 28, max_pixels=512 * 28 * 28,
                                        image_mean=(0.5, 0.4, 0.3), image_std=(0.2, 0.25, 0.3))
  (tmp_path / "preprocessor_config.json").write_text(json.dumps(config.to_preprocessor_config()))
  assert images.ImageProcessingConfig.from_preprocessor_config(tmp_path) == config
  assert images.ImageProcessingConfig.from_preprocessor_config(tmp_path / "preprocessor_config.json") == config
  assert images.ImageProcessingConfig.from_preprocessor_config(str(tmp_path)) == config
  assert images.ImageProcessingConfig.from_preprocessor_config(config.to_preprocessor_config()) == config

  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    auto = AutoImageProcessor.from_pretrained(str(tmp_path), backend="pil")
    pil = hf_qwen.Qwen2VLImageProcessorPil.from_pretrained(str(tmp_path))
  for hf in (auto, pil):
    assert isinstance(hf, hf_qwen.Qwen2VLImageProcessorPil)
    assert (hf.size.shortest_edge, hf.size.longest_edge) == (config.min_pixels, config.max_pixels)
    assert tuple(hf.image_mean) == config.image_mean and tuple(hf.image_std) == config.image_std
    for seed, (h, w) in enumerate([(500, 333), (1400, 1000), (20, 30)]):
      _assert_matches_hf(PIL.Image.fromarray(_noise((h, w, 3), seed)), config, processor=hf)


def test_config_reads_what_transformers_saves(tmp_path):
  hf = hf_qwen.Qwen2VLImageProcessorPil(min_pixels=1000, max_pixels=200000, merge_size=2)
  hf.save_pretrained(str(tmp_path))
  config = images.ImageProcessingConfig.from_preprocessor_config(tmp_path)
  assert (config.min_pixels, config.max_pixels) == (1000, 200000)
  _assert_matches_hf(PIL.Image.fromarray(_noise((500, 333, 3), 11)), config, processor=hf)


def test_config_size_keys_and_precedence():
  from_dict = images.ImageProcessingConfig.from_preprocessor_config
  base = {"image_processor_type": "Qwen2VLImageProcessor", "processor_class": "Qwen2VLProcessor"}
  assert from_dict(base) == DEFAULT
  got = from_dict({**base, "min_pixels": 3136, "max_pixels": 12845056})
  assert (got.min_pixels, got.max_pixels) == (3136, 12845056)
  got = from_dict({**base, "size": {"shortest_edge": 500, "longest_edge": 9000}})
  assert (got.min_pixels, got.max_pixels) == (500, 9000)
  # Top-level min_pixels / max_pixels override size, as in Qwen2VLImageProcessor.__init__.
  cfg = {**base, "size": {"shortest_edge": 500, "longest_edge": 9000}, "max_pixels": 7000}
  got = from_dict(cfg)
  hf = hf_qwen.Qwen2VLImageProcessorPil.from_dict(cfg)
  assert (got.min_pixels, got.max_pixels) == (hf.size.shortest_edge, hf.size.longest_edge) == (500, 7000)
  # Layout saved by older transformers versions.
  got = from_dict({**base, "size": {"min_pixels": 600, "max_pixels": 8000}})
  assert (got.min_pixels, got.max_pixels) == (600, 8000)
  # null means "class default", as in transformers.
  assert from_dict({**base, "min_pixels": None, "patch_size": None, "do_resize": None}) == DEFAULT
  got = from_dict({**base, "patch_size": 16, "temporal_patch_size": 1, "merge_size": 2,
                   "image_mean": [0.5] * 3, "image_std": [0.5] * 3})
  assert (got.patch_size, got.temporal_patch_size, got.image_mean) == (16, 1, (0.5, 0.5, 0.5))


def test_config_rejects_unsupported_settings():
  from_dict = images.ImageProcessingConfig.from_preprocessor_config
  with pytest.raises(ValueError, match="do_resize=False is not supported"):
    from_dict({"do_resize": False})
  with pytest.raises(ValueError, match="do_normalize=False is not supported"):
    from_dict({"do_normalize": False})
  with pytest.raises(ValueError, match=r"resample=2 is not supported, expected 3"):
    from_dict({"resample": 2})
  with pytest.raises(ValueError, match="rescale_factor=0.5 is not supported"):
    from_dict({"rescale_factor": 0.5})
  with pytest.raises(ValueError, match="shortest_edge.*longest_edge"):
    from_dict({"size": {"shortest_edge": 100}})
  with pytest.raises(ValueError, match="image_mean must have 3 values.*got 2"):
    from_dict({"image_mean": [0.5, 0.5]})
  with pytest.raises(ValueError, match="min_pixels must be a positive integer, got 0"):
    images.ImageProcessingConfig(min_pixels=0)
  with pytest.raises(ValueError, match="image_std must be non-zero"):
    images.ImageProcessingConfig(image_std=(0.5, 0.0, 0.5))


def test_config_is_hashable_and_frozen():
  config = images.ImageProcessingConfig(image_mean=[0.1, 0.2, 0.3])
  assert config.image_mean == (0.1, 0.2, 0.3)
  assert hash(config) == hash(images.ImageProcessingConfig(image_mean=(0.1, 0.2, 0.3)))
  with pytest.raises(AttributeError):
    config.min_pixels = 5  # pytype: disable=not-writable


# ------------------------------------------------------------------------------ load_image


def test_load_image_converts_to_rgb_like_transformers(tmp_path):
  path = tmp_path / "rgba.png"
  _rgba(seed=12).save(path)
  image = images.load_image(path)
  assert image.mode == "RGB" and image.size == (70, 45)
  with PIL.Image.open(path) as raw:
    hf_patches, hf_grid = _hf_preprocess(raw)
  patches, grid = images.preprocess_image(image, DEFAULT)
  np.testing.assert_array_equal(grid, hf_grid)
  assert float(np.abs(patches - hf_patches).max()) <= TOL

  gray = tmp_path / "gray.jpg"
  PIL.Image.fromarray(_noise((30, 40), 13)).save(gray)
  assert images.load_image(str(gray)).mode == "RGB"


def test_load_image_missing_file(tmp_path):
  path = tmp_path / "nope.png"
  with pytest.raises(ValueError, match=re.escape(f"cannot read image {path}: FileNotFoundError")):
    images.load_image(path)


def test_load_image_corrupt_file(tmp_path):
  path = tmp_path / "corrupt.jpg"
  path.write_bytes(b"definitely not an image")
  with pytest.raises(ValueError, match=re.escape(f"cannot read image {path}: ")):
    images.load_image(str(path))
  truncated = tmp_path / "truncated.png"
  PIL.Image.fromarray(_noise((64, 64, 3), 14)).save(truncated)
  truncated.write_bytes(truncated.read_bytes()[:200])
  with pytest.raises(ValueError, match=re.escape(f"cannot read image {truncated}: ")):
    images.load_image(truncated)


@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_load_image_applies_exif_orientation_like_transformers(tmp_path, orientation):
  """A JPEG whose EXIF says "rotate" (camera photos) is turned upright exactly as transformers'
  `load_image` does (`exif_transpose`), for files and for encoded bytes (Parquet, TFDS): the
  same pixels and the same patches from the processor."""
  from transformers.image_utils import load_image as hf_load_image
  path = tmp_path / f"rotated_{orientation}.jpg"
  exif = PIL.Image.Exif()
  exif[0x0112] = orientation  # Orientation
  PIL.Image.fromarray(_smooth(45, 70, 15)).save(path, exif=exif, quality=95)
  ours, theirs = images.load_image(path), hf_load_image(str(path))
  assert ours.size == theirs.size == ((70, 45) if orientation == 3 else (45, 70))
  np.testing.assert_array_equal(np.asarray(ours), np.asarray(theirs))
  np.testing.assert_array_equal(np.asarray(images.decode_image(path.read_bytes())),
                                np.asarray(theirs))
  _assert_matches_hf(ours)
  np.testing.assert_array_equal(images.preprocess_image(ours, DEFAULT)[0],
                                _hf_preprocess(theirs)[0])
