"""Attention within contiguous segments, computed block by block (the vision tower's XLA path).

The vision tower attends within an image frame (full layers) or within a window of a frame
(Qwen2.5-VL's windowed layers). Masked attention over the whole patch buffer computes
[patches, patches] scores per head, nearly all of them masked. Here the buffer is cut into
blocks of `block` patches and each query block meets only the key blocks its segments reach:
from the block holding the start of its first patch's segment to the block holding the end of
its last patch's segment. Segments must be contiguous runs of equal ids (0 = padding, which
attends to nothing); the tower sorts Qwen2.5-VL's patches window by window to make windows so.

Shapes are static: with segments of at most `max_segment` patches, a segment crosses at most
K = ceil((max_segment - 1) / block) block boundaries and one segment crosses each boundary, so
a row needs at most blocks * (K + 2) (query block, key block) pairs (`pair_budget`). The scores
are [pairs, heads, block, block] instead of [heads, patches, patches]; the softmax of a query
row is combined across its pairs with a shared maximum (computed without gradient: the result
does not depend on it). A row whose segments break the promise (a segment longer than
`max_segment`) would need more pairs than the budget: its output is NaN, never silently wrong.
"""
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from mmembed_jax.models.layers import NEG_INF

BLOCK_SIZES = (16, 32, 64, 128, 256, 512)


def keys_per_query(block: int, max_segment: int) -> int:
  """Keys each query meets with blocks of `block` for segments of at most `max_segment`."""
  return (math.ceil(max(max_segment - 1, 0) / block) + 2) * block


