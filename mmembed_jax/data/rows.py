"""The row convention: JSONL rows of text and images, encoded into token ids, patches and positions.

A JSONL file holds one JSON object per line (blank lines are skipped):

  {"text": "A red circle.", "image": "imgs/1.png"}        one image, or "image": null
  {"text": "<image> left, <image> right", "images": ["a.png", "b.png"]}
  {"text": "just text"}

Other keys are ignored. "image" (a path or null) and "images" (a list of paths) may not both
name images. Image paths are relative to the JSONL file's directory unless absolute or URLs
(e.g. gs://bucket/img.png, read by `mmembed_jax.data.images.load_image`).

Each `<image>` marker in the text stands for the next image, in order, and is replaced by
`<|vision_start|>` + N x `<|image_pad|>` + `<|vision_end|>`, N = t*h*w / merge_size**2 being the
number of merged visual tokens of that image after preprocessing. The prepend rule: a row with
images and no marker gets one `<image>` per image, in order, prepended directly to the text (no
separator, as Qwen2-VL's chat template puts images right before the text); a row with markers
must have exactly one marker per image, and any other count is an error. No chat template and no
other special tokens are added (the tokenizer runs with add_special_tokens=False), and the text
may not contain the vision tokens literally. Inputs longer than max_length are an error here;
nothing is silently truncated. So is an empty row (no text, no image), a line that is not UTF-8
and text the tokenizer rejects (a lone surrogate such as "\ud800", which JSON allows).

Errors name the row as "row R (line L) of FILE" (both 1-based) and say what was expected vs found.
"""
import dataclasses
import json
import os
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from mmembed_jax.data import mrope
from mmembed_jax.models import inputs

IMAGE_MARKER = "<image>"
VISION_START = "<|vision_start|>"
VISION_END = "<|vision_end|>"
IMAGE_PAD = "<|image_pad|>"
VIDEO_PAD = "<|video_pad|>"


@dataclasses.dataclass(frozen=True)
class EncodedRow:
  """One encoded row: token ids, its images' patches and grids, and M-RoPE positions."""
  input_ids: np.ndarray  # int32 [n]
  patches: np.ndarray  # float32 [p, 1176]; p = sum of t*h*w over the row's images
  grid_thw: np.ndarray  # int32 [num_images, 3]
  positions: np.ndarray  # int32 [3, n]
  source: str = "row"  # names the row in error messages, e.g. "row 7 (line 7) of data.jsonl"

  @property
  def num_tokens(self) -> int:
    """Returns n, the number of tokens."""
    return int(self.input_ids.shape[0])

  @property
  def num_patches(self) -> int:
    """Returns p, the number of (unmerged) patches."""
    return int(self.patches.shape[0])

  @property
  def num_images(self) -> int:
    """Returns the number of images."""
    return int(self.grid_thw.shape[0])


def row_name(path: str, row: int, line: int) -> str:
  """Returns the name errors use for a row: 'row R (line L) of FILE' (1-based R and L)."""
  return f"row {row} (line {line}) of {path}"


def _type_name(value: Any) -> str:
  """Returns the JSON type name of a decoded value."""
  if value is None:
    return "null"
  return {bool: "boolean", int: "number", float: "number", str: "string", list: "array",
          dict: "object"}.get(type(value), type(value).__name__)


def validate_row(row: Any, where: str = "row") -> None:
  """Raises ValueError naming `where` and the field if row breaks the row convention."""
  if not isinstance(row, dict):
    raise ValueError(f"{where}: expected a JSON object, found {_type_name(row)}")
  if "text" not in row:
    raise ValueError(f"{where}: missing field 'text' (found fields {sorted(row)})")
  if not isinstance(row["text"], str):
    raise ValueError(f"{where}: field 'text' must be a string, found {_type_name(row['text'])}")
  image = row.get("image")
  if image is not None and not isinstance(image, str):
    raise ValueError(f"{where}: field 'image' must be a path string or null, found {_type_name(image)}")
  if "images" in row:
    images = row["images"]
    if not isinstance(images, list):
      raise ValueError(f"{where}: field 'images' must be an array of path strings, "
                       f"found {_type_name(images)}")
    for i, item in enumerate(images):
      if not isinstance(item, str):
        raise ValueError(f"{where}: field 'images[{i}]' must be a path string, "
                         f"found {_type_name(item)}")
    if image is not None:
      raise ValueError(f"{where}: fields 'image' and 'images' are both set; expected at most one")


