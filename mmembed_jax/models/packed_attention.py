"""Attention within packed sequences that skips, at run time, the blocks they leave empty (the
LLM's path off TPU for long rows, and the vision tower's full layers).

A packed row holds several sequences back to back (segment ids 1..k, 0 = padding); masked
attention computes [length, length] scores per head although a query meets only its own
sequence. Here queries and keys are cut into blocks of `block` tokens. Query block i meets key
blocks low_i .. low_i + span_i - 1: from the block where its first token's sequence starts to
the block where its last token's sequence ends (never past i when causal).

The work is a list made at run time: each row's query blocks sorted by span, widest first, and
cut into chunks of `chunk` blocks; chunk c takes as many loop steps as its widest block's span,
and step t scores each of its query blocks against key block low + t, folded into an online
softmax (flash attention's). A while loop runs to the longest row's list, so the work is about
the sum of the spans (what the sequences need), not blocks x widest span, and no [length,
length] array exists. The backward pass (a custom VJP) walks the same list, recomputing the
scores from the saved log-sum-exp. Padding queries give zeros.
"""
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from mmembed_jax.models.block_attention import segment_bounds
from mmembed_jax.models.layers import NEG_INF

BLOCK = 128
MIN_LENGTH = 2 * BLOCK  # shorter rows take the masked path (one or two blocks gain nothing)
CHUNKS = 16  # a row's query blocks go in about this many chunks (more: less work, more steps)


def key_ranges(segment_ids: jax.Array, block: int, causal: bool) -> tuple[jax.Array, jax.Array]:
  """(low, span) int32 [batch, blocks]: each query block's first key block and how many key
  blocks it meets (0 for a block of padding); segment_ids [batch, n], n a multiple of `block`."""
  batch, n = segment_ids.shape
  blocks = n // block
  start, end = jax.vmap(segment_bounds)(segment_ids)  # [batch, n]
  valid = (segment_ids > 0).reshape(batch, blocks, block)
  offset = jnp.arange(blocks, dtype=jnp.int32) * block
  first = offset + jnp.argmax(valid, axis=-1)
  last = offset + block - 1 - jnp.argmax(valid[..., ::-1], axis=-1)
  low = jnp.take_along_axis(start, first, axis=1) // block
  high = (jnp.take_along_axis(end, last, axis=1) - 1) // block
  if causal:
    high = jnp.minimum(high, jnp.arange(blocks, dtype=jnp.int32))
  has_valid = valid.any(axis=-1)
  return jnp.where(has_valid, low, 0), jnp.where(has_valid, high - low + 1, 0)


class WorkList(NamedTuple):
  """Each row's loop steps (int32 arrays, computed once per call)."""
  low: jax.Array  # [batch, blocks] each query block's first key block
  span: jax.Array  # [batch, blocks] how many key blocks it meets
  order: jax.Array  # [batch, blocks] query blocks by span, widest first; chunk c = [c*C, c*C+C)
  ends: jax.Array  # [batch, chunks] the loop step at which each chunk's steps end
  steps: jax.Array  # [batch, chunks] each chunk's steps (its widest span)


def work_list(segment_ids: jax.Array, block: int, chunk: int, causal: bool) -> WorkList:
  """The work list of `segment_ids` [batch, n] (n a multiple of block x chunk)."""
  low, span = key_ranges(segment_ids, block, causal)
  order = jnp.argsort(-span, axis=1, stable=True).astype(jnp.int32)
  steps = jnp.take_along_axis(span, order[:, ::chunk], axis=1)
  return WorkList(low, span, order, jnp.cumsum(steps, axis=1), steps)


def _item(k, work: WorkList, chunk: int):
  """Loop step k of every row: (query blocks int [b, C], t int [b], whether the row has step k
  bool [b])."""
  chunks = work.ends.shape[1]
  c = jnp.sum(work.ends <= k, axis=1)  # [b]
  active = c < chunks
  c = jnp.minimum(c, chunks - 1)[:, None]
  t = k - (jnp.take_along_axis(work.ends, c, axis=1) - jnp.take_along_axis(work.steps, c, axis=1))
  blocks = jnp.take_along_axis(work.order, c * chunk + jnp.arange(chunk), axis=1)
  return blocks, t[:, 0], active


