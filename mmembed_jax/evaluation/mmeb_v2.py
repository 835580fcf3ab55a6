"""MMEB-V2: the leaderboard's 78 tasks (36 image, 18 video, 24 visual-document), scored and
summarised as the leaderboard does.

  python launch/evaluate.py --model runs/moca_cl --mmeb_v2 data/MMEB-V2 [--tasks image,visdoc]

The task table is data, `tables/mmeb_v2.json` (from VLM2Vec's release; the commit and files are
named in it): per task its modality, meta-task, format, candidate pool, metric, frame count,
query and candidate instructions and the Hugging Face dataset it comes from. A local MMEB-V2
directory holds one entry per task under its modality:

  DIR/image/NAME.jsonl | NAME.parquet | NAME/*.parquet   MMEB rows (evaluation/mmeb.py): qry_inst,
                                                         qry_text, qry_img_path, tgt_inst,
                                                         tgt_text, tgt_img_path; images resolve
                                                         against DIR/image
  DIR/visdoc/NAME/{queries,corpus,qrels}                 BEIR layout (evaluation/vidore.py)
  DIR/video/NAME/...                                     video tasks: not evaluated yet (listed
                                                         as such in the results)

Scores: hit@1 for image and video tasks (candidate 0 is the truth; ties go to it, as
mmeb.py), NDCG@5 with linear gains for visual documents, ranked over the task's whole corpus
(`scoring` as in vidore.py: pytrec_eval's conventions by default). A meta-task's and a
modality's score are the plain means over their tasks, and "overall" the plain mean over all
tasks (so with all 78, (36 image + 18 video + 24 visdoc) / 78, not the mean of the modalities).
`write_results` writes OUT/{modality}/{NAME}_score.json per task and OUT/submission.json in the
layout of VLM2Vec's `experiments/report_score_v2.py`.
"""
import dataclasses
import json
import logging
import os
import time
from typing import Any, Dict, List, Optional, Sequence, Union

import numpy as np
from etils import epath

from mmembed_jax.evaluation import mmeb, vidore

log = logging.getLogger(__name__)

TABLE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tables", "mmeb_v2.json")
MODALITIES = ("image", "video", "visdoc")
MAIN_METRIC = {"image": "hit@1", "video": "hit@1", "visdoc": "ndcg_linear@5"}
EVALUATED_FORMATS = ("mmeb_rows", "beir")  # the video formats come with the video evaluation


@dataclasses.dataclass(frozen=True)
class Task:
  """One MMEB-V2 task as the leaderboard counts it (fields: tables/mmeb_v2.json)."""
  name: str
  modality: str  # image | video | visdoc
  meta_task: str  # I-CLS, I-QA, I-RET, I-VG, V-CLS, V-QA, V-RET, V-MRET, ViDoRe-V1, ...
  format: str  # mmeb_rows | beir | video_classification | video_qa | video_retrieval | ...
  candidates: str  # "row": each query's own list; "corpus": the task's whole pool
  metric: str  # hit@1 | ndcg_linear@5
  num_frames: Optional[int]  # frames per video (video tasks)
  queries: int  # queries in the released data
  query_instruction: Union[str, Dict[str, str]]  # by query kind where it depends on it
  candidate_instruction: Optional[str]  # None: candidates are bare text (labels, answers)
  hf_dataset: str  # "repo" or "repo:subset"
  split: str
  vlm2vec_parser: str  # the loader in VLM2Vec's code that reads it


def load_tasks(path: str = TABLE) -> Dict[str, Task]:
  """{name: Task} of the table, in the leaderboard's order."""
  with open(path, encoding="utf-8") as f:
    return {row["name"]: Task(**row) for row in json.load(f)["tasks"]}


TASKS = load_tasks()


def select(spec: Optional[Sequence[str]] = None) -> List[Task]:
  """Tasks named by modality (image, video, visdoc) and/or task name; None: all 78."""
  if not spec:
    return list(TASKS.values())
  unknown = [s for s in spec if s not in MODALITIES and s not in TASKS]
  if unknown:
    raise ValueError(f"unknown MMEB-V2 tasks {unknown}; expected a modality {MODALITIES} or task "
                     f"names such as {list(TASKS)[:3]} (tables/mmeb_v2.json)")
  return [t for t in TASKS.values() if t.modality in spec or t.name in spec]


def task_path(root: str, task: Task) -> Optional[str]:
  """Where the task's data sit under an MMEB-V2 directory, or None."""
  base = epath.Path(root) / task.modality
  if task.format == "mmeb_rows":
    found = mmeb.list_datasets(str(base)) if base.is_dir() else {}
    return found.get(task.name)
  path = base / task.name
  return str(path) if path.is_dir() else None


def summarize(scores: Dict[str, float]) -> Dict[str, Any]:
  """{"overall", "per_modality", "per_meta_task", "tasks"} of {task name: main score}: plain
  means over tasks (the leaderboard's)."""
  tasks = [TASKS[name] for name in scores]
  def mean(names):
    return float(np.mean([scores[n] for n in names]))
  per_modality = {m: mean([t.name for t in tasks if t.modality == m])
                  for m in MODALITIES if any(t.modality == m for t in tasks)}
  meta_tasks = dict.fromkeys(t.meta_task for t in TASKS.values())  # the table's order
  per_meta_task = {k: mean([t.name for t in tasks if t.meta_task == k])
                   for k in meta_tasks if any(t.meta_task == k for t in tasks)}
  return {"overall": mean(list(scores)) if scores else float("nan"),
          "per_modality": per_modality, "per_meta_task": per_meta_task, "tasks": len(scores)}