def _read_jsonl(path: str) -> List[Tuple[int, Dict[str, Any]]]:
  """Returns (1-based line number, validated row) for every non-blank line of a JSONL file."""
  rows = []
  with open(path, "rb") as f:
    for line_no, data in enumerate(f, start=1):
      try:
        line = data.decode("utf-8")
      except UnicodeDecodeError as e:
        raise ValueError(f"{path}: line {line_no}: not UTF-8 ({e.reason} at byte {e.start})"
                         ) from None
      if not line.strip():
        continue
      try:
        row = json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(
            f"{path}: line {line_no}: malformed JSON ({e.msg} at column {e.colno})") from None
      validate_row(row, f"{path}: line {line_no}")
      rows.append((line_no, row))
  return rows


def read_jsonl_rows(path: str) -> List[Dict[str, Any]]:
  """Returns the validated rows of a JSONL file; errors name the file, line and field."""
  return [row for _, row in _read_jsonl(path)]


def _is_url(path: str) -> bool:
  """Returns whether path is a URL such as gs://bucket/a.png."""
  return "://" in path


def _is_absolute(path: str) -> bool:
  """Returns whether path is absolute or a URL, so not relative to the JSONL file."""
  return os.path.isabs(path) or _is_url(path)


def resolve_image_paths(row: Dict[str, Any], base_dir: Optional[str] = None,
                        where: str = "row") -> List[str]:
  """Returns the row's image paths in order, relative ones joined to base_dir (default: cwd)."""
  validate_row(row, where)
  if row.get("image") is not None:
    paths = [row["image"]]
  else:
    paths = list(row.get("images", []))
  base_dir = base_dir if base_dir is not None else ""
  return [p if _is_absolute(p) else os.path.join(base_dir, p) for p in paths]


def vision_token_ids(tokenizer: Any) -> Dict[str, int]:
  """Returns {token: id} for the vision tokens; raises ValueError if the tokenizer lacks one."""
  ids = {}
  for token in (VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD):
    token_id = tokenizer.convert_tokens_to_ids(token)
    if token_id is None or tokenizer.convert_ids_to_tokens(token_id) != token:
      raise ValueError(f"tokenizer has no token {token!r}; expected a Qwen-VL tokenizer "
                       f"(e.g. mmembed_jax.demo.tokenizer.build_tokenizer)")
    ids[token] = int(token_id)
  return ids


def tokenize_with_images(text: str, grid_thw: Any, tokenizer: Any, merge_size: int = 2,
                         where: str = "row") -> np.ndarray:
  """Returns int32 [n] ids of text with `<image>` markers expanded for images of grid_thw [k, 3]."""
  grid_thw = np.asarray(grid_thw, dtype=np.int64).reshape(-1, 3)  # [k, 3]
  num_images = grid_thw.shape[0]
  num_markers = text.count(IMAGE_MARKER)
  if num_markers == 0:
    text = IMAGE_MARKER * num_images + text  # the prepend rule
  elif num_markers != num_images:
    raise ValueError(f"{where}: text has {num_markers} '{IMAGE_MARKER}' markers but the row has "
                     f"{num_images} images; expected one marker per image (or none, to prepend them)")
  special = vision_token_ids(tokenizer)
  reserved = {token_id: token for token, token_id in special.items()}
  ids: List[int] = []
  for k, piece in enumerate(text.split(IMAGE_MARKER)):
    if k > 0:
      t, h, w = (int(x) for x in grid_thw[k - 1])
      if t * h * w % (merge_size * merge_size):
        raise ValueError(f"{where}: image {k - 1} has grid_thw {[t, h, w]}, whose {t * h * w} patches "
                         f"do not split into merged tokens of merge_size**2 = {merge_size ** 2}")
      count = t * h * w // (merge_size * merge_size)
      ids += [special[VISION_START]] + [special[IMAGE_PAD]] * count + [special[VISION_END]]
    if piece:
      try:
        piece_ids = tokenizer.encode(piece, add_special_tokens=False)
      except Exception as e:  # pylint: disable=broad-except  # e.g. a lone surrogate: TypeError
        raise ValueError(f"{where}: the tokenizer rejects the text ({type(e).__name__}: {e}); "
                         f"expected valid Unicode text") from None
      for token_id in piece_ids:
        if token_id in reserved:
          raise ValueError(f"{where}: text contains the reserved token {reserved[token_id]!r}; "
                           f"expected plain text with '{IMAGE_MARKER}' markers for images")
      ids += piece_ids
  return np.asarray(ids, dtype=np.int32).reshape(-1)


