"""MMEB (v1) evaluation: Precision@1 per dataset, per meta-task and overall (METHODS.md §4).

A dataset is a table (JSONL or Parquet) at DIR/NAME.jsonl, DIR/NAME.parquet or DIR/NAME/*.parquet
(the Hugging Face TIGER-Lab/MMEB-eval layout). Each row:

  qry_text       the query text, instruction included; `<|image_1|>` marks the query image
  qry_inst       optional instruction, put before qry_text (MMEB-V2 style rows)
  tgt_inst       optional candidate instruction (one string, or one per candidate), put before
                 each tgt_text
  qry_img_path   the query image ("" or null: none), relative to the image root
  tgt_text       list: one text per candidate (instruction included for image candidates)
  tgt_img_path   list: one image per candidate ("" for text-only candidates)

Candidate 0 is the ground truth. Each dataset's candidates are encoded once, however many rows
share them (MMEB's classification rows all hold the same labels), and queries and candidates go
through the embedder sorted by size, so batches of similar shapes share compiled programs. A row
that cannot be read (bad JSON, not UTF-8, a missing field, a missing image, an unreadable
Parquet file) or whose query or one of whose candidates cannot be embedded (a truncated image,
say) is skipped, counted and named by FILE:LINE. Scores: P@1 per dataset (`metrics.mmeb_precision_at_1`: ties go to the earlier
candidate, as in VLM2Vec), the mean of its datasets per meta-task, and the mean of all datasets
overall (VLM2Vec's "overall"), all as fractions in [0, 1]. The meta-task of a dataset comes from
`mmembed_jax.data.mmeb.MMEB_EVAL`, or for other datasets from DIR/meta_tasks.json ({name: task}).
"""
import dataclasses
import json
import logging
import os
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
from etils import epath

from mmembed_jax.data import mmeb as mmeb_data
from mmembed_jax.data import pairs
from mmembed_jax.evaluation import metrics, tables

log = logging.getLogger(__name__)

# rows {"text", "images", "where"} -> (embeddings [rows, d], {row index: why it failed}), e.g.
# JaxEmbedder.try_embed_rows; the rows that failed are left out of the scores.
EmbedFn = Callable[[Sequence[Dict[str, Any]]], Tuple[np.ndarray, Dict[int, str]]]
META_TASKS_FILE = "meta_tasks.json"


@dataclasses.dataclass
class MmebDataset:
  """One dataset's rows, ready to embed: queries, unique candidates, each row's candidate ids."""
  name: str
  meta_task: str
  queries: List[Dict[str, Any]]  # row-convention rows {"text", "images", "where"}
  candidates: List[Dict[str, Any]]  # distinct candidates of the whole dataset
  row_candidates: List[np.ndarray]  # per query: indices into `candidates`, truth first
  bad_rows: List[str]  # "FILE:LINE: why"


def list_datasets(root: str) -> Dict[str, str]:
  """{dataset name: table file or directory} of an MMEB directory."""
  out = {}
  for path in sorted(epath.Path(root).iterdir()):
    if path.is_dir() and tables.table_files(str(path)):
      out[path.name] = str(path)
    elif path.suffix.lstrip(".") in tables.KINDS:
      out[path.stem] = str(path)
  if not out:
    raise FileNotFoundError(f"{root}: no MMEB datasets (expected NAME.jsonl, NAME.parquet or "
                            f"NAME/*.parquet)")
  return out


def _images(value: Any, field: str, image_root: str) -> List[str]:
  """An image field (path, list of paths, "" or null) as existing local paths or URLs."""
  out = []
  for path in tables.string_list({field: value}, field):
    if not path:
      continue
    resolved = pairs.resolve_image_path(path, [image_root], image_root)
    if "://" not in resolved and not os.path.isfile(resolved):
      raise ValueError(f"field '{field}': image {path!r} not found under {image_root}")
    out.append(resolved)
  return out


