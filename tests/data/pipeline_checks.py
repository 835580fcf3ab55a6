"""Helpers shared by the input-pipeline tests: JSONL files, iterator states, batch equality."""
import json

import numpy as np


def write_jsonl(path, lines) -> str:
  """Writes one line per item (a string as is, anything else as JSON); returns the path."""
  with open(path, "w") as f:
    for line in lines:
      f.write((line if isinstance(line, str) else json.dumps(line)) + "\n")
  return str(path)


def take(iterator, n):
  """The next n batches and the state before each."""
  states, batches = [], []
  for _ in range(n):
    states.append(iterator.get_state())
    batches.append(next(iterator))
  return states, batches


def assert_same(expected, got, what):
  """Two (possibly nested) batches hold the same keys and identical arrays."""
  assert expected.keys() == got.keys(), what
  for key in expected:
    if isinstance(expected[key], dict):
      assert_same(expected[key], got[key], f"{what}: {key}")
    else:
      np.testing.assert_array_equal(expected[key], got[key], err_msg=f"{what}: {key}")
