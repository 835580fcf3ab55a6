"""Attention within packed sequences by blocks met at run time (models/packed_attention.py) equals
masked attention: values and gradients, causal and bidirectional, grouped-query heads, rows that
are not a multiple of the block, padding and fully padded rows; the loop skips what packing
leaves empty; the language model takes it for long rows off TPU."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmembed_jax.demo.tiny_model import tiny_config
from mmembed_jax.models import packed_attention
from mmembed_jax.models.layers import dot_product_attention
from mmembed_jax.models.llm import TextDecoder, attention_mask

HEADS, KV_HEADS, HEAD_DIM, BLOCK = 4, 2, 8, 32


def _segments(n, lengths):
  """Segment ids [n]: sequences of the given lengths back to back (ids 1..k), then padding."""
  ids = np.zeros(n, np.int32)
  start = 0
  for s, length in enumerate(lengths, start=1):
    ids[start:start + length] = s
    start += length
  return ids


def _batch(n=150):
  rows = [_segments(n, [40, 3, 70, 20]),  # crosses block edges; 17 padding tokens
          _segments(n, [n]),  # one sequence: every block meets every block
          _segments(n, [1] * 30 + [90]),  # many tiny sequences, then a long one
          np.zeros(n, np.int32)]  # all padding
  segment_ids = jnp.asarray(np.stack(rows))
  keys = jax.random.split(jax.random.key(1), 4)
  query = jax.random.normal(keys[0], (4, n, HEADS, HEAD_DIM))
  key = jax.random.normal(keys[1], (4, n, KV_HEADS, HEAD_DIM))
  value = jax.random.normal(keys[2], (4, n, KV_HEADS, HEAD_DIM))
  weights = jax.random.normal(keys[3], (4, n, HEADS, HEAD_DIM))
  return query, key, value, segment_ids, weights


@pytest.mark.parametrize("chunks", [2, 8])  # 5 blocks: chunks of 3 (one block of padding) or 1
@pytest.mark.parametrize("causal", [False, True])
def test_values_and_gradients_equal_masked_attention(causal, chunks):
  query, key, value, segment_ids, weights = _batch()
  real = (segment_ids > 0)[..., None, None]

  def loss(attend, q, k, v):  # padding positions excluded: masked attention averages there
    return jnp.sum(jnp.where(real, attend(q, k, v) * weights, 0.0))

  blocks = lambda q, k, v: packed_attention.attend(q, k, v, segment_ids, causal, jnp.float32,
                                                   block=BLOCK, chunks=chunks)
  masked = lambda q, k, v: dot_product_attention(
      q, k, v, attention_mask(segment_ids, causal=causal), jnp.float32)
  out = jax.jit(blocks)(query, key, value)
  expected = masked(query, key, value)
  assert np.abs(np.where(real, out - expected, 0.0)).max() <= 1e-5
  assert not np.asarray(out)[~np.asarray(segment_ids > 0)].any()  # padding gives zeros
  grads = jax.jit(jax.grad(lambda *x: loss(blocks, *x), argnums=(0, 1, 2)))(query, key, value)
  want = jax.grad(lambda *x: loss(masked, *x), argnums=(0, 1, 2))(query, key, value)
  for name, got, exp in zip("qkv", grads, want):
    assert np.abs(got - exp).max() <= 1e-5 * np.abs(exp).max(), name


def test_each_query_block_meets_only_the_key_blocks_its_sequences_reach():
  segment_ids = jnp.asarray(np.stack([_segments(256, [60, 60, 60, 60]),
                                      _segments(256, [256]), np.zeros(256, np.int32)]))
  low, span = packed_attention.key_ranges(segment_ids, BLOCK, causal=False)
  # Row 0, blocks of 32: sequences [0, 60), [60, 120), [120, 180), [180, 240), padding after.
  np.testing.assert_array_equal(low[0], [0, 0, 1, 1, 3, 3, 5, 5])
  np.testing.assert_array_equal(span[0], [2, 4, 3, 5, 3, 5, 3, 3])  # 5 steps of the loop, not 8
  np.testing.assert_array_equal(span[1], [8] * 8)
  np.testing.assert_array_equal(span[2], [0] * 8)  # nothing to attend: the loop skips it
  _, causal_span = packed_attention.key_ranges(segment_ids, BLOCK, causal=True)
  np.testing.assert_array_equal(causal_span[1], np.arange(1, 9))


def test_the_loop_takes_each_chunk_of_query_blocks_to_its_widest_span():
  segment_ids = jnp.asarray(np.stack([_segments(256, [60, 60, 60, 60]),
                                      _segments(256, [256]), np.zeros(256, np.int32)]))
  work = packed_attention.work_list(segment_ids, BLOCK, chunk=2, causal=False)
  # Row 0's spans [2, 4, 3, 5, 3, 5, 3, 3] by width: 5 5 | 4 3 | 3 3 | 3 2 -> 15 steps of 2
  # blocks (30 block pairs for the 28 needed; one batch-wide span would take 8 x 5 = 40).
  np.testing.assert_array_equal(work.order[0], [3, 5, 1, 2, 4, 6, 7, 0])
  np.testing.assert_array_equal(work.ends[0], [5, 9, 12, 15])
  np.testing.assert_array_equal(work.ends[1], [8, 16, 24, 32])  # one sequence: every pair
  np.testing.assert_array_equal(work.ends[2], [0, 0, 0, 0])  # padding: no step
  causal = packed_attention.work_list(segment_ids, BLOCK, chunk=2, causal=True)
  np.testing.assert_array_equal(causal.ends[1], [8, 14, 18, 20])  # spans 8 7 | 6 5 | 4 3 | 2 1


@pytest.mark.parametrize("attention", ["bidirectional", "causal"])
def test_the_language_model_takes_blocks_for_long_rows_and_matches_masked_attention(attention):
  """3 layers over 512-token rows (hidden states of size ~4), 4 blocks: 4.8e-7 apart."""
  config = tiny_config(attention=attention)
  n = 2 * packed_attention.MIN_LENGTH  # 4 blocks
  segment_ids = jnp.asarray(np.stack([_segments(n, [200, 100, 150]),
                                      _segments(n, [n - 5])]))
  positions = jnp.where(segment_ids > 0, jnp.arange(n), 0)[:, None, :].repeat(3, axis=1)
  embeds = jax.random.normal(jax.random.key(0), (2, n, config.text.hidden_size))
  decoder = TextDecoder(config)
  params = decoder.init(jax.random.key(1), embeds, segment_ids, positions)
  by_blocks = jax.jit(decoder.apply)(params, embeds, segment_ids, positions)
  masked = jax.jit(TextDecoder(config.replace(attention_impl="xla")).apply)(
      params, embeds, segment_ids, positions)
  real = (segment_ids > 0)[..., None]
  assert np.abs(np.where(real, by_blocks - masked, 0.0)).max() <= 1e-5


def test_rows_sharded_over_devices_give_the_same_values_and_gradients():
  query, key, value, segment_ids, weights = _batch()
  mesh = jax.make_mesh((4,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))

  def loss(q, k, v, ids):
    out = packed_attention.attend(q, k, v, ids, True, jnp.float32, block=BLOCK, chunks=2)
    return jnp.sum(out * weights)

  step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))
  expected = step(query, key, value, segment_ids)
  with jax.set_mesh(mesh):
    got = step(*jax.device_put((query, key, value, segment_ids), rows))
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(expected)):
    assert np.abs(np.asarray(a) - np.asarray(b)).max() <= 1e-6 * np.abs(np.asarray(b)).max()
