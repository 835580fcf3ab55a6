"""The MMEB and ViDoRe evaluators' bookkeeping, with an embedding whose scores are known by hand.

`_embed` maps a row to a unit vector chosen by its text ("<anything> #k" -> axis k), so which
candidate wins is decided in the test, and the evaluators' reading, deduplication, bad-row
handling and averaging are what is checked. The real model goes through them in test_round_trip.py.
"""
import json
import os

import numpy as np
import pytest

from mmembed_jax.data.prompts import PromptFormat
from mmembed_jax.evaluation import mmeb, vidore

DIM = 16


def _embed(rows):
  """Row -> e_k for text ending in "#k"; rows with an image add 0.5 * e_15 (then renormalised).
  A row whose text holds "FAIL" cannot be embedded (as a truncated image cannot)."""
  out = np.zeros((len(rows), DIM), np.float32)
  errors = {}
  for i, row in enumerate(rows):
    out[i, int(row["text"].rsplit("#", 1)[1])] = 1.0
    if row["images"]:
      out[i, DIM - 1] += 0.5
    if "FAIL" in row["text"]:
      errors[i] = f"{row['where']}: cannot embed it"
  return out / np.linalg.norm(out, axis=1, keepdims=True), errors


class _Counting:
  """_embed that records every row it was given."""

  def __init__(self):
    self.rows = []

  def __call__(self, rows):
    self.rows += rows
    return _embed(rows)


def _write_jsonl(path, rows):
  with open(path, "w") as f:
    for row in rows:
      f.write((row if isinstance(row, str) else json.dumps(row)) + "\n")


@pytest.fixture
def mmeb_dir(tmp_path):
  """Two datasets: a classification set (3 shared labels) and a retrieval set with images."""
  from PIL import Image
  Image.new("RGB", (40, 30), (200, 10, 10)).save(tmp_path / "a.png")
  labels = ["cat #1", "dog #2", "bird #3"]
  rows = [
      {"qry_text": "<|image_1|> classify #1", "qry_img_path": "a.png", "tgt_text": labels,
       "tgt_img_path": ["", "", ""]},  # truth cat: hit
      {"qry_text": "<|image_1|> classify #2", "qry_img_path": "a.png",
       "tgt_text": [labels[2], labels[0], labels[1]], "tgt_img_path": ["", "", ""]},  # truth bird: miss
      {"qry_text": "classify #3", "qry_img_path": "", "tgt_text": [labels[2], labels[2], labels[0]],
       "tgt_img_path": ["", "", ""]},  # truth duplicated at 1: tie goes to 0: hit
      {"qry_text": "classify #2", "qry_img_path": "", "tgt_text": labels,
       "tgt_img_path": ["", "", ""]},  # truth cat, query dog: miss
      "{not json",
      {"qry_text": "classify #1", "qry_img_path": "missing.png", "tgt_text": labels},
      {"qry_text": "classify #1", "tgt_text": ["cat #1"], "tgt_img_path": ["", ""]},
  ]
  _write_jsonl(tmp_path / "ImageNet-1K.jsonl", rows)
  retrieval = [
      {"qry_inst": "Find the image", "qry_text": "#4", "qry_img_path": "",
       "tgt_text": ["<|image_1|> photo #4", "<|image_1|> photo #5"],
       "tgt_img_path": ["a.png", "a.png"]},  # hit
      {"qry_text": "#6", "qry_img_path": "", "tgt_text": ["<|image_1|> photo #5", "other #6"],
       "tgt_img_path": ["a.png", ""]},  # miss
  ]
  _write_jsonl(tmp_path / "my_retrieval.jsonl", retrieval)
  (tmp_path / "meta_tasks.json").write_text(json.dumps({"my_retrieval": "retrieval"}))
  return str(tmp_path)


