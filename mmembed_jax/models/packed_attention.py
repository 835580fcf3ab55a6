"""Attention within packed sequences that skips, at run time, the blocks they leave empty (the
LLM's path off TPU for long rows).

A packed row holds several sequences back to back (segment ids 1..k, 0 = padding); masked
attention computes [length, length] scores per head although a query meets only its own
sequence. Here queries and keys are cut into blocks of `block` tokens. Query block i meets key
blocks low_i .. low_i + span_i - 1: from the block where its first token's sequence starts to
the block where its last token's sequence ends (never past i when causal). A while loop steps
t = 0, 1, ... up to the batch's widest span; step t scores every query block against its key
block low_i + t and folds them into an online softmax (flash attention's), so the work is
blocks x widest span, not blocks x blocks, and no [length, length] array exists. The backward
pass (a custom VJP) walks the same loop, recomputing the scores from the saved log-sum-exp.
Padding queries give zeros.
"""
import functools

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from mmembed_jax.models.block_attention import segment_bounds
from mmembed_jax.models.layers import NEG_INF

BLOCK = 128
MIN_LENGTH = 2 * BLOCK  # shorter rows take the masked path (one or two blocks gain nothing)


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


def _blocked(x: jax.Array, block: int) -> jax.Array:
  """[batch, n, ...] -> [batch, n // block, block, ...]."""
  return x.reshape((x.shape[0], x.shape[1] // block, block) + x.shape[2:])


def _step(t, qb, kb, vb, ids, low, span, causal, scale, dtype):
  """Step t's key blocks and scores: (key block index [b, nb], k, v [b, nb, B, kvh, d],
  scores f32 [b, nb, kvh, g, B, B], mask bool of the same shape)."""
  blocks, block = ids.shape[1], ids.shape[2]
  j = jnp.minimum(low + t, blocks - 1)  # [b, nb]
  index = j[:, :, None, None, None]
  kj = jnp.take_along_axis(kb, index, axis=1)
  vj = jnp.take_along_axis(vb, index, axis=1)
  k_ids = jnp.take_along_axis(ids, j[:, :, None], axis=1)  # [b, nb, B]
  scores = jnp.einsum("biqhgd,bikhd->bihgqk", qb.astype(dtype), kj.astype(dtype),
                      preferred_element_type=jnp.float32) * scale
  mask = ((ids[:, :, :, None] == k_ids[:, :, None, :]) & (ids[:, :, :, None] > 0)
          & (t < span)[:, :, None, None])  # [b, nb, Bq, Bk]
  if causal:
    q_pos = jnp.arange(blocks)[:, None] * block + jnp.arange(block)  # [nb, B]
    k_pos = j[:, :, None] * block + jnp.arange(block)  # [b, nb, B]
    mask &= q_pos[None, :, :, None] >= k_pos[:, :, None, :]
  return j, kj, vj, scores, mask[:, :, None, None]


def _forward(qb, kb, vb, ids, low, span, causal, scale, dtype):
  """(out f32 [b, nb, kvh, g, B, d], log-sum-exp f32 [b, nb, kvh, g, B])."""
  b, nb, block, kvh, groups, d = qb.shape
  stat_shape = (b, nb, kvh, groups, block)

  def body(carry):
    t, peak, total, acc = carry
    _, _, vj, scores, mask = _step(t, qb, kb, vb, ids, low, span, causal, scale, dtype)
    scores = jnp.where(mask, scores, NEG_INF)
    new_peak = jnp.maximum(peak, scores.max(axis=-1))
    weights = jnp.where(mask, jnp.exp(scores - new_peak[..., None]), 0.0)
    rescale = jnp.exp(peak - new_peak)
    acc = acc * rescale[..., None] + jnp.einsum(
        "bihgqk,bikhd->bihgqd", weights.astype(dtype), vj.astype(dtype),
        preferred_element_type=jnp.float32)
    return t + 1, new_peak, total * rescale + weights.sum(axis=-1), acc

  init = (jnp.int32(0), jnp.full(stat_shape, NEG_INF, jnp.float32),
          jnp.zeros(stat_shape, jnp.float32), jnp.zeros(stat_shape + (d,), jnp.float32))
  _, peak, total, acc = jax.lax.while_loop(lambda c: c[0] < span.max(), body, init)
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


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _attend(query, key, value, segment_ids, block, causal, dtype):
  return _attend_fwd(query, key, value, segment_ids, block, causal, dtype)[0]


def _attend_fwd(query, key, value, segment_ids, block, causal, dtype):
  qb, kb, vb, ids = _layouts(query, key, value, segment_ids, block)
  low, span = key_ranges(segment_ids, block, causal)
  out, lse = _forward(qb, kb, vb, ids, low, span, causal, query.shape[-1]**-0.5, dtype)
  out = _to_rows(out).astype(query.dtype)
  return out, (query, key, value, segment_ids, out, lse, low, span)


def _attend_bwd(block, causal, dtype, residuals, d_out):
  query, key, value, segment_ids, out, lse, low, span = residuals
  qb, kb, vb, ids = _layouts(query, key, value, segment_ids, block)
  b, nb, _, kvh, groups, d = qb.shape
  scale = d**-0.5
  d_out_b = _query_blocks(d_out, kvh, block).astype(jnp.float32)
  delta = jnp.einsum("biqhgd,biqhgd->bihgq", d_out_b,
                     _query_blocks(out, kvh, block).astype(jnp.float32))
  rows = jnp.arange(b)[:, None]

  def body(carry):
    t, dq, dk, dv = carry
    j, kj, vj, scores, mask = _step(t, qb, kb, vb, ids, low, span, causal, scale, dtype)
    probs = jnp.where(mask, jnp.exp(scores - lse[..., None]), 0.0)  # [b, nb, kvh, g, Bq, Bk]
    dv = dv.at[rows, j].add(jnp.einsum("bihgqk,biqhgd->bikhd", probs.astype(dtype),
                                       d_out_b.astype(dtype), preferred_element_type=jnp.float32))
    d_probs = jnp.einsum("biqhgd,bikhd->bihgqk", d_out_b.astype(dtype), vj.astype(dtype),
                         preferred_element_type=jnp.float32)
    d_scores = (probs * (d_probs - delta[..., None]) * scale).astype(dtype)
    dq = dq + jnp.einsum("bihgqk,bikhd->biqhgd", d_scores, kj.astype(dtype),
                         preferred_element_type=jnp.float32)
    dk = dk.at[rows, j].add(jnp.einsum("bihgqk,biqhgd->bikhd", d_scores, qb.astype(dtype),
                                       preferred_element_type=jnp.float32))
    return t + 1, dq, dk, dv

  init = (jnp.int32(0), jnp.zeros(qb.shape, jnp.float32), jnp.zeros(kb.shape, jnp.float32),
          jnp.zeros(vb.shape, jnp.float32))
  _, dq, dk, dv = jax.lax.while_loop(lambda c: c[0] < span.max(), body, init)
  n = query.shape[1]
  return (dq.reshape(query.shape).astype(query.dtype),
          dk.reshape(b, n, kvh, d).astype(key.dtype), dv.reshape(b, n, kvh, d).astype(value.dtype),
          None)


_attend.defvjp(_attend_fwd, _attend_bwd)


def attend(query: jax.Array, key: jax.Array, value: jax.Array, segment_ids: jax.Array,
           causal: bool, dtype, block: int = BLOCK) -> jax.Array:
  """Softmax attention within each row's segments (causal or not), by blocks met at run time.

  query [batch, n, heads, head_dim]; key, value [batch, n, kv_heads, head_dim] (grouped-query
  heads as transformers' repeat_kv); segment_ids int [batch, n]. Returns [batch, n, heads,
  head_dim]; padding positions get zeros.
  """
  n = query.shape[1]
  padded = -(-n // block) * block
  pad = ((0, 0), (0, padded - n), (0, 0), (0, 0))
  query, key, value = (jnp.pad(x, pad) for x in (query, key, value))
  segment_ids = jnp.pad(segment_ids, ((0, 0), (0, padded - n)))
  out = _attend(query, key, value, segment_ids, block, causal, dtype)
  return checkpoint_name(out[:, :n].astype(dtype), "attention_out")
