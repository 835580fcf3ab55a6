"""MMEB-V2: the task table against the leaderboard's counts, its summary arithmetic, and a run
over the sample set that writes the leaderboard's files."""
import collections
import hashlib
import json

import numpy as np
import pytest

from mmembed_jax.demo.eval_sets import MMEB_V2_IMAGE, MMEB_V2_VISDOC, write_demo_mmeb_v2
from mmembed_jax.evaluation import mmeb_v2

# The leaderboard's columns (VLM2Vec's experiments/report_score_v2.py, its published tables).
COUNTS = {"image": {"I-CLS": 10, "I-QA": 10, "I-RET": 12, "I-VG": 4},
          "video": {"V-CLS": 5, "V-QA": 5, "V-RET": 5, "V-MRET": 3},
          "visdoc": {"ViDoRe-V1": 10, "ViDoRe-V2": 4, "VisRAG": 6, "VisDoc-OOD": 4}}


def test_table_has_the_leaderboards_78_tasks():
  tasks = mmeb_v2.load_tasks()
  assert len(tasks) == 78
  counted = collections.defaultdict(collections.Counter)
  for task in tasks.values():
    counted[task.modality][task.meta_task] += 1
  assert {m: dict(c) for m, c in counted.items()} == COUNTS
  for task in tasks.values():  # every task resolves to a format, instructions and a metric
    assert task.metric == mmeb_v2.MAIN_METRIC[task.modality], task.name
    assert task.format and task.candidates in ("row", "corpus"), task.name
    assert task.query_instruction, task.name
    assert (task.num_frames == 8) == (task.modality == "video"), task.name
    if task.modality == "visdoc":
      assert task.format == "beir" and task.candidates == "corpus" and task.candidate_instruction
  assert tasks["MSCOCO_i2t"].candidate_instruction is None  # bare captions
  assert set(tasks["MomentSeeker"].query_instruction) == {"text", "image", "video"}


def test_selection_by_modality_and_name():
  assert len(mmeb_v2.select(["video"])) == 18
  assert [t.name for t in mmeb_v2.select(["K700", "ViDoRe_docvqa"])] == ["K700", "ViDoRe_docvqa"]
  assert len(mmeb_v2.select(["image", "K700"])) == 37
  with pytest.raises(ValueError, match="Imagenet"):
    mmeb_v2.select(["Imagenet"])


def test_summary_is_the_mean_over_tasks_not_over_modalities():
  scores = {t.name: 0.0 for t in mmeb_v2.TASKS.values()}
  scores.update({t.name: 1.0 for t in mmeb_v2.select(["image"])})  # 36 of 78 tasks score 1
  summary = mmeb_v2.summarize(scores)
  assert summary["overall"] == pytest.approx(36 / 78)  # not (1 + 0 + 0) / 3
  assert summary["per_modality"] == {"image": 1.0, "video": 0.0, "visdoc": 0.0}
  assert summary["per_meta_task"]["I-RET"] == 1.0 and summary["per_meta_task"]["VisRAG"] == 0.0
  assert list(summary["per_meta_task"])[:4] == ["I-CLS", "I-QA", "I-RET", "I-VG"]
  scores["ViDoRe_docvqa"] = 0.5  # one of the 10 ViDoRe-V1 tasks
  assert mmeb_v2.summarize(scores)["per_meta_task"]["ViDoRe-V1"] == pytest.approx(0.05)


def _embed(rows):
  """A deterministic stand-in model: a vector from a hash of the text and image bytes."""
  out = []
  for row in rows:
    digest = hashlib.sha256(row["text"].encode())
    for path in row["images"]:
      with open(path, "rb") as f:
        digest.update(f.read())
    vector = np.random.default_rng(int.from_bytes(digest.digest()[:8], "little")).normal(size=8)
    out.append(vector / np.linalg.norm(vector))
  return np.asarray(out, np.float32), {}


def test_sample_set_run_writes_the_leaderboards_files(tmp_path):
  from mmembed_jax.training.trained_model import export_mesh
  root = tmp_path / "mmeb_v2"
  written = write_demo_mmeb_v2(str(root))
  assert set(written) == set(MMEB_V2_IMAGE.values()) | {MMEB_V2_VISDOC}
  result = mmeb_v2.evaluate_mmeb_v2(_embed, str(root), export_mesh())
  assert set(result["per_task"]) == set(written)
  assert len(result["not_run"]) == 78 - len(written)
  assert result["not_run"]["K700"] == "no data"
  image = result["per_task"]["ImageNet-1K"]
  assert 0 <= image["hit@1"] <= 1 and image["num_pred"] == image["num_data"] == 16
  pages = result["per_task"][MMEB_V2_VISDOC]
  assert 0 <= pages["ndcg_linear@5"] <= 1 and pages["num_pred"] > 0
  summary = result["summary"]
  main = {name: scores[mmeb_v2.TASKS[name].metric] for name, scores in result["per_task"].items()}
  assert summary["overall"] == pytest.approx(np.mean(list(main.values())))
  assert summary["per_modality"]["image"] == pytest.approx(
      np.mean([main[n] for n in MMEB_V2_IMAGE.values()]))

  submission = mmeb_v2.write_results(result, str(tmp_path / "out"), {"model_name": "stand-in"})
  record = json.loads(open(submission, encoding="utf-8").read())
  assert record["metadata"] == {"model_name": "stand-in"}
  assert set(record["metrics"]) == {"image", "video", "visdoc"}
  assert record["metrics"]["image"]["ImageNet-1K"]["hit@1"] == image["hit@1"]
  per_task_file = json.loads((tmp_path / "out" / "visdoc" / f"{MMEB_V2_VISDOC}_score.json"
                              ).read_text())
  assert per_task_file["ndcg_linear@5"] == pages["ndcg_linear@5"]
  table = mmeb_v2.format_table(result)
  assert "[overall, 5 of 78 tasks]" in table and "not run: 73 task(s)" in table

  with pytest.raises(ValueError, match="no data for MMEB-V2 task K700"):
    mmeb_v2.evaluate_mmeb_v2(_embed, str(root), export_mesh(), tasks=["K700"])