def _image_task(embed: vidore.EmbedFn, task: Task, path: str, image_root: str,
                max_rows: Optional[int]) -> Dict[str, Any]:
  dataset = mmeb.read_dataset(task.name, path, image_root, task.meta_task, max_rows)
  result = mmeb.score_dataset(embed, dataset)
  for bad in dataset.bad_rows[:5]:
    log.warning("skipped %s", bad)
  return {"hit@1": result["precision_at_1"], "num_pred": result["rows"],
          "num_data": result["rows"] + result["bad_rows"], "bad_rows": result["bad_rows"]}


def _document_task(embed: vidore.EmbedFn, task: Task, path: str, mesh: Any,
                   scoring: str) -> Dict[str, Any]:
  result = vidore.evaluate_vidore(
      embed, os.path.dirname(path), mesh, [os.path.basename(path)], k_values=(1, 5, 10),
      scoring=scoring, instructions=(task.query_instruction, task.candidate_instruction))
  scores = result["per_dataset"][os.path.basename(path)]
  out = {f"{metric}@{k}": scores[f"{name}_at_{k}"] for k in (1, 5, 10)
         for name, metric in (("ndcg", "ndcg_linear"), ("recall", "recall"))}
  out.update(num_pred=scores["queries"], num_data=scores["queries"] + scores["bad_rows"],
             bad_rows=scores["bad_rows"])
  return out


def evaluate_mmeb_v2(embed: vidore.EmbedFn, root: str, mesh: Any,
                     tasks: Optional[Sequence[str]] = None, max_rows: Optional[int] = None,
                     scoring: str = "pytrec_eval") -> Dict[str, Any]:
  """{"summary", "per_task": {name: scores}, "not_run": {name: why}} of the selected tasks
  found under root. A task named explicitly must be there; of a whole modality (or all 78),
  those missing are listed in "not_run", as are the video tasks (not evaluated yet)."""
  chosen = select(tasks)
  per_task, not_run = {}, {}
  for task in chosen:
    path = task_path(root, task)
    if path is None:
      if tasks and task.name in tasks:
        raise ValueError(f"{root}: no data for MMEB-V2 task {task.name} (expected "
                         f"{task.modality}/{task.name}, see mmembed_jax/evaluation/mmeb_v2.py)")
      not_run[task.name] = "no data"
      continue
    if task.format not in EVALUATED_FORMATS:
      not_run[task.name] = f"format {task.format} is not evaluated yet"
      continue
    start = time.perf_counter()
    if task.format == "mmeb_rows":
      scores = _image_task(embed, task, path, os.path.join(root, task.modality), max_rows)
    else:
      scores = _document_task(embed, task, path, mesh, scoring)
    scores["seconds"] = time.perf_counter() - start
    per_task[task.name] = scores
    log.info("%s: %s %.4f (%d queries, %.1fs)", task.name, task.metric, scores[task.metric],
             scores["num_pred"], scores["seconds"])
  summary = summarize({name: s[TASKS[name].metric] for name, s in per_task.items()})
  return {"summary": summary, "per_task": per_task, "not_run": not_run, "scoring": scoring}


def write_results(result: Dict[str, Any], out_dir: str, metadata: Dict[str, Any]) -> str:
  """OUT/{modality}/{NAME}_score.json per task and OUT/submission.json ({"metadata",
  "metrics": {modality: {NAME: scores}}}, report_score_v2's layout); returns the latter's path."""
  from mmembed_jax.embedding import save_json  # pylint: disable=g-import-not-at-top
  metrics: Dict[str, Dict[str, Any]] = {m: {} for m in MODALITIES}
  for name, scores in result["per_task"].items():
    modality = TASKS[name].modality
    record = {k: v for k, v in scores.items() if k not in ("seconds", "bad_rows")}
    save_json(os.path.join(out_dir, modality, f"{name}_score.json"), record)
    metrics[modality][name] = record
  return save_json(os.path.join(out_dir, "submission.json"),
                   {"metadata": metadata, "metrics": metrics})


def format_table(result: Dict[str, Any]) -> str:
  """The console table: per task, then per meta-task, per modality and overall (percent)."""
  lines = [f"{'task':<46}{'meta-task':<12}{'metric':<15}{'score':>8}{'queries':>9}"]
  for name, scores in result["per_task"].items():
    task = TASKS[name]
    lines.append(f"{name:<46}{task.meta_task:<12}{task.metric:<15}"
                 f"{100 * scores[task.metric]:>8.2f}{scores['num_pred']:>9}")
  summary = result["summary"]
  for values in (summary["per_meta_task"], summary["per_modality"]):
    for name, value in values.items():
      lines.append(f"{'[' + name + ']':<73}{100 * value:>8.2f}")
  overall = f"[overall, {summary['tasks']} of {len(TASKS)} tasks]"
  lines.append(f"{overall:<73}{100 * summary['overall']:>8.2f}")
  if result["not_run"]:
    lines.append(f"not run: {len(result['not_run'])} task(s), e.g. "
                 + "; ".join(f"{n} ({why})" for n, why in list(result["not_run"].items())[:3]))
  return "\n".join(lines)
