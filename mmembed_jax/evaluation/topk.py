"""Top-k search over a corpus streamed in blocks whose rows are split across every device.

  search = StreamingTopK(mesh, k=10)
  search.reset(queries)                                  # [queries, embed]
  for block, ids in blocks:                              # [rows, embed], [rows] corpus ids
    search.update(*shard_block(mesh, block, ids))
  scores, ids = search.result()                          # [queries, k] each, best first

Each update scores the (replicated) queries against the device's own rows only ([queries,
rows / devices] per device), keeps the device's k best, all-gathers those k per device and merges
them with the running top-k. No device holds a block's full score matrix and nobody holds the
corpus's embeddings. Ties go to the lower corpus id, provided blocks come in increasing id order
(as `shard_block` lays them out): every merge keeps candidates in id order among equal scores and
`lax.top_k` keeps the earlier of equal values. Id -1 marks padding rows; they are never returned
ahead of a real row, and fill the result (score -inf) when the corpus has fewer than k rows.
"""
import functools
from typing import Tuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P


def shard_block(mesh: Mesh, block: np.ndarray, ids: np.ndarray, rows: int = 0
                ) -> Tuple[jax.Array, jax.Array]:
  """Host block [n, embed] and ids [n] -> arrays with rows split over all devices, padded with
  id -1 to `rows` (at least n, rounded up to a multiple of the devices)."""
  block, ids = np.asarray(block, np.float32), np.asarray(ids, np.int32)
  rows = -(-max(rows, len(block)) // mesh.size) * mesh.size
  padded = np.zeros((rows, block.shape[1]), np.float32)
  padded[:len(block)] = block
  padded_ids = np.full((rows,), -1, np.int32)
  padded_ids[:len(ids)] = ids
  sharding = NamedSharding(mesh, P(mesh.axis_names))
  put = lambda x: jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])
  return put(padded), put(padded_ids)


@functools.partial(jax.jit, static_argnames=("mesh", "k"))
def _merge(queries, scores, ids, block, block_ids, *, mesh: Mesh, k: int):
  """Running (scores, ids) [q, k] merged with one block's rows -> the new [q, k]."""
  axes = tuple(mesh.axis_names)

  def local_best(queries, block, block_ids):
    local = queries @ block.T  # [q, rows / devices]
    local = jnp.where(block_ids[None, :] >= 0, local, -jnp.inf)
    best, position = jax.lax.top_k(local, min(k, local.shape[1]))  # [q, k']
    best_ids = jnp.where(jnp.isfinite(best), block_ids[position], -1)
    # [q, devices * k'], device by device: ids ascend across devices among equal scores.
    return (jax.lax.all_gather(best, axes, axis=1, tiled=True),
            jax.lax.all_gather(best_ids, axes, axis=1, tiled=True))

  new_scores, new_ids = jax.shard_map(local_best, mesh=mesh, in_specs=(P(), P(axes), P(axes)),
                                      out_specs=(P(), P()), check_vma=False)(
                                          queries, block, block_ids)
  merged = jnp.concatenate([scores, new_scores], axis=1)  # running ids are all lower
  merged_ids = jnp.concatenate([ids, new_ids], axis=1)
  best, position = jax.lax.top_k(merged, k)
  return best, jnp.take_along_axis(merged_ids, position, axis=1)


class StreamingTopK:
  """The k best corpus rows per query, over blocks given one at a time (see the module doc)."""

  def __init__(self, mesh: Mesh, k: int):
    if k < 1:
      raise ValueError(f"k must be positive, got {k}")
    self.mesh, self.k = mesh, k
    self._replicated = NamedSharding(mesh, P())

  def reset(self, queries: np.ndarray) -> None:
    """Starts a search for queries [q, embed]: every running score -inf, every id -1."""
    queries = np.asarray(queries, np.float32)
    self.queries = jax.device_put(queries, self._replicated)
    self.scores = jax.device_put(np.full((len(queries), self.k), -np.inf, np.float32),
                                 self._replicated)
    self.ids = jax.device_put(np.full((len(queries), self.k), -1, np.int32), self._replicated)

  def update(self, block: jax.Array, block_ids: jax.Array) -> None:
    """Folds in one block [rows, embed] with ids [rows] (-1: padding), rows split over devices."""
    self.scores, self.ids = _merge(self.queries, self.scores, self.ids, block, block_ids,
                                   mesh=self.mesh, k=self.k)

  def result(self) -> Tuple[np.ndarray, np.ndarray]:
    """(scores [q, k] float32, corpus ids [q, k] int32), best first; -1 where none."""
    return np.asarray(self.scores), np.asarray(self.ids)
