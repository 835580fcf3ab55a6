"""Evaluation files: JSONL or Parquet tables read whole, each row named by FILE:LINE or FILE:row R."""
import json
from typing import Any, Iterator, List, Optional, Sequence, Tuple

from etils import epath

KINDS = ("jsonl", "parquet")


def find_table(directory: str, stem: str) -> Optional[str]:
  """DIR/STEM.jsonl or DIR/STEM.parquet (the first that exists), else None."""
  for kind in KINDS:
    path = epath.Path(directory) / f"{stem}.{kind}"
    if path.exists():
      return str(path)
  return None


def table_files(path: str) -> List[str]:
  """A table file itself, or the .jsonl / .parquet files of a directory (sorted)."""
  root = epath.Path(path)
  if not root.is_dir():
    return [str(root)]
  return sorted(str(p) for p in root.iterdir() if p.suffix.lstrip(".") in KINDS)


def read_table(path: str) -> Iterator[Tuple[str, Optional[dict], Optional[str]]]:
  """(where, row or None, None or why the row cannot be read) for every row of a table file.

  A Parquet file that cannot be read at all (truncated, say) is one entry naming the file.
  """
  if path.endswith(".parquet"):
    import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
    try:
      with epath.Path(path).open("rb") as f:
        rows = pq.read_table(f).to_pylist()
    except Exception as e:  # pylint: disable=broad-except  # Arrow raises its own types
      yield path, None, f"cannot read the Parquet file ({type(e).__name__}: {e})"
      return
    for number, row in enumerate(rows, start=1):
      yield f"{path}:row {number}", row, None
    return
  with epath.Path(path).open("rb") as f:
    for line_no, data in enumerate(f, start=1):
      where = f"{path}:{line_no}"
      try:
        line = data.decode("utf-8")
      except UnicodeDecodeError as e:
        yield where, None, f"not UTF-8 ({e.reason} at byte {e.start})"
        continue
      if not line.strip():
        continue
      try:
        row = json.loads(line)
      except json.JSONDecodeError as e:
        yield where, None, f"invalid JSON ({e.msg} at column {e.colno})"
        continue
      if not isinstance(row, dict):
        yield where, None, f"expected a JSON object, found {type(row).__name__}"
        continue
      yield where, row, None


def string_field(row: dict, field: str, default: Any = None) -> str:
  """row[field] as a string ("" for null); ValueError naming the field otherwise."""
  value = row.get(field, default)
  if value is None:
    return ""
  if isinstance(value, (int, float)) and not isinstance(value, bool) and field.endswith("-id"):
    return str(value)
  if not isinstance(value, str):
    raise ValueError(f"field '{field}' must be a string, found {type(value).__name__}")
  return value


def string_list(row: dict, field: str) -> Sequence[str]:
  """row[field] as a list of strings (a lone string is a list of one)."""
  value = row.get(field)
  if value is None:
    return []
  if isinstance(value, str):
    return [value]
  if not isinstance(value, (list, tuple)) or not all(isinstance(v, (str, type(None))) for v in value):
    raise ValueError(f"field '{field}' must be a list of strings, found {value!r:.60}")
  return [v or "" for v in value]
