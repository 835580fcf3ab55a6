"""The test session's shared temporary root (pytest-xdist's workers each have their own below it)."""
import os


def session_root(tmp_path_factory):
  """The directory shared by every worker of this session: the basetemp, or under pytest-xdist
  its parent (which holds each worker's basetemp)."""
  base = tmp_path_factory.getbasetemp()
  return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
