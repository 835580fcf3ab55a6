"""Bad records: what the input pipelines skip (and count, and name), and when the input as a whole
is broken.

A record that cannot be decoded, tokenised or processed for any reason (the pipelines catch every
exception, not only `BadRecord`) is skipped, counted in the batch's `bad_records` and named by
one line "FILE:LINE: why" carried in the batch's `bad_messages` (one string per row, lines joined
by newlines, "" for none). The trainer logs those lines when it consumes the batch, so a record
is named exactly once however far the pipeline read ahead, and resumed runs do not name it again.

When every record a source yields is bad (`max_consecutive` of them in a row: a wrong path
template, a wrong format, a wrong image root), the run stops with one `DataError` line naming the
source instead of training on nothing.
"""
import collections
from typing import Iterable, Optional

import numpy as np

MESSAGES = "bad_messages"  # batch key: the "FILE:LINE: why" lines of the row's bad records
MAX_CONSECUTIVE = 1000  # bad records in a row from one source before the input is declared broken


class BadRecord(ValueError):
  """A record the pipeline skips and counts; the message says why."""


class DataError(ValueError):
  """The input as a whole is unusable (e.g. every record of a source is bad); one line."""


def printable(text: str) -> str:
  """`text` on one line that any stream can print: newlines folded, lone surrogates escaped."""
  text = " ".join(str(text).split("\n"))
  return text.encode("utf-8", "backslashreplace").decode("utf-8")


def describe(where: str, error: BaseException) -> str:
  """The one-line "FILE:LINE: why" of a record that raised `error` (any exception)."""
  why = str(error) if isinstance(error, BadRecord) else f"{type(error).__name__}: {error}"
  return printable(f"{where}: {why}")


def join_messages(messages: Iterable[str]) -> np.ndarray:
  """The `bad_messages` entry of one row: its lines joined by newlines (a numpy string)."""
  return np.str_("\n".join(messages))


def split_messages(entries: Optional[np.ndarray]) -> list:
  """Every non-empty line of a batch's `bad_messages` (any shape), in row order."""
  if entries is None:
    return []
  return [line for entry in np.asarray(entries).reshape(-1) for line in str(entry).split("\n")
          if line]


class ConsecutiveBadCheck:
  """Counts each source's bad records since its last good one; raises DataError at the limit."""

  def __init__(self, max_consecutive: int = MAX_CONSECUTIVE):
    self.max_consecutive = max_consecutive
    self._counts = collections.Counter()

  def good(self, source: str) -> None:
    """A record of `source` was used."""
    self._counts[source] = 0

  def bad(self, source: str, message: str) -> None:
    """A record of `source` was bad; DataError when it is the limit-th in a row."""
    self._counts[source] += 1
    if self._counts[source] >= self.max_consecutive:
      raise DataError(printable(
          f"source '{source}': the last {self._counts[source]} records read from it were all "
          f"bad (the last: {message}); check its path, format and image root"))