def test_mmeb_scores_dedups_and_skips_bad_rows(mmeb_dir, caplog):
  embed = _Counting()
  result = mmeb.evaluate_mmeb(embed, mmeb_dir)
  classification = result["details"]["ImageNet-1K"]
  assert classification["rows"] == 4 and classification["bad_rows"] == 3
  assert classification["candidates_encoded"] == 3  # 3 labels, 12 slots
  assert result["per_dataset"] == {"ImageNet-1K": 0.5, "my_retrieval": 0.5}
  assert result["per_task"] == {"classification": 0.5, "retrieval": 0.5}
  assert result["overall"] == 0.5
  texts = [row["text"] for row in embed.rows]
  assert texts.count("cat #1") == 1
  # An MMEB-V2 style row keeps its instruction beside its text, for the model's prompt format;
  # the default format renders them as before: instruction, a space, the text.
  [instructed] = [row for row in embed.rows if row.get("instruction")]
  assert (instructed["text"], instructed["instruction"], instructed["role"]) == (
      "#4", "Find the image", "query")
  assert PromptFormat().render(instructed["text"], instructed["instruction"]) == "Find the image #4"
  assert "<image> classify #1" in texts  # <|image_1|> became the model's marker
  bad = "\n".join(r.getMessage() for r in caplog.records)
  assert "ImageNet-1K.jsonl:5" in bad and "ImageNet-1K.jsonl:6" in bad and "missing.png" in bad
  assert "ImageNet-1K.jsonl:7" in bad and "'tgt_img_path' has 2" in bad
  assert "ImageNet-1K" in mmeb.format_table(result)


def test_rows_whose_query_or_candidate_cannot_be_embedded_are_skipped_and_named(tmp_path, caplog):
  """The embed function reports the rows it could not embed (a truncated image, say): their
  dataset rows are left out of the score, counted and named by FILE:LINE, and the evaluation
  goes on; so are lines that are not UTF-8 and Parquet files that cannot be read."""
  _write_jsonl(tmp_path / "ImageNet-1K.jsonl", [
      {"qry_text": "q #1", "tgt_text": ["cat #1", "dog #2"]},  # hit
      {"qry_text": "q FAIL #1", "tgt_text": ["cat #1", "dog #2"]},  # the query fails
      {"qry_text": "q #3", "tgt_text": ["bird FAIL #3", "dog #2"]}])  # a candidate fails
  with open(tmp_path / "ImageNet-1K.jsonl", "ab") as f:
    f.write(b'{"qry_text": "caf\xe9 #1", "tgt_text": ["cat #1"]}\n')  # line 4: Latin-1
  (tmp_path / "N24News.parquet").write_bytes(b"PAR1 truncated")
  with caplog.at_level("WARNING"):
    result = mmeb.evaluate_mmeb(_embed, str(tmp_path))
  details = result["details"]["ImageNet-1K"]
  assert (details["rows"], details["bad_rows"], details["precision_at_1"]) == (1, 3, 1.0)
  assert (result["details"]["N24News"]["rows"], result["details"]["N24News"]["bad_rows"]) == (0, 1)
  assert result["overall"] == 1.0  # datasets without a scored row are left out of the means
  logged = "\n".join(r.getMessage() for r in caplog.records)
  path = tmp_path / "ImageNet-1K.jsonl"
  assert f"{path}:2: cannot embed it" in logged
  assert f"{path}:3: a candidate cannot be embedded ({path}:3: candidate 0: cannot embed it)" in logged
  assert f"{path}:4: not UTF-8" in logged
  assert f"{tmp_path / 'N24News.parquet'}: cannot read the Parquet file" in logged


def test_mmeb_dataset_selection_and_errors(mmeb_dir, tmp_path_factory):
  tmp_path = tmp_path_factory.mktemp("other")
  result = mmeb.evaluate_mmeb(_embed, mmeb_dir, datasets=["my_retrieval"], max_rows=1)
  assert result["per_dataset"] == {"my_retrieval": 1.0}
  with pytest.raises(ValueError, match=r"no dataset \['nope'\]"):
    mmeb.evaluate_mmeb(_embed, mmeb_dir, datasets=["nope"])
  os.remove(os.path.join(mmeb_dir, "meta_tasks.json"))
  with pytest.raises(ValueError, match="my_retrieval"):
    mmeb.evaluate_mmeb(_embed, mmeb_dir)
  (tmp_path / "empty").mkdir()
  with pytest.raises(FileNotFoundError, match="no MMEB datasets"):
    mmeb.evaluate_mmeb(_embed, str(tmp_path / "empty"))


