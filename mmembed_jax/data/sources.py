"""Record sources: JSONL, Parquet, ArrayRecord and TFDS data as Grain random-access sources.

Every source has `len()` and `source[i]`, which returns one record

  {"text": str | None, "images": [image, ...], "videos": [video, ...], "fps": float | None,
   "source": name, "where": "FILE:LINE", "error": None | str}

plus "dialogue" (the row's value, checked by its pipeline: CoMa's [{"q", "a"}, ...]) when the
row has one; such rows may leave out 'text'.

An image is an absolute path (local or gs://), or, for Parquet and TFDS, the encoded bytes or
a decoded array. A video ("video" or "videos" in the row) is a video file's path or a list of
frame images' paths; "fps" is the rate of frame-list videos (data/sequences.py). Relative paths are joined to the directory of the file holding the record.
`where` names the record: "data.jsonl:7" (1-based line), "data.parquet:row 3",
"data.array_record:record 3" (1-based), "tfds NAME:SPLIT:record 3".

Nothing is validated while indexing: a record that cannot be read (malformed JSON, missing or
mistyped 'text' or 'images') comes back with `error` set and `text` None, and the pipeline skips
and counts it when it decodes it (`cpt_pipeline.py`). Sources are picklable: open files are
per thread and reopened after unpickling, so Grain worker processes and read threads share none.
"""
import bisect
import glob as glob_lib
import json
import os
import posixpath
import threading
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

IMAGE_FIELDS = ("images", "image")
VIDEO_FIELDS = ("videos", "video")


def _is_url(path: str) -> bool:
  """True for a URL such as gs://bucket/a.png."""
  return "://" in path


def _join(base_dir: str, path: str) -> str:
  """Returns path if absolute or a URL, else base_dir/path (URL-aware)."""
  if os.path.isabs(path) or _is_url(path):
    return path
  return posixpath.join(base_dir, path) if _is_url(base_dir) else os.path.join(base_dir, path)


def _absolute(path: str) -> str:
  """A local path made absolute (so logs name the file from any process); URLs unchanged."""
  return path if _is_url(path) else os.path.abspath(path)


def _dirname(path: str) -> str:
  """Directory of a local path (made absolute) or of a URL."""
  return posixpath.dirname(path) if _is_url(path) else os.path.dirname(os.path.abspath(path))


def _type_name(value: Any) -> str:
  """JSON-ish type name of a value, for error messages."""
  if value is None:
    return "null"
  return {bool: "boolean", int: "number", float: "number", str: "string", list: "array",
          dict: "object", bytes: "bytes"}.get(type(value), type(value).__name__)


def _as_image(value: Any, base_dir: str, field: str) -> Any:
  """An image entry as a resolved path, bytes or array; ValueError naming the field otherwise."""
  if isinstance(value, str):
    return _join(base_dir, value)
  if isinstance(value, (bytes, np.ndarray)):
    return value
  if isinstance(value, dict):  # Hugging Face `Image` feature: {"bytes": ..., "path": ...}
    if value.get("bytes") is not None:
      return value["bytes"]
    if isinstance(value.get("path"), str):
      return _join(base_dir, value["path"])
  raise ValueError(f"field '{field}' must be an image path, found {_type_name(value)}")


def error_record(source: str, where: str, error: str) -> Dict[str, Any]:
  """A record that could not be read: the pipeline skips, counts and names it."""
  return {"text": None, "images": [], "videos": [], "fps": None, "source": source,
          "where": where, "error": error}


