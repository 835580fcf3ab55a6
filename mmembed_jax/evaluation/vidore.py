"""ViDoRe-style evaluation: text queries against a corpus of page images -> NDCG@k and Recall@k.

A dataset is a directory (BEIR layout, as ViDoRe-v2 publishes it) holding three tables, each
JSONL or Parquet:

  queries   {"query-id", "query"}
  corpus    {"corpus-id", "image"}            image: a path relative to the dataset directory
  qrels     {"query-id", "corpus-id", "score"}  score > 0: relevant (graded); also qrels.tsv

The corpus is embedded block by block; each block's embeddings are split over the devices and
folded into a running top-k per query (`topk.StreamingTopK`), so no device (and no host) ever
holds the whole corpus's embeddings. Scores (`scoring`, metrics.py):
  "pytrec_eval"  as ViDoRe, BEIR and MTEB score (the default): equal scores rank by page id,
                 descending (the corpus is searched in that order), and a judged query without a
                 relevant page scores 0 and is averaged in;
  "corpus_order" equal scores rank the earlier corpus row first, and judged queries without a
                 relevant page are left out and counted.
NDCG uses linear gains and 1/log2(rank + 1) discounts either way; scores are kept unrounded.
Rows that cannot be read (bad JSON, not UTF-8, a missing image, an unreadable Parquet file) or
embedded (a truncated image, say) are skipped, counted and named by FILE:LINE.
"""
import csv
import logging
import os
import tempfile
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
from etils import epath

from mmembed_jax.data.rows import IMAGE_MARKER
from mmembed_jax.evaluation import metrics, tables, topk

log = logging.getLogger(__name__)

# rows {"text", "images", "where"} -> (embeddings [rows, d], {row index: why it failed}).
EmbedFn = Callable[[Sequence[Dict[str, Any]]], Tuple[np.ndarray, Dict[int, str]]]
QUERY_TEMPLATE = "Find a document image that answers the question: {text}"
DOCUMENT_TEMPLATE = IMAGE_MARKER + "\nRepresent the given document image."
K_VALUES = (1, 5, 10)
SCORING = {"pytrec_eval": "score", "corpus_order": "skip"}  # -> metrics' zero_relevant
TABLES = ("queries", "corpus", "qrels")


def list_datasets(root: str) -> Dict[str, str]:
  """{dataset name: directory}: root itself if it is a dataset, else its dataset subdirectories."""
  def is_dataset(path):
    return all(tables.find_table(str(path), t) for t in ("queries", "corpus")) and (
        tables.find_table(str(path), "qrels") or (path / "qrels.tsv").exists())
  root_path = epath.Path(root)
  if is_dataset(root_path):
    return {root_path.name: root}
  out = {p.name: str(p) for p in sorted(root_path.iterdir()) if p.is_dir() and is_dataset(p)}
  if not out:
    raise FileNotFoundError(f"{root}: no ViDoRe datasets (expected directories holding "
                            f"queries, corpus and qrels tables)")
  return out


def _read_qrels(directory: str, bad: List[str]) -> Dict[str, Dict[str, int]]:
  """{query id: {corpus id: relevance}} from qrels.jsonl / .parquet / .tsv (BEIR, with header)."""
  out: Dict[str, Dict[str, int]] = {}
  path = tables.find_table(directory, "qrels")
  if path is None:
    path = str(epath.Path(directory) / "qrels.tsv")
    with epath.Path(path).open("r") as f:
      reader = csv.reader(f, delimiter="\t")
      header = next(reader, None)
      rows = [(f"{path}:{n}", dict(zip(header, line)), None) for n, line in enumerate(reader, 2)]
  else:
    rows = tables.read_table(path)
  for where, row, error in rows:
    try:
      if error:
        raise ValueError(error)
      query_id = tables.string_field(row, "query-id")
      corpus_id = tables.string_field(row, "corpus-id")
      score = int(row.get("score", 1))
    except (ValueError, TypeError) as e:
      bad.append(f"{where}: {e}")
      continue
    out.setdefault(query_id, {})[corpus_id] = score
  return out


