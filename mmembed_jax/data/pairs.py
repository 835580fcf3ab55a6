"""Contrastive pair rows (MMEB / VLM2Vec and mmE5 training formats) as random-access pair records.

A row (one JSON object per JSONL line, or one Parquet row) has the fields

  qry, qry_image_path           the query's text and image(s)
  pos_text, pos_image_path      the positive target's text and image(s)
  neg_text, neg_image_path      optional hard negatives: a value (one negative) or parallel lists
  qry_video_path, pos_video_path, neg_video_path, fps
                                optional videos (UNITE, VLM2Vec-V2): a video file, or a list of
                                videos each a file or a list of frame images; neg_video_path is
                                parallel to the other negative fields; fps: frame lists' rate

An image field holds a path, a list of paths (several images on one side) or "" / null (none);
Parquet rows may also hold encoded bytes or Hugging Face `Image` dicts. A side's videos are
marked `<video>` in its text, or prepended after its images (data/sequences.py). A text field
holds a string, "" or null. Format "mmE5" differs only in that neg_text / neg_image_path may be strings
holding a Python list literal ("['a', 'b']"), parsed with `ast.literal_eval` (there, a string
starting with "[" must be such a literal; one that does not parse makes a bad row). Other fields
are ignored.

Per-source settings (`PairSettings`, from the config; nothing here is model code):
  format           "mmeb" | "mmE5"
  image_root       a directory or a list of them: a relative image path is resolved against the
                   first root where the file exists, else against the data file's directory
                   (roots themselves are absolute, URLs or relative to the working directory)
  query_template   str.format template applied to the query text, with {text} (default "{text}")
  target_template  the same for the positive and negative texts; per-dataset instructions go here
  target_modal     the positive's modality bitmask (text 1, image 2, video 4), for UNITE's
                   modality-aware masking; None infers it from the positive: 2 if it has an
                   image, 4 if it has a video (6 both), else 1. Text+image (3) is never
                   inferred, because MMEB image targets carry instruction text ("<|image_1|>
                   Represent the given image."): set it explicitly.

Texts: the template is applied first, then Phi-3.5-V placeholders `<|image_N|>` become the
project's `<image>` marker (rows.py). A side with images and no marker gets one marker per image
prepended (rows.py's prepend rule); otherwise it needs exactly one marker per image. Hard
negatives with neither text nor image are dropped (padding in list fields).

`PairSource(kind, path, name, settings)[i]` is the pair record of row i:

  {"query": {"text", "images"[, "videos", "fps"]}, "positive": {...}, "negatives": [{...}],
   "target_modal": int, "source": name, "where": "FILE:LINE", "error": None | str}

A row that cannot be read (malformed JSON, a missing side, a field of the wrong type, a list
literal that does not parse, a marker count that does not match the images) is never raised:
it comes back with `error` set and `where` naming it ("data.jsonl:7", "data.parquet:row 3").
"""
import ast
import dataclasses
import os
import posixpath
import re
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from mmembed_jax.data import sources as sources_lib
from mmembed_jax.data.rows import IMAGE_MARKER
from mmembed_jax.data.sequences import VIDEO_MARKER

FORMATS = ("mmeb", "mmE5")
TEXT_MODALITY, IMAGE_MODALITY, VIDEO_MODALITY = 1, 2, 4
SETTING_FIELDS = ("format", "image_root", "query_template", "target_template", "target_modal")
PAIR_FIELDS = ("qry", "qry_image_path", "pos_text", "pos_image_path", "neg_text", "neg_image_path",
               "qry_video_path", "pos_video_path", "neg_video_path", "fps")
# Phi-3.5-V's `<|image_1|>`, `<|image_2|>`... (MMEB / mmE5 rows); not Qwen's `<|image_pad|>`.
_PLACEHOLDER = re.compile(r"<\|image_\d+\|>")


@dataclasses.dataclass(frozen=True)
class PairSettings:
  """How one source's rows become pair records (see the module docstring)."""
  format: str = "mmeb"
  image_roots: Tuple[str, ...] = ()
  query_template: str = "{text}"
  target_template: str = "{text}"
  target_modal: Optional[int] = None


