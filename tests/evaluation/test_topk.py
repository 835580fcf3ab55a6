"""Blockwise top-k over rows split across 8 devices equals a full sort by (score desc, id asc)."""
import jax
import numpy as np
import pytest

from mmembed_jax.evaluation import topk
from mmembed_jax.training.trained_model import export_mesh


def _reference(queries, corpus, k):
  """Ids [q, k] of a full stable sort: score descending, then corpus id; -1 past the corpus."""
  scores = queries @ corpus.T
  out = np.full((len(queries), k), -1)
  for i, row in enumerate(scores):
    order = sorted(range(len(corpus)), key=lambda j: (-row[j], j))[:k]
    out[i, :len(order)] = order
  return out


@pytest.mark.parametrize("k", [3, 20, 60])  # within a device's rows, beyond a block, beyond the corpus
def test_streaming_topk_matches_a_full_sort(k):
  mesh = export_mesh()
  assert mesh.size == 8
  rng = np.random.default_rng(k)
  queries = rng.normal(size=(6, 16)).astype(np.float32)
  corpus = rng.integers(-2, 3, size=(45, 16)).astype(np.float32)
  corpus[[10, 30, 44]] = corpus[3]  # exact ties across blocks and devices: lower id first
  search = topk.StreamingTopK(mesh, k)
  search.reset(queries)
  start = 0
  for rows in (16, 5, 24):  # uneven blocks, padded with id -1 to a multiple of 8
    search.update(*topk.shard_block(mesh, corpus[start:start + rows],
                                    np.arange(start, start + rows)))
    start += rows
  scores, ids = search.result()
  np.testing.assert_array_equal(ids, _reference(queries, corpus, k))
  valid = ids >= 0
  np.testing.assert_allclose(scores[valid], np.take_along_axis(queries @ corpus.T,
                                                              np.maximum(ids, 0), 1)[valid],
                             rtol=1e-5)
  assert np.all(np.isneginf(scores[~valid]))


def test_each_device_scores_only_its_rows():
  """The compiled merge's per-device temporaries shrink with the devices: no [q, block] matrix."""
  mesh = export_mesh()
  queries, block = np.zeros((512, 64), np.float32), np.zeros((4096, 64), np.float32)

  def temp_bytes(mesh_):
    search = topk.StreamingTopK(mesh_, 10)
    search.reset(queries)
    args = (search.queries, search.scores, search.ids,
            *topk.shard_block(mesh_, block, np.arange(len(block))))
    compiled = topk._merge.lower(*args, mesh=mesh_, k=10).compile()  # pylint: disable=protected-access
    return compiled.memory_analysis().temp_size_in_bytes

  one = jax.make_mesh((1, 1, 1), mesh.axis_names, devices=jax.devices()[:1],
                      axis_types=(jax.sharding.AxisType.Auto,) * 3)
  full_scores = 512 * 4096 * 4
  assert temp_bytes(one) >= full_scores
  assert temp_bytes(mesh) < full_scores / 4