def _image_file(value: Any, directory: str, image_cache: str, index: int) -> str:
  """A corpus image as a file: a path (relative to the dataset directory) as is; encoded bytes
  (Parquet: raw or a Hugging Face Image dict) written to image_cache first."""
  if isinstance(value, dict) and value.get("bytes") is None:
    value = value.get("path")
  if isinstance(value, dict) or isinstance(value, bytes):
    data = value["bytes"] if isinstance(value, dict) else value
    path = os.path.join(image_cache, f"{index:08d}.img")
    with open(path, "wb") as f:
      f.write(data)
    return path
  if not isinstance(value, str) or not value:
    raise ValueError(f"field 'image' must be a path or encoded image bytes, found {value!r:.60}")
  path = value if "://" in value or os.path.isabs(value) else os.path.join(directory, value)
  if "://" not in path and not os.path.isfile(path):
    raise ValueError(f"field 'image': {value!r} is not an image file")
  return path


def read_dataset(directory: str, query_template: str, document_template: str, image_cache: str,
                 instructions: Optional[Tuple[str, str]] = None
                 ) -> Tuple[List[str], List[dict], List[str], List[dict], Dict, List[str]]:
  """(query ids, query rows, corpus ids, corpus rows, qrels, bad rows) of one dataset; images
  stored in the corpus table itself are written to image_cache. instructions: (query's, page's)
  carried beside the rows' texts for the model's prompt format, instead of the templates."""
  bad: List[str] = []
  query_ids, queries = [], []
  for where, row, error in tables.read_table(tables.find_table(directory, "queries")):
    try:
      if error:
        raise ValueError(error)
      text = tables.string_field(row, "query")
      if not text:
        raise ValueError("field 'query' is empty")
      query_ids.append(tables.string_field(row, "query-id"))
      if instructions:
        queries.append({"text": text, "instruction": instructions[0], "role": "query",
                        "images": [], "where": where})
      else:
        queries.append({"text": query_template.format(text=text), "images": [], "where": where})
    except ValueError as e:
      bad.append(f"{where}: {e}")
  corpus_ids, corpus = [], []
  for where, row, error in tables.read_table(tables.find_table(directory, "corpus")):
    try:
      if error:
        raise ValueError(error)
      path = _image_file(row.get("image"), directory, image_cache, len(corpus))
      corpus_ids.append(tables.string_field(row, "corpus-id"))
      if instructions:
        corpus.append({"text": "", "instruction": instructions[1], "role": "candidate",
                       "images": [path], "where": where})
      else:
        corpus.append({"text": document_template, "images": [path], "where": where})
    except ValueError as e:
      bad.append(f"{where}: {e}")
  return query_ids, queries, corpus_ids, corpus, _read_qrels(directory, bad), bad


