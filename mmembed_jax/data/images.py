"""Image preprocessing for Qwen2-VL style vision towers, in numpy + PIL (no torch).

A bit-exact port of transformers' `Qwen2VLImageProcessorPil` (the PIL backend):

  1. convert to RGB, compositing transparency onto white;
  2. `smart_resize` to multiples of patch_size * merge_size within [min_pixels, max_pixels]
     and resize with PIL BICUBIC (through a uint8 PIL image, as transformers does);
  3. rescale by 1/255 (computed in float64, stored as float32);
  4. normalise with the CLIP mean / std (in float32);
  5. cut into patches: a still image is repeated to `temporal_patch_size` frames and patches
     are ordered so that every merge_size x merge_size block of patches is contiguous.

The result is `patches` float32 [t * h * w, C * temporal_patch_size * patch_size**2]
([num_patches, 1176] with the defaults) and `grid_thw` int32 [3] = (1, h, w).

Inputs are PIL images of any mode, or arrays [H, W, C] / [C, H, W] with C in (1, 3, 4),
laid out and converted exactly as transformers does (a shape whose first and last axes both
look like channels, e.g. [3, W, 3], is read as channels-first). Beyond transformers, a 2-D
array [H, W] is read as grayscale. Prefer uint8 inputs: like transformers, float arrays in
[0, 1] go through uint8 for resizing (truncating) and are then rescaled by 1/255 once more.
"""
import dataclasses
import io
import json
import math
import os
import pathlib
from typing import Any, Mapping, Sequence, Union

import numpy as np
import PIL.Image
import PIL.ImageOps

try:
  from etils import epath
except ImportError:  # pragma: no cover - etils[epath] is an install requirement
  epath = None

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
RESCALE_FACTOR = 1 / 255
BICUBIC = 3  # PIL.Image.Resampling.BICUBIC, transformers' `resample` for Qwen2-VL
IMAGE_PROCESSOR_TYPE = "Qwen2VLImageProcessor"

ImageInput = Union[PIL.Image.Image, np.ndarray]


MAX_ASPECT_RATIO = 200  # smart_resize refuses longer sides beyond 200 x the shorter


def smart_resize(
    height: int,
    width: int,
    factor: int = 28,
    min_pixels: int = 56 * 56,
    max_pixels: int = 28 * 28 * 1280,
) -> tuple[int, int]:
  """Returns (new_h, new_w): multiples of `factor`, area in [min_pixels, max_pixels], aspect kept."""
  if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
    raise ValueError(
        f"absolute aspect ratio must be smaller than {MAX_ASPECT_RATIO}, got {max(height, width) / min(height, width)}"
    )
  h_bar = round(height / factor) * factor
  w_bar = round(width / factor) * factor
  if h_bar * w_bar > max_pixels:
    beta = math.sqrt((height * width) / max_pixels)
    h_bar = max(factor, math.floor(height / beta / factor) * factor)
    w_bar = max(factor, math.floor(width / beta / factor) * factor)
  elif h_bar * w_bar < min_pixels:
    beta = math.sqrt(min_pixels / (height * width))
    h_bar = math.ceil(height * beta / factor) * factor
    w_bar = math.ceil(width * beta / factor) * factor
  return h_bar, w_bar


def max_resized_pixels(min_pixels: int, max_pixels: int, factor: int = 28) -> int:
  """The most pixels `smart_resize` returns for any image: max_pixels, except where a side is
  clamped up to `factor` (aspect ratios near 200) or min_pixels is rounded up per side."""
  ratio = MAX_ASPECT_RATIO
  clamped = factor * math.sqrt(ratio * max_pixels)  # the short side held at `factor`
  # Scaled up to min_pixels, then each side rounded up by less than `factor`.
  rounded_up = (min_pixels + factor * math.sqrt(min_pixels) * (math.sqrt(ratio) + 1 / math.sqrt(ratio))
                + factor * factor)
  return int(max(max_pixels, clamped, rounded_up, factor * factor))


