"""Tests of the record sources (mmembed_jax.data.sources): JSONL, Parquet, ArrayRecord, TFDS."""
import concurrent.futures
import json
import os
import pickle
import sys
import types

import numpy as np
import pytest

from mmembed_jax.data import sources


def _write_jsonl(path, lines):
  with open(path, "w", encoding="utf-8") as f:
    f.write("\n".join(lines) + "\n")
  return str(path)


def test_jsonl_records_name_their_line_and_resolve_image_paths(tmp_path):
  path = _write_jsonl(tmp_path / "rows.jsonl", [
      json.dumps({"text": "plain"}),
      "",
      json.dumps({"text": "<image> a", "images": ["img/a.png"], "other": 1}),
      "   ",
      json.dumps({"text": "one", "image": "/abs/b.png"}),
      json.dumps({"text": "cloud", "images": ["gs://bucket/c.png"]}),
      json.dumps({"text": "null image", "image": None}),
  ])
  source = sources.JsonlSource(path, "rows")
  assert len(source) == 5  # blank lines are not records
  records = [source[i] for i in range(5)]
  assert [r["where"] for r in records] == [f"{path}:{n}" for n in (1, 3, 5, 6, 7)]
  assert all(r["source"] == "rows" and r["error"] is None for r in records)
  assert records[0]["images"] == [] and records[0]["text"] == "plain"
  assert records[1]["images"] == [os.path.join(str(tmp_path), "img", "a.png")]
  assert records[2]["images"] == ["/abs/b.png"]
  assert records[3]["images"] == ["gs://bucket/c.png"]
  assert records[4]["images"] == []


def test_jsonl_malformed_records_are_returned_with_an_error_not_raised(tmp_path):
  path = _write_jsonl(tmp_path / "bad.jsonl", [
      json.dumps({"text": "fine"}),
      "{not json",
      json.dumps({"caption": "no text field"}),
      json.dumps({"text": 3}),
      json.dumps({"text": "x", "images": "a.png"}),
      json.dumps({"text": "x", "images": [1]}),
      json.dumps({"text": "x", "image": "a.png", "images": ["b.png"]}),
      json.dumps(["a list"]),
  ])
  source = sources.JsonlSource(path, "bad")  # indexing never parses, so never raises
  errors = [source[i]["error"] for i in range(len(source))]
  assert errors[0] is None
  assert "malformed JSON" in errors[1]
  assert "missing field 'text'" in errors[2]
  assert "field 'text' must be a string, found number" in errors[3]
  assert "field 'images' must be an array" in errors[4]
  assert "field 'images[0]' must be an image path, found number" in errors[5]
  assert "both set" in errors[6]
  assert "found array" in errors[7]
  assert source[1]["where"] == f"{path}:2" and source[1]["text"] is None


def test_jsonl_source_pickles_and_reads_from_threads(tmp_path):
  path = _write_jsonl(tmp_path / "many.jsonl", [json.dumps({"text": f"row {i}"}) for i in range(300)])
  source = sources.JsonlSource(path, "many")
  assert source[3]["text"] == "row 3"  # opens a file handle, which must not be pickled
  clone = pickle.loads(pickle.dumps(source))
  with concurrent.futures.ThreadPoolExecutor(8) as pool:
    texts = list(pool.map(lambda i: clone[i]["text"], list(range(300)) * 3))
  assert texts == [f"row {i}" for i in range(300)] * 3


def test_parquet_source_reads_row_groups_and_both_image_layouts(tmp_path):
  pa = pytest.importorskip("pyarrow")
  pq = pytest.importorskip("pyarrow.parquet")
  table = pa.table({"text": [f"t{i}" for i in range(7)] + [None],
                    "images": [[f"im{i}.png"] for i in range(7)] + [None]})
  path = str(tmp_path / "many.parquet")
  pq.write_table(table, path, row_group_size=3)
  source = sources.ParquetSource(path, "pq", cached_row_groups=1)
  assert len(source) == 8
  for i in [6, 0, 4, 1, 5]:  # jumps between row groups
    record = source[i]
    assert record["text"] == f"t{i}" and record["error"] is None
    assert record["images"] == [os.path.join(str(tmp_path), f"im{i}.png")]
    assert record["where"] == f"{path}:row {i + 1}"
  assert "missing field 'text'" in source[7]["error"]
  single = str(tmp_path / "single.parquet")
  pq.write_table(pa.table({"text": ["a", "b"], "image": ["x.png", None],
                           "extra": [1, 2]}), single)
  single_source = pickle.loads(pickle.dumps(sources.ParquetSource(single, "single")))
  assert single_source[0]["images"] == [os.path.join(str(tmp_path), "x.png")]
  assert single_source[1]["images"] == []
  encoded = str(tmp_path / "bytes.parquet")
  pq.write_table(pa.table({"text": ["a"], "image": [{"bytes": b"\x89PNG", "path": None}]}), encoded)
  assert sources.ParquetSource(encoded, "bytes")[0]["images"] == [b"\x89PNG"]