def make_record(raw: Any, base_dir: str, source: str, where: str) -> Dict[str, Any]:
  """The record of a raw row {"text", "images" | "image"}; problems go to `error`, never raised."""
  record = error_record(source, where, None)
  try:
    if not isinstance(raw, dict):
      raise ValueError(f"expected an object with field 'text', found {_type_name(raw)}")
    text = raw.get("text")
    if isinstance(text, bytes):
      text = text.decode("utf-8")
    if raw.get("dialogue") is not None:
      record["dialogue"] = raw["dialogue"]
      text = "" if text is None else text
    if text is None:
      raise ValueError(f"missing field 'text' (found fields {sorted(raw)})")
    if not isinstance(text, str):
      raise ValueError(f"field 'text' must be a string, found {_type_name(text)}")
    images = raw.get("images")
    image = raw.get("image")
    if images is not None and image is not None:
      raise ValueError("fields 'image' and 'images' are both set; expected at most one")
    if image is not None:
      images = [_as_image(image, base_dir, "image")]
    elif images is None:
      images = []
    elif isinstance(images, (list, tuple, np.ndarray)):
      images = [_as_image(x, base_dir, f"images[{i}]") for i, x in enumerate(images)]
    else:
      raise ValueError(f"field 'images' must be an array of image paths, found {_type_name(images)}")
    videos = _videos(raw, base_dir)
    fps = raw.get("fps")
    if fps is not None and (isinstance(fps, bool) or not isinstance(fps, (int, float)) or fps <= 0):
      raise ValueError(f"field 'fps' must be a positive number, found {fps!r}")
  except (ValueError, UnicodeDecodeError) as e:
    record["error"] = str(e)
    return record
  record.update(text=text, images=images, videos=videos, fps=fps)
  return record


def _as_video(value: Any, base_dir: str, field: str) -> Any:
  """A video entry as a resolved path or a list of resolved frame paths."""
  if isinstance(value, str) and value:
    return _join(base_dir, value)
  if isinstance(value, (list, tuple, np.ndarray)) and len(value):
    return [_as_image(x, base_dir, f"{field}[{i}]") for i, x in enumerate(value)]
  raise ValueError(f"field '{field}' must be a video path or a non-empty array of frame paths, "
                   f"found {_type_name(value)}")


def _videos(raw: Dict[str, Any], base_dir: str) -> List[Any]:
  """The row's videos ("video": one, "videos": a list)."""
  video, videos = raw.get("video"), raw.get("videos")
  if video is not None and videos is not None:
    raise ValueError("fields 'video' and 'videos' are both set; expected at most one")
  if video is not None:
    return [_as_video(video, base_dir, "video")]
  if videos is None:
    return []
  if not isinstance(videos, (list, tuple, np.ndarray)):
    raise ValueError(f"field 'videos' must be an array of videos, found {_type_name(videos)}")
  return [_as_video(v, base_dir, f"videos[{i}]") for i, v in enumerate(videos)]


def _open(path: str, mode: str = "rb"):
  """Opens a local or gs:// file (etils.epath for URLs)."""
  if _is_url(path):
    from etils import epath  # pylint: disable=g-import-not-at-top
    return epath.Path(path).open(mode)
  return open(path, mode)


class _PerThreadFile:
  """A file handle per thread (and per process after unpickling): seek+read never interleave."""

  def __init__(self, path: str):
    self._path = path
    self._local = threading.local()

  def read_at(self, offset: int, size: int) -> bytes:
    """Reads `size` bytes at `offset`."""
    f = getattr(self._local, "file", None)
    if f is None:
      f = self._local.file = _open(self._path)
    f.seek(offset)
    return f.read(size)

  def __getstate__(self):
    return {"path": self._path}

  def __setstate__(self, state):
    self.__init__(state["path"])


