"""Held-out Precision@1 on hand-made embeddings: hits, hard negatives, shared positives, chance."""
import numpy as np

from mmembed_jax.training.retrieval_eval import content_keys, precision_at_1


def _unit(*vectors):
  x = np.asarray(vectors, np.float32)
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def test_precision_at_1_by_hand():
  """Query 0 finds its positive; query 1's hard negative beats its positive; query 2 shares
  positive 0's content (one candidate, so its nearest 'other' is not a miss); a masked negative
  that would win is ignored."""
  query = _unit([1, 0], [0, 1], [1, 0.1])
  positive = _unit([1, 0], [0.6, 0.8], [1, 0])
  negative = _unit([[0, -1]], [[0, 1]], [[1, 0.1]])  # [3, 1, 2]
  mask = np.array([[1], [1], [0]])
  keys = np.array([7, 8, 7])
  hit, chance = precision_at_1(query, positive, negative, mask, keys)
  assert hit == 2 / 3  # queries 0 and 2 hit; query 1 loses to its hard negative
  # Distinct candidates: query 0: positives {0/2, 1} + 1 negative = 3; query 1: 3; query 2: 2 + 0.
  np.testing.assert_allclose(chance, np.mean([1 / 3, 1 / 3, 1 / 2]))


def test_a_collapsed_model_scores_zero():
  """Identical embeddings for every input are ties, never hits."""
  same = _unit([1, 1], [1, 1], [1, 1])
  hit, _ = precision_at_1(same, same, np.zeros((3, 0, 2)), np.zeros((3, 0)), np.arange(3))
  assert hit == 0.0


def test_content_keys_match_equal_rows():
  """Rows with the same ids and pixels share a key; a different pixel changes it."""
  ids = np.array([[1, 2, 0], [1, 2, 0], [1, 2, 0]])
  pixels = np.zeros((3, 4, 1176), np.float32)
  pixels[2, 0, 0] = 1.0
  keys = content_keys({"input_ids": ids, "pixel_patches": pixels})
  assert keys[0] == keys[1] != keys[2]