def _check_template(source: str, field: str, template: Any) -> str:
  """The template if str.format(text=...) accepts it; ValueError naming the source and field."""
  if not isinstance(template, str):
    raise ValueError(f"source '{source}': field '{field}' must be a str.format template with "
                     f"{{text}}, found {type(template).__name__}")
  try:
    template.format(text="")
  except (KeyError, IndexError, ValueError) as e:
    raise ValueError(f"source '{source}': field '{field}' = {template!r} is not a str.format "
                     f"template whose only field is {{text}} ({type(e).__name__}: {e})") from None
  return template


def settings_from_spec(source: str, spec: Mapping[str, Any]) -> PairSettings:
  """PairSettings from a source's config fields; ValueError naming the source and field."""
  fmt = spec.get("format") or "mmeb"
  if fmt not in FORMATS:
    raise ValueError(f"source '{source}': field 'format' = {fmt!r}, expected one of {FORMATS}")
  roots = spec.get("image_root") or ()
  if isinstance(roots, str):
    roots = (roots,)
  if not isinstance(roots, (list, tuple)) or not all(isinstance(r, str) and r for r in roots):
    raise ValueError(f"source '{source}': field 'image_root' must be a directory or a list of "
                     f"directories, found {roots!r}")
  target_modal = spec.get("target_modal")
  if target_modal is not None and (isinstance(target_modal, bool)
                                   or not isinstance(target_modal, (int, np.integer))
                                   or not 1 <= target_modal <= 7):
    raise ValueError(f"source '{source}': field 'target_modal' = {target_modal!r}, expected None "
                     f"(inferred) or a bitmask 1..7 (text 1, image 2, video 4)")
  templates = {field: _check_template(source, field, spec.get(field) or "{text}")
               for field in ("query_template", "target_template")}
  return PairSettings(format=fmt, image_roots=tuple(roots), **templates,
                      target_modal=None if target_modal is None else int(target_modal))


# --- raw rows ------------------------------------------------------------------------------------


def _raw(row: Any, where: str, base_dir: str, error: Optional[str]) -> Dict[str, Any]:
  """A raw row with where it came from (or why it could not be read)."""
  return {"row": row, "where": where, "base_dir": base_dir, "error": error}


class RawJsonlSource(sources_lib.JsonlSource):
  """JsonlSource's line index, returning each row as parsed JSON instead of a CPT record."""

  def __getitem__(self, index: int) -> Dict[str, Any]:
    row, where, error = self.read_row(index)
    return _raw(row, where, self._base_dir, error)


class RawParquetSource(sources_lib.ParquetSource):
  """ParquetSource's row-group cache over the pair columns, returning each row as a dict."""

  def select_columns(self, columns: set) -> List[str]:
    """The pair columns the file has; ValueError without a query or a positive column."""
    if not {"qry", "qry_image_path"} & columns or not {"pos_text", "pos_image_path"} & columns:
      raise ValueError(f"{self.path}: Parquet file has no query or no positive column (found "
                       f"{sorted(columns)}); expected columns {list(PAIR_FIELDS)}")
    return [c for c in PAIR_FIELDS if c in columns]

  def __getitem__(self, index: int) -> Dict[str, Any]:
    row, where, _ = self.read_row(index)
    return _raw(row, where, self._base_dir, None)


RAW_KINDS = {"jsonl": RawJsonlSource, "parquet": RawParquetSource}


# --- parsing -------------------------------------------------------------------------------------


def _exists(path: str) -> bool:
  """Whether a local or gs:// file exists."""
  if "://" in path:
    from etils import epath  # pylint: disable=g-import-not-at-top
    return epath.Path(path).exists()
  return os.path.exists(path)


def _join(base: str, path: str) -> str:
  """base/path, URL-aware."""
  return posixpath.join(base, path) if "://" in base else os.path.join(base, path)


def resolve_image_path(path: str, roots: Sequence[str], base_dir: str) -> str:
  """An absolute path or URL as is; else under the first root holding it, else under base_dir."""
  if os.path.isabs(path) or "://" in path:
    return path
  for root in roots:
    candidate = _join(root, path)
    if _exists(candidate):
      return candidate
  return _join(base_dir, path)


def _type_name(value: Any) -> str:
  """JSON-ish type name of a value, for error messages."""
  return sources_lib._type_name(value)  # pylint: disable=protected-access


