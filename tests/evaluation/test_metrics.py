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


def test_recall_k_beyond_the_list_and_skipped_queries():
  qrels = {"q1": {"a": 1, "b": 3, "c": 1}, "q2": {"d": 0}, "q3": {"e": 1}}
  ranked = {"q1": ["a", "x", "c"], "q2": ["d"], "q3": ["x", "y"], "q4": ["e"]}
  recall = metrics.recall_at_k(ranked, qrels, 10)  # k longer than the lists
  assert recall.per_query == {"q1": pytest.approx(2 / 3), "q3": 0.0}
  assert recall.skipped == 2  # q2 (relevance 0 only) and q4 (unjudged)
  assert recall.mean == pytest.approx(1 / 3)
  assert metrics.recall_at_k(ranked, qrels, 1).per_query["q1"] == pytest.approx(1 / 3)
  assert metrics.ndcg_at_k(ranked, qrels, 10).per_query["q3"] == 0.0
  with pytest.raises(ValueError, match="q9"):
    metrics.ndcg_at_k(ranked, dict(qrels, q9={"a": 1}), 5)