def choose_block(length: int, max_segment: int) -> int:
  """The largest block whose keys per query (with `length` padded up to a multiple of it) are
  within 1.25x of the fewest any block gives: each pair gathers a key block, so small blocks
  hold (keys per query / block) copies of the keys, which the backward pass keeps."""
  def keys(block):
    padded = -(-length // block) * block
    return padded * keys_per_query(block, max_segment)
  fewest = min(keys(block) for block in BLOCK_SIZES)
  return max(block for block in BLOCK_SIZES if keys(block) <= 1.25 * fewest)


def pair_budget(blocks: int, block: int, max_segment: int) -> int:
  """(query block, key block) pairs that always suffice for a row of `blocks` blocks."""
  return min(blocks * (keys_per_query(block, max_segment) // block), blocks * blocks)


def score_share(length: int, max_segment: int) -> float:
  """The score entries blocks compute, as a share of masked attention's [length, length]."""
  block = choose_block(length, max_segment)
  blocks = -(-length // block)
  return pair_budget(blocks, block, max_segment) * block * block / (length * length)


def segment_bounds(segment_ids: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(start, end) int32 [n]: the index range [start, end) of each position's run of equal ids."""
  n = segment_ids.shape[0]
  index = jnp.arange(n, dtype=jnp.int32)
  changes = segment_ids[1:] != segment_ids[:-1]
  opens = jnp.concatenate([jnp.ones((1,), bool), changes])
  closes = jnp.concatenate([changes, jnp.ones((1,), bool)])
  start = jax.lax.cummax(jnp.where(opens, index, 0), axis=0)
  end = jax.lax.cummin(jnp.where(closes, index + 1, n), axis=0, reverse=True)
  return start, end


def block_pairs(segment_ids: jax.Array, block: int, num_pairs: int
                ) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
  """(query_block, key_block, used, overflow) of one row, segment_ids int [n] (n a multiple of
  `block`): `num_pairs` pairs, sorted by query block; `used` bool [num_pairs] marks real pairs;
  `overflow` says the row needed more than `num_pairs`."""
  n = segment_ids.shape[0]
  blocks = n // block
  start, end = segment_bounds(segment_ids)
  valid = (segment_ids > 0).reshape(blocks, block)
  has_valid = valid.any(axis=1)
  first = jnp.argmax(valid, axis=1)
  last = block - 1 - jnp.argmax(valid[:, ::-1], axis=1)
  offset = jnp.arange(blocks, dtype=jnp.int32) * block
  own = jnp.arange(blocks, dtype=jnp.int32)
  low = jnp.where(has_valid, start[offset + first] // block, own)
  high = jnp.where(has_valid, (end[offset + last] - 1) // block, own)
  count = high - low + 1  # [blocks]
  ends = jnp.cumsum(count)
  pair = jnp.arange(num_pairs, dtype=jnp.int32)
  query_block = jnp.minimum(jnp.searchsorted(ends, pair, side="right"), blocks - 1)
  key_block = low[query_block] + pair - (ends[query_block] - count[query_block])
  used = pair < ends[-1]
  return query_block, jnp.where(used, key_block, query_block), used, ends[-1] > num_pairs


class BlockPlan(NamedTuple):
  """Which blocks meet, per row (int arrays; computed once, shared by every layer)."""
  segment_ids: jax.Array  # [batch, padded] the ids padded to a multiple of the block with 0
  query_block: jax.Array  # [batch, pairs]
  key_block: jax.Array  # [batch, pairs]
  used: jax.Array  # bool [batch, pairs]
  overflow: jax.Array  # bool [batch]: a segment was longer than promised


def plan(segment_ids: jax.Array, max_segment: int) -> BlockPlan:
  """The plan of `segment_ids` int [batch, n] (contiguous runs of at most `max_segment`)."""
  batch, n = segment_ids.shape
  block = choose_block(n, max_segment)
  padded = -(-n // block) * block
  segment_ids = jnp.pad(segment_ids, ((0, 0), (0, padded - n)))
  num_pairs = pair_budget(padded // block, block, max_segment)
  pairs = jax.vmap(lambda ids: block_pairs(ids, block, num_pairs))(segment_ids)
  return BlockPlan(segment_ids, *pairs)


def _attend_row(query, key, value, segment_ids, query_block, key_block, used, overflow,
                block: int, dtype):
  """One row: query/key/value [n, heads, head_dim] (n a multiple of `block`) -> the same."""
  n, heads, head_dim = query.shape
  blocks = n // block

  def gather(x, index):  # [n, ...] -> [pairs, block, ...]
    return x.reshape((blocks, block) + x.shape[1:])[index]

  q, k, v = gather(query, query_block), gather(key, key_block), gather(value, key_block)
  q_ids, k_ids = gather(segment_ids, query_block), gather(segment_ids, key_block)
  scores = jnp.einsum("pqhd,pkhd->phqk", q.astype(dtype), k.astype(dtype),
                      preferred_element_type=jnp.float32) * (head_dim**-0.5)
  mask = ((q_ids[:, :, None] == k_ids[:, None, :]) & (q_ids[:, :, None] > 0)
          & used[:, None, None])[:, None]  # [pairs, 1, block, block]
  scores = jnp.where(mask, scores, NEG_INF)
  segment = dict(segment_ids=query_block, num_segments=blocks, indices_are_sorted=True)
  peak = jax.lax.stop_gradient(jax.ops.segment_max(scores.max(axis=-1), **segment))
  weights = jnp.where(mask, jnp.exp(scores - peak[query_block][..., None]), 0.0)
  total = jax.ops.segment_sum(weights.sum(axis=-1), **segment)  # [blocks, heads, block]
  mixed = jax.ops.segment_sum(
      jnp.einsum("phqk,pkhd->phqd", weights.astype(dtype), v.astype(dtype),
                 preferred_element_type=jnp.float32), **segment)  # [blocks, heads, block, d]
  out = mixed / jnp.where(total > 0, total, 1.0)[..., None]
  out = jnp.transpose(out, (0, 2, 1, 3)).reshape(n, heads, head_dim)
  return jnp.where(overflow, jnp.nan, out).astype(dtype)


def attend(query: jax.Array, key: jax.Array, value: jax.Array, block_plan: BlockPlan,
           max_segment: int, dtype) -> jax.Array:
  """Softmax attention within contiguous segments, by blocks.

  query, key, value [batch, n, heads, head_dim]; `block_plan` from `plan(segment_ids,
  max_segment)` of the same n. Returns [batch, n, heads, head_dim]; padding positions get zeros.
  """
  n = query.shape[1]
  block = choose_block(n, max_segment)
  padded = block_plan.segment_ids.shape[1]
  pad = ((0, 0), (0, padded - n), (0, 0), (0, 0))
  query, key, value = (jnp.pad(x, pad) for x in (query, key, value))
  out = jax.vmap(lambda *row: _attend_row(*row, block=block, dtype=dtype))(
      query, key, value, *block_plan)
  return checkpoint_name(out[:, :n], "attention_out")