def search(embed: EmbedFn, queries: Sequence[dict], corpus: Sequence[dict], mesh: Any, k: int,
           block_rows: int, bad: List[str]) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(scores [queries, k], corpus indices [queries, k], embedded [queries] bool) of the top k,
  best first (-1: none). Queries and pages that cannot be embedded are left out, named in `bad`."""
  search_topk = topk.StreamingTopK(mesh, k)
  query_vectors, errors = embed(queries)
  bad += errors.values()
  embedded = np.ones(len(queries), bool)
  embedded[list(errors)] = False
  search_topk.reset(np.where(embedded[:, None], query_vectors, 0.0))
  for start in range(0, len(corpus), block_rows):
    block, errors = embed(corpus[start:start + block_rows])  # [block, d]
    bad += errors.values()
    ids = np.arange(start, start + len(block), dtype=np.int32)
    ids[list(errors)] = -1  # never ranked
    # Every block padded to one shape: one compiled merge for the whole corpus.
    search_topk.update(*topk.shard_block(mesh, np.nan_to_num(block), ids, rows=block_rows))
  scores, indices = search_topk.result()
  return scores, indices, embedded


def evaluate_vidore(embed: EmbedFn, root: str, mesh: Any, datasets: Optional[Sequence[str]] = None,
                    k_values: Sequence[int] = K_VALUES, query_template: str = QUERY_TEMPLATE,
                    document_template: str = DOCUMENT_TEMPLATE, block_rows: int = 1024,
                    scoring: str = "pytrec_eval", instructions: Optional[Tuple[str, str]] = None
                    ) -> Dict[str, Any]:
  """{"ndcg_at_5", "per_dataset": {name: {"ndcg_at_K", "recall_at_K", ...}}} of the datasets
  (instructions: see `read_dataset`)."""
  if scoring not in SCORING:
    raise ValueError(f"scoring must be one of {sorted(SCORING)}, got {scoring!r}")
  found = list_datasets(root)
  names = list(datasets) if datasets else list(found)
  missing = [n for n in names if n not in found]
  if missing:
    raise ValueError(f"{root}: no dataset {missing}; found {sorted(found)}")
  per_dataset = {}
  for name in names:
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="mmembed_vidore_") as image_cache:
      query_ids, queries, corpus_ids, corpus, qrels, bad = read_dataset(
          found[name], query_template, document_template, image_cache, instructions)
      if scoring == "pytrec_eval":  # search in pytrec_eval's order among equal scores
        order = metrics.official_order(corpus_ids)
        corpus_ids, corpus = [corpus_ids[i] for i in order], [corpus[i] for i in order]
      _, indices, embedded = search(embed, queries, corpus, mesh, max(k_values), block_rows, bad)
      for line in bad[:5]:
        log.warning("skipped %s", line)
    ranked = {q: [corpus_ids[i] for i in row if i >= 0]
              for q, row, ok in zip(query_ids, indices, embedded) if ok}
    scores = score_rankings(ranked, qrels, k_values, scoring)
    scores.update(queries=int(np.sum(embedded)), corpus=len(corpus), bad_rows=len(bad),
                  seconds=time.perf_counter() - start)
    per_dataset[name] = scores
    log.info("%s: NDCG@5 %s (%d queries, %d pages, %.1fs)", name, scores.get("ndcg_at_5"),
             len(queries), len(corpus), scores["seconds"])
  key = "ndcg_at_5" if 5 in k_values else f"ndcg_at_{max(k_values)}"
  return {key: float(np.mean([d[key] for d in per_dataset.values()])), "per_dataset": per_dataset,
          "scoring": scoring}


def score_rankings(ranked: Dict[str, List[str]], qrels: Dict[str, Dict[str, int]],
                   k_values: Sequence[int], scoring: str = "pytrec_eval") -> Dict[str, Any]:
  """{"ndcg_at_K", "recall_at_K", "skipped_queries", "unjudged_or_unread_queries"} of rankings
  (queries that were judged but not read or embedded are left out and counted)."""
  unknown = sorted(set(qrels) - set(ranked))
  qrels = {q: rel for q, rel in qrels.items() if q in ranked}  # judged queries that were read
  scores: Dict[str, Any] = {"unjudged_or_unread_queries": len(unknown)}
  for k in k_values:
    ndcg = metrics.ndcg_at_k(ranked, qrels, k, SCORING[scoring])
    scores[f"ndcg_at_{k}"] = ndcg.mean
    scores[f"recall_at_{k}"] = metrics.recall_at_k(ranked, qrels, k, SCORING[scoring]).mean
  scores["skipped_queries"] = ndcg.skipped  # the same at every k
  return scores


def format_table(result: Dict[str, Any]) -> str:
  """The console table: NDCG and Recall per dataset (percent), then the mean NDCG."""
  keys = [k for k in next(iter(result["per_dataset"].values())) if k.startswith(("ndcg", "recall"))]
  lines = [f"{'dataset':<28}" + "".join(f"{k:>14}" for k in keys) + f"{'queries':>9}{'pages':>7}"]
  for name, d in result["per_dataset"].items():
    lines.append(f"{name:<28}" + "".join(f"{100 * d[k]:>14.2f}" for k in keys)
                 + f"{d['queries']:>9}{d['corpus']:>7}")
  main = next(k for k in result if k.startswith("ndcg"))
  lines.append(f"{'[mean ' + main + ']':<28}{100 * result[main]:>14.2f}")
  return "\n".join(lines)