def _list_literal(value: Any, field: str) -> Any:
  """mmE5: a string holding a Python list literal as the list; other values unchanged."""
  if not isinstance(value, str):
    return value
  stripped = value.strip()
  if not stripped.startswith("["):  # a plain text; one starting with "[" must be a list literal
    return value
  try:
    parsed = ast.literal_eval(stripped)  # literals only: never eval
  except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError) as e:
    raise ValueError(f"field '{field}' holds {stripped[:40]!r}, which looks like a list literal "
                     f"but does not parse ({type(e).__name__}: {e})") from None
  if not isinstance(parsed, (list, tuple)):
    raise ValueError(f"field '{field}' holds a literal of type {type(parsed).__name__}; "
                     f"expected a list")
  return list(parsed)


def _text(value: Any, field: str) -> str:
  """A text field as a string ("" for null)."""
  if value is None:
    return ""
  if isinstance(value, bytes):
    value = value.decode("utf-8")
  if not isinstance(value, str):
    raise ValueError(f"field '{field}' must be a string or null, found {_type_name(value)}")
  return value


def _images(value: Any, field: str, roots: Sequence[str], base_dir: str) -> List[Any]:
  """An image field as a list of resolved paths, bytes or arrays ([] for "" or null)."""
  if value is None or (isinstance(value, str) and not value):
    return []
  items = list(value) if isinstance(value, (list, tuple)) else [value]
  out = []
  for i, item in enumerate(items):
    name = f"{field}[{i}]" if isinstance(value, (list, tuple)) else field
    if item is None or (isinstance(item, str) and not item):
      continue
    if isinstance(item, str):
      out.append(resolve_image_path(item, roots, base_dir))
    else:  # bytes, arrays or {"bytes", "path"} dicts (Parquet); errors name the field
      out.append(sources_lib._as_image(item, base_dir, name))  # pylint: disable=protected-access
  return out


def _entries(value: Any) -> List[Any]:
  """A negative field as a list: a lone value is one negative; "" or null, none."""
  if value is None or (isinstance(value, str) and not value):
    return []
  return list(value) if isinstance(value, (list, tuple)) else [value]


def _videos(value: Any, field: str, roots: Sequence[str], base_dir: str) -> List[Any]:
  """A video field as a list of videos, each a resolved path or a list of frame paths."""
  if value is None or (isinstance(value, str) and not value):
    return []
  items = [value] if isinstance(value, str) else list(value)
  out = []
  for i, item in enumerate(items):
    if isinstance(item, str):
      if item:
        out.append(resolve_image_path(item, roots, base_dir))
    elif isinstance(item, (list, tuple)) and item and all(isinstance(f, str) for f in item):
      out.append([resolve_image_path(f, roots, base_dir) for f in item])
    else:
      raise ValueError(f"field '{field}[{i}]' must be a video path or a list of frame paths, "
                       f"found {_type_name(item)}")
  return out


def make_side(text: str, images: List[Any], template: str, field: str,
              videos: Sequence[Any] = (), fps: Optional[float] = None,
              prepend: bool = True) -> Dict[str, Any]:
  """{"text", "images"} (+ "videos", "fps" when it has videos): templated, placeholders turned
  into `<image>`, markers checked; media without markers get them prepended (`prepend`), or are
  left to the prompt format and the encoder (a row with an instruction: data/prompts.py)."""
  text = _PLACEHOLDER.sub(IMAGE_MARKER, template.format(text=text))
  markers, video_markers = text.count(IMAGE_MARKER), text.count(VIDEO_MARKER)
  if markers == video_markers == 0 and (images or videos):
    if prepend:
      text = IMAGE_MARKER * len(images) + VIDEO_MARKER * len(videos) + text  # rows.py's rule
  elif markers != len(images) or video_markers != len(videos):
    video_detail = (f", and {video_markers} video markers for {len(videos)} videos"
                    if videos or video_markers else "")
    raise ValueError(f"field '{field}' has {markers} image markers after templating but "
                     f"{len(images)} images{video_detail}; expected one per image and video (or "
                     f"none, to prepend)")
  if not videos:
    return {"text": text, "images": images}
  return {"text": text, "images": images, "videos": list(videos), "fps": fps}