def _positive_int(name: str, value: Any) -> int:
  """Returns `value` as an int, raising ValueError unless it is a positive integer."""
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
    raise ValueError(f"{name} must be a positive integer, got {value!r}")
  return int(value)


def _three_floats(name: str, value: Any) -> tuple[float, float, float]:
  """Returns `value` as a tuple of 3 floats, raising ValueError for any other length."""
  if isinstance(value, (str, bytes)) or not isinstance(value, (Sequence, np.ndarray)):
    raise ValueError(f"{name} must be a sequence of 3 floats (one per RGB channel), got {value!r}")
  if len(value) != 3:
    raise ValueError(f"{name} must have 3 values (one per RGB channel), got {len(value)}: {value!r}")
  return tuple(float(v) for v in value)


@dataclasses.dataclass(frozen=True)
class ImageProcessingConfig:
  """Settings of the Qwen2-VL image processor; defaults are transformers' class defaults."""
  min_pixels: int = 56 * 56  # HF size["shortest_edge"]
  max_pixels: int = 28 * 28 * 1280  # HF size["longest_edge"]
  patch_size: int = 14
  temporal_patch_size: int = 2
  merge_size: int = 2
  image_mean: tuple[float, ...] = OPENAI_CLIP_MEAN
  image_std: tuple[float, ...] = OPENAI_CLIP_STD

  def __post_init__(self):
    for name in ("min_pixels", "max_pixels", "patch_size", "temporal_patch_size", "merge_size"):
      object.__setattr__(self, name, _positive_int(name, getattr(self, name)))
    object.__setattr__(self, "image_mean", _three_floats("image_mean", self.image_mean))
    object.__setattr__(self, "image_std", _three_floats("image_std", self.image_std))
    if any(s == 0 for s in self.image_std):
      raise ValueError(f"image_std must be non-zero, got {self.image_std}")

  @property
  def factor(self) -> int:
    """Side lengths of resized images are multiples of this (patch_size * merge_size)."""
    return self.patch_size * self.merge_size

  @property
  def patch_dim(self) -> int:
    """Values in one flattened patch vector (1176 for 3x2x14x14)."""
    return 3 * self.temporal_patch_size * self.patch_size**2

  @classmethod
  def from_preprocessor_config(
      cls, path_or_dict: Union[str, os.PathLike, Mapping[str, Any]]
  ) -> "ImageProcessingConfig":
    """Reads a HF `preprocessor_config.json` (a dict, the file, or the directory holding it)."""
    if isinstance(path_or_dict, Mapping):
      raw = dict(path_or_dict)
      source = "preprocessor config dict"
    else:
      path = _as_path(path_or_dict)
      if path.is_dir():
        path = path / "preprocessor_config.json"
      source = str(path)
      with path.open("r") as f:
        raw = json.load(f)
      if not isinstance(raw, dict):
        raise ValueError(f"{source} must hold a JSON object, got {type(raw).__name__}")
    # transformers treats null like a missing key (falls back to the class default).
    cfg = {k: v for k, v in raw.items() if v is not None}

    for key in ("do_resize", "do_rescale", "do_normalize", "do_convert_rgb"):
      if key in cfg and cfg[key] is not True:
        raise ValueError(f"{source}: {key}={cfg[key]!r} is not supported, expected true")
    if "resample" in cfg and cfg["resample"] != BICUBIC:
      raise ValueError(f"{source}: resample={cfg['resample']!r} is not supported, expected {BICUBIC} (BICUBIC)")
    if "rescale_factor" in cfg and not math.isclose(cfg["rescale_factor"], RESCALE_FACTOR, rel_tol=1e-9):
      raise ValueError(
          f"{source}: rescale_factor={cfg['rescale_factor']!r} is not supported, expected 1/255"
      )

    # Like Qwen2VLImageProcessor.__init__: `size` (or the class default when absent), then
    # top-level min_pixels / max_pixels override its shortest_edge / longest_edge.
    # size={"min_pixels", "max_pixels"} is the layout older transformers versions saved.
    if "size" in cfg:
      size = cfg["size"]
      if not isinstance(size, Mapping):
        raise ValueError(f"{source}: size must be a dict with shortest_edge/longest_edge, got {size!r}")
      min_pixels = size.get("shortest_edge", size.get("min_pixels"))
      max_pixels = size.get("longest_edge", size.get("max_pixels"))
    else:
      min_pixels, max_pixels = cls.min_pixels, cls.max_pixels
    min_pixels = cfg.get("min_pixels", min_pixels)
    max_pixels = cfg.get("max_pixels", max_pixels)
    if min_pixels is None or max_pixels is None:
      raise ValueError(
          f"{source}: size must contain 'shortest_edge' and 'longest_edge' (or set min_pixels and"
          f" max_pixels), got size={cfg.get('size')!r}"
      )
    return cls(
        min_pixels=min_pixels,
        max_pixels=max_pixels,
        patch_size=cfg.get("patch_size", cls.patch_size),
        temporal_patch_size=cfg.get("temporal_patch_size", cls.temporal_patch_size),
        merge_size=cfg.get("merge_size", cls.merge_size),
        image_mean=cfg.get("image_mean", cls.image_mean),
        image_std=cfg.get("image_std", cls.image_std),
    )

  def to_preprocessor_config(self) -> dict[str, Any]:
    """Returns a HF `preprocessor_config.json` dict that loads to these settings in transformers."""
    return {
        "image_processor_type": IMAGE_PROCESSOR_TYPE,
        "do_convert_rgb": True,
        "do_resize": True,
        "resample": BICUBIC,
        "do_rescale": True,
        "rescale_factor": RESCALE_FACTOR,
        "do_normalize": True,
        "image_mean": list(self.image_mean),
        "image_std": list(self.image_std),
        "min_pixels": self.min_pixels,
        "max_pixels": self.max_pixels,
        "size": {"shortest_edge": self.min_pixels, "longest_edge": self.max_pixels},
        "patch_size": self.patch_size,
        "temporal_patch_size": self.temporal_patch_size,
        "merge_size": self.merge_size,
    }