def test_vidore_ndcg_with_graded_and_several_relevant_pages(tmp_path):
  from PIL import Image
  root = tmp_path / "docs"
  (root / "images").mkdir(parents=True)
  for k in range(4):
    Image.new("RGB", (28, 28), (k * 60, 0, 0)).save(root / "images" / f"p{k}.png")
  # Page k embeds along axis k via the template "... #k"; query q1 points along axis 1.
  corpus = [{"corpus-id": f"p{k}", "image": f"images/p{k}.png"} for k in range(4)]
  _write_jsonl(root / "corpus.jsonl", corpus + [{"corpus-id": "gone", "image": "images/x.png"}])
  _write_jsonl(root / "queries.jsonl", [{"query-id": "q1", "query": "first"},
                                        {"query-id": "q2", "query": "second"},
                                        {"query-id": "q3", "query": "unjudged"}])
  _write_jsonl(root / "qrels.jsonl", [{"query-id": "q1", "corpus-id": "p1", "score": 1},
                                      {"query-id": "q1", "corpus-id": "p2", "score": 2},
                                      {"query-id": "q2", "corpus-id": "p3", "score": 1}])
  axes = {"first": 1, "second": 0, "unjudged": 2}

  def embed(rows):
    out = []
    for row in rows:
      if row["images"]:
        k = int(os.path.basename(row["images"][0])[1])
        vector = np.eye(DIM)[k] + (0.5 * np.eye(DIM)[1] if k == 2 else 0)  # p2 second for q1
      else:
        vector = np.eye(DIM)[axes[row["text"].rsplit(": ", 1)[1]]]
      out.append(vector / np.linalg.norm(vector))
    return np.asarray(out, np.float32), {}

  from mmembed_jax.training.trained_model import export_mesh
  result = vidore.evaluate_vidore(embed, str(root), export_mesh(), k_values=(1, 5))
  scores = result["per_dataset"]["docs"]
  # q1 ranks p1 (rel 1) then p2 (rel 2): DCG = 1 + 2/log2(3); IDCG = 2 + 1/log2(3).
  q1 = (1 + 2 / np.log2(3)) / (2 + 1 / np.log2(3))
  # q2 ranks p0 first (1.0), then p1, p2, p3 tie at 0: pytrec_eval orders ties by id,
  # descending, so p3 comes second: DCG = 1/log2(3), IDCG = 1.
  q2 = 1 / np.log2(3)
  assert scores["ndcg_at_5"] == pytest.approx((q1 + q2) / 2, abs=1e-6)
  assert scores["ndcg_at_1"] == pytest.approx((1 / 2 + 0) / 2, abs=1e-6)
  assert scores["recall_at_1"] == pytest.approx((0.5 + 0) / 2)
  assert scores["recall_at_5"] == pytest.approx(1.0)
  assert scores["bad_rows"] == 1 and scores["corpus"] == 4 and scores["queries"] == 3
  assert result["ndcg_at_5"] == scores["ndcg_at_5"]
  # Corpus order: the tied p1, p2, p3 keep the corpus's order and p3 comes fourth.
  corpus_order = vidore.evaluate_vidore(embed, str(root), export_mesh(), k_values=(5,),
                                        scoring="corpus_order")
  assert corpus_order["ndcg_at_5"] == pytest.approx((q1 + 1 / np.log2(5)) / 2, abs=1e-6)
  assert "docs" in vidore.format_table(result)


def test_mmeb_table():
  from mmembed_jax.data import mmeb as mmeb_data
  import collections
  assert len(mmeb_data.MMEB_EVAL) == len(mmeb_data.MMEB_EVAL_BY_NAME) == 36
  counts = collections.Counter(t.meta_task for t in mmeb_data.MMEB_EVAL)
  assert counts == {"classification": 10, "vqa": 10, "retrieval": 12, "grounding": 4}
  assert sum(t.in_distribution for t in mmeb_data.MMEB_EVAL) == 20
  # The in-distribution sets are the training sets (MMEB_TRAIN spells ImageNet_1K).
  assert {t.name for t in mmeb_data.MMEB_EVAL if t.in_distribution} == {
      n.replace("ImageNet_1K", "ImageNet-1K") for n in mmeb_data.MMEB_TRAIN}
  assert mmeb_data.meta_task_of("my_set", {"my_set": "vqa"}) == "vqa"