class JsonlSource:
  """One JSONL file: the byte offsets of its non-blank lines are indexed once at construction."""

  def __init__(self, path: str, name: str):
    self.path, self.name = _absolute(str(path)), name
    self._base_dir = _dirname(self.path)
    starts, ends, lines = [], [], []
    offset = 0
    with _open(self.path) as f:
      for line_no, line in enumerate(f, start=1):
        if line.strip():
          starts.append(offset)
          ends.append(offset + len(line))
          lines.append(line_no)
        offset += len(line)
    self._starts = np.asarray(starts, np.int64)  # [records]
    self._sizes = np.asarray(ends, np.int64) - self._starts  # [records]
    self._lines = np.asarray(lines, np.int64)  # [records] 1-based line numbers
    self._file = _PerThreadFile(self.path)

  def __len__(self) -> int:
    return int(self._starts.shape[0])

  def read_row(self, index: int) -> tuple[Any, str, Optional[str]]:
    """(parsed JSON or None, "FILE:LINE", None or why the line is not JSON) of record `index`."""
    if not 0 <= index < len(self):
      raise IndexError(f"{self.path}: row {index} out of range [0, {len(self)})")
    where = f"{self.path}:{int(self._lines[index])}"
    data = self._file.read_at(int(self._starts[index]), int(self._sizes[index]))
    try:
      return json.loads(data), where, None
    except json.JSONDecodeError as e:
      return None, where, f"malformed JSON ({e.msg} at column {e.colno})"
    except UnicodeDecodeError as e:
      return None, where, f"malformed JSON (not UTF-8: {e.reason})"

  def __getitem__(self, index: int) -> Dict[str, Any]:
    raw, where, error = self.read_row(index)
    if error:
      return error_record(self.name, where, error)
    return make_record(raw, self._base_dir, self.name, where)


class ParquetSource:
  """One Parquet file with columns text and images (list of paths/bytes) or image."""
  # Random access decodes the record's whole row group (columns text/images only) and keeps the
  # last few decoded row groups per process: prefer small row groups (say <= 1,000 rows), or
  # ArrayRecord, for large shuffled corpora.

  def __init__(self, path: str, name: str, cached_row_groups: int = 4):
    import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
    self.path, self.name = _absolute(str(path)), name
    self._base_dir = _dirname(self.path)
    self._cached_row_groups = cached_row_groups
    with _open(self.path) as f:
      parquet_file = pq.ParquetFile(f)
      metadata = parquet_file.metadata
      columns = set(parquet_file.schema_arrow.names)
    self._columns = self.select_columns(columns)
    counts = [metadata.row_group(g).num_rows for g in range(metadata.num_row_groups)]
    self._group_starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)  # [groups + 1]
    self._lock = threading.Lock()
    self._cache: Dict[int, Dict[str, list]] = {}

  def select_columns(self, columns: set) -> List[str]:
    """The columns to read, from those the file has; ValueError if a needed one is missing."""
    if "text" not in columns and "dialogue" not in columns:
      raise ValueError(f"{self.path}: Parquet file has no column 'text' (found {sorted(columns)}); "
                       f"expected columns text and images (or image)")
    return [c for c in ("text", "dialogue", "fps") + IMAGE_FIELDS + VIDEO_FIELDS if c in columns]

  def __getstate__(self):
    state = dict(self.__dict__)
    state.pop("_lock"), state.pop("_cache")
    return state

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._lock, self._cache = threading.Lock(), {}

  def __len__(self) -> int:
    return int(self._group_starts[-1])

  def _row_group(self, group: int) -> Dict[str, list]:
    """Columns of one row group as Python lists, from a small per-process cache."""
    with self._lock:
      if group in self._cache:
        return self._cache[group]
    import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
    with _open(self.path) as f:
      table = pq.ParquetFile(f).read_row_group(group, columns=self._columns)
    columns = {name: table.column(name).to_pylist() for name in self._columns}
    with self._lock:
      if len(self._cache) >= self._cached_row_groups:
        self._cache.pop(next(iter(self._cache)))
      self._cache[group] = columns
    return columns

  def read_row(self, index: int) -> tuple[Dict[str, Any], str, None]:
    """({column: value}, "FILE:row R", None) of row `index` (1-based R)."""
    if not 0 <= index < len(self):
      raise IndexError(f"{self.path}: row {index} out of range [0, {len(self)})")
    group = bisect.bisect_right(self._group_starts, index) - 1
    columns = self._row_group(group)
    offset = index - int(self._group_starts[group])
    return ({name: values[offset] for name, values in columns.items()},
            f"{self.path}:row {index + 1}", None)

  def __getitem__(self, index: int) -> Dict[str, Any]:
    raw, where, _ = self.read_row(index)
    raw = {k: v for k, v in raw.items() if not (k in IMAGE_FIELDS + VIDEO_FIELDS and v is None)}
    return make_record(raw, self._base_dir, self.name, where)