def _as_path(path: Union[str, os.PathLike]):
  """Returns an `epath.Path` for `path` (local or gs://), or a `pathlib.Path` without etils."""
  if epath is not None:
    return epath.Path(path)
  if str(path).startswith("gs://"):
    raise ImportError(f"reading {path} needs etils[epath] (pip install 'etils[epath]')")
  return pathlib.Path(path)


def _infer_channels_first(image: np.ndarray) -> bool:
  """True if `image` [3 dims] is channels-first; transformers' rule (1, 3 or 4 channels, first wins)."""
  num_channels = (1, 3, 4)
  if image.shape[0] in num_channels:
    return True  # also when ambiguous: transformers assumes channels-first
  if image.shape[-1] in num_channels:
    return False
  raise ValueError(
      f"cannot find the channel axis of image with shape {image.shape}: expected 1, 3 or 4 channels"
      " on the first or last axis"
  )


def _pil_to_rgb(image: PIL.Image.Image) -> PIL.Image.Image:
  """Converts to RGB, compositing any transparency onto white (transformers' convert_to_rgb)."""
  has_alpha = "A" in image.getbands() or image.info.get("transparency") is not None
  if not has_alpha:
    return image.convert("RGB")
  image = image.convert("RGBA")
  background = PIL.Image.new("RGBA", image.size, (255, 255, 255, 255))
  return PIL.Image.alpha_composite(background, image).convert("RGB")