def parse_pair(row: Any, settings: PairSettings, base_dir: str) -> Dict[str, Any]:
  """The query / positive / negatives / target_modal of a raw row; ValueError names the field."""
  if not isinstance(row, dict):
    raise ValueError(f"expected an object with fields {list(PAIR_FIELDS)}, found {_type_name(row)}")
  roots = settings.image_roots
  fps = row.get("fps")
  if fps is not None and (isinstance(fps, bool) or not isinstance(fps, (int, float)) or fps <= 0):
    raise ValueError(f"field 'fps' must be a positive number, found {fps!r}")
  sides = {}
  for side, text_field, image_field, video_field in (
      ("query", "qry", "qry_image_path", "qry_video_path"),
      ("positive", "pos_text", "pos_image_path", "pos_video_path")):
    text = _text(row.get(text_field), text_field)
    images = _images(row.get(image_field), image_field, roots, base_dir)
    videos = _videos(row.get(video_field), video_field, roots, base_dir)
    if not text and not images and not videos:
      raise ValueError(f"the {side} is empty: fields '{text_field}', '{image_field}' and "
                       f"'{video_field}' are all missing, null or empty (found fields "
                       f"{sorted(row)})")
    template = settings.query_template if side == "query" else settings.target_template
    sides[side] = make_side(text, images, template, text_field, videos, fps)
  neg_text, neg_images = row.get("neg_text"), row.get("neg_image_path")
  if settings.format == "mmE5":
    neg_text = _list_literal(neg_text, "neg_text")
    neg_images = _list_literal(neg_images, "neg_image_path")
  texts, images = _entries(neg_text), _entries(neg_images)
  videos = _entries(row.get("neg_video_path"))
  counts = {name: len(entries) for name, entries in (("neg_text", texts),
                                                      ("neg_image_path", images),
                                                      ("neg_video_path", videos)) if entries}
  names = list(counts)
  for name in names[1:]:
    if counts[name] != counts[names[0]]:
      raise ValueError(f"field '{names[0]}' has {counts[names[0]]} entries but '{name}' has "
                       f"{counts[name]}; expected parallel lists")
  negatives = []
  for k in range(max(counts.values(), default=0)):
    text = _text(texts[k] if texts else None, f"neg_text[{k}]")
    neg_images = _images(images[k] if images else None, f"neg_image_path[{k}]", roots, base_dir)
    neg_videos = _videos([videos[k]] if videos else None, f"neg_video_path[{k}]", roots,
                         base_dir)  # one video: a path or a frame list
    if text or neg_images or neg_videos:
      negatives.append(make_side(text, neg_images, settings.target_template, f"neg_text[{k}]",
                                 neg_videos, fps))
  target_modal = settings.target_modal
  if target_modal is None:
    positive = sides["positive"]
    target_modal = ((IMAGE_MODALITY if positive["images"] else 0)
                    | (VIDEO_MODALITY if positive.get("videos") else 0)) or TEXT_MODALITY
  return {"query": sides["query"], "positive": sides["positive"], "negatives": negatives,
          "target_modal": int(target_modal)}


def error_pair(source: str, where: str, error: str) -> Dict[str, Any]:
  """A pair record for a row that could not be read: the pipeline marks it bad and names it."""
  return {"query": None, "positive": None, "negatives": [], "target_modal": 0, "source": source,
          "where": where, "error": error}


class PairSource:
  """Random-access pair records of one source: a file, a glob or a list of them (concatenated)."""

  def __init__(self, kind: str, path: Any, name: str, settings: PairSettings = PairSettings()):
    if kind not in RAW_KINDS:
      raise ValueError(f"source '{name}': field 'kind' = {kind!r}, expected one of "
                       f"{sorted(RAW_KINDS)}")
    files = sources_lib.expand_paths(path)
    raw = [RAW_KINDS[kind](f, name) for f in files]
    self.name, self.settings = name, settings
    self._raw = raw[0] if len(raw) == 1 else sources_lib.ConcatSource(raw, name)

  def __len__(self) -> int:
    return len(self._raw)

  def __getitem__(self, index: int) -> Dict[str, Any]:
    raw = self._raw[index]
    if raw["error"]:
      return error_pair(self.name, raw["where"], raw["error"])
    try:
      pair = parse_pair(raw["row"], self.settings, raw["base_dir"])
    except (ValueError, UnicodeDecodeError) as e:
      return error_pair(self.name, raw["where"], str(e))
    return dict(pair, source=self.name, where=raw["where"], error=None)