class ArrayRecordSource:
  """One ArrayRecord file whose records are JSON objects (UTF-8 bytes)."""

  def __init__(self, path: str, name: str):
    from array_record.python import array_record_data_source  # pylint: disable=g-import-not-at-top
    self.path, self.name = _absolute(str(path)), name
    self._base_dir = _dirname(self.path)
    self._reader = array_record_data_source.ArrayRecordDataSource([self.path])

  def __len__(self) -> int:
    return len(self._reader)

  def __getitem__(self, index: int) -> Dict[str, Any]:
    where = f"{self.path}:record {index + 1}"
    try:
      raw = json.loads(self._reader[index])
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
      return error_record(self.name, where, f"malformed JSON ({e})")
    return make_record(raw, self._base_dir, self.name, where)


class TfdsSource:
  """A TFDS split via `tfds.data_source`; path 'NAME[:SPLIT]' (split 'train' by default)."""
  # Features 'text' and 'images' (or 'image'): paths, encoded bytes or decoded arrays.

  def __init__(self, path: str, name: str, data_dir: Optional[str] = None):
    try:
      import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    except ImportError as e:
      raise ImportError(f"source '{name}' (kind tfds, path {path!r}) needs tensorflow-datasets: "
                        f"pip install -e '.[tfds]'") from e
    dataset_name, _, split = path.partition(":")
    self.path, self.name = path, name
    self._split = split or "train"
    self._source = tfds.data_source(dataset_name, split=self._split, data_dir=data_dir)

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int) -> Dict[str, Any]:
    raw = self._source[index]
    raw = dict(raw)
    if isinstance(raw.get("images"), np.ndarray) and raw["images"].ndim in (1, 4):
      raw["images"] = list(raw["images"])  # a Sequence(Image) feature: [k, H, W, C] or objects
    return make_record(raw, "", self.name, f"tfds {self.path}:record {index + 1}")


class ConcatSource:
  """Several sources back to back: record i of the concatenation is record j of one file."""

  def __init__(self, sources: Sequence[Any], name: str):
    if not sources:
      raise ValueError(f"source '{name}': expected at least one file, found none")
    self.name = name
    self._sources = list(sources)
    self._starts = np.concatenate([[0], np.cumsum([len(s) for s in sources])]).astype(np.int64)

  def __len__(self) -> int:
    return int(self._starts[-1])

  def __getitem__(self, index: int) -> Dict[str, Any]:
    if not 0 <= index < len(self):
      raise IndexError(f"source '{self.name}': record {index} out of range [0, {len(self)})")
    k = bisect.bisect_right(self._starts, index) - 1
    return self._sources[k][index - int(self._starts[k])]


KINDS = {"jsonl": JsonlSource, "parquet": ParquetSource, "array_record": ArrayRecordSource,
         "tfds": TfdsSource}


def expand_paths(path: Any) -> List[str]:
  """Files named by a path, a glob pattern (local or gs://) or a list of them, sorted per pattern."""
  if isinstance(path, (list, tuple)):
    return [p for item in path for p in expand_paths(item)]
  path = str(path)
  if not any(c in path for c in "*?["):
    return [path]
  if _is_url(path):
    from etils import epath  # pylint: disable=g-import-not-at-top
    base, pattern = path.split("://", 1)[0] + "://", path.split("://", 1)[1]
    root, _, tail = pattern.partition("/")
    files = sorted(str(p) for p in epath.Path(base + root).glob(tail))
  else:
    files = sorted(glob_lib.glob(path))
  if not files:
    raise ValueError(f"pattern {path!r} matches no file")
  return files


def open_source(kind: str, path: Any, name: str, **options: Any) -> Any:
  """The random-access source of `kind` over the files at `path` (several files concatenated)."""
  if kind not in KINDS:
    raise ValueError(f"source '{name}': unknown kind {kind!r}, expected one of {sorted(KINDS)}")
  if kind == "tfds":
    return TfdsSource(str(path), name, **options)
  files = expand_paths(path)
  sources = [KINDS[kind](f, name, **options) for f in files]
  return sources[0] if len(sources) == 1 else ConcatSource(sources, name)

