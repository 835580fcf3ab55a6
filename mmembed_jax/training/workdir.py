"""A run's workdir: checked writable and locked before anything is written into it.

One run at a time per workdir: process 0 holds an exclusive `flock` on WORKDIR/.lock for the
whole run (the kernel drops it when the process ends, however it ends: a SIGKILL leaves no stale
lock). A second run on the same workdir fails at once with one line naming the holder's host
and pid, before it writes anything. gs:// workdirs cannot be flock-ed: they are not locked.
"""
import datetime
import errno
import fcntl
import os
import socket
from typing import Optional

import jax
import numpy as np
from jax.experimental import multihost_utils

LOCK_FILE = ".lock"


class WorkdirError(ValueError):
  """The workdir cannot be used: not a directory, not writable, or held by another run."""


def _is_url(path: str) -> bool:
  return "://" in path


def _make_writable_dir(workdir: str) -> None:
  """Creates `workdir`; WorkdirError naming why it cannot be a writable directory."""
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise WorkdirError(f"workdir {workdir} is a file, not a directory")
  try:
    os.makedirs(workdir, exist_ok=True)
  except (FileExistsError, NotADirectoryError):
    parent = next((p for p in _parents(workdir) if os.path.exists(p) and not os.path.isdir(p)),
                  None)
    raise WorkdirError(f"workdir {workdir} lies under {parent or 'a path'}, which is a file, "
                       f"not a directory") from None
  except OSError as e:
    raise WorkdirError(f"cannot create workdir {workdir}: {_reason(e)}") from None


def _parents(path: str) -> list:
  """The ancestors of `path`, nearest first."""
  out, path = [], os.path.abspath(path)
  while os.path.dirname(path) != path:
    path = os.path.dirname(path)
    out.append(path)
  return out


def _reason(error: OSError) -> str:
  """An OSError as a short reason ("read-only file system", "permission denied", ...)."""
  return os.strerror(error.errno).lower() if error.errno else str(error)


class WorkdirLock:
  """The held lock on a local workdir (nothing for gs://); `release()` at the end of the run."""

  def __init__(self, workdir: str):
    self.workdir, self._file = workdir, None
    if _is_url(workdir):
      return
    _make_writable_dir(workdir)
    path = os.path.join(workdir, LOCK_FILE)
    try:
      self._file = open(path, "a+")  # pylint: disable=consider-using-with  # held for the run
    except OSError as e:
      raise WorkdirError(f"cannot write into workdir {workdir}: {_reason(e)}") from None
    try:
      fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
      self._file.seek(0)
      holder = self._file.read().strip() or "unknown"
      self._file.close()
      self._file = None
      if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
        raise WorkdirError(f"workdir {workdir} is in use by another run ({holder}); wait for it "
                           f"to end or choose another workdir") from None
      raise WorkdirError(f"cannot lock workdir {workdir}: {_reason(e)}") from None
    self._file.seek(0)
    self._file.truncate()
    started = datetime.datetime.now().isoformat(timespec="seconds")
    self._file.write(f"host {socket.gethostname()}, pid {os.getpid()}, since {started}\n")
    self._file.flush()

  def release(self) -> None:
    """Drops the lock (the file stays; it names the last holder)."""
    if self._file is not None:
      fcntl.flock(self._file, fcntl.LOCK_UN)
      self._file.close()
      self._file = None


def lock(workdir: str) -> Optional[WorkdirLock]:
  """Process 0 checks and locks `workdir`; every process raises the same WorkdirError if it fails
  (so no process of a pod starts work the others abandon). Returns the lock on process 0."""
  held, error = None, ""
  if jax.process_index() == 0:
    try:
      held = WorkdirLock(workdir)
    except WorkdirError as e:
      error = str(e)
  if jax.process_count() > 1:
    failed = multihost_utils.broadcast_one_to_all(np.int32(bool(error)))
    if int(failed) and not error:
      error = f"process 0 could not use workdir {workdir} (its log says why)"
  if error:
    raise WorkdirError(error)
  return held