def _load_images(paths: Sequence[str], image_config: Any, where: str) -> Tuple[np.ndarray, np.ndarray]:
  """Returns (patches float32 [p, 1176], grid_thw int32 [k, 3]) of the images at paths."""
  if not paths:
    return np.zeros((0, inputs.PATCH_DIM), np.float32), np.zeros((0, 3), np.int32)
  for i, path in enumerate(paths):
    if not _is_url(path) and not os.path.isfile(path):
      raise ValueError(f"{where}: image {i} file {path!r} does not exist")
  from mmembed_jax.data import images  # lazily: pulls in PIL and the image pipeline

  if image_config is None:
    image_config = images.ImageProcessingConfig()  # Qwen2-VL's defaults
  all_patches, grids = [], []
  for i, path in enumerate(paths):
    try:
      pil_image = images.load_image(path)
    except (OSError, ValueError) as e:
      raise ValueError(f"{where}: cannot load image {i} from {path!r}: {e}") from e
    try:
      patches, grid = images.preprocess_image(pil_image, image_config)
    except ValueError as e:  # e.g. an aspect ratio the processor rejects
      raise ValueError(f"{where}: cannot preprocess image {i} from {path!r}: {e}") from e
    patches = np.asarray(patches, np.float32)
    grid = np.asarray(grid, np.int32).reshape(3)
    if patches.shape != (int(np.prod(grid)), inputs.PATCH_DIM):
      raise ValueError(f"{where}: image {i} ({path!r}) preprocessed to patches of shape "
                       f"{patches.shape}, expected ({int(np.prod(grid))}, {inputs.PATCH_DIM}) "
                       f"for grid_thw {grid.tolist()}")
    all_patches.append(patches)
    grids.append(grid)
  return np.concatenate(all_patches, axis=0), np.stack(grids).astype(np.int32)


def encode_row(row: Dict[str, Any], tokenizer: Any, image_config: Any, max_length: int,
               base_dir: Optional[str] = None, where: str = "row") -> EncodedRow:
  """Encodes one row (loading its images); raises ValueError naming `where` on any problem.

  image_config is a `mmembed_jax.data.images.ImageProcessingConfig`; None means its defaults.
  """
  paths = resolve_image_paths(row, base_dir, where)
  patches, grid_thw = _load_images(paths, image_config, where)
  merge_size = int(getattr(image_config, "merge_size", 2))  # image_config may be None without images
  input_ids = tokenize_with_images(row["text"], grid_thw, tokenizer, merge_size, where)
  n = input_ids.shape[0]
  if n == 0:
    raise ValueError(f"{where} is empty: no text and no image; expected at least one of them")
  if n > max_length:
    num_image_tokens = int(np.prod(grid_thw, axis=-1).sum()) // (merge_size * merge_size)
    detail = f" ({num_image_tokens} of them image tokens)" if paths else ""
    raise ValueError(f"{where} has {n} tokens{detail}, more than max_length {max_length}")
  image_token_id = vision_token_ids(tokenizer)[IMAGE_PAD]
  positions = mrope.mrope_positions(input_ids, grid_thw, image_token_id, merge_size)
  return EncodedRow(input_ids=input_ids, patches=patches, grid_thw=grid_thw, positions=positions,
                    source=where)


def encode_jsonl(path: str, tokenizer: Any, image_config: Any, max_length: int) -> List[EncodedRow]:
  """Reads and encodes every row of a JSONL file; image paths are relative to the file's directory."""
  base_dir = os.path.dirname(os.path.abspath(path))
  return [
      encode_row(row, tokenizer, image_config, max_length, base_dir, row_name(path, r, line_no))
      for r, (line_no, row) in enumerate(_read_jsonl(path), start=1)
  ]