def _array_to_rgb(image: np.ndarray) -> np.ndarray:
  """Converts a 1/3/4-channel array [H, W, C] or [C, H, W] to 3 channels, keeping layout and dtype."""
  channel_axis = 0 if _infer_channels_first(image) else -1
  image = np.moveaxis(image, channel_axis, -1)
  num_channels = image.shape[-1]
  if num_channels == 1:
    image_rgb = np.repeat(image, 3, axis=-1)
  elif num_channels == 4:
    if np.issubdtype(image.dtype, np.floating) and (image.min() < 0.0 or image.max() > 1.0):
      raise ValueError(
          "a float RGBA image must have values in [0, 1] to be converted to RGB, got"
          f" [{image.min()}, {image.max()}]"
      )
    white = 255 if np.issubdtype(image.dtype, np.integer) else 1.0
    alpha = image[..., 3:4] / white  # float64 for integer images
    composite = alpha * image[..., :3] + (1 - alpha) * white  # blend onto white
    # np.round rounds half to even, as in transformers.
    image_rgb = np.round(composite).astype(image.dtype) if white == 255 else composite.astype(image.dtype)
  else:
    image_rgb = image
  return np.moveaxis(image_rgb, -1, channel_axis)


def _rescale(image: np.ndarray, scale: float) -> np.ndarray:
  """Multiplies by `scale` in float64 and returns float32, as transformers' rescale does."""
  return (image.astype(np.float64) * scale).astype(np.float32)


def _needs_rescale_for_pil(image: np.ndarray) -> bool:
  """True if `image` holds [0, 1] floats that must be scaled to [0, 255] before going to uint8."""
  if image.dtype == np.uint8:
    return False
  if np.allclose(image, image.astype(int)):
    if np.all(image >= 0) and np.all(image <= 255):
      return False
    raise ValueError(
        "image cannot be converted to uint8 for resizing: expected values in [0, 255], got"
        f" [{image.min()}, {image.max()}]"
    )
  if np.all(image >= 0) and np.all(image <= 1):
    return True
  raise ValueError(
      "image cannot be converted to uint8 for resizing: expected floats in [0, 1], got"
      f" [{image.min()}, {image.max()}]"
  )


def _resize(image: np.ndarray, height: int, width: int) -> np.ndarray:
  """Resizes `image` [C, H, W] to [C, height, width] with PIL BICUBIC through a uint8 PIL image."""
  image = np.moveaxis(image, 0, -1)  # [H, W, C]
  if image.shape[-1] == 1:
    image = np.squeeze(image, axis=-1)
  do_rescale = _needs_rescale_for_pil(image)
  if do_rescale:
    image = _rescale(image, 255)
  pil_image = PIL.Image.fromarray(image.astype(np.uint8))  # float -> uint8 truncates, as in HF
  resized = np.array(pil_image.resize((width, height), resample=BICUBIC))
  if resized.ndim == 2:
    resized = resized[..., None]
  resized = np.moveaxis(resized, -1, 0)  # [C, height, width]
  return _rescale(resized, 1 / 255) if do_rescale else resized


def _to_channels_first_rgb(image: ImageInput) -> np.ndarray:
  """Returns `image` as RGB [3, H, W] in its own dtype (uint8 for PIL images)."""
  if isinstance(image, PIL.Image.Image):
    return np.moveaxis(np.array(_pil_to_rgb(image)), -1, 0)
  if not isinstance(image, np.ndarray):
    raise TypeError(f"image must be a PIL.Image.Image or np.ndarray, got {type(image).__name__}")
  if image.ndim == 2:
    image = image[..., None]  # [H, W] grayscale; transformers itself rejects 2-D arrays
  if image.ndim != 3:
    raise ValueError(
        f"image array must be [height, width, channels] or [channels, height, width], got shape {image.shape}"
    )
  image = _array_to_rgb(image)
  if not _infer_channels_first(image):
    image = np.moveaxis(image, -1, 0)
  return image


