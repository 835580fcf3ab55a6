"""Retrieval metrics on the host: MMEB's Precision@1, and NDCG@k / Recall@k over ranked lists.

MMEB (VLM2Vec's evaluation): candidate 0 of each row is the ground truth and a row is a hit when
`np.argmax(scores) == 0`. Ties go to the lowest index, so a candidate that ties the truth (a
duplicate of it, say) still counts as a hit, exactly as in VLM2Vec's code.

NDCG@k and Recall@k as pytrec_eval computes them (ViDoRe, BEIR and MTEB score with it; the tests
run it as the oracle): gain = relevance (linear; relevance <= 0 counts 0), discount
1 / log2(rank + 1) with 1-based ranks, IDCG from the query's relevances sorted and cut at k;
Recall@k = |relevant in the top k| / |relevant|. Two conventions (`zero_relevant`):
  "score"  pytrec_eval's: a query whose judgements hold no relevant document scores 0 and is
           averaged in; only queries without any judgement are left out (the default).
  "skip"   such queries are left out of the mean and counted (this project's first convention).
Equal scores: pytrec_eval ranks them by document id, descending (strcmp); `official_order`
gives that order, and the evaluators put the corpus in it before searching, since
`topk.StreamingTopK` breaks ties by corpus order.
"""
import dataclasses
from typing import Dict, Mapping, Optional, Sequence, Union

import numpy as np


def mmeb_precision_at_1(scores: Union[Sequence[np.ndarray], np.ndarray],
                        mask: Optional[np.ndarray] = None) -> np.ndarray:
  """Per-row hits [rows] bool: the highest score is candidate 0's (ties: the earlier candidate).

  scores: one 1-D array per row (candidate counts may differ) or [rows, candidates] with
  mask [rows, candidates] (False = no candidate there).
  """
  rows = [np.asarray(s, np.float64) for s in scores]
  if mask is not None:
    rows = [row[np.asarray(m, bool)] if np.asarray(m, bool)[0] else None
            for row, m in zip(rows, mask)]
  hits = np.zeros(len(rows), bool)
  for i, row in enumerate(rows):
    if row is None or row.size == 0:
      raise ValueError(f"row {i}: no candidates (candidate 0, the ground truth, is required)")
    hits[i] = int(np.argmax(row)) == 0
  return hits


@dataclasses.dataclass
class QueryMean:
  """A metric averaged over queries: the mean, each query's value, and how many were skipped."""
  mean: float
  per_query: Dict[str, float]
  skipped: int


ZERO_RELEVANT = ("score", "skip")


def official_order(doc_ids: Sequence[str]) -> np.ndarray:
  """Indices that put documents in pytrec_eval's order among equal scores: id descending."""
  return np.asarray(sorted(range(len(doc_ids)), key=lambda i: doc_ids[i], reverse=True), np.int64)


def _per_query(ranked: Mapping[str, Sequence[str]], qrels: Mapping[str, Mapping[str, int]],
               value, zero_relevant: str) -> QueryMean:
  """Applies value(ranked list, {doc: relevance > 0}) to every judged query (module doc)."""
  if zero_relevant not in ZERO_RELEVANT:
    raise ValueError(f"zero_relevant must be one of {ZERO_RELEVANT}, got {zero_relevant!r}")
  missing = sorted(set(qrels) - set(ranked))
  if missing:
    raise ValueError(f"queries {missing[:5]} have relevance judgements but no ranking")
  per_query, skipped = {}, 0
  for query, docs in ranked.items():
    judged = qrels.get(query, {})
    relevant = {d: r for d, r in judged.items() if r > 0}
    if not judged or (not relevant and zero_relevant == "skip"):
      skipped += 1
      continue
    per_query[query] = value(list(docs), relevant) if relevant else 0.0
  mean = float(np.mean(list(per_query.values()))) if per_query else float("nan")
  return QueryMean(mean, per_query, skipped)


def ndcg_at_k(ranked: Mapping[str, Sequence[str]], qrels: Mapping[str, Mapping[str, int]],
              k: int, zero_relevant: str = "score") -> QueryMean:
  """NDCG@k per query (linear gains, log2 discounts) and its mean over judged queries."""
  def ndcg(docs, relevant):
    dcg = sum(relevant.get(d, 0) / np.log2(rank + 2) for rank, d in enumerate(docs[:k]))
    ideal = sorted(relevant.values(), reverse=True)[:k]
    return float(dcg / sum(r / np.log2(rank + 2) for rank, r in enumerate(ideal)))
  return _per_query(ranked, qrels, ndcg, zero_relevant)


def recall_at_k(ranked: Mapping[str, Sequence[str]], qrels: Mapping[str, Mapping[str, int]],
                k: int, zero_relevant: str = "score") -> QueryMean:
  """Recall@k per query (share of its relevant documents in the top k) and its mean."""
  return _per_query(ranked, qrels,
                    lambda docs, relevant: len(set(docs[:k]) & set(relevant)) / len(relevant),
                    zero_relevant)