def _blocked(x: jax.Array, block: int) -> jax.Array:
  """[batch, n, ...] -> [batch, n // block, block, ...]."""
  return x.reshape((x.shape[0], x.shape[1] // block, block) + x.shape[2:])


def _gather(x: jax.Array, index: jax.Array) -> jax.Array:
  """x [b, nb, ...] at block index [b, C] -> [b, C, ...]."""
  return jnp.take_along_axis(x, index.reshape(index.shape + (1,) * (x.ndim - 2)), axis=1)


def _step(k, qb, kb, vb, ids, work, chunk, causal, scale, dtype):
  """Loop step k: (query blocks [b, C], key blocks [b, C], q [b, C, B, kvh, g, d], k, v [b, C, B,
  kvh, d], scores f32 [b, C, kvh, g, B, B], mask bool broadcastable to it)."""
  blocks_total, block = ids.shape[1], ids.shape[2]
  blocks, t, active = _item(k, work, chunk)
  j = jnp.minimum(_gather(work.low, blocks) + t[:, None], blocks_total - 1)  # [b, C]
  qi, kj, vj = _gather(qb, blocks), _gather(kb, j), _gather(vb, j)
  q_ids, k_ids = _gather(ids, blocks), _gather(ids, j)  # [b, C, B]
  scores = jnp.einsum("biqhgd,bikhd->bihgqk", qi.astype(dtype), kj.astype(dtype),
                      preferred_element_type=jnp.float32) * scale
  live = (t[:, None] < _gather(work.span, blocks)) & active[:, None]  # [b, C]
  mask = ((q_ids[:, :, :, None] == k_ids[:, :, None, :]) & (q_ids[:, :, :, None] > 0)
          & live[:, :, None, None])  # [b, C, Bq, Bk]
  if causal:
    q_pos = blocks[:, :, None] * block + jnp.arange(block)  # [b, C, B]
    k_pos = j[:, :, None] * block + jnp.arange(block)
    mask &= q_pos[:, :, :, None] >= k_pos[:, :, None, :]
  return blocks, j, qi, kj, vj, scores, mask[:, :, None, None]


def _forward(qb, kb, vb, ids, work, chunk, causal, scale, dtype):
  """(out f32 [b, nb, kvh, g, B, d], log-sum-exp f32 [b, nb, kvh, g, B])."""
  b, nb, block, kvh, groups, d = qb.shape
  stat_shape = (b, nb, kvh, groups, block)
  rows = jnp.arange(b)[:, None]

  def body(carry):
    k, peak, total, acc = carry
    blocks, _, _, _, vj, scores, mask = _step(k, qb, kb, vb, ids, work, chunk, causal, scale,
                                              dtype)
    peak_c, total_c, acc_c = (_gather(x, blocks) for x in (peak, total, acc))
    scores = jnp.where(mask, scores, NEG_INF)
    new_peak = jnp.maximum(peak_c, scores.max(axis=-1))
    weights = jnp.where(mask, jnp.exp(scores - new_peak[..., None]), 0.0)
    rescale = jnp.exp(peak_c - new_peak)
    acc_c = acc_c * rescale[..., None] + jnp.einsum(
        "bihgqk,bikhd->bihgqd", weights.astype(dtype), vj.astype(dtype),
        preferred_element_type=jnp.float32)
    total_c = total_c * rescale + weights.sum(axis=-1)
    return (k + 1, peak.at[rows, blocks].set(new_peak), total.at[rows, blocks].set(total_c),
            acc.at[rows, blocks].set(acc_c))

  init = (jnp.int32(0), jnp.full(stat_shape, NEG_INF, jnp.float32),
          jnp.zeros(stat_shape, jnp.float32), jnp.zeros(stat_shape + (d,), jnp.float32))
  _, peak, total, acc = jax.lax.while_loop(lambda c: c[0] < work.ends[:, -1].max(), body, init)
  out = acc / jnp.where(total > 0, total, 1.0)[..., None]
  lse = jnp.where(total > 0, peak + jnp.log(jnp.where(total > 0, total, 1.0)), 0.0)
  return out, lse


def _query_blocks(x: jax.Array, kv_heads: int, block: int) -> jax.Array:
  """[b, n, heads, d] -> [b, nb, B, kvh, g, d] (head h uses kv head h // g)."""
  b, n, heads, d = x.shape
  return _blocked(x.reshape(b, n, kv_heads, heads // kv_heads, d), block)


def _layouts(query, key, value, segment_ids, block):
  """Blocked, grouped operands: q [b, nb, B, kvh, g, d], k, v [b, nb, B, kvh, d], ids [b, nb, B]."""
  return (_query_blocks(query, key.shape[2], block), _blocked(key, block), _blocked(value, block),
          _blocked(segment_ids, block))


def _to_rows(x: jax.Array) -> jax.Array:
  """[b, nb, kvh, g, B, d] -> [b, n, heads, d]."""
  b, nb, kvh, groups, block, d = x.shape
  return jnp.transpose(x, (0, 1, 4, 2, 3, 5)).reshape(b, nb * block, kvh * groups, d)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7))
def _attend(query, key, value, segment_ids, block, chunk, causal, dtype):
  return _attend_fwd(query, key, value, segment_ids, block, chunk, causal, dtype)[0]


def _attend_fwd(query, key, value, segment_ids, block, chunk, causal, dtype):
  qb, kb, vb, ids = _layouts(query, key, value, segment_ids, block)
  work = work_list(segment_ids, block, chunk, causal)
  out, lse = _forward(qb, kb, vb, ids, work, chunk, causal, query.shape[-1]**-0.5, dtype)
  out = _to_rows(out).astype(query.dtype)
  return out, (query, key, value, segment_ids, out, lse, work)


def _attend_bwd(block, chunk, causal, dtype, residuals, d_out):
  query, key, value, segment_ids, out, lse, work = residuals
  qb, kb, vb, ids = _layouts(query, key, value, segment_ids, block)
  b, nb, _, kvh, groups, d = qb.shape
  scale = d**-0.5
  d_out_b = _query_blocks(d_out, kvh, block).astype(jnp.float32)  # [b, nb, B, kvh, g, d]
  delta = jnp.einsum("biqhgd,biqhgd->bihgq", d_out_b,
                     _query_blocks(out, kvh, block).astype(jnp.float32))
  rows = jnp.arange(b)[:, None]

  def body(carry):
    k, dq, dk, dv = carry
    blocks, j, qi, kj, vj, scores, mask = _step(k, qb, kb, vb, ids, work, chunk, causal, scale,
                                                dtype)
    d_out_c = _gather(d_out_b, blocks)
    probs = jnp.where(mask, jnp.exp(scores - _gather(lse, blocks)[..., None]), 0.0)
    dv = dv.at[rows, j].add(jnp.einsum("bihgqk,biqhgd->bikhd", probs.astype(dtype),
                                       d_out_c.astype(dtype), preferred_element_type=jnp.float32))
    d_probs = jnp.einsum("biqhgd,bikhd->bihgqk", d_out_c.astype(dtype), vj.astype(dtype),
                         preferred_element_type=jnp.float32)
    d_scores = (probs * (d_probs - _gather(delta, blocks)[..., None]) * scale).astype(dtype)
    dq = dq.at[rows, blocks].add(jnp.einsum("bihgqk,bikhd->biqhgd", d_scores, kj.astype(dtype),
                                            preferred_element_type=jnp.float32))
    dk = dk.at[rows, j].add(jnp.einsum("bihgqk,biqhgd->bikhd", d_scores, qi.astype(dtype),
                                       preferred_element_type=jnp.float32))
    return k + 1, dq, dk, dv

  init = (jnp.int32(0), jnp.zeros(qb.shape, jnp.float32), jnp.zeros(kb.shape, jnp.float32),
          jnp.zeros(vb.shape, jnp.float32))
  _, dq, dk, dv = jax.lax.while_loop(lambda c: c[0] < work.ends[:, -1].max(), body, init)
  n = query.shape[1]
  return (dq.reshape(query.shape).astype(query.dtype),
          dk.reshape(b, n, kvh, d).astype(key.dtype), dv.reshape(b, n, kvh, d).astype(value.dtype),
          None)


_attend.defvjp(_attend_fwd, _attend_bwd)


def attend(query: jax.Array, key: jax.Array, value: jax.Array, segment_ids: jax.Array,
           causal: bool, dtype, block: int = BLOCK, chunks: int = CHUNKS) -> jax.Array:
  """Softmax attention within each row's segments (causal or not), by blocks met at run time.

  query [batch, n, heads, head_dim]; key, value [batch, n, kv_heads, head_dim] (grouped-query
  heads as transformers' repeat_kv); segment_ids int [batch, n] (contiguous runs of equal ids,
  0 = padding). Returns [batch, n, heads, head_dim]; padding positions get zeros.
  """
  n = query.shape[1]
  chunk = -(-n // (block * chunks))  # query blocks per chunk
  padded = -(-n // (block * chunk)) * block * chunk
  pad = ((0, 0), (0, padded - n), (0, 0), (0, 0))
  query, key, value = (jnp.pad(x, pad) for x in (query, key, value))
  segment_ids = jnp.pad(segment_ids, ((0, 0), (0, padded - n)))
  out = _attend(query, key, value, segment_ids, block, chunk, causal, dtype)
  return checkpoint_name(out[:, :n].astype(dtype), "attention_out")