def _parse_row(row: dict, image_root: str) -> tuple:
  """(query, [candidates]) of one MMEB row; ValueError naming the field. An instruction
  (qry_inst, tgt_inst) rides beside its text for the model's prompt format to place."""
  query = _side(tables.string_field(row, "qry_text"), tables.string_field(row, "qry_inst"),
                _images(row.get("qry_img_path"), "qry_img_path", image_root), "qry_text", "query")
  texts = tables.string_list(row, "tgt_text")
  images = tables.string_list(row, "tgt_img_path")
  if not texts and not images:
    raise ValueError("no candidates: fields 'tgt_text' and 'tgt_img_path' are empty or missing")
  if texts and images and len(texts) != len(images):
    raise ValueError(f"field 'tgt_text' has {len(texts)} entries but 'tgt_img_path' has "
                     f"{len(images)}; expected one of each per candidate")
  count = max(len(texts), len(images))
  instructions = row.get("tgt_inst")
  instructions = (tables.string_list(row, "tgt_inst") if isinstance(instructions, list)
                  else [tables.string_field(row, "tgt_inst")] * count)
  if len(instructions) != count:
    raise ValueError(f"field 'tgt_inst' has {len(instructions)} entries for {count} candidates")
  candidates = []
  for k in range(count):
    candidate_images = _images(images[k] if images else "", f"tgt_img_path[{k}]", image_root)
    candidates.append(_side(texts[k] if texts else "", instructions[k], candidate_images,
                            f"tgt_text[{k}]", "candidate"))
  return query, candidates


def _side(text: str, instruction: str, images: List[str], field: str, role: str) -> dict:
  """One query or candidate row: without an instruction as it always was (markers prepended),
  with one as {"text", "instruction", "role"} for the prompt format."""
  if not instruction:
    return pairs.make_side(text, images, "{text}", field)
  return dict(pairs.make_side(text, images, "{text}", field, prepend=False),
              instruction=instruction, role=role)


def read_dataset(name: str, path: str, image_root: str, meta_task: str,
                 max_rows: Optional[int] = None) -> MmebDataset:
  """Reads one dataset (bad rows skipped and counted); candidates are deduplicated by content."""
  dataset = MmebDataset(name, meta_task, [], [], [], [])
  keys: Dict[tuple, int] = {}
  for file in tables.table_files(path):
    for where, row, error in tables.read_table(file):
      if max_rows is not None and len(dataset.queries) >= max_rows:
        break
      try:
        if error:
          raise ValueError(error)
        query, candidates = _parse_row(row, image_root)
      except ValueError as e:
        dataset.bad_rows.append(f"{where}: {e}")
        continue
      ids = []
      for k, candidate in enumerate(candidates):
        key = (candidate["text"], candidate.get("instruction"), tuple(candidate["images"]))
        if key not in keys:
          keys[key] = len(dataset.candidates)
          dataset.candidates.append(dict(candidate, where=f"{where}: candidate {k}"))
        ids.append(keys[key])
      dataset.queries.append(dict(query, where=where))
      dataset.row_candidates.append(np.asarray(ids, np.int64))
  return dataset


def _size(row: Dict[str, Any]) -> tuple:
  """A cheap sort key that groups rows of similar encoded shape (images, then text length)."""
  return (len(row["images"]), len(row["text"]))


def embed_sorted(embed: EmbedFn, rows: Sequence[Dict[str, Any]]
                 ) -> Tuple[np.ndarray, Dict[int, str]]:
  """embed(rows) with rows sent in size order (fewer padded tokens and batch shapes), returned
  in input order: (embeddings [rows, d], {input index: why it failed})."""
  order = sorted(range(len(rows)), key=lambda i: _size(rows[i]))
  out, errors = np.empty((len(rows), 0), np.float32), {}
  if rows:
    embedded, sorted_errors = embed([rows[i] for i in order])
    out = np.empty_like(embedded)
    out[order] = embedded
    errors = {order[i]: why for i, why in sorted_errors.items()}
  return out, errors