def patchify(
    image: np.ndarray, patch_size: int = 14, temporal_patch_size: int = 2, merge_size: int = 2
) -> tuple[np.ndarray, int, int]:
  """Cuts `image` [C, H, W] into patches [h * w, C * temporal_patch_size * patch_size**2], h, w."""
  image = np.asarray(image, dtype=np.float32)
  channels, height, width = image.shape
  factor = patch_size * merge_size
  if height % factor or width % factor:
    raise ValueError(
        f"image sides must be multiples of patch_size * merge_size = {factor}, got {height}x{width}"
    )
  grid_h, grid_w = height // patch_size, width // patch_size
  patches = image.reshape(
      channels, grid_h // merge_size, merge_size, patch_size, grid_w // merge_size, merge_size, patch_size
  )
  # [gh / m, gw / m, m, m, C, p, p]
  patches = np.transpose(patches, (1, 4, 2, 5, 0, 3, 6))
  # A still image is repeated over the temporal axis: [gh / m, gw / m, m, m, C, T, p, p].
  patches = np.broadcast_to(
      patches[:, :, :, :, :, None], (*patches.shape[:5], temporal_patch_size, *patches.shape[5:])
  )
  patches = patches.reshape(grid_h * grid_w, channels * temporal_patch_size * patch_size * patch_size)
  return np.ascontiguousarray(patches, dtype=np.float32), grid_h, grid_w


def preprocess_image(
    image: ImageInput, config: ImageProcessingConfig = ImageProcessingConfig()
) -> tuple[np.ndarray, np.ndarray]:
  """Returns (patches float32 [h * w, patch_dim], grid_thw int32 [3] = (1, h, w)) for one still image."""
  image = _to_channels_first_rgb(image)  # [3, H, W]
  height, width = image.shape[-2:]
  new_h, new_w = smart_resize(
      height, width, factor=config.factor, min_pixels=config.min_pixels, max_pixels=config.max_pixels
  )
  image = _resize(image, new_h, new_w)  # [3, new_h, new_w]
  image = _rescale(image, RESCALE_FACTOR)  # float32
  mean = np.array(config.image_mean, dtype=image.dtype)[:, None, None]
  std = np.array(config.image_std, dtype=image.dtype)[:, None, None]
  image = (image - mean) / std
  patches, grid_h, grid_w = patchify(
      image,
      patch_size=config.patch_size,
      temporal_patch_size=config.temporal_patch_size,
      merge_size=config.merge_size,
  )
  return patches, np.array([1, grid_h, grid_w], dtype=np.int32)


def num_merged_tokens(grid_thw: Union[Sequence[int], np.ndarray], merge_size: int = 2) -> int:
  """Number of LLM tokens of an image with patch grid `grid_thw` [3]: t * h * w // merge_size**2."""
  grid = np.asarray(grid_thw)
  if grid.shape != (3,):
    raise ValueError(f"grid_thw must have shape (3,) = (t, h, w), got shape {grid.shape}")
  t, h, w = (int(v) for v in grid)
  if h % merge_size or w % merge_size:
    raise ValueError(f"grid_thw h and w must be multiples of merge_size={merge_size}, got {(t, h, w)}")
  return t * h * w // merge_size**2


def decode_image(data: bytes) -> PIL.Image.Image:
  """Encoded image bytes -> an RGB PIL image, turned upright by its EXIF orientation (as
  transformers' `load_image` does), transparency composited onto white."""
  with PIL.Image.open(io.BytesIO(data)) as image:
    image.load()
    return _pil_to_rgb(PIL.ImageOps.exif_transpose(image))


def load_image(path: Union[str, os.PathLike]) -> PIL.Image.Image:
  """Opens a local or gs:// image file with `decode_image`; ValueError naming the file."""
  try:
    with _as_path(path).open("rb") as f:
      data = f.read()
    return decode_image(data)
  except ImportError:
    raise
  except Exception as e:  # pylint: disable=broad-except  # storage backends raise their own types
    raise ValueError(f"cannot read image {path}: {type(e).__name__}: {e}") from e
