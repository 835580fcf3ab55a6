"""The row convention: JSONL rows of text and images, encoded into token ids, patches and positions.

A JSONL file holds one JSON object per line (blank lines are skipped):

  {"text": "A red circle.", "image": "imgs/1.png"}        one image, or "image": null
  {"text": "<image> left, <image> right", "images": ["a.png", "b.png"]}
  {"text": "just text"}
  {"text": "<video> a cat jumps", "video": "clips/cat.mp4"}     or "videos": [...]
  {"text": "<video> a cat", "video": ["f0.jpg", "f1.jpg", "f2.jpg"], "fps": 1.0}

A row may also carry an "instruction" and a "role" ("query", the default, or "candidate"): the
model's prompt format (data/prompts.py, mmembed.json's "prompt") renders them with the text;
by default the instruction goes before the text with a space between. Other keys are ignored.
"image" (a path or null) and "images" (a list of paths) may not both
name images; nor may "video" (a video file or a list of frame images) and "videos" (a list of
those) both name videos; "fps" is the rate of videos given as frame lists (default 2.0). Image paths are relative to the JSONL file's directory unless absolute or URLs
(e.g. gs://bucket/img.png, read by `mmembed_jax.data.images.load_image`).

Rows are encoded by the one SequenceEncoder (data/sequences.py) that also encodes training
records and pairs. Each `<image>` marker in the text stands for the next image, in order, and is
replaced by
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
import json
import os
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from mmembed_jax.data.bad_records import BadRecord
from mmembed_jax.data.prompts import ROLES, PromptFormat
from mmembed_jax.data.sequences import (IMAGE_MARKER, IMAGE_PAD, VIDEO_PAD, VISION_END,
                                        VISION_START, EncodedRow, SequenceEncoder)

__all__ = ["EncodedRow", "IMAGE_MARKER", "IMAGE_PAD", "VIDEO_PAD", "VISION_END", "VISION_START",
           "encode_jsonl", "encode_row", "read_jsonl_rows", "resolve_image_paths",
           "resolve_video_paths", "row_name",
           "tokenize_with_images", "validate_row", "vision_token_ids"]


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
  for k, video in enumerate(_videos(row)):
    field = "video" if row.get("video") is not None else f"videos[{k}]"
    if not (isinstance(video, str) or isinstance(video, list) and video
            and all(isinstance(frame, str) for frame in video)):
      raise ValueError(f"{where}: field '{field}' must be a video path or a non-empty array of "
                       f"frame paths, found {_type_name(video)}")
  if row.get("video") is not None and "videos" in row:
    raise ValueError(f"{where}: fields 'video' and 'videos' are both set; expected at most one")
  fps = row.get("fps")
  if fps is not None and (isinstance(fps, bool) or not isinstance(fps, (int, float)) or fps <= 0):
    raise ValueError(f"{where}: field 'fps' must be a positive number, found {fps!r}")
  instruction = row.get("instruction")
  if instruction is not None and not isinstance(instruction, str):
    raise ValueError(f"{where}: field 'instruction' must be a string, found "
                     f"{_type_name(instruction)}")
  if row.get("role", "query") not in ROLES:
    raise ValueError(f"{where}: field 'role' must be one of {ROLES}, found {row['role']!r}")


def _videos(row: Dict[str, Any]) -> List[Any]:
  """The row's videos as given ("video" or "videos")."""
  if row.get("video") is not None:
    return [row["video"]]
  videos = row.get("videos", [])
  if not isinstance(videos, list):
    raise ValueError(f"field 'videos' must be an array, found {_type_name(videos)}")
  return videos


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


def resolve_video_paths(row: Dict[str, Any], base_dir: Optional[str] = None) -> List[Any]:
  """The row's videos in order (a path, or a list of frame paths), relative paths joined to
  base_dir (default: cwd)."""
  base_dir = base_dir if base_dir is not None else ""
  join = lambda p: p if _is_absolute(p) else os.path.join(base_dir, p)
  return [join(v) if isinstance(v, str) else [join(f) for f in v] for v in _videos(row)]


def vision_token_ids(tokenizer: Any) -> Dict[str, int]:
  """Returns {token: id} for the vision tokens; raises ValueError if the tokenizer lacks one."""
  return SequenceEncoder(tokenizer).vision_ids


def _named(where: str, error: BadRecord) -> ValueError:
  """The encoder's error with the row's name in front."""
  return ValueError(f"{where}: {error}")


def tokenize_with_images(text: str, grid_thw: Any, tokenizer: Any, merge_size: int = 2,
                         where: str = "row") -> np.ndarray:
  """Returns int32 [n] ids of text with `<image>` markers expanded for images of grid_thw [k, 3]."""
  from mmembed_jax.data.images import ImageProcessingConfig  # pylint: disable=g-import-not-at-top
  encoder = SequenceEncoder(tokenizer, ImageProcessingConfig(merge_size=merge_size))
  try:
    return encoder.ids_for_grids(text, grid_thw)
  except BadRecord as e:
    raise _named(where, e) from None


def encode_row(row: Dict[str, Any], tokenizer: Any, image_config: Any, max_length: int,
               base_dir: Optional[str] = None, where: str = "row",
               prompt: PromptFormat = PromptFormat()) -> EncodedRow:
  """Encodes one row (loading its images) with the shared SequenceEncoder, its text rendered
  with its instruction by `prompt`; raises ValueError naming `where` on any problem. Nothing is
  truncated: a row over max_length is an error.

  tokenizer: a loaded transformers tokenizer or a tokenizer directory; image_config: a
  `mmembed_jax.data.images.ImageProcessingConfig` (None: its defaults).
  """
  encoder = tokenizer if isinstance(tokenizer, SequenceEncoder) else SequenceEncoder(
      tokenizer, image_config)
  paths = resolve_image_paths(row, base_dir, where)
  videos = resolve_video_paths(row, base_dir)
  try:
    text = prompt.render(row["text"], row.get("instruction") or "", row.get("role", "query"),
                         len(paths), len(videos))
    return encoder.encode(text, paths, length=max_length, source=where, videos=videos,
                          video_fps=row.get("fps"))
  except BadRecord as e:
    raise _named(where, e) from None


def encode_jsonl(path: str, tokenizer: Any, image_config: Any, max_length: int) -> List[EncodedRow]:
  """Reads and encodes every row of a JSONL file; image paths are relative to the file's directory."""
  base_dir = os.path.dirname(os.path.abspath(path))
  encoder = SequenceEncoder(tokenizer, image_config)
  return [
      encode_row(row, encoder, image_config, max_length, base_dir, row_name(path, r, line_no))
      for r, (line_no, row) in enumerate(_read_jsonl(path), start=1)
  ]