def score_dataset(embed: EmbedFn, dataset: MmebDataset) -> Dict[str, Any]:
  """P@1 of one dataset and what it took (rows, distinct candidates, seconds); rows whose query
  or a candidate could not be embedded join `dataset.bad_rows`."""
  start = time.perf_counter()
  vectors, errors = embed_sorted(embed, dataset.queries + dataset.candidates)
  queries, candidates = vectors[:len(dataset.queries)], vectors[len(dataset.queries):]
  scores = []
  for q, (query, ids) in enumerate(zip(queries, dataset.row_candidates)):
    failed = [errors[q]] if q in errors else []
    failed += [errors[len(queries) + c] for c in ids if len(queries) + c in errors][:1]
    if failed:
      dataset.bad_rows.append(failed[0] if q in errors else
                              f"{dataset.queries[q]['where']}: a candidate cannot be embedded "
                              f"({failed[0]})")
      continue
    scores.append(candidates[ids] @ query)
  hits = metrics.mmeb_precision_at_1(scores) if scores else np.zeros(0, bool)
  return {"precision_at_1": float(np.mean(hits)) if len(hits) else float("nan"),
          "meta_task": dataset.meta_task, "rows": len(scores),
          "candidates_encoded": len(dataset.candidates), "bad_rows": len(dataset.bad_rows),
          "seconds": time.perf_counter() - start}


def meta_task_overrides(root: str) -> Dict[str, str]:
  """DIR/meta_tasks.json ({dataset: meta-task}) when present."""
  path = epath.Path(root) / META_TASKS_FILE
  if not path.exists():
    return {}
  try:
    overrides = json.loads(path.read_text())
  except json.JSONDecodeError as e:
    raise ValueError(f"{path}: invalid JSON ({e})") from None
  bad = {k: v for k, v in overrides.items() if v not in mmeb_data.META_TASKS}
  if bad:
    raise ValueError(f"{path}: unknown meta-tasks {bad}; expected one of {mmeb_data.META_TASKS}")
  return overrides


def evaluate_mmeb(embed: EmbedFn, root: str, datasets: Optional[Sequence[str]] = None,
                  image_root: Optional[str] = None, max_rows: Optional[int] = None
                  ) -> Dict[str, Any]:
  """{"overall", "per_task", "per_dataset", "details"} of the MMEB datasets under root.

  datasets: names to run (default all found); image_root: where image paths resolve (default
  root); max_rows: at most this many rows per dataset (a quick look, not the benchmark).
  """
  found = list_datasets(root)
  names = list(datasets) if datasets else list(found)
  missing = [n for n in names if n not in found]
  if missing:
    raise ValueError(f"{root}: no dataset {missing}; found {sorted(found)}")
  overrides = meta_task_overrides(root)
  image_root = image_root or root
  if "://" not in image_root:
    image_root = os.path.abspath(image_root)
  details = {}
  for name in names:
    dataset = read_dataset(name, found[name], image_root,
                           mmeb_data.meta_task_of(name, overrides), max_rows)
    details[name] = score_dataset(embed, dataset)
    for bad in dataset.bad_rows[:5]:
      log.warning("skipped %s", bad)
    if len(dataset.bad_rows) > 5:
      log.warning("%s: %d bad rows in all", name, len(dataset.bad_rows))
    log.info("%s: P@1 %.4f (%d rows, %d candidates encoded, %.1fs)", name,
             details[name]["precision_at_1"], details[name]["rows"],
             details[name]["candidates_encoded"], details[name]["seconds"])
  scored = {n: d for n, d in details.items() if d["rows"]}
  per_task = {}
  for task in mmeb_data.META_TASKS:
    values = [d["precision_at_1"] for d in scored.values() if d["meta_task"] == task]
    if values:
      per_task[task] = float(np.mean(values))
  return {"overall": float(np.mean([d["precision_at_1"] for d in scored.values()]))
          if scored else float("nan"),
          "per_task": per_task,
          "per_dataset": {n: d["precision_at_1"] for n, d in details.items()},
          "details": details}


def format_table(result: Dict[str, Any]) -> str:
  """The console table: one line per dataset, then per meta-task and overall (percent)."""
  lines = [f"{'dataset':<28}{'task':<16}{'P@1':>8}{'rows':>8}{'bad':>6}"]
  for name, d in result["details"].items():
    lines.append(f"{name:<28}{d['meta_task']:<16}{100 * d['precision_at_1']:>8.2f}"
                 f"{d['rows']:>8}{d['bad_rows']:>6}")
  for task, value in result["per_task"].items():
    lines.append(f"{'[' + task + ']':<44}{100 * value:>8.2f}")
  lines.append(f"{'[overall]':<44}{100 * result['overall']:>8.2f}")
  return "\n".join(lines)