def test_parquet_without_text_column_fails_at_construction(tmp_path):
  pa = pytest.importorskip("pyarrow")
  pq = pytest.importorskip("pyarrow.parquet")
  path = str(tmp_path / "notext.parquet")
  pq.write_table(pa.table({"caption": ["a"]}), path)
  with pytest.raises(ValueError, match=r"notext.parquet: Parquet file has no column 'text'"):
    sources.ParquetSource(path, "notext")


def test_array_record_source_reads_json_records(tmp_path):
  array_record_module = pytest.importorskip("array_record.python.array_record_module")
  path = str(tmp_path / "rows.array_record")
  writer = array_record_module.ArrayRecordWriter(path, "group_size:1")
  for payload in [json.dumps({"text": "a", "images": ["i/a.png"]}).encode(), b"\xff{broken",
                  json.dumps({"text": "c"}).encode()]:
    writer.write(payload)
  writer.close()
  source = pickle.loads(pickle.dumps(sources.ArrayRecordSource(path, "ar")))
  assert len(source) == 3
  assert source[0]["images"] == [os.path.join(str(tmp_path), "i", "a.png")]
  assert source[0]["where"] == f"{path}:record 1"
  assert "malformed JSON" in source[1]["error"] and source[1]["where"] == f"{path}:record 2"
  assert source[2]["text"] == "c"


def test_open_source_concatenates_glob_matches(tmp_path):
  for k in range(3):
    _write_jsonl(tmp_path / f"part-{k}.jsonl",
                 [json.dumps({"text": f"{k}-{i}"}) for i in range(k + 1)])
  source = sources.open_source("jsonl", str(tmp_path / "part-*.jsonl"), "parts")
  assert len(source) == 6
  assert [source[i]["text"] for i in range(6)] == ["0-0", "1-0", "1-1", "2-0", "2-1", "2-2"]
  assert source[3]["where"].endswith("part-2.jsonl:1")
  with pytest.raises(ValueError, match="matches no file"):
    sources.open_source("jsonl", str(tmp_path / "none-*.jsonl"), "none")
  with pytest.raises(ValueError, match="unknown kind 'csv'"):
    sources.open_source("csv", str(tmp_path / "part-0.jsonl"), "x")


def test_tfds_source_adapts_records(monkeypatch):
  """The TFDS adapter on a stand-in `tensorflow_datasets` module (runs without TFDS)."""
  calls = {}

  def data_source(name, split, data_dir):
    calls.update(name=name, split=split, data_dir=data_dir)
    return [{"text": b"caption <image>", "image": np.zeros((5, 6, 3), np.uint8)},
            {"text": b"two", "images": np.zeros((2, 4, 4, 3), np.uint8)},
            {"label": 3}]

  fake_tfds = types.SimpleNamespace(data_source=data_source)
  monkeypatch.setitem(sys.modules, "tensorflow_datasets", fake_tfds)
  source = sources.open_source("tfds", "pixelprose:validation", "pp", data_dir="/data/tfds")
  assert calls == {"name": "pixelprose", "split": "validation", "data_dir": "/data/tfds"}
  assert len(source) == 3
  assert source[0]["text"] == "caption <image>" and source[0]["images"][0].shape == (5, 6, 3)
  assert len(source[1]["images"]) == 2
  assert "missing field 'text'" in source[2]["error"]
  assert source[2]["where"] == "tfds pixelprose:validation:record 3"


def test_tfds_absent_gives_a_clear_error(monkeypatch):
  monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)  # import fails as if not installed
  with pytest.raises(ImportError, match="needs tensorflow-datasets"):
    sources.open_source("tfds", "mnist", "digits")


def test_tfds_source_with_real_tfds():
  tfds = pytest.importorskip("tensorflow_datasets")
  with tfds.testing.mock_data(num_examples=2):
    source = sources.TfdsSource("mnist:train", "digits")
    assert len(source) == 2
    assert "missing field 'text'" in source[0]["error"]  # mnist has no text
