"""The sample evaluation sets: deterministic, reused, complete, and candidate 0 is the truth."""
import collections
import json
import os

from mmembed_jax.data import mmeb
from mmembed_jax.demo import eval_sets


def _rows(path):
  return [json.loads(line) for line in open(path)]


def test_mmeb_sample_set(tmp_path):
  paths = eval_sets.write_demo_mmeb(str(tmp_path / "a"), rows_per_dataset=6)
  again = eval_sets.write_demo_mmeb(str(tmp_path / "b"), rows_per_dataset=6)
  meta_tasks = json.loads((tmp_path / "a" / "meta_tasks.json").read_text())
  assert set(meta_tasks) == set(paths) and set(meta_tasks.values()) == set(mmeb.META_TASKS)
  for name, path in paths.items():
    assert open(path, "rb").read() == open(again[name], "rb").read()
    rows = _rows(path)
    assert len(rows) == 6
    for row in rows:
      assert len(row["tgt_text"]) == len(row["tgt_img_path"]) >= 2
      for image in [row["qry_img_path"], *row["tgt_img_path"]]:
        assert not image or os.path.isfile(tmp_path / "a" / image)
  first = _rows(paths["shape_classification"])[0]
  assert first["tgt_text"][0] == first["tgt_text"][-1]  # the deliberate duplicate of the truth
  for row in _rows(paths["caption_retrieval"]):  # the truth is the scene the caption was drawn from
    assert row["tgt_img_path"][0].endswith(".png") and "_neg" not in row["tgt_img_path"][0]
  mtime = os.path.getmtime(paths["document_vqa"])
  assert eval_sets.write_demo_mmeb(str(tmp_path / "a"), rows_per_dataset=6) == paths
  assert os.path.getmtime(paths["document_vqa"]) == mtime  # reused, not rewritten


def test_vidore_sample_set(tmp_path):
  root = eval_sets.write_demo_vidore(str(tmp_path), num_pages=9)["document_pages"]
  corpus = {r["corpus-id"]: r["image"] for r in _rows(os.path.join(root, "corpus.jsonl"))}
  queries = {r["query-id"] for r in _rows(os.path.join(root, "queries.jsonl"))}
  qrels = _rows(os.path.join(root, "qrels.jsonl"))
  assert all(os.path.isfile(os.path.join(root, image)) for image in corpus.values())
  assert {r["query-id"] for r in qrels} == queries and {r["corpus-id"] for r in qrels} <= set(corpus)
  per_query = collections.Counter(r["query-id"] for r in qrels)
  assert max(per_query.values()) == 2 and min(per_query.values()) == 1  # several relevant pages
  assert {r["score"] for r in qrels} == {1, 2}
  assert set(corpus) - {r["corpus-id"] for r in qrels}  # pages nobody asks about
