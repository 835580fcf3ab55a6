"""MMEB Precision@1 and NDCG@k / Recall@k against cases computed by hand."""
import numpy as np
import pytest

from mmembed_jax.evaluation import metrics


def test_precision_at_1_ties_duplicates_and_ragged_rows():
  scores = [np.array([0.9, 0.1, 0.3]),           # truth highest: hit
            np.array([0.5, 0.5]),                # duplicate of the truth ties it: hit (argmax -> 0)
            np.array([0.2, 0.7, 0.7, 0.1]),      # a wrong pair ties above the truth: miss
            np.array([0.4]),                     # a lone candidate is the truth: hit
            np.array([0.3, 0.30001])]            # a hair above: miss
  np.testing.assert_array_equal(metrics.mmeb_precision_at_1(scores), [True, True, False, True, False])


def test_precision_at_1_with_a_mask():
  scores = np.array([[0.1, 0.9, 0.2], [0.5, 0.9, 0.4]])
  mask = np.array([[True, False, True], [True, True, False]])  # row 0's 0.9 is no candidate
  np.testing.assert_array_equal(metrics.mmeb_precision_at_1(scores, mask), [False, False])
  mask = np.array([[True, False, False], [True, False, True]])
  np.testing.assert_array_equal(metrics.mmeb_precision_at_1(scores, mask), [True, True])
  with pytest.raises(ValueError, match="row 1: no candidates"):
    metrics.mmeb_precision_at_1([np.array([1.0]), np.array([])])


def test_ndcg_several_graded_relevant_documents():
  qrels = {"q1": {"a": 2, "b": 1, "z": 0}, "q2": {"c": 1}}
  ranked = {"q1": ["b", "x", "a", "y", "z", "w"], "q2": ["c"]}
  # q1: b (1) at rank 1, a (2) at rank 3; ideal order a (2), b (1).
  dcg = 1 / np.log2(2) + 2 / np.log2(4)
  idcg = 2 / np.log2(2) + 1 / np.log2(3)
  result = metrics.ndcg_at_k(ranked, qrels, 5)
  assert result.per_query["q1"] == pytest.approx(dcg / idcg)
  assert result.per_query["q2"] == pytest.approx(1.0)
  assert result.mean == pytest.approx((dcg / idcg + 1) / 2)
  # At k = 2 only b counts; the ideal is cut at 2 as well.
  assert metrics.ndcg_at_k(ranked, qrels, 2).per_query["q1"] == pytest.approx(1 / idcg)
  # At k = 1: b (gain 1) against the ideal a (gain 2).
  assert metrics.ndcg_at_k(ranked, qrels, 1).per_query["q1"] == pytest.approx(0.5)


def test_recall_k_beyond_the_list_and_queries_without_relevant_documents():
  qrels = {"q1": {"a": 1, "b": 3, "c": 1}, "q2": {"d": 0}, "q3": {"e": 1}}
  ranked = {"q1": ["a", "x", "c"], "q2": ["d"], "q3": ["x", "y"], "q4": ["e"]}
  recall = metrics.recall_at_k(ranked, qrels, 10)  # k longer than the lists
  # pytrec_eval's convention: q2 (judged, relevance 0 only) scores 0; q4 (unjudged) is left out.
  assert recall.per_query == {"q1": pytest.approx(2 / 3), "q2": 0.0, "q3": 0.0}
  assert recall.skipped == 1
  assert recall.mean == pytest.approx(2 / 9)
  skipping = metrics.recall_at_k(ranked, qrels, 10, zero_relevant="skip")
  assert skipping.per_query == {"q1": pytest.approx(2 / 3), "q3": 0.0}
  assert skipping.skipped == 2 and skipping.mean == pytest.approx(1 / 3)
  assert metrics.recall_at_k(ranked, qrels, 1).per_query["q1"] == pytest.approx(1 / 3)
  assert metrics.ndcg_at_k(ranked, qrels, 10).per_query["q3"] == 0.0
  with pytest.raises(ValueError, match="q9"):
    metrics.ndcg_at_k(ranked, dict(qrels, q9={"a": 1}), 5)
  with pytest.raises(ValueError, match="zero_relevant"):
    metrics.ndcg_at_k(ranked, qrels, 5, zero_relevant="drop")


def test_ndcg_and_recall_equal_pytrec_eval_on_rankings_full_of_ties():
  """The sharded top-k over a corpus in `official_order`, then our metrics == pytrec_eval on
  the whole score matrix: scores drawn from 4 values (ties everywhere, also across blocks and
  devices), ids whose string order is not their numeric order, graded and zero judgements."""
  import jax  # pylint: disable=g-import-not-at-top
  import pytrec_eval  # pylint: disable=g-import-not-at-top
  from mmembed_jax.evaluation import topk, vidore  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  docs = [f"{i}" for i in rng.permutation(300)] + [f"page_{c}" for c in "zyxab"]
  queries = [f"q{i}" for i in range(40)]
  scores = rng.integers(0, 4, size=(len(queries), len(docs))).astype(np.float64) / 4
  qrels = {}
  for q in queries[:-2]:  # two queries unjudged
    judged = rng.choice(len(docs), size=int(rng.integers(1, 6)), replace=False)
    qrels[q] = {docs[j]: int(rng.integers(0, 3)) for j in judged}  # some with no relevant doc
  assert any(not any(r > 0 for r in rel.values()) for rel in qrels.values())
  measures = {f"{m}_{k}" for m in ("ndcg_cut", "recall") for k in vidore.K_VALUES}
  oracle = pytrec_eval.RelevanceEvaluator(qrels, measures).evaluate(
      {q: {d: float(s) for d, s in zip(docs, row)} for q, row in zip(queries, scores)})

  # Our path: the corpus in official order, searched in blocks over every device.
  order = metrics.official_order(docs)
  mesh = jax.sharding.Mesh(np.array(jax.devices()), ("devices",))
  # One-hot query and document vectors reproduce the score matrix exactly as dot products.
  search = topk.StreamingTopK(mesh, max(vidore.K_VALUES))
  search.reset(np.eye(len(queries), dtype=np.float32))
  for start in range(0, len(docs), 64):
    block = order[start:start + 64]
    search.update(*topk.shard_block(mesh, scores[:, block].T.astype(np.float32),
                                    np.arange(start, start + len(block)), rows=64))
  _, indices = search.result()
  ranked = {q: [docs[order[i]] for i in row] for q, row in zip(queries, indices)}
  ours = vidore.score_rankings(ranked, qrels, vidore.K_VALUES)
  for k in vidore.K_VALUES:
    for ours_key, measure in ((f"ndcg_at_{k}", f"ndcg_cut_{k}"), (f"recall_at_{k}", f"recall_{k}")):
      expected = np.mean([per_query[measure] for per_query in oracle.values()])
      assert ours[ours_key] == pytest.approx(expected, abs=1e-12), ours_key
  assert len(oracle) == len(qrels) and ours["skipped_queries"] == 2
  # Corpus order is a different ranking on such ties (the option kept for comparison).
  plain = {q: [docs[j] for j in np.argsort(-row, kind="stable")[:10]] for q, row in
           zip(queries, scores)}
  assert vidore.score_rankings(plain, qrels, (5,))["ndcg_at_5"] != pytest.approx(ours["ndcg_at_5"])
